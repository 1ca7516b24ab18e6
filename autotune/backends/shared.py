"""How the user's shared objects reach the workers, and how kernels see them.

Under ``fork`` nothing is copied or pickled: workers inherit the parent's
objects copy-on-write.  Under ``spawn`` and ``forkserver`` the whole
``shared`` dict is pickled *once* in the parent with protocol 5; every
contiguous buffer larger than :data:`INBAND_LIMIT` (numpy arrays at the top
level and arrays inside other objects, such as a list of scipy splines) is
taken out of band and copied into one shared-memory segment.  Each worker
unpickles the same bytes against read-only views of that segment, so the
arrays are shared, not copied per worker.
"""

from __future__ import annotations

import keyword
import math
import mmap
import pickle
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from autotune.backends.sending import dumps_code, dumps_shared
from autotune.backends.shm import Segment, unlink

__all__ = [
    "shared_array",
    "SharedNamespace",
    "PackedShared",
    "check_names",
    "pack",
    "unpack",
    "dumps_callable",
    "is_shared_array_segment",
]

#: Buffers smaller than this stay inside the pickle: a segment slot for a few
#: hundred bytes costs more than copying them.
INBAND_LIMIT = 64 * 1024
#: Out-of-band buffers are placed at multiples of this (a cache line, and
#: enough for any numpy dtype's alignment).
ALIGN = 64


@dataclass(frozen=True)
class _Allocation:
    segment_name: str
    size: int
    address: int  # where the mapping starts in this process
    mapping: weakref.ref[mmap.mmap]  # weak: the arrays decide how long it lives


# Segments made by shared_array(), by name, while some array still views them.
_ALLOCATED: dict[str, _Allocation] = {}


