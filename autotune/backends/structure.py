"""Several outputs: map results and reduce partials that are a tuple or a dict.

Real kernels return several outputs (distances and indices, fit parameters
and residuals).  A map kernel may return one array, or a tuple or a dict of
arrays, each with first axis ``stop - start``; every backend splits each
chunk's result into its arrays (:func:`split_map_result`), assembles each in
an output of its own and hands back the same structure
(:meth:`Structure.build`).  A reduce kernel's tuple or dict partials are
combined element by element (:class:`ElementWise`), never concatenated as
``+`` on two tuples would.

Every check raises a ``ValueError`` that says what was returned and for
which items, with the same message on every backend.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from autotune.backends.rows import ResultError, check_map_result

__all__ = [
    "ARRAY",
    "ELEMENTWISE",
    "ElementWise",
    "PartialMismatch",
    "Structure",
    "describe",
    "split_map_result",
]


@dataclass(frozen=True)
class Structure:
    """The shape of a map result: one array, a tuple of ``len(keys)`` arrays, or a dict.

    ``keys`` are the tuple's positions or the dict's keys in the first
    chunk's order (the order of the returned dict).
    """

    kind: str  # "array" | "tuple" | "dict"
    keys: tuple[Any, ...] = (0,)

    def describe(self) -> str:
        """What a kernel returned, in words: ``"a tuple of 2 arrays"``."""
        if self.kind == "array":
            return "an array"
        if self.kind == "tuple":
            return f"a tuple of {len(self.keys)} array{'s' if len(self.keys) != 1 else ''}"
        return f"a dict of arrays with keys {', '.join(map(repr, self.keys))}"

    def build(self, arrays: list[np.ndarray]) -> Any:
        """``arrays`` (one per output, in ``keys`` order) in this structure."""
        if self.kind == "array":
            return arrays[0]
        if self.kind == "tuple":
            return tuple(arrays)
        return dict(zip(self.keys, arrays, strict=True))

    def label(self, i: int) -> str:
        """How output ``i`` is named in messages (empty for a single array)."""
        if self.kind == "array":
            return ""
        return f"output {self.keys[i]!r}" if self.kind == "dict" else f"output {i}"


#: The structure of a plain array result.
ARRAY = Structure("array")

_EXPECTS = "map expects an array, or a tuple or dict of arrays, each with first axis"


def split_map_result(
    result: Any, start: int, stop: int, expect: Structure | None = None
) -> tuple[Structure, list[np.ndarray]]:
    """The structure of a map kernel's result and its arrays, checked.

    Each array's first axis must be ``stop - start`` long; with ``expect``
    (the structure of the call's first chunk) the result must have the same
    structure, dict keys included.
    """
    if type(result) is np.ndarray or not isinstance(result, (tuple, Mapping)):
        # The common case first: one array (or anything array-like).
        if expect is not None and expect.kind != "array":
            raise _changed(ARRAY, expect, start, stop)
        return ARRAY, [check_map_result(result, start, stop)]
    if isinstance(result, tuple):
        structure = Structure("tuple", tuple(range(len(result))))
        values = list(result)
    else:
        structure = Structure("dict", tuple(result))
        values = list(result.values())
    if not values:
        raise ResultError(
            f"map kernel returned an empty {structure.kind} for items [{start}, {stop}); "
            f"{_EXPECTS} stop - start = {stop - start}"
        )
    if expect is not None and structure != expect:
        if (
            expect.kind != "dict"
            or structure.kind != "dict"
            or set(expect.keys) != set(structure.keys)
        ):
            raise _changed(structure, expect, start, stop)
        # The same keys in another order: take them in the first chunk's order.
        structure, values = expect, [result[k] for k in expect.keys]
    arrays = [np.asarray(v) for v in values]
    lengths = [None if a.ndim == 0 else a.shape[0] for a in arrays]
    if any(length != stop - start for length in lengths):
        axes = ", ".join("a scalar" if a is None else str(a) for a in lengths)
        raise ResultError(
            f"map kernel returned {structure.describe()} for items [{start}, {stop}) with "
            f"first axes {axes}; {_EXPECTS} stop - start = {stop - start}"
        )
    return structure, arrays


def _changed(got: Structure, first: Structure, start: int, stop: int) -> ResultError:
    return ResultError(
        f"map kernel returned {got.describe()} for items [{start}, {stop}), but the first "
        f"chunk to finish returned {first.describe()}; every chunk must return the same "
        f"structure"
    )


# -- reduce -----------------------------------------------------------------------------
#: Combine functions applied element by element to tuple and dict partials.
#: Any other ``combine`` receives whole partials, as the kernel returned them.
ELEMENTWISE = (operator.add, operator.mul)


def describe(partial: Any) -> str:
    """A reduce partial in words, for error messages."""
    if isinstance(partial, tuple):
        return f"a tuple of {len(partial)} partial{'s' if len(partial) != 1 else ''}"
    if isinstance(partial, Mapping):
        return f"a dict with keys {', '.join(map(repr, partial))}"
    if isinstance(partial, np.ndarray):
        return f"an array of shape {partial.shape}"
    return f"a {type(partial).__name__}"


class PartialMismatch(ResultError):
    """Two reduce partials that cannot be combined element by element.

    :class:`~autotune.backends.fold.OrderedFold` turns it into the error
    the user sees, naming the chunk (:meth:`at`).
    """

    def __init__(self, acc: Any, value: Any, path: str = "") -> None:
        self.acc = describe(acc)
        self.value = describe(value)
        self.path = path
        super().__init__(self.message())

    def message(self, start: int | None = None, stop: int | None = None) -> str:
        where = "" if start is None else f" for items [{start}, {stop})"
        inside = f" (at {self.path})" if self.path else ""
        return (
            f"reduce kernel returned {self.value}{where}{inside}, but the chunks before it "
            f"gave {self.acc}; tuple and dict partials are combined element by element and "
            f"every chunk must return the same structure"
        )

    def at(self, start: int, stop: int) -> ValueError:
        """The error naming the chunk ``[start, stop)`` whose partial did not match."""
        return ValueError(self.message(start, stop))


class ElementWise:
    """``op`` applied to partials, element by element where they are tuples or dicts.

    Plain partials (numbers, arrays) go straight to ``op``; a tuple (a
    namedtuple keeps its type) or a ``dict`` (not any mapping) is combined
    position by position or key by key, recursively.  Partials of different structure raise
    :class:`PartialMismatch`: an array plus a tuple would otherwise broadcast.
    """

    __slots__ = ("op",)

    def __init__(self, op: Callable[[Any, Any], Any]) -> None:
        self.op = op

    def __call__(self, acc: Any, value: Any) -> Any:
        # Once per chunk in the parent: plain partials must stay cheap, so
        # concrete types only (an ABC check costs several times more).
        if isinstance(acc, (tuple, dict)) or isinstance(value, (tuple, dict)):
            return self._combine(acc, value, "")
        return self.op(acc, value)

    def _combine(self, acc: Any, value: Any, path: str) -> Any:
        if isinstance(acc, tuple) and isinstance(value, tuple):
            if len(acc) != len(value):
                raise PartialMismatch(acc, value, path)
            pairs = enumerate(zip(acc, value, strict=True))
            parts = [self._combine(a, v, f"{path}[{i}]") for i, (a, v) in pairs]
            make = getattr(acc, "_make", None)  # a namedtuple keeps its type
            return make(parts) if make is not None else tuple(parts)
        if isinstance(acc, dict) and isinstance(value, dict):
            if set(acc) != set(value):
                raise PartialMismatch(acc, value, path)
            return {k: self._combine(acc[k], value[k], f"{path}[{k!r}]") for k in acc}
        if isinstance(acc, (tuple, dict)) or isinstance(value, (tuple, dict)):
            raise PartialMismatch(acc, value, path)
        return self.op(acc, value)
