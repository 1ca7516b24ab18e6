"""``Workload``: what the tuner measures and the evaluator runs.

A workload is ``n`` items and a kernel ``kernel(shared, start, stop)`` that
computes items ``[start, stop)`` from read-only shared data.  It is plain
data: the evaluator and the tuner decide how to split and where to run it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from autotune._util import check_int, check_kernel_signature

__all__ = ["Workload", "MODES"]

MODES = ("map", "reduce")


@dataclass(frozen=True)
class Workload:
    """A kernel over ``n`` items, with the data it reads.

    Parameters
    ----------
    name : str
        Short name; profiles are stored and matched under it.
    n : int
        Number of items.
    kernel : callable
        ``kernel(shared, start, stop)`` computes items ``[start, stop)``.
        In ``"map"`` mode it returns an array whose first axis has length
        ``stop - start``; in ``"reduce"`` mode a partial (a number or an
        array) that is combined with ``+`` in index order.
    shared : mapping of str to object, optional
        Data the kernel reads, handed to it as a read-only namespace.
    mode : {"map", "reduce"}
        How results are assembled.
    item_bytes : int, optional
        Bytes of input and output (temporaries included) touched per item;
        used to express chunk lengths in bytes.  Unless given, counted as an
        evaluator counts them: the row bytes of the ``shared`` arrays whose
        first axis has ``n`` entries, else 16
        (:func:`autotune.profile.item_bytes_of`).
    """

    name: str
    n: int
    kernel: Callable[..., Any]
    shared: Mapping[str, Any] | None = None
    mode: str = "reduce"
    item_bytes: int | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Workload name must be a non-empty string, got {self.name!r}")
        check_int("Workload n", self.n, minimum=0)
        if not callable(self.kernel):
            raise TypeError(f"Workload kernel must be callable, got {type(self.kernel).__name__}")
        check_kernel_signature(self.kernel, "Workload kernel")
        if self.mode not in MODES:
            raise ValueError(f"Workload mode must be one of {MODES}, got {self.mode!r}")
        if self.item_bytes is not None:
            check_int("Workload item_bytes", self.item_bytes)
