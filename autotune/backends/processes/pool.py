"""The process pool behind ``Evaluator(backend="processes")``: its plumbing.

Worker handles and what must be released (``_Resources``), one call's
dispatch loop (``_Call``: batches out, results in, dead workers replaced and
their chunks re-run, failures drained), the parent's BLAS limit while fork
pools are open, and how a worker's exit or exception is reported.  The
public front, argument checks and backend choice live in ``evaluator.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

import numpy as np

from autotune._errors import RemoteError, WorkerLost
from autotune.backends.processes.worker import wants_shared_output
from autotune.backends.rows import check_row_like
from autotune.backends.schedule import Batches, OrderedFold, chunk_bounds, n_chunks
from autotune.backends.shm import Segment
from autotune.backends.shm import unlink as unlink_segment
from autotune.backends.threads import ThreadRunner

if TYPE_CHECKING:
    from autotune.backends.dask.runner import DaskRunner
    from autotune.evaluator import Evaluator

__all__: list[str] = []

#: Batches queued per worker: one running, one waiting, so the worker never
#: idles while the parent reads its last result.
DEPTH = 2
#: Graceful stop, then SIGTERM, then SIGKILL, each waited for this long.
JOIN_TIMEOUT = 1.0
#: Written to the control word at shutdown: larger than any call id.
CANCEL_ALL = 2**62

# Parent-side pipe ends of every live worker of every evaluator in this
# process: a worker forked later inherits them and must close them.
_PARENT_FDS: set[int] = set()


class _RemoteTraceback(Exception):
    """The worker's traceback, attached as ``__cause__`` of a re-raised kernel error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb


@dataclass
class _Worker:
    index: int
    process: Any
    conn: Any
    inflight: dict[int, tuple[int, int]] = field(default_factory=dict)  # batch_id -> (c0, c1)
    call_id: int = 0  # the call this worker has been told about


@dataclass
class _Resources:
    """Everything that must be released, kept apart from the Evaluator so a
    ``weakref.finalize`` can clean up without keeping the Evaluator alive."""

    workers: list[_Worker] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    cancel: np.ndarray | None = None  # the control word workers poll between chunks
    borrowed: list[Segment] = field(default_factory=list)  # shared_array segments, kept linked
    output_names: list[str] = field(default_factory=list)  # map outputs kept for reuse
    threads: ThreadRunner | None = None  # the threads backend instead of processes
    dask: DaskRunner | None = None  # the dask backend instead of processes
    owner_pid: int = field(default_factory=os.getpid)
    blas_held: bool = False  # this evaluator holds the parent's BLAS limit

    def shutdown(self) -> None:
        if os.getpid() != self.owner_pid:
            # A copy inherited by a forked process: the pool is not its to end
            # (and writing the control word would cancel the owner's calls).
            return
        if self.threads is not None:
            self.threads.close()
            self.threads = None
        if self.dask is not None:
            self.dask.close()
            self.dask = None
        if self.cancel is not None:
            # Cancels every call: workers drop the rest of their batch now
            # instead of finishing it before they read "stop".
            self.cancel[0] = CANCEL_ALL
            self.cancel = None
        workers, self.workers = self.workers, []
        for w in workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(("stop",))
        _join_all([w.process for w in workers], JOIN_TIMEOUT)
        for w in workers:
            _PARENT_FDS.discard(_fileno(w.conn))
            w.conn.close()
            with contextlib.suppress(ValueError):
                w.process.close()
        self.borrowed = []
        names, self.output_names = self.output_names, []
        for name in names:
            unlink_segment(name)
        if self.blas_held:
            self.blas_held = False
            _BLAS_HOLD.release()
        segments, self.segments = self.segments, []
        for seg in segments:
            seg.unlink()
            seg.close()


#: Read by OpenBLAS, OpenMP, MKL and Accelerate when a process first loads them.
_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


@contextlib.contextmanager
def _environ(names: tuple[str, ...], value: str) -> Iterator[None]:
    """Set environment variables for the duration (a spawned child inherits them)."""
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, value))
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


