"""Small helpers every layer uses, with one home each."""

from __future__ import annotations

import functools
import inspect
import sys
import types
import weakref
from datetime import datetime, timezone
from typing import Any

import numpy as np

__all__ = [
    "BACKENDS",
    "LOCAL_BACKENDS",
    "STRATEGIES",
    "check_int",
    "check_kernel_signature",
    "format_bytes",
    "one_line",
    "positive_int",
    "progress_bar",
    "utc_timestamp",
]

#: Every backend ``Evaluator(backend=...)`` accepts, and those that run
#: on this machine; profiles, runners, the tuner and the CLI all use these.
BACKENDS = ("processes", "threads", "dask")
LOCAL_BACKENDS = ("processes", "threads")
#: Search strategies (``autotune search --strategy``).
STRATEGIES = ("auto", "grid")


def check_int(name: str, value: Any, minimum: int = 1, *, type_error: bool = False) -> int:
    """``value`` as an ``int >= minimum``; ``bool`` is refused although Python calls it an int.

    Raises ``ValueError`` naming the argument (``TypeError`` for a value that
    is not an integer at all, with ``type_error=True``).
    """
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    message = f"{name} must be an integer >= {minimum}, got {value!r}"
    if not is_int and type_error:
        raise TypeError(message)
    if not is_int or value < minimum:
        raise ValueError(message)
    return int(value)


def positive_int(name: str, value: Any) -> int | None:
    """An optional argument that must be an ``int >= 1`` (``TypeError`` if not an integer)."""
    return None if value is None else check_int(name, value, type_error=True)


def format_bytes(n: int) -> str:
    """``49152`` -> ``"48 KiB"``, ``1310720`` -> ``"1.25 MiB"``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def utc_timestamp(when: datetime | None = None) -> str:
    """``when`` (default: now) as the profiles' ``YYYY-MM-DDTHH:MM:SSZ``."""
    when = datetime.now(timezone.utc) if when is None else when.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def progress_bar(total: int, desc: str, unit: str, *, unit_scale: bool = False) -> Any:
    """A tqdm bar on stderr that starts no thread.

    tqdm's first bar starts a monitor thread (``tqdm.monitor_interval``) that
    lives as long as the process, so every pool forked after it would fork a
    multi-threaded process: the child may deadlock on a lock the thread held
    (Python 3.12+ warns).  The monitor only redraws a bar whose updates slowed
    down after tqdm raised its ``miniters``; with ``miniters=1`` a bar redraws
    on any update ``mininterval`` after the last, so ours do without it.  It
    is switched off on a subclass: the user's own tqdm bars keep theirs.
    """
    return _bar_class()(
        total=total, desc=desc, unit=unit, unit_scale=unit_scale, miniters=1, file=sys.stderr
    )


@functools.cache
def _bar_class() -> Any:
    from tqdm import tqdm

    # The subclass shares tqdm's list of bars (positions) and, made here
    # first, its write lock: it stacks and writes like any other bar.
    tqdm.get_lock()

    class Bar(tqdm):
        monitor_interval = 0

    return Bar


def check_kernel_signature(kernel: Any, what: str = "kernel") -> None:
    """Refuse, in the parent, a kernel that cannot be called as ``kernel(shared, start, stop)``.

    Raises ``TypeError`` naming the kernel and its signature; callables
    without an inspectable signature (some builtins) pass.
    """
    code = kernel.__code__ if isinstance(kernel, types.FunctionType) else None
    if code is not None and code in _SIGNATURE_OK:
        return  # checked before (inspect.signature costs tens of microseconds)
    try:
        sig = inspect.signature(kernel)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None, 0, 0)
    except TypeError as exc:
        name = getattr(kernel, "__qualname__", None) or type(kernel).__name__
        raise TypeError(f"{what} {name}{sig} must accept (shared, start, stop): {exc}") from None
    if code is not None and not getattr(kernel, "__defaults__", None):
        _SIGNATURE_OK.add(code)


# Code objects of plain functions whose signature was found fine (a function
# with defaults is checked each time: its defaults can be reassigned).
_SIGNATURE_OK: weakref.WeakSet[Any] = weakref.WeakSet()
