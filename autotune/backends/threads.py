"""The ``threads`` backend: the same calls, run by threads of this process.

numpy's ufuncs release the GIL, so a memory-bound numpy kernel scales on
plain threads with no copies, no pickling and no process start-up.  Kernels
that hold the GIL (pure Python, ``RectBivariateSpline.ev``) do not: the
tuner measures which kind a kernel is.

The kernel runs concurrently in one process: it must be thread-safe (read
``shared``, write nothing global).  That cannot be checked, only documented.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from autotune.backends.rows import check_map_result, check_row_like, where
from autotune.backends.schedule import Batches, OrderedFold, n_chunks
from autotune.backends.shared import SharedNamespace
from autotune.backends.shm import SHM_OUTPUT_MIN, OutputCache

__all__ = ["ThreadRunner", "in_thread_kernel"]

# Set in the backend's threads while they run kernels: an evaluator used from
# there would wait for the very threads that wait for it.
_LOCAL = threading.local()


def in_thread_kernel() -> bool:
    """True inside a kernel run by the threads backend."""
    return getattr(_LOCAL, "in_kernel", False)


class _ThreadCall:
    """One call: threads claim chunk batches from a shared scheduler under a lock.

    A lock is safe here, unlike between processes: a thread cannot be killed
    while it holds it.
    """

    def __init__(
        self,
        kernel: Callable[..., Any],
        shared: SharedNamespace,
        n: int,
        chunk_len: int,
        mode: str,
        combine: Callable[[Any, Any], Any] | None,
        workers: int,
        allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray],
    ) -> None:
        self.allocate = allocate
        self.kernel = kernel
        self.shared = shared
        self.n = n
        self.chunk_len = chunk_len
        self.mode = mode
        self.lock = threading.Lock()
        self.batches = Batches(n_chunks(n, chunk_len), workers)
        self.fold = OrderedFold(combine) if combine is not None else None
        self.out: np.ndarray | None = None
        self.failure: BaseException | None = None
        self.cancelled = False

    def fail(self, exc: BaseException, start: int, stop: int) -> None:
        with self.lock:
            if self.failure is None:
                if hasattr(exc, "add_note"):
                    exc.add_note(f"[{where(exc, start, stop, 'in a thread')}]")
                self.failure = exc
            self.cancelled = True

    def drain(self) -> None:
        """Run batches until none is left (or the call fails)."""
        _LOCAL.in_kernel = True
        try:
            self._drain()
        finally:
            _LOCAL.in_kernel = False

    def _drain(self) -> None:
        kernel, shared, n, cl = self.kernel, self.shared, self.n, self.chunk_len
        mapping = self.mode == "map"
        while True:
            with self.lock:
                if self.cancelled or not self.batches:
                    return
                # Until the output exists, one chunk at a time: its first
                # result gives the row shape and dtype.
                c0, c1 = self.batches.take(1 if mapping and self.out is None else None)
            partials = []
            for c in range(c0, c1):
                if self.cancelled:
                    return
                start = c * cl
                stop = min(n, start + cl)
                try:
                    r = kernel(shared, start, stop)
                    if mapping:
                        arr = check_map_result(r, start, stop)
                        out = self.out
                        if out is None:
                            with self.lock:
                                if self.out is None:
                                    self.out = self.allocate((n, *arr.shape[1:]), arr.dtype)
                                out = self.out
                        check_row_like(arr, out, start, stop)
                        out[start:stop] = arr  # disjoint rows: no lock needed
                    else:
                        partials.append(r)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                    self.fail(exc, start, stop)
                    return
            if not mapping:
                assert self.fold is not None
                with self.lock:
                    self.fold.extend(c0, partials)


class ThreadRunner:
    """A fixed set of threads serving every call until :meth:`close`."""

    def __init__(self, workers: int, shared: dict[str, Any], blas_threads: int | None) -> None:
        self.workers = workers
        self.shared = SharedNamespace(shared)
        self.blas_threads = blas_threads
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="autotune")
        self._outputs = OutputCache()
        self._closed = False

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The output of a map: the previous one's memory again if the caller let it go.

        Fresh memory costs a page fault per page on first touch, which
        doubles the time of a memory-bound map.  Large outputs live in a
        shared-memory segment that :class:`~autotune.backends.shm.OutputCache`
        keeps and reuses once nothing (no result, no view of it) maps it any
        more: the same scheme as the processes backend, with no reference
        counting.  Small ones are plain arrays.
        """
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if dtype.hasobject or nbytes < SHM_OUTPUT_MIN:
            return np.empty(shape, dtype=dtype)
        seg = self._outputs.get(nbytes)
        out = np.frombuffer(seg.mmap, dtype=dtype, count=count).reshape(shape)
        seg.close()  # the array keeps the mapping; the cache keeps the name
        return out

    def run(
        self,
        kernel: Callable[..., Any],
        n: int,
        chunk_len: int,
        mode: str,
        combine: Callable[[Any, Any], Any] | None,
    ) -> Any:
        call = _ThreadCall(
            kernel, self.shared, n, chunk_len, mode, combine, self.workers, self._allocate
        )
        limiter = None
        if self.blas_threads is not None:
            from threadpoolctl import threadpool_limits

            # BLAS thread counts are per process, not per thread: capped for
            # the duration of the call, so threads x BLAS threads fits.
            limiter = threadpool_limits(limits=self.blas_threads)
        try:
            futures = [self._executor.submit(call.drain) for _ in range(self.workers)]
            try:
                wait(futures)
            except BaseException:
                # Ctrl-C in the caller: threads stop after their current chunk.
                call.cancelled = True
                wait(futures)
                raise
        finally:
            if limiter is not None:
                limiter.restore_original_limits()
        if call.failure is not None:
            raise call.failure
        if mode == "map":
            return call.out
        assert call.fold is not None
        return call.fold.result()

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._outputs.close()

    @property
    def closed(self) -> bool:
        return self._closed