class _BlasHold:
    """This process's BLAS limit while fork evaluators are open (a refcount).

    Setting the limit inside a freshly forked worker makes OpenBLAS start its
    thread pool there, and those threads spin for about a fifth of a second
    of CPU: a core stolen from the other workers.  Setting it in the parent
    and restoring it right after the fork only moves the spin into the
    parent.  So the parent keeps the limit while an evaluator is open (its
    workers occupy the cores anyway), forked workers inherit it and start no
    thread, and the last evaluator to close restores the original limits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._threads: int | None = None
        self._limiter: Any = None

    def acquire(self, threads: int) -> None:
        from threadpoolctl import threadpool_limits

        with self._lock:
            if self._holders == 0:
                self._limiter = threadpool_limits(limits=threads)
            elif threads != self._threads:
                threadpool_limits(limits=threads)  # undone by the first limiter's restore
            self._threads = threads
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = self._threads = None


_BLAS_HOLD = _BlasHold()


def _fileno(conn: Any) -> int:
    try:
        return int(conn.fileno())
    except (OSError, ValueError):
        return -1


def _join_all(processes: list[Any], timeout: float) -> None:
    """Join processes; terminate, then kill, those that do not exit in time."""
    for stage in (None, "terminate", "kill"):
        alive = []
        for p in processes:
            try:
                if p.is_alive():
                    alive.append(p)
            except ValueError:  # already closed
                pass
        if not alive:
            return
        for p in alive:
            if stage is not None:
                with contextlib.suppress(OSError, ValueError):
                    getattr(p, stage)()
        for p in alive:
            p.join(timeout)


class _Call:
    """One map/reduce call: dispatch batches, collect results, handle faults."""

    def __init__(self, ev: Evaluator, kernel_bytes: bytes, n: int, mode: str, combine: Any) -> None:
        self.ev = ev
        self.n = n
        self.mode = mode
        self.chunk_len = ev._chunk_len_for(n)
        self.total = n_chunks(n, self.chunk_len)
        ev._call_id += 1
        self.call_id = ev._call_id
        self.kernel_bytes = kernel_bytes
        self.batches = Batches(self.total, ev.workers)
        self.fold = OrderedFold(combine) if mode == "reduce" else None
        self.out: np.ndarray | None = None
        self.out_desc: tuple[str, int] | None = None  # shared output (name, size)
        self.failure: BaseException | None = None
        self.tries: dict[tuple[int, int], int] = {}  # re-run batch -> deaths so far
        self.completed = 0  # chunks

    # The loop ---------------------------------------------------------------
    def run(self) -> Any:
        """The call's result, or None with ``self.failure`` set."""
        ev = self.ev
        try:
            # One batch for every worker first, then the queued second ones:
            # with few chunks, the first worker must not take them all.
            for depth in range(1, DEPTH + 1):
                for w in list(ev._res.workers):
                    self._refill(w, depth)
            while self.completed < self.total or any(w.inflight for w in ev._res.workers):
                if self.failure is not None and not any(w.inflight for w in ev._res.workers):
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
        ev = self.ev
        by_conn = {w.conn: w for w in ev._res.workers}
        by_sentinel = {w.process.sentinel: w for w in ev._res.workers}
        ready = wait(list(by_conn) + list(by_sentinel), timeout=1.0)
        # Messages first: a worker that sent its result and then died has
        # still done that work.
        for obj in ready:
            w = by_conn.get(obj)
            if w is None or ev._res.workers[w.index] is not w:
                continue
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                self._lost(w)
                continue
            self._handle(w, msg)
        for obj in ready:
            w = by_sentinel.get(obj)
            if w is not None and ev._res.workers[w.index] is w:
                # Drain what it managed to send before dying.
                while True:
                    try:
                        if not w.conn.poll():
                            break
                        self._handle(w, w.conn.recv())
                    except (EOFError, OSError):
                        break
                self._lost(w)

    def _handle(self, w: _Worker, msg: tuple) -> None:
        kind, call_id = msg[0], msg[1]
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
            self._fail(_rebuild_exception(msg))
            if batch is None:  # the kernel could not be loaded: no batch will run
                self._forget(w, None)
        elif kind == "cancelled" and batch is not None and self.failure is None:
            # Only a failing call cancels its batches; anything else that
            # cancels one (a stray write to the control word) must not lose it.
            self.batches.requeue(batch)
        if self.failure is None:
            self._refill(w)

    def _forget(self, w: _Worker, _: Any) -> None:
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
        seg = self.ev._output_segment(max(count * dtype.itemsize, 1))
        self.out_desc = (seg.name, seg.size)
        self.out = np.frombuffer(seg.mmap, dtype=dtype, count=count).reshape(shape)
        for w in self.ev._res.workers:
            self._send(w, ("out", self.call_id, seg.name, seg.size, shape, dtype))

    def _refill(self, w: _Worker, depth: int = DEPTH) -> None:
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
            if w.inflight and self.batches.remaining < len(self.ev._res.workers):
                break  # the last chunks go to idle workers, not into a queue

            # Until a map knows its output's shape, results come back through
            # the pipe: keep those batches to one chunk.
            limit = 1 if self.mode == "map" and self.out is None else None
            batch = self.batches.take(limit)
            self.ev._batch_id += 1
            w.inflight[self.ev._batch_id] = batch
            if not self._send(w, ("batch", self.call_id, self.ev._batch_id, *batch)):
                return

    def _send(self, w: _Worker, msg: tuple) -> bool:
        try:
            w.conn.send(msg)
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._lost(w)
            return False

    def _lost(self, w: _Worker) -> None:
        """Worker ``w`` died: re-queue its batches and start a replacement."""
        ev = self.ev
        if ev._res.workers[w.index] is not w:
            return
        lost = list(w.inflight.values())
        w.inflight.clear()
        code = w.process.exitcode
        if code is None:
            w.process.join(JOIN_TIMEOUT)
            code = w.process.exitcode
        how = _describe_exit(code)
        if lost and self.failure is None:
            # A worker runs its batches in order: only the oldest had started.
            # Its chunks are re-run one by one, so that a chunk that kills its
            # worker every time is pinned down and named, and the others pass.
            running, waiting = lost[0], lost[1:]
            for batch in waiting:
                self.batches.requeue(batch)
            tries = self.tries.get(running, 0) + 1
            if tries > ev.retries:
                start, stop = chunk_bounds(*running, self.chunk_len, self.n)
                self._fail(
                    WorkerLost(
                        f"a worker died ({how}) while computing items [{start}, {stop}), "
                        f"which were already re-run {ev.retries} time(s); giving up",
                        start=start,
                        stop=stop,
                    )
                )
            else:
                for c in range(*running):
                    self.tries[(c, c + 1)] = tries
                    self.batches.requeue((c, c + 1))
        new = ev._replace(w)
        if self.failure is None:
            self._refill(new)

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            # Workers check this word between chunks and drop the rest of
            # their batches, so the call drains in about one chunk's time.
            if self.ev._cancelled is not None:
                self.ev._cancelled[0] = self.call_id

    def _end(self) -> None:
        for w in self.ev._res.workers:
            if w.call_id == self.call_id:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send(("end", self.call_id))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _rebuild_exception(msg: tuple) -> BaseException:
    """The kernel's exception, its type kept, the worker's traceback attached."""
    _, _, _, start, stop, exc_bytes, name, message, tb = msg
    exc: BaseException | None = None
    if exc_bytes is not None:
        try:
            exc = pickle.loads(exc_bytes)
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(f"{name}: {message}")
    where = f"raised by the kernel in a worker on items [{start}, {stop})"
    # Put the worker's traceback into the message itself where the exception
    # is a plain one-string exception, so that it shows in logs that print
    # only str(exc); always chain it as the cause too (as concurrent.futures).
    if (
        len(exc.args) == 1
        and isinstance(exc.args[0], str)
        and type(exc).__str__
        in (
            BaseException.__str__,
            Exception.__str__,
        )
    ):
        exc.args = (f"{exc.args[0]}\n\n[{where}]\nWorker traceback:\n{tb}",)
    elif hasattr(exc, "add_note"):
        exc.add_note(f"[{where}]")
    exc.__cause__ = _RemoteTraceback(tb)
    return exc
