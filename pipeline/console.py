"""One line of progress output from a training worker, printed once.

Ray 2.60's Train V2 replaces ``print`` in its workers with a version that logs the message AND,
whenever ``sys.stdout`` is not ``sys.__stdout__``, prints it as well; Ray's workers always wrap
stdout, so every ``print`` in a worker reached the driver twice. Writing to the stream directly
goes around that patch (the worker's .out file and the driver still get the line, once).
"""
from __future__ import annotations

import sys


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
