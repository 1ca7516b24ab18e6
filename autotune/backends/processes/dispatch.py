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
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Protocol

import numpy as np

from autotune._errors import RangeError, WorkerLost
from autotune.backends.fold import OrderedFold
from autotune.backends.processes.exits import (
    describe_exit,
    rebuild_exception,
    startup_failure,
)
from autotune.backends.processes.worker import wants_shared_output
from autotune.backends.rows import check_row_like
from autotune.backends.schedule import Batches, ChunkPlan, Coverage
from autotune.backends.shm import Layout, Segment, output_layout, output_views
from autotune.backends.stats import Meter
from autotune.backends.structure import Structure, split_map_result

__all__ = ["Dispatch", "Pool", "WorkerHandle"]

#: Batches queued per worker: one running, one waiting, so the worker never
#: idles while the parent reads its last result.
DEPTH = 2
#: Graceful stop, then SIGTERM, then SIGKILL, each waited for this long.
JOIN_TIMEOUT = 1.0


@dataclass
class WorkerHandle:
    """The parent's handle on one worker process."""

    index: int
    process: Any
    conn: Any
    inflight: dict[int, tuple[int, int]] = field(default_factory=dict)  # batch_id -> (c0, c1)
    call_id: int = 0  # the call this worker has been told about
    ready: bool = False  # it said "ready": a death from now on is a crash, not a start-up failure


class Pool(Protocol):
    """What a call needs of its pool (:class:`~autotune.backends.processes.pool.ProcessPool`)."""

    workers: int
    retries: int
    start_method: str

    @property
    def live(self) -> list[WorkerHandle]: ...

    def replace(self, dead: WorkerHandle) -> WorkerHandle: ...

    def output_segment(self, size: int) -> Segment: ...

    def cancel(self, call_id: int) -> None: ...

    def next_batch_id(self) -> int: ...


