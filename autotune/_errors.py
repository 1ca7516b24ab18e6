"""Exceptions raised by autotune, and the note it attaches to a kernel's."""

from __future__ import annotations

import sys

__all__ = [
    "EfficiencyWarning",
    "ProfileError",
    "ProfileWarning",
    "RangeError",
    "RemoteError",
    "WorkerLost",
    "add_note",
    "has_plain_message",
]


class ProfileError(ValueError):
    """A profile file is malformed, hostile or of an unknown schema.

    The message names the file and the field (or the problem) in one line.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        # An empty path is still a path the user gave: show it quoted.
        where = "" if self.path is None else f"{self.path or repr(self.path)}: "
        super().__init__(f"{where}{problem}")


class WorkerLost(RuntimeError):
    """A worker process died and the chunks it held could not be re-run.

    Raised after ``retries`` replacements of workers that died (SIGKILL,
    segfault, out of memory) while holding the same chunk range.
    """

    def __init__(self, message: str, *, start: int | None = None, stop: int | None = None) -> None:
        super().__init__(message)
        self.start = start
        self.stop = stop


class RangeError(RuntimeError):
    """autotune's own bug: the item ranges of a call left ``[0, n)``, overlapped or missed items.

    Every range a call hands to a kernel is checked where it is made (chunks,
    the online refinement's slices, retries after a lost worker), so this is
    raised before a kernel runs on a bad range, and a call whose chunks were
    not all accepted exactly once fails instead of returning.  It never
    comes from the user's input: please report it.
    """

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem} (a bug in autotune, not in your code: please report it)")


class ProfileWarning(UserWarning):
    """A profile was skipped or not used, or the heuristic stood in for one."""


class RemoteError(RuntimeError):
    """A kernel raised an exception that could not be sent back as itself."""


class EfficiencyWarning(RuntimeWarning):
    """A long call kept its workers busy for too little of its time.

    Issued once per evaluator, in one line saying what ``ev.stats`` suggests:
    too few chunks, one slow chunk, a kernel holding the GIL on threads, or a
    memory-bound kernel.
    """


def has_plain_message(exc: BaseException) -> bool:
    """Whether ``exc`` is a one-string exception whose ``str`` is that string.

    Such a message (``ValueError("bad item")``) can be extended in ``exc.args``
    and still read as before; ``KeyError``, ``OSError``, numpy's
    ``MemoryError`` and exceptions of several arguments format their own.
    """
    args = exc.args
    plain_str = type(exc).__str__ is BaseException.__str__
    return plain_str and len(args) == 1 and isinstance(args[0], str)


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` so that a traceback shows it under the message.

    On Python 3.11+ this is ``exc.add_note(note)``.  Python 3.10 has no notes:
    there an exception with a plain message (:func:`has_plain_message`) gets
    the note appended to it on a line of its own, where 3.11 prints it, so
    ``str(exc)`` and the traceback show it and its type, attributes, cause and
    traceback stay; any other keeps its message, which rewriting would garble,
    and gets the note in ``__notes__`` as on 3.11 (pytest and the
    ``exceptiongroup`` backport print it from there).
    """
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    elif has_plain_message(exc):
        exc.args = (f"{exc.args[0]}\n{note}",)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # type: ignore[attr-defined]
