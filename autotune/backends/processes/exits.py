"""How a worker's end is told: its exit status in words, its exception rebuilt in the
parent, and joining processes that do not want to go."""

from __future__ import annotations

import contextlib
import pickle
import signal
from typing import Any

from autotune._errors import RemoteError, add_note, has_plain_message
from autotune.backends.rows import ResultError, where

__all__ = ["describe_exit", "fileno", "join_all", "rebuild_exception", "startup_failure"]


class _RemoteTraceback(Exception):
    """The worker's traceback, attached as ``__cause__`` of a re-raised kernel error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb


def fileno(conn: Any) -> int:
    try:
        return int(conn.fileno())
    except (OSError, ValueError):
        return -1


def join_all(processes: list[Any], timeout: float) -> None:
    """Join processes; terminate, then kill, those that do not exit in time."""
    for stage in (None, "terminate", "kill"):
        alive = []
        for p in processes:
            try:
                if p.is_alive():
                    alive.append(p)
            except ValueError:  # already closed
                pass
        if not alive:
            return
        for p in alive:
            if stage is not None:
                with contextlib.suppress(OSError, ValueError):
                    getattr(p, stage)()
        for p in alive:
            p.join(timeout)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def rebuild_exception(msg: tuple) -> BaseException:
    """The kernel's exception, its type kept, the worker's traceback attached."""
    _, _, _, start, stop, exc_bytes, name, message, tb = msg
    exc: BaseException | None = None
    if exc_bytes is not None:
        try:
            exc = pickle.loads(exc_bytes)
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(f"{name}: {message}")
    place = where(exc, start, stop, "in a worker")
    if isinstance(exc, ResultError):
        # autotune's own check: the worker's traceback would show our code,
        # not the user's; the message says what was wrong.
        exc.args = (f"{exc.args[0]} [{place}]",) if len(exc.args) == 1 else exc.args
        return exc
    # Put the worker's traceback into the message itself where the exception
    # is a plain one-string exception, so that it shows in logs that print
    # only str(exc); always chain it as the cause too (as concurrent.futures).
    if has_plain_message(exc):
        exc.args = (f"{exc.args[0]}\n\n[{place}]\nWorker traceback:\n{tb}",)
    else:
        add_note(exc, f"[{place}]")
    exc.__cause__ = _RemoteTraceback(tb)
    return exc


def startup_failure(
    index: int, code: int | None, start_method: str, message: str | None
) -> RuntimeError:
    """The one error for a worker that ended before it was ready, with the likely cause.

    Parameters
    ----------
    index : int
        The worker's number.
    code : int or None
        Its exit status.
    start_method : str
        How it was started.
    message : str or None
        What the worker said (its exception and traceback), if anything.
    """
    head = (
        f"autotune worker {index} ({start_method}) ended before it was ready "
        f"({describe_exit(code) if message is None else 'it reported an error'}); "
        f"no worker is retried at start-up."
    )
    if start_method == "fork":
        cause = "Likely cause: the process ran out of memory or was killed while starting."
    else:
        cause = (
            'Likely causes: a script without `if __name__ == "__main__":` around the code '
            "that creates the Evaluator (under spawn and forkserver every worker re-imports "
            "the main module), or a module the shared data needs that the worker cannot "
            "import (an ImportError in the kernel's or the data's module)."
        )
    own = (
        f"\nThe worker's own message:\n{message.rstrip()}"
        if message
        else "\nThe worker left no message here; its traceback, if any, is on stderr above."
    )
    return RuntimeError(f"{head} {cause}{own}")
