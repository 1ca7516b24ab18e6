"""The ``threads`` backend: the same calls, run by threads of this process.

numpy's ufuncs release the GIL, so a memory-bound numpy kernel scales on
plain threads with no copies, no pickling and no process start-up.  Kernels
that hold the GIL (pure Python, ``RectBivariateSpline.ev``) do not: the
tuner measures which kind a kernel is.

The kernel runs concurrently in one process: it must be thread-safe (read
``shared``, write nothing global).  That cannot be checked, only documented.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from autotune._errors import add_note
from autotune.backends.fold import OrderedFold
from autotune.backends.rows import check_row_like, where
from autotune.backends.schedule import Batches, ChunkPlan, Coverage
from autotune.backends.shared import SharedNamespace
from autotune.backends.shm import SHM_OUTPUT_MIN, OutputCache, output_layout, output_views
from autotune.backends.stats import Meter
from autotune.backends.structure import Structure, split_map_result

__all__ = ["Outputs", "ThreadRunner", "in_thread_kernel", "run_inline"]

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
        plan: ChunkPlan,
        mode: str,
        combine: Callable[[Any, Any], Any] | None,
        workers: int,
        allocate: Callable[[int, list[tuple[tuple[int, ...], Any]]], list[np.ndarray]],
        meter: Meter,
        base: int = 0,
    ) -> None:
        # A map's output starts at item ``base``: 0 for a runner's (rows up to
        # the plan's stop, ChunkPlan.at), the plan's start for run_inline's.
        self.base = base
        self.allocate = allocate
        self.meter = meter
        self.kernel = kernel
        self.shared = shared
        self.plan = plan
        self.mode = mode
        self.lock = threading.Lock()
        self.batches = Batches(plan.chunks, workers)
        self.coverage = Coverage(self.batches.total)  # chunks accepted, each once
        self.fold = (
            OrderedFold(combine, lambda c: plan.bounds(c, c + 1)) if combine is not None else None
        )
        self.structure: Structure | None = None
        self.out: list[np.ndarray] | None = None  # one array per output of the map
        self.failure: BaseException | None = None
        self.cancelled = False

    def result(self) -> Any:
        """The call's result, or its failure raised."""
        if self.failure is not None:
            raise self.failure
        self.coverage.check_complete()
        if self.mode == "map":
            assert self.structure is not None and self.out is not None
            return self.structure.build(self.out)
        assert self.fold is not None
        return self.fold.result()

    def fail(self, exc: BaseException, start: int, stop: int) -> None:
        with self.lock:
            if self.failure is None:
                add_note(exc, f"[{where(exc, start, stop, 'in a thread')}]")
                self.failure = exc
            self.cancelled = True

    def drain(self, worker: int) -> None:
        """Run batches until none is left (or the call fails)."""
        _LOCAL.in_kernel = True
        try:
            self._drain(worker)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            self.abort(exc)
        finally:
            _LOCAL.in_kernel = False

    def abort(self, exc: BaseException) -> None:
        """Fail the call with an error of autotune's own (no kernel's range to name)."""
        with self.lock:
            if self.failure is None:
                self.failure = exc
            self.cancelled = True

    def _drain(self, worker: int) -> None:
        kernel, shared, plan, base = self.kernel, self.shared, self.plan, self.base
        mapping = self.mode == "map"
        while True:
            with self.lock:
                if self.cancelled or not self.batches:
                    return
                # Until the output exists, one chunk at a time: its first
                # result gives the row shape and dtype.
                c0, c1 = self.batches.take(1 if mapping and self.out is None else None)
            s0, s1 = plan.bounds(c0, c1)  # chunks of this call, or RangeError
            partials = []
            # CPU time of this thread, not wall time: a kernel that holds the
            # GIL makes the other threads wait, and waiting is not work.
            began = time.thread_time()
            for start, stop in plan.ranges(c0, c1):
                if self.cancelled:
                    return
                try:
                    r = kernel(shared, start, stop)
                    if mapping:
                        structure, arrays = split_map_result(r, start, stop, self.structure)
                        out = self.out
                        if out is None:
                            with self.lock:
                                if self.out is None:
                                    self.structure = structure
                                    rows = [(a.shape[1:], a.dtype) for a in arrays]
                                    self.out = self.allocate(plan.stop - base, rows)
                                out = self.out
                            if self.structure != structure:  # another thread's came first
                                structure, arrays = split_map_result(r, start, stop, self.structure)
                        for i, arr in enumerate(arrays):
                            o = out[i]
                            check_row_like(arr, o, start, stop, structure.label(i))
                            o[start - base : stop - base] = arr  # disjoint rows: no lock needed
                    else:
                        partials.append(r)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                    self.fail(exc, start, stop)
                    return
            busy = time.thread_time() - began
            with self.lock:
                self.meter.add_busy(worker, busy)
                self.coverage.accept(c0, c1)
                if not mapping:
                    assert self.fold is not None
                    self.fold.extend(c0, partials)  # a mismatch or a combine error: aborts
                self.meter.advance(s1 - s0)


