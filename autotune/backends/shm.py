"""POSIX shared-memory segments: created and unlinked by the parent, attached by workers.

We do not use :class:`multiprocessing.shared_memory.SharedMemory` directly for
two reasons:

* Before Python 3.13 every ``SharedMemory(name)`` *attach* registers the
  segment with the resource tracker, which then unlinks it (or warns about a
  "leak") when the attaching worker exits (CPython gh-82300).  Workers here
  attach with ``shm_open`` + ``mmap`` and never talk to the tracker.
* A ``map`` result is handed to the user as an array that views the segment
  (no copy).  ``SharedMemory.close()`` refuses to run while such a view
  exists and complains from ``__del__``; a bare :class:`mmap.mmap` simply
  lives as long as the last array that views it.

A segment the parent creates is unlinked by the parent itself (close, an
exception, garbage collection) or, if the parent dies first, by one helper
process: autotune's segment guardian (:mod:`autotune.backends.guardian`),
which survives a kill of the whole process group.  Never also by Python's
resource tracker: a segment registered with both is unlinked by the guardian
and then reported by the tracker, to the user's terminal, as "leaked" and
"No such file or directory" when it finds it gone.  The tracker takes the
segments only where no guardian runs (it could not start, or it died).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import secrets
import threading
import weakref
from multiprocessing import resource_tracker
from typing import Any

import numpy as np

from autotune.backends import guardian as _guardian

try:  # POSIX only; Windows has no fork and is not supported by this module.
    import _posixshmem
except ImportError:  # pragma: no cover - exercised on Windows only
    _posixshmem = None

__all__ = [
    "OutputCache",
    "Segment",
    "PREFIX",
    "SHM_OUTPUT_MIN",
    "list_segments",
    "output_layout",
    "output_views",
    "unlink",
]

#: Map outputs of at least this many bytes live in shared memory (the
#: processes backend: workers write into it; threads: it is reused); smaller
#: ones are plain arrays (processes: sent back through the pipe).
SHM_OUTPUT_MIN = 256 * 1024

#: Every segment autotune creates is named with this prefix, so tests and
#: users can see what is ours in /dev/shm.
PREFIX = "autotune_"

#: Each output of a map with several outputs starts at a multiple of this
#: in the shared segment (a cache line: rows of two outputs never share one).
OUTPUT_ALIGN = 64

#: Where each output of a map lives in its segment: ``(offset, shape, dtype)``.
Layout = list[tuple[int, tuple[int, ...], Any]]


def output_layout(n: int, rows: list[tuple[tuple[int, ...], Any]]) -> tuple[int, Layout]:
    """Bytes needed, and the layout, for ``n`` rows of each ``(row_shape, dtype)``.

    Every output of a map (one array, or each array of a tuple or dict
    result) is laid out in one segment, one after the other: one segment,
    one name to reuse and to unlink, whatever the number of outputs.
    """
    layout: Layout = []
    offset = 0
    for tail, dtype in rows:
        dtype = np.dtype(dtype)
        shape = (n, *tail)
        layout.append((offset, shape, dtype))
        nbytes = math.prod(shape) * dtype.itemsize
        offset += -(-nbytes // OUTPUT_ALIGN) * OUTPUT_ALIGN
    return max(offset, 1), layout


def output_views(buffer: Any, layout: Layout) -> list[np.ndarray]:
    """The arrays of ``layout`` viewing ``buffer`` (a segment's mapping)."""
    return [
        np.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
        for offset, shape, dtype in layout
    ]


class Segment:
    """A named shared-memory segment mapped into this process.

    Use :meth:`create` in the parent and :meth:`attach` in a worker.  The
    mapping (``self.mmap``) stays valid after :meth:`unlink`; it is released
    when the last object viewing it is garbage-collected.
    """

    __slots__ = ("name", "size", "mmap", "_owner", "_linked")

    def __init__(self, name: str, size: int, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.size = size
        self.mmap = mm
        self._owner = owner
        self._linked = owner

    @classmethod
    def create(cls, size: int) -> Segment:
        """Create a new zero-filled segment of ``size`` bytes (the parent's side)."""
        if _posixshmem is None:  # pragma: no cover
            raise OSError("POSIX shared memory is not available on this platform")
        # mmap refuses length 0; an empty array still needs a valid buffer.
        length = max(int(size), 1)
        while True:
            # The creator's pid in the name tells whose segment a leftover is.
            name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(6)}"
            try:
                fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            except FileExistsError:  # pragma: no cover - 64 random bits
                continue
            break
        try:
            os.ftruncate(fd, length)
            mm = mmap.mmap(fd, length)
        except BaseException:
            _posixshmem.shm_unlink("/" + name)
            raise
        finally:
            os.close(fd)
        _watch(name)
        return cls(name, length, mm, owner=True)

    @classmethod
    def attach(cls, name: str, size: int, *, populate: bool = False) -> Segment:
        """Map an existing segment; never touches the resource tracker.

        ``populate`` maps every page up front in one system call (Linux),
        cheaper than one page fault each when the pages already exist.
        """
        if _posixshmem is None:  # pragma: no cover
            raise OSError("POSIX shared memory is not available on this platform")
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, 0o600)
        try:
            flags = mmap.MAP_SHARED
            if populate and hasattr(mmap, "MAP_POPULATE"):
                flags |= mmap.MAP_POPULATE
            mm = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)
        return cls(name, size, mm, owner=False)

    def unlink(self) -> None:
        """Remove the name from the system (owner only; idempotent).

        Mappings stay valid; the memory is freed once every process has
        unmapped it.
        """
        if not (self._owner and self._linked):
            return
        self._linked = False
        unlink(self.name)

    def close(self) -> None:
        """Unmap now if nothing views the mapping; otherwise leave it to the GC."""
        # An array that still views the mapping keeps it alive; it is
        # unmapped when that array goes.
        with contextlib.suppress(BufferError):
            self.mmap.close()

    def __repr__(self) -> str:
        state = "linked" if self._linked else "unlinked" if self._owner else "attached"
        return f"<Segment {self.name} {self.size} bytes {state}>"