def shared_array(shape: int | tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
    """A zero-filled array that lives in shared memory from the start.

    Pass it in an evaluator's ``shared`` dict and spawn/forkserver workers
    map the very same pages: no copy is made, not even one (a plain numpy
    array is copied once into shared memory).  Under fork it behaves like
    any array.  The memory is released when the last view of it is gone.

    Parameters
    ----------
    shape : int or tuple of int
    dtype : numpy dtype, default float64

    Examples
    --------
    >>> x = autotune.shared_array(10**8)       # 800 MB, shared, not copied
    >>> x[:] = np.random.default_rng().random(x.size)
    """
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError("shared_array cannot hold Python objects (dtype=object)")
    shape_t = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(map(int, shape))
    if any(d < 0 for d in shape_t):
        raise ValueError(f"shape must not be negative, got {shape_t}")
    count = math.prod(shape_t)
    segment = Segment.create(count * dt.itemsize)
    address = np.frombuffer(segment.mmap, dtype=np.uint8).ctypes.data
    _ALLOCATED[segment.name] = _Allocation(
        segment.name, segment.size, address, weakref.ref(segment.mmap)
    )
    # The name lives as long as the mapping: when the last array viewing it
    # is collected, the segment is unlinked and forgotten.
    weakref.finalize(segment.mmap, _release, segment.name)
    return np.frombuffer(segment.mmap, dtype=dt, count=count).reshape(shape_t)


def _release(name: str) -> None:
    _ALLOCATED.pop(name, None)
    unlink(name)


def _find_allocated(buf: memoryview) -> tuple[Segment, int] | None:
    """The shared_array segment ``buf`` lies in (a non-owning handle), and the offset."""
    if not _ALLOCATED or buf.nbytes == 0:
        return None
    address = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    for alloc in _ALLOCATED.values():
        mapping = alloc.mapping()
        if mapping is not None and alloc.address <= address < alloc.address + alloc.size:
            handle = Segment(alloc.segment_name, alloc.size, mapping, owner=False)
            return handle, address - alloc.address
    return None


def is_shared_array_segment(name: str) -> bool:
    """Whether segment ``name`` holds a :func:`shared_array` (the user's, not ours to unlink)."""
    return name in _ALLOCATED


class SharedNamespace(Mapping[str, Any]):
    """Read-only view of the shared objects, as kernels receive it.

    ``shared.x`` and ``shared["x"]`` both work.  Top-level numpy arrays are
    handed out as read-only views, so a kernel cannot scribble on data that
    other workers (and, under ``fork``, the parent's pages) share.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        frozen = {}
        for name, value in data.items():
            if isinstance(value, np.ndarray) and value.flags.writeable:
                value = value.view()
                value.flags.writeable = False
            frozen[name] = value
        object.__setattr__(self, "_data", frozen)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails, so Mapping's methods win over
        # a shared object named, say, "keys"; use shared["keys"] for those.
        try:
            return object.__getattribute__(self, "_data")[name]
        except KeyError:
            raise AttributeError(f"no shared object named {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("shared objects are read-only inside a kernel")

    def __getitem__(self, name: str) -> Any:
        return self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"SharedNamespace({', '.join(self._data)})"

    def __reduce__(self) -> Any:
        # Kernels may capture the namespace by accident (a closure): refuse
        # loudly rather than pickle every shared array into each task.
        raise TypeError("the shared namespace cannot be pickled; read from it inside the kernel")


def check_names(shared: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate ``shared`` and return it as a plain dict."""
    if shared is None:
        return {}
    if not isinstance(shared, Mapping):
        raise TypeError(f"shared must be a dict of name -> object, got {type(shared).__name__}")
    out = {}
    for name, value in shared.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(
                f"shared name {name!r} is not a Python identifier (kernels read it as shared.name)"
            )
        if name.startswith("_"):
            raise ValueError(f"shared name {name!r} must not start with '_' (reserved)")
        out[name] = value
    return out


def dumps_callable(obj: Any, what: str, inherited: Mapping[str, Any] | None = None) -> bytes:
    """Pickle a kernel to send to the workers (see :mod:`autotune.backends.sending`).

    Code in importable modules goes by reference; code in ``__main__`` (a
    notebook, ``python -c``) by value, unless a forked worker inherited it
    (``inherited``: what ``__main__`` held when the workers were forked).
    """
    return dumps_code(obj, what, inherited)


@dataclass(frozen=True)
class PackedShared:
    """The shared objects as sent to spawn/forkserver workers: small and picklable."""

    payload: bytes
    #: Where each out-of-band buffer lies: (segment name, segment size, offset, nbytes).
    layout: tuple[tuple[str, int, int, int], ...]


def pack(shared: dict[str, Any], start_method: str = "spawn") -> tuple[PackedShared, list[Segment]]:
    """Pickle ``shared`` once, its large buffers placed in shared memory.

    Objects of classes defined in ``__main__`` (a notebook) are pickled with
    their class by value; an object that cannot be pickled at all is named
    by its key and type, for the ``start_method`` named.
    Buffers of :func:`shared_array` arrays are referenced where they are;
    the others are copied into one new segment.  Returns the description and
    the segments that must stay alive while workers may attach them: the new
    one first (the caller owns it and must unlink it), then the borrowed ones.
    """
    buffers: list[pickle.PickleBuffer] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        # True keeps the buffer in-band (copied into the pickle).
        if buf.raw().nbytes < INBAND_LIMIT:
            return True
        buffers.append(buf)
        return False

    payload = dumps_shared(shared, keep_out_of_band, start_method)

    placed: list[tuple[Segment | None, int, int]] = []  # (borrowed segment or None, offset, n)
    borrowed: dict[str, Segment] = {}
    size = 0
    for buf in buffers:
        raw = buf.raw()
        found = _find_allocated(raw)
        if found is not None:
            borrowed[found[0].name] = found[0]
            placed.append((found[0], found[1], raw.nbytes))
        else:
            placed.append((None, size, raw.nbytes))
            size += -(-raw.nbytes // ALIGN) * ALIGN

    own = Segment.create(size) if size else None
    try:
        if own is not None:
            view = memoryview(own.mmap)
            for buf, (seg, off, nbytes) in zip(buffers, placed, strict=True):
                if seg is None:
                    view[off : off + nbytes] = buf.raw()
            view.release()
    except BaseException:
        if own is not None:
            own.unlink()
        raise
    finally:
        for buf in buffers:
            buf.release()
    layout = tuple(
        (seg.name, seg.size, off, n) if seg is not None else (own.name, own.size, off, n)  # type: ignore[union-attr]
        for seg, off, n in placed
    )
    keep = ([own] if own is not None else []) + list(borrowed.values())
    return PackedShared(payload, layout), keep


def unpack(packed: PackedShared) -> tuple[dict[str, Any], list[Segment]]:
    """Rebuild the shared objects in a worker, viewing the segments read-only."""
    segments: dict[str, Segment] = {}
    views: dict[str, memoryview] = {}
    buffers = []
    for name, size, off, nbytes in packed.layout:
        if name not in segments:
            segments[name] = Segment.attach(name, size)
            views[name] = memoryview(segments[name].mmap).toreadonly()
        buffers.append(views[name][off : off + nbytes])
    return pickle.loads(packed.payload, buffers=buffers), list(segments.values())
