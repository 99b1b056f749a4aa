"""A stop asked for from outside the run, turned into a checkpoint at the next step's end.

Schedulers announce the end of a job with SIGTERM and kill it a grace period later: SLURM at its
time limit or on preemption, Kubernetes when a pod is deleted or its node drained, ``timeout``,
a cluster's own job runner. Without a handler the run dies mid-step and a later start repeats
every step since the last periodic checkpoint. With :func:`stop_on_signals` around the loop the
first SIGTERM only sets a flag; the loop reads it with the step's metrics (summed over ranks in
the all-reduce it already does, so every rank stops at the same step even when one rank alone was
signalled), saves a checkpoint, and raises :class:`TrainingStopped`. Starting the same command
again resumes from that step. Further SIGTERMs change nothing: a worker under torchrun inside a
SLURM step gets one from SLURM and another from the torchrun agent that forwards its own, and
the second must not cut the checkpoint short. What ends a run at once is SIGKILL (which the
scheduler sends when its grace period is over) or SIGINT.

Only the main thread may install signal handlers: where the loop runs in another thread (a Ray
Train worker), signals keep their default and Ray's own restart from the last reported checkpoint
applies.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

# what a shell reports for a process ended by SIGTERM: schedulers read it as "terminated", not "failed"
STOPPED_EXIT_CODE = 128 + signal.SIGTERM


class TrainingStopped(Exception):
    """The run stopped early on request, after saving a checkpoint at ``step``: it is not finished,
    so a caller must not treat it as a success (no export, no record); run it again to resume."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; a checkpoint of that step was saved, "
                         "so the same command resumes there")
        self.step = step
        self.signal_name = signal_name


class StopRequest:
    """The flag a signal handler sets; ``signal_name`` is None until a stop is asked for."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def handle(self, signum: int, frame: object) -> None:
        if not self.requested:
            self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals(signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> Iterator[StopRequest]:
    """Within the block, ``signals`` set the returned request's flag instead of ending the
    process; the previous handlers come back afterwards."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
