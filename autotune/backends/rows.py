"""Checks every backend applies to a map kernel's result, with the same messages."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ResultError", "check_map_result", "check_row_like", "where"]


class ResultError(ValueError):
    """autotune's own check of a kernel's result failed (not an error the kernel raised)."""


def where(exc: BaseException, start: int, stop: int, place: str) -> str:
    """The note added to an exception from a chunk: the kernel's, or autotune's check."""
    if isinstance(exc, ResultError):
        return f"found by autotune's check of the kernel's result {place}, items [{start}, {stop})"
    return f"raised by the kernel {place} on items [{start}, {stop})"


def check_map_result(result: Any, start: int, stop: int) -> np.ndarray:
    """A map kernel's result as an array whose first axis is ``stop - start`` long."""
    arr = np.asarray(result)
    if arr.ndim == 0 or arr.shape[0] != stop - start:
        got = "a scalar" if arr.ndim == 0 else f"first axis {arr.shape[0]}"
        raise ResultError(
            f"map kernel returned {got} for items [{start}, {stop}); it must return an array "
            f"(or a tuple or dict of arrays) whose first axis has length stop - start = "
            f"{stop - start}"
        )
    return arr


def check_row_like(
    arr: np.ndarray, out: np.ndarray, start: int, stop: int, label: str = ""
) -> None:
    """Refuse a map result whose rows differ in shape or dtype from the output's.

    ``label`` names the output among several (``"output 1"``).
    """
    if arr.shape[1:] != out.shape[1:] or arr.dtype != out.dtype:
        what = f" ({label})" if label else ""
        raise ResultError(
            f"map kernel returned shape {arr.shape} dtype {arr.dtype}{what} for items "
            f"[{start}, {stop}), "
            f"but the first chunk gave rows of shape {out.shape[1:]} dtype {out.dtype}; "
            f"every chunk must return the same row shape and dtype"
        )
