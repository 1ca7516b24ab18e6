"""``Evaluator``: run a kernel over index ranges in worker processes that share the data.

The recipe it implements: keep big data in the parent, let the workers read
it copy-on-write (fork) or from shared memory (spawn, forkserver), send only
``(start, stop)`` index ranges, and bring back small partials (``reduce``) or
write results straight into a shared-memory output (``map``).

How work flows.  Workers start once and serve every call until
:meth:`Evaluator.close`.  A call sends the kernel to each worker once, then
chunk *batches* (ranges of chunk indices, shrinking as the work runs out),
keeping two batches queued per worker so that no worker waits for the
parent.  The parent owns the only copy of "who holds what", so a worker that
dies costs exactly its batches, which are re-run on a replacement; there is
no shared lock a dying worker could take with it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing as mp
import operator
import os
import pickle
import signal
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

import numpy as np

from autotune._errors import WorkerLost
from autotune._schedule import Batches, OrderedFold, balanced_chunk_len, chunk_bounds, n_chunks
from autotune._shared import _ALLOCATED, check_names, dumps_callable, pack
from autotune._shm import Segment
from autotune._shm import unlink as unlink_segment
from autotune._threads import ThreadRunner, in_thread_kernel
from autotune._worker import WorkerSpec, in_worker, wants_shared_output, worker_main

if TYPE_CHECKING:
    from autotune._dask import DaskRunner
    from autotune.profile import Profile

__all__ = ["Evaluator", "BACKENDS"]

BACKENDS = ("processes", "threads", "dask")
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
# combine functions with a known identity, for reduce over an empty range.
_IDENTITY = {operator.add: 0, operator.mul: 1}


class _RemoteTraceback(Exception):
    """The worker's traceback, attached as ``__cause__`` of a re-raised kernel error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb


class RemoteError(RuntimeError):
    """A kernel raised an exception that could not be sent back as itself."""


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


