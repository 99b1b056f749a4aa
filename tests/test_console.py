"""A job's output off a terminal and on one (pipeline/console.py): in a file no redraws or
colour codes, on a terminal the live bars stay. Each case is a fresh interpreter whose stdout
is a pipe or a pseudo-terminal."""
from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, logging, os, sys
from pipeline.console import configure_output, progress_bars
tty = configure_output()
logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.INFO)
logging.getLogger("ray._private.worker").info("dashboard at %s%s%s", "\\x1b[1m\\x1b[32m", "http://127.0.0.1:8265", "\\x1b[39m")
logging.getLogger("mine").info("\\x1b[33mown colour\\x1b[0m")
print(json.dumps({"tty": tty, "bars": progress_bars(), "env": {k: os.environ.get(k) for k in
      ("RAY_COLOR_PREFIX", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "TQDM_DISABLE")}}), file=sys.stderr)
"""


def run_probe(stdout) -> tuple[dict, list[str]]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_COLOR_PREFIX", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "TQDM_DISABLE")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    return json.loads(lines[-1]), lines[:-1]


def test_off_a_terminal_no_redraws_and_no_colour_codes():
    state, logged = run_probe(subprocess.PIPE)
    assert state["tty"] is False and state["bars"] is False
    assert state["env"] == {"RAY_COLOR_PREFIX": "0", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                            "TQDM_DISABLE": "1"}
    # Ray's messages lose their colour codes; other loggers' text is left as written
    assert logged == ["dashboard at http://127.0.0.1:8265", "\x1b[33mown colour\x1b[0m"]


def test_on_a_terminal_the_live_bars_stay():
    leader, follower = pty.openpty()
    try:
        state, logged = run_probe(follower)
    finally:
        os.close(follower)
        os.close(leader)
    assert state["tty"] is True and state["bars"] is True
    assert state["env"] == {"RAY_COLOR_PREFIX": None, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": None, "TQDM_DISABLE": None}
    assert logged[0] == "dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:8265\x1b[39m"
