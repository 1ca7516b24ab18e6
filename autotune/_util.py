"""Small helpers every layer uses, with one home each."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

__all__ = ["one_line", "positive_int", "utc_timestamp"]


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
