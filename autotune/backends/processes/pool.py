"""``ProcessPool``: the worker processes behind ``Evaluator(backend="processes")``.

The pool owns everything a process pool is made of: the workers (started
once, replaced when they die), the control word they poll between chunks,
the segments that hold the shared data under spawn/forkserver, the cache of
the last map output, the call and batch counters, and the parent's BLAS
limit under fork.  It is the only code that touches them; one call's
dispatch loop (:class:`~autotune.backends.processes.dispatch.Dispatch`) uses
the pool through :attr:`ProcessPool.live`, :meth:`~ProcessPool.replace`,
:meth:`~ProcessPool.output_segment`, :meth:`~ProcessPool.cancel` and
:meth:`~ProcessPool.next_batch_id`.

Like the threads and Dask runners it has ``run(kernel, plan, mode, combine)``
and ``close()``; the caller plans each call (``plan_chunks``) and the pool
runs the plan's ranges.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

import numpy as np

from autotune.backends.processes.blas import BLAS_ENV, BLAS_HOLD, environ
from autotune.backends.processes.dispatch import JOIN_TIMEOUT, Dispatch, WorkerHandle
from autotune.backends.processes.exits import fileno, join_all, startup_failure
from autotune.backends.processes.worker import REPORT_ENV, WorkerSpec, worker_main
from autotune.backends.schedule import ChunkPlan
from autotune.backends.sending import main_snapshot
from autotune.backends.shared import PackedShared, dumps_callable, is_shared_array_segment, pack
from autotune.backends.shm import OutputCache, Segment
from autotune.backends.stats import Meter

__all__ = ["ProcessPool", "WorkerHandle"]

#: Written to the control word at shutdown: larger than any call id.
CANCEL_ALL = 2**62
#: Seconds a starting worker may take to say "ready" (a spawned interpreter
#: importing numpy and scipy on a loaded machine takes a few).
READY_TIMEOUT = 120.0

# Parent-side pipe ends of every live worker of every pool in this process:
# a worker forked later inherits them and must close them.
_PARENT_FDS: set[int] = set()


@dataclass
class _Resources:
    """Everything that must be released, kept apart from the pool so that a
    ``weakref.finalize`` can clean up without keeping the pool alive."""

    workers: list[WorkerHandle] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    cancel: np.ndarray | None = None  # the control word workers poll between chunks
    borrowed: list[Segment] = field(default_factory=list)  # shared_array segments, kept linked
    outputs: OutputCache = field(default_factory=OutputCache)  # the last map output
    owner_pid: int = field(default_factory=os.getpid)
    blas_held: bool = False  # this pool holds the parent's BLAS limit

    def shutdown(self) -> None:
        if os.getpid() != self.owner_pid:
            # A copy inherited by a forked process: the pool is not its to end
            # (and writing the control word would cancel the owner's calls).
            return
        if self.cancel is not None:
            # Cancels every call: workers drop the rest of their batch now
            # instead of finishing it before they read "stop".
            self.cancel[0] = CANCEL_ALL
            self.cancel = None
        workers, self.workers = self.workers, []
        for w in workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(("stop",))
        join_all([w.process for w in workers], JOIN_TIMEOUT)
        for w in workers:
            _PARENT_FDS.discard(fileno(w.conn))
            w.conn.close()
            with contextlib.suppress(ValueError):
                w.process.close()
        self.borrowed = []
        self.outputs.close()
        if self.blas_held:
            self.blas_held = False
            BLAS_HOLD.release()
        segments, self.segments = self.segments, []
        for seg in segments:
            seg.unlink()
            seg.close()


class ProcessPool:
    """Worker processes that share ``shared`` and run chunk batches until :meth:`close`.

    Parameters
    ----------
    workers : int
        Worker processes.
    shared : dict of str to object
        What kernels read: inherited under ``fork``, pickled once into shared
        memory under ``spawn``/``forkserver``.
    start_method : {"fork", "spawn", "forkserver"}
    blas_threads : int or None
        BLAS threads per worker; ``None`` leaves them alone.
    cpus : sequence of int, optional
        Pin worker ``i`` to ``cpus[i]``.
    retries : int
        Re-runs of a batch lost with a dying worker before ``WorkerLost``.
    """

    def __init__(
        self,
        workers: int,
        shared: dict[str, Any],
        *,
        start_method: str,
        blas_threads: int | None,
        cpus: Sequence[int] | None = None,
        retries: int = 2,
    ) -> None:
        self.workers = workers
        self.start_method = start_method
        self.blas_threads = blas_threads
        self.retries = retries
        self._ctx = mp.get_context(start_method)
        self._shared = shared
        self._cpus = None if cpus is None else list(cpus)
        self._call_id = 0
        self._batch_id = 0
        self._packed: PackedShared | None = None
        # What a forked worker finds in __main__: code there goes by reference,
        # anything newer (a notebook cell run since) by value.  None: spawned
        # and forkserver workers inherit nothing, all of __main__ goes by value.
        self._main_at_fork = main_snapshot() if start_method == "fork" else None
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, _Resources.shutdown, self._res)
        try:
            self._control = Segment.create(64)
            self._res.segments.append(self._control)
            self._res.cancel = np.frombuffer(self._control.mmap, dtype=np.int64, count=1)
            if start_method != "fork":
                self._packed, segments = pack(shared, start_method)
                for seg in segments:
                    if not is_shared_array_segment(seg.name):
                        self._res.segments.append(seg)  # ours: unlinked at close
                    else:
                        self._res.borrowed.append(seg)  # the user's shared_array
            with self._blas_limited(), self._report_file() as report:
                for i in range(workers):
                    self._res.workers.append(self._start_worker(i))
                self._await_ready(report)
        except BaseException:
            self.close()
            raise

    # -- the runner interface -----------------------------------------------
    def run(
        self,
        kernel: Callable[..., Any],
        plan: ChunkPlan,
        mode: str,
        combine: Callable[[Any, Any], Any] | None,
        meter: Meter | None = None,
    ) -> Any:
        """Run one call; the kernel's exception (or ``WorkerLost``) is raised as is.

        ``meter`` records the workers' busy time, re-run batches and progress;
        ``plan.workers`` (at most the pool's) take part, the others stay idle.

        After a kernel error the call has drained and the pool stays usable;
        anything else (Ctrl-C, a failure of our own) closes the pool, since
        workers may be left mid-batch.
        """
        if self.closed:
            raise RuntimeError("this process pool is closed")
        kernel_bytes = dumps_callable(kernel, "kernel", self._main_at_fork)
        self._call_id += 1
        active = max(1, min(plan.workers, self.workers))
        meter = meter if meter is not None else Meter(active)
        meter.taking_part(active)
        call = Dispatch(self, self._call_id, kernel_bytes, plan, mode, combine, meter, active)
        try:
            result = call.run()
        except BaseException:
            self.close()
            raise
        failure, call.failure, call.out = call.failure, None, None
        del call  # the traceback below must not keep the call's output mapped
        if failure is not None:
            raise failure
        return result

    def close(self) -> None:
        """End the workers and unlink every segment this pool made (idempotent)."""
        self._finalizer()
        self._shared = {}
        self._packed = None

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.process.pid for w in self._res.workers]

    # -- what one call's dispatch uses ----------------------------------------
    @property
    def live(self) -> list[WorkerHandle]:
        """The current workers, indexed by worker number."""
        return self._res.workers

    def next_batch_id(self) -> int:
        self._batch_id += 1
        return self._batch_id

    def cancel(self, call_id: int) -> None:
        """Tell the workers to drop the rest of call ``call_id``'s batches."""
        if self._res.cancel is not None:
            self._res.cancel[0] = call_id

    def replace(self, dead: WorkerHandle) -> WorkerHandle:
        """Start a worker in place of ``dead`` (which has exited or will be ended)."""
        _PARENT_FDS.discard(fileno(dead.conn))
        dead.conn.close()
        join_all([dead.process], JOIN_TIMEOUT)
        dead.process.close()
        with self._blas_limited():
            new = self._start_worker(dead.index)
        self._res.workers[dead.index] = new
        return new

    def output_segment(self, size: int) -> Segment:
        """Shared memory for a map result of ``size`` bytes (the last one's, when free)."""
        return self._res.outputs.get(size)

    # -- starting workers -----------------------------------------------------
    @contextlib.contextmanager
    def _report_file(self) -> Iterator[str | None]:
        """A file spawned workers leave a start-up message in (see ``check_not_bootstrapping``)."""
        if self.start_method != "spawn":
            # fork runs no main-module import; a forkserver's environment was
            # fixed when it started.
            yield None
            return
        fd, path = tempfile.mkstemp(prefix="autotune_start_", suffix=".txt")
        os.close(fd)
        try:
            with environ((REPORT_ENV,), path):
                yield path
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _await_ready(self, report: str | None) -> None:
        """Wait until every worker said "ready"; one that ended first is a start-up error.

        Such a worker is not replaced: whatever stopped it (a missing main
        guard, a module it cannot import) would stop every replacement too.
        """
        pending = {w.conn: w for w in self._res.workers}
        while pending:
            sentinels = {w.process.sentinel: w for w in pending.values()}
            ready = wait(list(pending) + list(sentinels), timeout=READY_TIMEOUT)
            if not ready:
                raise RuntimeError(
                    f"{len(pending)} autotune worker(s) did not start within "
                    f"{READY_TIMEOUT:g} s ({self.start_method})"
                )
            for obj in ready:
                w = pending.get(obj) or sentinels.get(obj)
                if w is None or w.conn not in pending:
                    continue
                msg = None
                with contextlib.suppress(EOFError, OSError):
                    if w.conn.poll():
                        msg = w.conn.recv()
                if msg is not None and msg[0] == "ready":
                    w.ready = True
                    del pending[w.conn]
                    continue
                if msg is None and obj is w.conn:
                    continue  # woken by EOF: the sentinel follows
                told = None
                if msg is not None and msg[0] == "error":
                    told = f"{msg[6]}: {msg[7]}\n{msg[8]}"  # type, message, traceback
                elif report is not None:
                    with contextlib.suppress(OSError), open(report, encoding="utf-8") as f:
                        told = f.read().strip() or None
                w.process.join(JOIN_TIMEOUT)
                raise startup_failure(w.index, w.process.exitcode, self.start_method, told)

    def _start_worker(self, index: int) -> WorkerHandle:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        fork = self.start_method == "fork"
        spec = WorkerSpec(
            index=index,
            shared=self._shared if fork else None,
            packed=self._packed,
            control_name=self._control.name,
            control_size=self._control.size,
            # Under fork the limit is set in the parent around the fork (below).
            blas_threads=None if fork else self.blas_threads,
            cpu=None if self._cpus is None else self._cpus[index],
            close_fds=tuple(_PARENT_FDS | {parent_conn.fileno()}) if fork else (),
        )
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(child_conn, spec),
            name=f"autotune-worker-{index}",
            daemon=True,
        )
        if fork:
            # Objects the child inherits live on pages it shares with us
            # copy-on-write.  A garbage collection in the child writes to the
            # header of every object it visits and so copies those pages;
            # frozen objects are never visited.
            gc.freeze()
            try:
                process.start()
            finally:
                gc.unfreeze()
        else:
            process.start()
        child_conn.close()
        _PARENT_FDS.add(parent_conn.fileno())
        return WorkerHandle(index, process, parent_conn)

    def _blas_limited(self) -> contextlib.AbstractContextManager[Any]:
        """BLAS thread limits in force while workers start.

        A spawned interpreter reads the limit from its environment when it
        first imports numpy, and starts no BLAS thread beyond it.  A forked
        worker inherits the parent's BLAS state: see
        :class:`~autotune.backends.processes.blas.BlasHold`.
        """
        if self.blas_threads is None:
            return contextlib.nullcontext()
        if self.start_method == "fork":
            if not self._res.blas_held:
                BLAS_HOLD.acquire(self.blas_threads)
                self._res.blas_held = True
            return contextlib.nullcontext()
        return environ(BLAS_ENV, str(self.blas_threads))
