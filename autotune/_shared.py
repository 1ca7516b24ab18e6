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
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from autotune._shm import Segment

__all__ = [
    "SharedNamespace",
    "PackedShared",
    "check_names",
    "pack",
    "unpack",
    "dumps_callable",
]

#: Buffers smaller than this stay inside the pickle: a segment slot for a few
#: hundred bytes costs more than copying them.
INBAND_LIMIT = 64 * 1024
#: Out-of-band buffers are placed at multiples of this (a cache line, and
#: enough for any numpy dtype's alignment).
ALIGN = 64


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


def dumps_callable(obj: Any, what: str) -> bytes:
    """Pickle a kernel or combine function to send to the workers.

    Plain pickle first (functions are sent by reference, so a module-level
    kernel's globals are not dragged along); cloudpickle as a fallback for
    lambdas, closures and functions typed into an interactive session.
    """
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as first:  # PicklingError, AttributeError, TypeError ...
        try:
            import cloudpickle
        except ImportError:  # pragma: no cover - cloudpickle is a dependency
            cloudpickle = None
        if cloudpickle is not None:
            try:
                return bytes(cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
            except Exception:
                pass
        raise TypeError(
            f"the {what} {obj!r} cannot be pickled to send to the worker processes "
            f"({type(first).__name__}: {first}); define it at module level"
        ) from first


@dataclass(frozen=True)
class PackedShared:
    """The shared objects as sent to spawn/forkserver workers: small and picklable."""

    payload: bytes
    segment_name: str | None
    segment_size: int
    layout: tuple[tuple[int, int], ...]  # (offset, nbytes) of each out-of-band buffer


def pack(shared: dict[str, Any]) -> tuple[PackedShared, Segment | None]:
    """Pickle ``shared`` once, moving its large buffers into one new segment.

    Returns the packed description and the segment, which the caller owns
    and must unlink.
    """
    buffers: list[pickle.PickleBuffer] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        # True keeps the buffer in-band (copied into the pickle).
        if buf.raw().nbytes < INBAND_LIMIT:
            return True
        buffers.append(buf)
        return False

    try:
        payload = pickle.dumps(shared, protocol=5, buffer_callback=keep_out_of_band)
    except Exception as first:
        buffers.clear()
        try:
            import cloudpickle

            payload = bytes(cloudpickle.dumps(shared, protocol=5, buffer_callback=keep_out_of_band))
        except Exception:
            raise TypeError(
                f"a shared object cannot be pickled for spawn/forkserver workers "
                f"({type(first).__name__}: {first}); use start_method='fork' or share "
                f"plain data (arrays, lists, scipy objects)"
            ) from first

    layout = []
    offset = 0
    for buf in buffers:
        nbytes = buf.raw().nbytes
        layout.append((offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    if not buffers:
        return PackedShared(payload, None, 0, ()), None

    segment = Segment.create(offset)
    try:
        view = memoryview(segment.mmap)
        for buf, (off, nbytes) in zip(buffers, layout, strict=True):
            view[off : off + nbytes] = buf.raw()
        view.release()
    except BaseException:
        segment.unlink()
        raise
    finally:
        for buf in buffers:
            buf.release()
    return PackedShared(payload, segment.name, segment.size, tuple(layout)), segment


def unpack(packed: PackedShared) -> tuple[dict[str, Any], Segment | None]:
    """Rebuild the shared objects in a worker, viewing the segment read-only."""
    if packed.segment_name is None:
        return pickle.loads(packed.payload), None
    segment = Segment.attach(packed.segment_name, packed.segment_size)
    view = memoryview(segment.mmap).toreadonly()
    buffers = [view[off : off + nbytes] for off, nbytes in packed.layout]
    return pickle.loads(packed.payload, buffers=buffers), segment