class ThreadRunner:
    """A fixed set of threads serving every call until :meth:`close`."""

    def __init__(self, workers: int, shared: dict[str, Any], blas_threads: int | None) -> None:
        self.workers = workers
        self.shared = SharedNamespace(shared)
        self.blas_threads = blas_threads
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="autotune")
        self._outputs = Outputs()
        self._closed = False

    def _allocate(self, n: int, rows: list[tuple[tuple[int, ...], Any]]) -> list[np.ndarray]:
        return self._outputs.allocate(n, rows)

    def run(
        self,
        kernel: Callable[..., Any],
        plan: ChunkPlan,
        mode: str,
        combine: Callable[[Any, Any], Any] | None,
        meter: Meter | None = None,
    ) -> Any:
        """Run the ranges of ``plan`` on ``plan.workers`` of the threads (at most all)."""
        active = max(1, min(plan.workers, self.workers))
        meter = meter if meter is not None else Meter(active)
        meter.taking_part(active)
        call = _ThreadCall(kernel, self.shared, plan, mode, combine, active, self._allocate, meter)
        limiter = None
        if self.blas_threads is not None:
            from threadpoolctl import threadpool_limits

            # BLAS thread counts are per process, not per thread: capped for
            # the duration of the call, so threads x BLAS threads fits.
            limiter = threadpool_limits(limits=self.blas_threads)
        try:
            futures = [self._executor.submit(call.drain, i) for i in range(active)]
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
        return call.result()

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._outputs.close()

    @property
    def closed(self) -> bool:
        return self._closed


class Outputs:
    """Map outputs in this process: the previous one's memory again once the caller let it go.

    Fresh memory costs a page fault per page on first touch, which doubles
    the time of a memory-bound map.  Large outputs live in a shared-memory
    segment that :class:`~autotune.backends.shm.OutputCache` keeps and
    reuses once nothing (no result, no view of it) maps it any more: the
    same scheme as the processes backend, with no reference counting; the
    outputs of a tuple or dict result share one segment.  Small ones are
    plain arrays.
    """

    def __init__(self) -> None:
        self._cache = OutputCache()

    def allocate(self, n: int, rows: list[tuple[tuple[int, ...], Any]]) -> list[np.ndarray]:
        size, layout = output_layout(n, rows)
        if any(dtype.hasobject for _, _, dtype in layout) or size < SHM_OUTPUT_MIN:
            return [np.empty(shape, dtype=dtype) for _, shape, dtype in layout]
        seg = self._cache.get(size)
        out = output_views(seg.mmap, layout)
        seg.close()  # the arrays keep the mapping; the cache keeps the name
        return out

    def close(self) -> None:
        self._cache.close()


def run_inline(
    kernel: Callable[..., Any],
    shared: SharedNamespace,
    plan: ChunkPlan,
    mode: str,
    combine: Callable[[Any, Any], Any] | None,
    meter: Meter,
    outputs: Outputs | None = None,
) -> Any:
    """The ranges of ``plan`` in the calling thread, chunk after chunk, folded in order.

    What one thread of the backend would do alone: the same ranges, hence
    the same bits for a reduce as on the workers with the same plan.  A
    map's result has the rows of the plan's items only, ``plan.n`` of them
    (a runner's has rows up to ``plan.stop``).  A call of one chunk is the
    kernel's own result (a map's arrays copied only when they are views of
    other memory, such as the shared data).
    """
    meter.taking_part(1)
    start, stop = plan.start, plan.stop
    if plan.chunks <= 1:
        _LOCAL.in_kernel = True
        began = time.thread_time()
        try:
            result = kernel(shared, start, stop)
            if mode == "map":
                structure, arrays = split_map_result(result, start, stop, None)
                result = structure.build([a if a.flags.owndata else a.copy() for a in arrays])
        except BaseException as exc:
            add_note(exc, f"[{where(exc, start, stop, 'in the calling process')}]")
            raise
        finally:
            _LOCAL.in_kernel = False
        meter.add_busy(0, time.thread_time() - began)
        meter.advance(plan.n)
        return result
    # Without an Outputs to keep them, plain arrays: a segment made here would
    # outlive the call with nothing to unlink it.
    allocate = outputs.allocate if outputs is not None else _plain_outputs
    call = _ThreadCall(kernel, shared, plan, mode, combine, 1, allocate, meter, start)
    call.drain(0)
    return call.result()


def _plain_outputs(n: int, rows: list[tuple[tuple[int, ...], Any]]) -> list[np.ndarray]:
    """A map's output arrays in private memory."""
    return [np.empty((n, *shape), dtype=dtype) for shape, dtype in rows]
