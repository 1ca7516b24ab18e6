"""Small helpers every layer uses, with one home each."""

from __future__ import annotations

import inspect
from datetime import datetime, timezone
from typing import Any

import numpy as np

__all__ = ["check_kernel_signature", "one_line", "positive_int", "utc_timestamp"]


def positive_int(name: str, value: Any) -> int | None:
    """``value`` as an ``int >= 1`` (``None`` passes); ``bool`` is refused.

    Raises ``TypeError`` for a non-integer and ``ValueError`` below 1, naming
    the argument.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def utc_timestamp(when: datetime | None = None) -> str:
    """``when`` (default: now) as the profiles' ``YYYY-MM-DDTHH:MM:SSZ``."""
    when = datetime.now(timezone.utc) if when is None else when.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_kernel_signature(kernel: Any, what: str = "kernel") -> None:
    """Refuse, in the parent, a kernel that cannot be called as ``kernel(shared, start, stop)``.

    Raises ``TypeError`` naming the kernel and its signature; callables
    without an inspectable signature (some builtins) pass.
    """
    try:
        sig = inspect.signature(kernel)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None, 0, 0)
    except TypeError as exc:
        name = getattr(kernel, "__qualname__", None) or type(kernel).__name__
        raise TypeError(f"{what} {name}{sig} must accept (shared, start, stop): {exc}") from None
