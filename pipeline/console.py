"""What a job prints, read where it usually is: a file, ``ray job logs`` or a CI log, not a terminal.

``say()`` prints one line of progress from a training worker, once. Ray 2.60's Train V2 replaces ``print`` in its workers with a version that logs the message AND,
whenever ``sys.stdout`` is not ``sys.__stdout__``, prints it as well; Ray's workers always wrap
stdout, so every ``print`` in a worker reached the driver twice. Writing to the stream directly
goes around that patch (the worker's .out file and the driver still get the line, once).

``configure_output()`` (first thing in a job's ``main``) decides from ``sys.stdout``:

- on a terminal nothing changes: live progress bars and colours stay;
- elsewhere every carriage-return redraw and colour code is switched off at its source: Ray
  Data's bars on the training datasets (:func:`progress_bars`), MLflow's artifact download bars,
  any other tqdm bar in this process and the processes it starts, the colour of the
  ``(Worker pid=...)`` prefixes Ray puts on worker lines, and the colour codes in Ray's own log
  messages. Progress is then the loop's own lines (``[train] step ... pts/s ... ETA``, the
  evaluation's every 10 s) and Ray Data's periodic log lines in the preprocessing job.

``init_ray()`` connects to (or starts) Ray so that Ray Train's helper actors find this cluster
by its address; ``quiet_ray_shutdown()`` ends a successful job's Ray session with what Ray prints
while tearing down kept in a file, so the job's summary is its last line.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_configured: bool | None = None


def interactive() -> bool:
    """Whether this process writes to a terminal (its stdout)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def configure_output() -> bool:
    """Switch redraws and colours off when stdout is not a terminal; return ``interactive()``.
    Environment settings use ``setdefault``: a user's explicit choice wins."""
    global _configured
    tty = interactive()
    if _configured is not None:
        return tty
    _configured = tty
    if tty:
        return tty
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's driver-side worker-line prefix
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm >= 4.66: every other bar, here and in children
    previous = logging.getLogRecordFactory()

    def plain_records(*args: Any, **kwargs: Any) -> logging.LogRecord:
        # Ray's own messages embed colour codes (e.g. the dashboard URL at ray.init).
        record = previous(*args, **kwargs)
        if record.name.startswith("ray"):
            text = record.getMessage()
            if "\x1b" in text:
                record.msg, record.args = ANSI.sub("", text), None
        return record

    logging.setLogRecordFactory(plain_records)
    return tty


def progress_bars() -> bool:
    """Whether Ray Data should draw live bars for datasets this job creates (only on a terminal)."""
    return interactive()


def init_ray(**kwargs: Any) -> Any:
    """``ray.init`` for a job: the cluster in ``$RAY_ADDRESS`` (set by ``ray job submit``), else
    a new local instance (a bare ``ray.init()`` joins whatever instance another process started
    on the machine, and dies with it). Connecting to a cluster by address, the same address goes to the job's
    tasks and actors (``RAY_ADDRESS`` in the runtime env): Ray Train's placement-group cleaner
    looks its controller up through the State API, which without an address searches the
    machine for Ray instances and fails with a traceback when it finds several (a test
    machine, a shared node)."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS") or None
    if address and "://" not in address and address != "auto" and "runtime_env" not in kwargs:
        try:
            ray.init(address=address, runtime_env={"env_vars": {"RAY_ADDRESS": address}}, **kwargs)
            return ray
        except ValueError:  # the submitted job's runtime env sets RAY_ADDRESS itself: keep it
            pass
    ray.init(address=address or "local", **kwargs)
    return ray


def quiet_ray_shutdown(log_file: str | Path) -> None:
    """Disconnect from Ray (stopping a local instance) with this process's stdout and stderr,
    at the file-descriptor level, appended to ``log_file``: after a successful job, what Ray
    logs while its actors and workers go away (socket errors of killed actors and the like) is
    no news, and the job's summary stays its last line. Errors of the job itself come before."""
    import ray

    if not ray.is_initialized():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log_file, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                ray.shutdown()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