class Dispatch:
    """One map/reduce call: dispatch batches, collect results, handle faults.

    It drives the workers of ``pool`` through the pool's own interface
    (``live``, ``replace``, ``output_segment``, ``cancel``, ``next_batch_id``)
    and never touches the pool's resources directly.
    """

    def __init__(
        self,
        pool: Pool,
        call_id: int,
        kernel_bytes: bytes,
        plan: ChunkPlan,
        mode: str,
        combine: Any,
        meter: Meter,
        active: int | None = None,
    ) -> None:
        self.pool = pool
        # Workers 0 .. active-1 take part (all by default); the others idle.
        self.active = pool.workers if active is None else max(1, min(active, pool.workers))
        self.plan = plan
        # A map's output has a row for every item up to the plan's stop (the
        # rows before its start are the caller's: ChunkPlan.at).
        self.rows = plan.stop
        self.mode = mode
        self.total = plan.chunks
        self.call_id = call_id
        self.kernel_bytes = kernel_bytes
        self.meter = meter
        self.batches = Batches(self.total, self.active)
        self.fold = OrderedFold(combine, self._bounds) if mode == "reduce" else None
        # A map's outputs: one array per output of the kernel (several when
        # it returns a tuple or a dict), all in one shared segment or none.
        self.structure: Structure | None = None
        self.out: list[np.ndarray] | None = None
        self.out_desc: tuple[str, int, Layout] | None = None  # shared (name, size, layout)
        self.failure: BaseException | None = None
        self.tries: dict[tuple[int, int], int] = {}  # re-run batch -> deaths so far
        self.coverage = Coverage(self.total)  # chunks accepted, each once

    def taking_part(self) -> list[WorkerHandle]:
        """The workers this call uses."""
        return self.pool.live[: self.active]

    # The loop ---------------------------------------------------------------
    def run(self) -> Any:
        """The call's result, or None with ``self.failure`` set."""
        pool = self.pool
        try:
            # One batch for every worker first, then the queued second ones:
            # with few chunks, the first worker must not take them all.
            for depth in range(1, DEPTH + 1):
                for w in self.taking_part():
                    self._refill(w, depth)
            while self.coverage or any(w.inflight for w in pool.live):
                if self.failure is not None and not any(w.inflight for w in pool.live):
                    break
                self._step()
        finally:
            self._end()
        if self.failure is None:
            try:
                self.coverage.check_complete()
            except RangeError as exc:
                self.failure = exc
        if self.failure is not None:
            return None
        if self.mode == "map":
            assert self.structure is not None and self.out is not None
            return self.structure.build(self.out)
        assert self.fold is not None
        return self.fold.result()

    def _bounds(self, c: int) -> tuple[int, int]:
        return self.plan.bounds(c, c + 1)

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
                self._send(w, ("out", self.call_id, None, 0, None, None))
            return
        batch_id = msg[2]
        batch = w.inflight.pop(batch_id, None)
        if kind == "done" and batch is not None:
            self.meter.add_busy(w.index, msg[4])
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
        try:
            self.coverage.accept(c0, c1)
        except RangeError as exc:
            self._fail(exc)
            return
        if results is not None:
            try:
                if self.mode == "map":
                    for c, item in zip(range(c0, c1), results, strict=True):
                        if item is not None:  # None: written to shared memory
                            self._store(c, item)
                else:
                    assert self.fold is not None and len(results) == c1 - c0
                    self.fold.extend(c0, results)
            except Exception as exc:
                # A result that does not fit (or a combine function that
                # raised): the call fails and drains; the pool stays usable.
                self._fail(exc)
        start, stop = self.plan.bounds(c0, c1)
        self.meter.advance(stop - start)

    def _store(self, c: int, item: Any) -> None:
        start, stop = self.plan.bounds(c, c + 1)
        structure = self.structure
        if type(item) is np.ndarray and structure is not None and structure.kind == "array":
            # The worker checked its length; only its rows are left to check.
            arrays = [item]
        else:
            structure, arrays = split_map_result(item, start, stop, structure)
        if self.out is None:
            self._allocate(structure, [(a.shape[1:], a.dtype) for a in arrays])
        assert self.out is not None
        for i, (arr, out) in enumerate(zip(arrays, self.out, strict=True)):
            check_row_like(arr, out, start, stop, structure.label(i))
            out[start:stop] = arr

    def _allocate(self, structure: Structure, rows: list[tuple[tuple[int, ...], Any]]) -> None:
        """Create the outputs for ``rows`` (row shape, dtype) of ``structure``; tell the workers.

        Every output of the map lives in one segment, laid out one after the
        other (:func:`~autotune.backends.shm.output_layout`), so a tuple or
        dict result is written in place by the workers like a single array.
        """
        self.structure = structure
        if not wants_shared_output(rows, self.rows):
            self.out = [np.empty((self.rows, *tail), dtype=dtype) for tail, dtype in rows]
            return
        size, layout = output_layout(self.rows, rows)
        seg = self.pool.output_segment(size)
        self.out_desc = (seg.name, seg.size, layout)
        self.out = output_views(seg.mmap, layout)
        for w in self.taking_part():
            self._send(w, ("out", self.call_id, seg.name, seg.size, structure, layout))

    def _refill(self, w: WorkerHandle, depth: int = DEPTH) -> None:
        """Keep ``depth`` batches queued on worker ``w``."""
        if w.index >= self.active:
            return  # not taking part in this call (a replaced idle worker)
        if w.call_id != self.call_id:
            w.call_id = self.call_id
            msg = ("call", self.call_id, self.kernel_bytes, self.mode, self.plan)
            if not self._send(w, msg):
                return
            if self.out_desc is not None:
                name, size, layout = self.out_desc
                out_msg = ("out", self.call_id, name, size, self.structure, layout)
                if not self._send(w, out_msg):
                    return
        while len(w.inflight) < depth and self.batches and self.failure is None:
            if w.inflight and self.batches.remaining < self.active:
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
                start, stop = self.plan.bounds(*running)
                self._fail(
                    WorkerLost(
                        f"a worker died ({how}) while computing items [{start}, {stop}), "
                        f"which were already re-run {pool.retries} time(s); giving up",
                        start=start,
                        stop=stop,
                    )
                )
            else:
                self.meter.retries += 1
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
