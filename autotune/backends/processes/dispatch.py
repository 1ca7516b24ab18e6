"""One call on the process pool: batches out, results in, faults handled.

The parent hands each worker batches of chunk indices, ``DEPTH`` queued per
worker so that none waits for the parent; the first batches go one per
worker, and the last chunks to idle workers rather than into a queue.  A
worker that dies is replaced and the batch it was running is re-run chunk by
chunk (so a chunk that kills its worker every time is named), up to the
pool's ``retries``.  A kernel error cancels the call's other batches through
the control word, and the call drains before the error is raised.
"""

from __future__ import annotations

import contextlib
import math
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

import numpy as np

from autotune._errors import WorkerLost
from autotune.backends.processes.exits import (
    describe_exit,
    rebuild_exception,
    startup_failure,
)
from autotune.backends.processes.worker import wants_shared_output
from autotune.backends.rows import check_row_like
from autotune.backends.schedule import Batches, OrderedFold, chunk_bounds, n_chunks

if TYPE_CHECKING:
    from autotune.backends.processes.pool import ProcessPool, WorkerHandle

__all__ = ["Dispatch"]

#: Batches queued per worker: one running, one waiting, so the worker never
#: idles while the parent reads its last result.
DEPTH = 2
#: Graceful stop, then SIGTERM, then SIGKILL, each waited for this long.
JOIN_TIMEOUT = 1.0


