"""The one exception type for expected failures of a preprocessing run.

A :class:`PreprocessError` is caused by what the user gave (inputs, output location, config),
not by a bug: its message is one line that names the file or folder and says what to do, and
``jobs.preprocess`` prints it without a traceback (exit 2). Bad inputs that the job can go on
without are not errors: they are quarantined and counted (``preprocessing/ingest.py``).
"""
from __future__ import annotations


class PreprocessError(RuntimeError):
    """An expected, user-caused failure; ``str(error)`` is the one-line message."""


def user_error(error: BaseException) -> BaseException | None:
    """The expected, user-caused error behind ``error``: a :class:`PreprocessError` or a bad
    input (``IngestError``, under ``fail_fast``), itself or anywhere in what it wraps (causes,
    Ray's task errors); None for anything else, which is a bug and keeps its traceback."""
    from preprocessing.formats_table import IngestError

    expected = (PreprocessError, IngestError)
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, expected):
            # Ray's task error subclasses the error it carries but prints a traceback: use the carried one
            inner = getattr(e, "cause", None)
            return inner if isinstance(inner, expected) else e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None