def unlink(name: str) -> None:
    """Remove a segment we created, by name, and tell whoever watches it."""
    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink("/" + name)
    with _watch_lock:
        if name in _tracked:
            _tracked.discard(name)
            resource_tracker.unregister("/" + name, "shared_memory")
        elif name in _guarded:
            _guarded.discard(name)
            if not _guardian.forget(name):
                _to_tracker()


# Who unlinks each segment this process created if it dies first: the guardian
# (it survives a kill of our process group, the resource tracker does not), or
# the tracker where no guardian runs.  One of them, never both (see above).
_watch_lock = threading.Lock()
_guarded: set[str] = set()
_tracked: set[str] = set()


def _watch(name: str) -> None:
    with _watch_lock:
        _guarded.add(name)
        if not _guardian.watch(name):
            _to_tracker()


def _to_tracker() -> None:
    """The guardian could not start or is gone: the tracker takes what it watched."""
    for name in _guarded:
        resource_tracker.register("/" + name, "shared_memory")
    _tracked.update(_guarded)
    _guarded.clear()


def list_segments(pid: int | None = None) -> list[str]:
    """Names of autotune's segments in ``/dev/shm`` (Linux), for leak checks.

    With ``pid``, only those that process created.
    """
    prefix = PREFIX if pid is None else f"{PREFIX}{pid}_"
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
    except OSError:
        return []


class OutputCache:
    """The last map output's segment, kept linked and reused once the caller lets it go.

    A fresh segment costs a page fault per page in every process that
    touches it: on a memory-bound map that doubles the time.  So the last
    output's segment stays linked, and the next output of the same size
    reuses it when the caller no longer holds the previous result.  Whether
    they do is told by a weak reference to the segment's mapping: the result
    array and every view of it keep that mapping alive (numpy points each
    view's ``base`` at it), and nothing else does.  No reference counts are
    read, so this holds wherever ``sys.getrefcount`` does not.  The cost: one
    output's memory stays linked until :meth:`close`.
    """

    def __init__(self) -> None:
        self._name: str | None = None
        self._size = 0
        self._mapping: weakref.ref[mmap.mmap] | None = None

    def get(self, size: int) -> Segment:
        """A segment of ``size`` bytes for the next output (the previous one if free)."""
        if self._name is not None:
            if self._size == size and self._mapping is not None and self._mapping() is None:
                seg = Segment.attach(self._name, size, populate=True)
                self._mapping = weakref.ref(seg.mmap)
                return seg
            # Still in the caller's hands (or another size): give up the
            # name; the caller's array keeps its own mapping.
            self.close()
        seg = Segment.create(size)
        self._name, self._size, self._mapping = seg.name, seg.size, weakref.ref(seg.mmap)
        return seg

    @property
    def name(self) -> str | None:
        """The cached segment's name, if any (unlinked by :meth:`close`)."""
        return self._name

    def close(self) -> None:
        """Unlink the cached segment (mappings still held stay valid)."""
        name, self._name, self._mapping = self._name, None, None
        if name is not None:
            unlink(name)
