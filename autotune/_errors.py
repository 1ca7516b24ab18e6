"""Exceptions raised by autotune."""

from __future__ import annotations

__all__ = [
    "EfficiencyWarning",
    "ProfileError",
    "ProfileWarning",
    "RangeError",
    "RemoteError",
    "WorkerLost",
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