def _default_start_method() -> str:
    # Chosen explicitly, never Python's default: that is forkserver on Linux
    # from 3.14 and spawn on macOS.  fork is the cheapest way to share data
    # read-only, and the workers are started before any thread of ours.
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class Evaluator:
    """Run ``kernel(shared, start, stop)`` over ``[0, n)`` in worker processes.

    Parameters
    ----------
    workers : int, optional
        Worker processes.  Default: the profile's, else the physical cores
        this process may use.
    chunk_len : int, optional
        Items per chunk, honoured exactly.  Default: the profile's, else the
        heuristic (about an eighth of the per-core L2 cache); those are
        fitted to each call's ``n`` (shortened a little so that few chunks
        split evenly over the workers).
    shared : dict of str to object, optional
        Data the kernels read: arrays, or any object (a list of scipy
        splines...).  Kernels receive it as a read-only namespace
        (``shared.x`` or ``shared["x"]``).  Never pickled per task: under
        ``fork`` inherited copy-on-write; under ``spawn``/``forkserver``
        pickled once, with every array inside it placed in shared memory.
    profile : Profile or str, optional
        A profile, or a workload name looked up with
        :func:`autotune.load_profile`.  Explicit ``workers``/``chunk_len``
        override it.
    start_method : {"fork", "spawn", "forkserver"}, optional
        Default ``"fork"`` where the platform has it, else ``"spawn"``.
    blas_threads : int or None
        BLAS/OpenMP threads per worker (threadpoolctl); ``None`` leaves them.
        Under ``fork`` the limit is also in force in this process while the
        evaluator is open: forked workers inherit it without starting a BLAS
        thread pool of their own (whose threads would spin on the cores).
    pin : bool
        Pin workers to distinct physical cores first, then their siblings.
    retries : int
        How many times a batch lost with a dying worker is re-run before
        :class:`autotune.WorkerLost` is raised.
    backend : {"processes", "threads", "dask"}, optional
        Default: the profile's (the backend measured fastest), else
        ``"processes"``.  ``"threads"`` runs the kernel in threads of this process: no copies
        and no start-up, and it scales when the kernel releases the GIL (numpy
        ufuncs do, ``RectBivariateSpline.ev`` does not).  The kernel then runs
        concurrently in one process and must be thread-safe.  ``"dask"`` runs
        it as tasks on a Dask cluster (``client`` or ``address``): ``shared`` is
        sent to each Dask worker once, and ``workers`` means tasks in flight
        (default two per worker thread); a profile name is matched to the cluster.
    client : dask.distributed.Client, optional
        The cluster for ``backend="dask"``; it is not closed by :meth:`close`.
    address : str, optional
        Instead of ``client``: a scheduler address (``"tcp://host:8786"``) to
        connect to; that connection is closed by :meth:`close`.

    Notes
    -----
    The pool starts in the constructor and serves every call until
    :meth:`close` (or the end of a ``with`` block).  Calls from several
    threads are serialised.  A ``KeyboardInterrupt`` (or any exception in the
    parent) during a call closes the evaluator: workers are ended and every
    shared-memory segment is unlinked.  An evaluator that is garbage-collected
    unclosed is cleaned up the same way.
    """

    def __init__(
        self,
        workers: int | None = None,
        chunk_len: int | None = None,
        *,
        shared: Mapping[str, Any] | None = None,
        profile: Profile | str | None = None,
        start_method: str | None = None,
        blas_threads: int | None = 1,
        pin: bool = False,
        retries: int = 2,
        backend: str | None = None,
        client: Any = None,
        address: str | None = None,
    ) -> None:
        if in_worker() or in_thread_kernel():
            raise RuntimeError(
                "autotune.Evaluator cannot be created inside an evaluator's kernel: nested "
                "process pools oversubscribe the cores and can deadlock; parallelise the outer "
                "level only"
            )
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        workers = _positive_int("workers", workers)
        chunk_len = explicit_chunk_len = _positive_int("chunk_len", chunk_len)
        blas_threads = _positive_int("blas_threads", blas_threads)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        method = start_method or _default_start_method()
        if method not in mp.get_all_start_methods():
            raise ValueError(
                f"start_method must be one of {', '.join(mp.get_all_start_methods())}; "
                f"got {start_method!r}"
            )
        shared_dict = check_names(shared)

        self._profile = None
        if profile is not None and (workers is None or chunk_len is None or backend is None):
            self._profile = _resolve_profile(
                profile, backend, client if client is not None else address
            )
            workers = workers or self._profile.workers
            chunk_len = chunk_len or self._profile.chunk_len
            if backend is None and self._profile.source != "heuristic":
                backend = self._profile.backend  # run what was measured fastest
        backend = backend or "processes"
        dask_runner = None
        if backend == "dask":
            from autotune._dask import DaskRunner

            if pin:
                raise ValueError("pin=True needs backend='processes'")
            # Connects, and sends `shared` to every Dask worker once.
            dask_runner = DaskRunner(
                workers, shared_dict, blas_threads, client=client, address=address
            )
            workers = dask_runner.workers
        elif client is not None or address is not None:
            raise ValueError("client= and address= are for backend='dask'")
        if backend == "threads" and pin:
            raise ValueError("pin=True needs backend='processes'")
        self._heuristic_chunks = chunk_len is None
        # An explicit chunk_len is honoured to the item; one from a profile or
        # the heuristic was measured at another n and is fitted to each call's.
        self._fit_chunks = explicit_chunk_len is None
        if workers is None or chunk_len is None:
            from autotune.probe import probe
            from autotune.profile import heuristic_profile

            guess = heuristic_profile(probe(), "default", None)
            workers = workers or guess.workers
            chunk_len = chunk_len or guess.chunk_len

        self.workers: int = workers
        self.chunk_len: int = chunk_len
        self.start_method = None if backend in ("threads", "dask") else method
        self.blas_threads = blas_threads
        self.pin = bool(pin)
        self.retries = retries
        self.backend = backend

        self._ctx = mp.get_context(method)
        self._shared = shared_dict
        # Calls from several threads are serialised; close() from another
        # thread waits for the call in progress.  Reentrant so that a call that
        # fails can close the evaluator while holding it.
        self._lock = threading.RLock()
        self._busy: int | None = None  # thread running a call
        self._owner_pid = os.getpid()
        self._closed = False
        self._call_id = 0
        self._batch_id = 0
        self._out_cache: tuple[str, int, weakref.ref[Any]] | None = None
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, _Resources.shutdown, self._res)
        self._threads: ThreadRunner | None = None
        self._dask = self._res.dask = dask_runner
        if dask_runner is not None:
            return
        if backend == "threads":
            self._threads = self._res.threads = ThreadRunner(workers, shared_dict, blas_threads)
            return
        try:
            self._control = Segment.create(64)
            self._res.segments.append(self._control)
            self._cancelled: np.ndarray | None = np.frombuffer(
                self._control.mmap, dtype=np.int64, count=1
            )
            self._res.cancel = self._cancelled
            self._packed = None
            if method != "fork":
                self._packed, segments = pack(shared_dict)
                for seg in segments:
                    if seg.name not in _ALLOCATED:
                        self._res.segments.append(seg)  # ours: unlinked at close
                    else:
                        self._res.borrowed.append(seg)  # the user's shared_array
            self._cpus = self._pin_cpus() if self.pin else None
            with self._blas_limited():
                for i in range(self.workers):
                    self._res.workers.append(self._start_worker(i))
        except BaseException:
            self.close()
            raise

    # -- public API -------------------------------------------------------
    def map(self, kernel: Callable[..., Any], n: int) -> np.ndarray:
        """Results of ``kernel(shared, start, stop)`` for every chunk, joined along axis 0.

        Parameters
        ----------
        kernel : callable
            Returns an array whose first axis has length ``stop - start``;
            every chunk must give the same row shape and dtype.
        n : int
            Number of items.

        Returns
        -------
        numpy.ndarray
            Shape ``(n, *row_shape)``.  For ``n == 0`` an empty float64
            array (no chunk ran, so the row shape is unknown).
        """
        return self._call(kernel, n, "map", None)

    def reduce(
        self,
        kernel: Callable[..., Any],
        n: int,
        combine: Callable[[Any, Any], Any] = operator.add,
    ) -> Any:
        """Partials of every chunk combined in index order.

        ``combine(combine(p0, p1), p2) ...``: the same operations in the same
        order as a serial loop over the same chunks, whichever worker
        finishes first, so the result is deterministic to the bit.  For
        ``n == 0`` the identity of ``combine`` (0 for ``operator.add``, 1 for
        ``operator.mul``); other combine functions raise ``ValueError``.
        """
        if not callable(combine):
            raise TypeError(f"combine must be callable, got {type(combine).__name__}")
        return self._call(kernel, n, "reduce", combine)

    def close(self) -> None:
        """End the workers and unlink every shared-memory segment (idempotent).

        Called from another thread while a call runs, it waits for that call.
        """
        with self._lock:
            self._closed = True
            # Our view of the control word would keep its mapping (and a file
            # descriptor) alive past the shutdown.
            self._cancelled = None
            self._finalizer()
            # Let the user's data go with the pool, even if this object lingers.
            self._shared = {}
            self._packed = None

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<Evaluator {state} workers={self.workers} chunk_len={self.chunk_len} "
            f"start_method={self.start_method!r}>"
        )

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (empty for the threads backend)."""
        return [w.process.pid for w in self._res.workers]

    # -- workers ----------------------------------------------------------
    def _pin_cpus(self) -> list[int]:
        from autotune.probe import probe

        order = list(probe().pin_order) or sorted(os.sched_getaffinity(0))
        return [order[i % len(order)] for i in range(self.workers)]

    def _start_worker(self, index: int) -> _Worker:
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
        return _Worker(index, process, parent_conn)

    def _blas_limited(self) -> contextlib.AbstractContextManager[Any]:
        """BLAS thread limits in force while workers start.

        A spawned interpreter reads the limit from its environment when it
        first imports numpy, and starts no BLAS thread beyond it.  A forked
        worker inherits the parent's BLAS state: see :class:`_BlasHold`.
        """
        if self.blas_threads is None:
            return contextlib.nullcontext()
        if self.start_method == "fork":
            if not self._res.blas_held:
                _BLAS_HOLD.acquire(self.blas_threads)
                self._res.blas_held = True
            return contextlib.nullcontext()
        return _environ(_BLAS_ENV, str(self.blas_threads))

    def _replace(self, dead: _Worker) -> _Worker:
        _PARENT_FDS.discard(_fileno(dead.conn))
        dead.conn.close()
        _join_all([dead.process], JOIN_TIMEOUT)
        dead.process.close()
        with self._blas_limited():
            new = self._start_worker(dead.index)
        self._res.workers[dead.index] = new
        return new

    def _output_segment(self, size: int) -> Segment:
        """Shared memory for a map result of ``size`` bytes.

        A fresh segment costs a page fault per page in every process that
        touches it: on a memory-bound map that doubles the time.  So the
        last output segment stays linked (and mapped in the workers), and is
        reused when the next result has the same size and the user no longer
        holds the previous one.  The cost: one output's memory held until
        :meth:`close`.
        """
        cache = self._out_cache
        if cache is not None:
            name, cached_size, mapping = cache
            if cached_size == size and mapping() is None:
                seg = Segment.attach(name, size, populate=True)
                self._out_cache = (name, size, weakref.ref(seg.mmap))
                return seg
            # Still in the user's hands (or another size): give up the name;
            # the user's array keeps its own mapping.
            self._out_cache = None
            self._res.output_names.remove(name)
            unlink_segment(name)
        seg = Segment.create(size)
        self._res.output_names.append(seg.name)
        self._out_cache = (seg.name, seg.size, weakref.ref(seg.mmap))
        return seg

    # -- one call ---------------------------------------------------------
    def _call(self, kernel: Callable[..., Any], n: int, mode: str, combine: Any) -> Any:
        if not callable(kernel):
            raise TypeError(f"kernel must be callable, got {type(kernel).__name__}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        n = int(n)
        self._check_not_nested()
        if self._closed:
            raise RuntimeError("this Evaluator is closed")
        if n == 0:
            if mode == "map":
                return np.empty((0,))
            if combine in _IDENTITY:
                return _IDENTITY[combine]
            raise ValueError("reduce over n=0 items with a combine function of unknown identity")
        runner = self._threads or self._dask
        kernel_bytes = None if runner is not None else dumps_callable(kernel, "kernel")
        with self._lock:
            if self._closed:
                raise RuntimeError("this Evaluator is closed")
            self._busy = threading.get_ident()
            try:
                if runner is not None:
                    return runner.run(kernel, n, self._chunk_len_for(n), mode, combine)
                assert kernel_bytes is not None
                call = _Call(self, kernel_bytes, n, mode, combine)
                try:
                    result = call.run()
                except BaseException:
                    # KeyboardInterrupt, or a failure of our own: workers may
                    # be mid-batch; end them rather than leave them unknown.
                    self.close()
                    raise
            finally:
                self._busy = None
        failure, call.failure, call.out = call.failure, None, None
        del call  # the traceback below must not keep the call's output mapped
        if failure is not None:
            # A kernel error, a bad map result or WorkerLost: the call was
            # drained, so the pool is idle and stays usable.
            raise failure
        return result

    def _check_not_nested(self) -> None:
        """Refuse use from inside a kernel or a combine function: it would deadlock."""
        if in_worker() or in_thread_kernel() or os.getpid() != self._owner_pid:
            raise RuntimeError(
                "nested use of an autotune Evaluator from inside a kernel is not supported "
                "(nested pools oversubscribe the cores and can deadlock); parallelise the "
                "outer level only"
            )
        if self._busy == threading.get_ident():
            raise RuntimeError(
                "nested use: this Evaluator is already running a call in this thread "
                "(a combine function cannot call the evaluator that runs it)"
            )

    def _chunk_len_for(self, n: int) -> int:
        chunk_len = self.chunk_len
        if self._heuristic_chunks:
            # The heuristic chunk may be larger than a small n deserves: keep
            # a few chunks per worker so all of them get work.
            chunk_len = max(1, min(chunk_len, math.ceil(n / (4 * self.workers))))
        if not self._fit_chunks:
            return chunk_len
        return balanced_chunk_len(n, chunk_len, self.workers)


def _resolve_profile(profile: Any, backend: str | None = None, cluster: Any = None) -> Profile:
    from autotune.profile import Profile, load_profile

    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, str):
        from autotune.workloads import ITEM_BYTES

        if backend == "dask" and cluster is not None:
            # Matched to the cluster's workers, never to a local profile.
            from autotune._dask import load_cluster_profile

            return load_cluster_profile(profile, cluster, item_bytes=ITEM_BYTES.get(profile))
        return load_profile(profile, item_bytes=ITEM_BYTES.get(profile), backend="local")
    raise TypeError(f"profile must be a Profile or a workload name, got {type(profile).__name__}")


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
        if arr.shape[1:] != self.out.shape[1:] or arr.dtype != self.out.dtype:
            raise ValueError(
                f"map kernel returned shape {arr.shape} dtype {arr.dtype} for items "
                f"[{start}, {stop}), but the first chunk gave rows of shape "
                f"{self.out.shape[1:]} dtype {self.out.dtype}; every chunk must return "
                f"the same row shape and dtype"
            )
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
