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

This module is the public front: arguments, profiles, backend choice,
starting and replacing workers.  The dispatch loop of one call and the pool's
resources are in ``_pool.py``; the worker's side in ``_worker.py``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing as mp
import operator
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from autotune._pool import (
    _BLAS_ENV,
    _BLAS_HOLD,
    _PARENT_FDS,
    JOIN_TIMEOUT,
    RemoteError,
    _Call,
    _environ,
    _fileno,
    _join_all,
    _Resources,
    _Worker,
)
from autotune._schedule import balanced_chunk_len
from autotune._sending import main_snapshot
from autotune._shared import _ALLOCATED, check_names, dumps_callable, pack
from autotune._shm import Segment
from autotune._shm import unlink as unlink_segment
from autotune._threads import ThreadRunner, in_thread_kernel
from autotune._worker import WorkerSpec, in_worker, worker_main

if TYPE_CHECKING:
    from autotune.profile import Profile


__all__ = ["Evaluator", "BACKENDS", "RemoteError"]

BACKENDS = ("processes", "threads", "dask")
# combine functions with a known identity, for reduce over an empty range.
_IDENTITY = {operator.add: 0, operator.mul: 1}


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
        Default ``"fork"`` where the platform has it, else ``"spawn"``, also
        in a process with other threads (a Jupyter kernel): the forked worker
        runs only autotune's loop and the kernel, and fork shares the data
        copy-on-write and starts fastest; Python 3.12+ warns about fork with
        threads, and ``"forkserver"`` avoids it.  Kernels and classes defined
        in ``__main__`` (a notebook) are sent by value under spawn and
        forkserver, and under fork when defined after the workers started.
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
        # What a forked worker finds in __main__: code there goes by reference,
        # anything newer (a notebook cell run since) by value.  None: spawned
        # and forkserver workers inherit nothing, all of __main__ goes by value.
        self._main_at_fork = main_snapshot() if method == "fork" else None
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
                self._packed, segments = pack(shared_dict, method)
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
        kernel_bytes = (
            None if runner is not None else dumps_callable(kernel, "kernel", self._main_at_fork)
        )
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