class Dispatch:
    """One map/reduce call: dispatch batches, collect results, handle faults.

    It drives the workers of ``pool`` through the pool's own interface
    (``live``, ``replace``, ``output_segment``, ``cancel``, ``next_batch_id``)
    and never touches the pool's resources directly.
    """

    def __init__(
        self,
        pool: ProcessPool,
        call_id: int,
        kernel_bytes: bytes,
        n: int,
        chunk_len: int,
        mode: str,
        combine: Any,
    ) -> None:
        self.pool = pool
        self.n = n
        self.mode = mode
        self.chunk_len = chunk_len
        self.total = n_chunks(n, self.chunk_len)
        self.call_id = call_id
        self.kernel_bytes = kernel_bytes
        self.batches = Batches(self.total, pool.workers)
        self.fold = OrderedFold(combine) if mode == "reduce" else None
        self.out: np.ndarray | None = None
        self.out_desc: tuple[str, int] | None = None  # shared output (name, size)
        self.failure: BaseException | None = None
        self.tries: dict[tuple[int, int], int] = {}  # re-run batch -> deaths so far
        self.completed = 0  # chunks

    # The loop ---------------------------------------------------------------
    def run(self) -> Any:
        """The call's result, or None with ``self.failure`` set."""
        pool = self.pool
        try:
            # One batch for every worker first, then the queued second ones:
            # with few chunks, the first worker must not take them all.
            for depth in range(1, DEPTH + 1):
                for w in list(pool.live):
                    self._refill(w, depth)
            while self.completed < self.total or any(w.inflight for w in pool.live):
                if self.failure is not None and not any(w.inflight for w in pool.live):
                    break
                self._step()
        finally:
            self._end()
        if self.failure is not None:
            return None
        if self.mode == "map":
            return self.out
        assert self.fold is not None
        return self.fold.result()

    def _step(self) -> None:
        live = self.pool.live
        by_conn = {w.conn: w for w in live}
        by_sentinel = {w.process.sentinel: w for w in live}
        ready = wait(list(by_conn) + list(by_sentinel), timeout=1.0)
        # Messages first: a worker that sent its result and then died has
        # still done that work.
        for obj in ready:
            w = by_conn.get(obj)
            if w is None or live[w.index] is not w:
                continue
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                self._lost(w)
                continue
            self._handle(w, msg)
        for obj in ready:
            w = by_sentinel.get(obj)
            if w is not None and live[w.index] is w:
                # Drain what it managed to send before dying.
                while True:
                    try:
                        if not w.conn.poll():
                            break
                        self._handle(w, w.conn.recv())
                    except (EOFError, OSError):
                        break
                self._lost(w)

    def _handle(self, w: WorkerHandle, msg: tuple) -> None:
        kind, call_id = msg[0], msg[1]
        if kind == "ready":  # a replacement has started
            w.ready = True
            return
        if call_id == -1:  # the worker could not start at all
            _, _, _, _, _, exc_bytes, name, message, tb = msg
            self._fail(RuntimeError(f"an autotune worker failed to start: {name}: {message}\n{tb}"))
            self._forget(w, None)
            return
        if call_id != self.call_id:
            return  # stale
        if kind == "need_out":  # a worker holds its first map result
            if self.out is None:
                self._allocate(msg[2], msg[3])
            if self.out_desc is None:  # small output: results come back inline
                self._send(w, ("out", self.call_id, None, 0, (), None))
            return
        batch_id = msg[2]
        batch = w.inflight.pop(batch_id, None)
        if kind == "done" and batch is not None:
            self._accept(batch, msg[3])
        elif kind == "error":
            self._fail(rebuild_exception(msg))
            if batch is None:  # the kernel could not be loaded: no batch will run
                self._forget(w, None)
        elif kind == "cancelled" and batch is not None and self.failure is None:
            # Only a failing call cancels its batches; anything else that
            # cancels one (a stray write to the control word) must not lose it.
            self.batches.requeue(batch)
        if self.failure is None:
            self._refill(w)

    def _forget(self, w: WorkerHandle, _: Any) -> None:
        # Every batch queued behind a failed kernel load is void.
        w.inflight.clear()

    def _accept(self, batch: tuple[int, int], results: list[Any] | None) -> None:
        c0, c1 = batch
        if results is not None:
            if self.mode == "map":
                try:
                    for c, arr in zip(range(c0, c1), results, strict=True):
                        if arr is not None:  # None: written to shared memory
                            self._store(c, arr)
                except ValueError as exc:
                    self._fail(exc)
            else:
                assert self.fold is not None and len(results) == c1 - c0
                self.fold.extend(c0, results)
        self.completed += c1 - c0

    def _store(self, c: int, arr: np.ndarray) -> None:
        start, stop = chunk_bounds(c, c + 1, self.chunk_len, self.n)
        if self.out is None:
            self._allocate(arr.shape[1:], arr.dtype)
        assert self.out is not None
        check_row_like(arr, self.out, start, stop)
        self.out[start:stop] = arr

    def _allocate(self, tail: tuple[int, ...], dtype: np.dtype) -> None:
        """Create the output for rows of shape ``tail`` and ``dtype``; tell the workers."""
        shape = (self.n, *tail)
        count = math.prod(shape)
        if not wants_shared_output(np.empty((1, *tail), dtype=dtype), self.n):
            self.out = np.empty(shape, dtype=dtype)
            return
        seg = self.pool.output_segment(max(count * dtype.itemsize, 1))
        self.out_desc = (seg.name, seg.size)
        self.out = np.frombuffer(seg.mmap, dtype=dtype, count=count).reshape(shape)
        for w in self.pool.live:
            self._send(w, ("out", self.call_id, seg.name, seg.size, shape, dtype))

    def _refill(self, w: WorkerHandle, depth: int = DEPTH) -> None:
        """Keep ``depth`` batches queued on worker ``w``."""
        if w.call_id != self.call_id:
            w.call_id = self.call_id
            msg = ("call", self.call_id, self.kernel_bytes, self.mode, self.n, self.chunk_len)
            if not self._send(w, msg):
                return
            if self.out_desc is not None and self.out is not None:
                name, size = self.out_desc
                out_msg = ("out", self.call_id, name, size, self.out.shape, self.out.dtype)
                if not self._send(w, out_msg):
                    return
        while len(w.inflight) < depth and self.batches and self.failure is None:
            if w.inflight and self.batches.remaining < len(self.pool.live):
                break  # the last chunks go to idle workers, not into a queue

            # Until a map knows its output's shape, results come back through
            # the pipe: keep those batches to one chunk.
            limit = 1 if self.mode == "map" and self.out is None else None
            batch = self.batches.take(limit)
            batch_id = self.pool.next_batch_id()
            w.inflight[batch_id] = batch
            if not self._send(w, ("batch", self.call_id, batch_id, *batch)):
                return

    def _send(self, w: WorkerHandle, msg: tuple) -> bool:
        try:
            w.conn.send(msg)
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._lost(w)
            return False

    def _lost(self, w: WorkerHandle) -> None:
        """Worker ``w`` died: re-queue its batches and start a replacement."""
        pool = self.pool
        if pool.live[w.index] is not w:
            return
        lost = list(w.inflight.values())
        w.inflight.clear()
        code = w.process.exitcode
        if code is None:
            w.process.join(JOIN_TIMEOUT)
            code = w.process.exitcode
        how = describe_exit(code)
        if not w.ready and self.failure is None:
            # A replacement that never started: whatever stopped it stops
            # every retry too.  One clear error instead of a cascade.
            self._fail(startup_failure(w.index, code, pool.start_method, None))
        elif lost and self.failure is None:
            # A worker runs its batches in order: only the oldest had started.
            # Its chunks are re-run one by one, so that a chunk that kills its
            # worker every time is pinned down and named, and the others pass.
            running, waiting = lost[0], lost[1:]
            for batch in waiting:
                self.batches.requeue(batch)
            tries = self.tries.get(running, 0) + 1
            if tries > pool.retries:
                start, stop = chunk_bounds(*running, self.chunk_len, self.n)
                self._fail(
                    WorkerLost(
                        f"a worker died ({how}) while computing items [{start}, {stop}), "
                        f"which were already re-run {pool.retries} time(s); giving up",
                        start=start,
                        stop=stop,
                    )
                )
            else:
                for c in range(*running):
                    self.tries[(c, c + 1)] = tries
                    self.batches.requeue((c, c + 1))
        new = pool.replace(w)
        if self.failure is None:
            self._refill(new)

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            # Workers check this word between chunks and drop the rest of
            # their batches, so the call drains in about one chunk's time.
            self.pool.cancel(self.call_id)

    def _end(self) -> None:
        for w in self.pool.live:
            if w.call_id == self.call_id:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send(("end", self.call_id))
