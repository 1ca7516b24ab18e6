"""Folding a reduce's partials strictly in chunk order, as they arrive.

Every runner folds through :class:`OrderedFold`, so a reduce gives the same
bits as a serial loop over the same chunks, whichever worker finished first.
Pure: nothing here touches processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autotune.backends.structure import ELEMENTWISE, ElementWise, PartialMismatch

__all__ = ["OrderedFold"]


class OrderedFold:
    """Combine per-chunk partials strictly in chunk order, as they arrive.

    ``((p0 + p1) + p2) + ...``: the same operations in the same order as a
    serial loop over the same chunks, hence the same bits, whichever worker
    finished first.  Partials that arrive early wait in a dict until the gap
    before them is filled, so memory stays bounded by what is out of order.

    ``operator.add`` and ``operator.mul`` combine tuple and dict partials
    element by element (:class:`~autotune.backends.structure.ElementWise`);
    any other ``combine`` is given whole partials.  ``bounds`` (chunk ->
    item range) lets a mismatch of structure name its chunk.
    """

    def __init__(
        self,
        combine: Callable[[Any, Any], Any],
        bounds: Callable[[int], tuple[int, int]] | None = None,
    ) -> None:
        self._combine = ElementWise(combine) if combine in ELEMENTWISE else combine
        self._bounds = bounds
        self._pending: dict[int, Any] = {}
        self._next = 0
        self._acc: Any = None

    def add(self, chunk: int, partial: Any) -> None:
        self._pending[chunk] = partial
        while self._next in self._pending:
            value = self._pending.pop(self._next)
            try:
                self._acc = value if self._next == 0 else self._combine(self._acc, value)
            except PartialMismatch as exc:
                raise self._named(exc, self._next) from None
            self._next += 1

    def extend(self, first: int, partials: list[Any]) -> None:
        """Add the partials of chunks ``first, first + 1, ...``."""
        if first != self._next or self._pending:
            for i, partial in enumerate(partials, first):
                self.add(i, partial)
            return
        # In order and nothing waiting (the common case): a tight loop.
        combine, acc = self._combine, self._acc
        it = iter(partials)
        if first == 0:
            acc = next(it, None)
        partial = None
        try:
            for partial in it:
                acc = combine(acc, partial)
        except PartialMismatch as exc:
            # Found by identity, so that the loop above counts nothing.
            at = first + next(i for i, p in enumerate(partials) if p is partial)
            self._acc, self._next = acc, at  # chunks before `at` are folded
            raise self._named(exc, at) from None
        self._acc = acc
        self._next = first + len(partials)

    def _named(self, exc: PartialMismatch, chunk: int) -> ValueError:
        if self._bounds is None:
            return ValueError(exc.message())
        return exc.at(*self._bounds(chunk))

    @property
    def done(self) -> int:
        """How many leading chunks have been folded."""
        return self._next

    def result(self) -> Any:
        if self._pending:
            raise RuntimeError(f"chunks after {self._next} arrived but chunk {self._next} did not")
        return self._acc
