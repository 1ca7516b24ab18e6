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

This module is the public front: argument checks, the profile, the backend
and chunk length of each call, the nesting guard, the lock and finalization.
The work is done by a runner of :mod:`autotune.backends` (the process pool,
threads, Dask), which owns its workers and memory.
"""

from __future__ import annotations

import operator
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from autotune._errors import EfficiencyWarning
from autotune._util import check_int, check_kernel_signature, progress_bar
from autotune.backends import stats as call_stats
from autotune.backends.processes.worker import check_not_bootstrapping, in_worker
from autotune.backends.runners import LazyRunner, Runner, open_runner
from autotune.backends.schedule import n_chunks, plan_chunks
from autotune.backends.shared import check_names
from autotune.backends.stats import CallStats, Meter, advice
from autotune.backends.threads import in_thread_kernel
from autotune.cpu import probe
from autotune.online import OnlineTuning
from autotune.profile import (
    Profile,
)
from autotune.settings import Settings, check_memory, resolve_settings

__all__ = ["Evaluator"]

# combine functions with a known identity, for reduce over an empty range.
_IDENTITY = {operator.add: 0, operator.mul: 1}


class Evaluator:
    """Run ``kernel(shared, start, stop)`` over ``[0, n)`` in worker processes.

    Parameters
    ----------
    workers : int, optional
        Worker processes.  Default: the profile's, else the physical cores
        this process may use.
    chunk_len : int, optional
        Items per chunk, honoured exactly, except that a last round of
        chunks that would leave workers idle is cut into equal pieces for
        all of them (the guided tail: no range is ever longer).  Default:
        the profile's, else the heuristic (about an eighth of the per-core
        L2 cache); those are fitted to each call's ``n`` (shortened a little
        so that few chunks split evenly over the workers).
    shared : dict of str to object, optional
        Data the kernels read: arrays, or any object (a list of scipy
        splines...).  Kernels receive it as a read-only namespace
        (``shared.x`` or ``shared["x"]``).  Never pickled per task: under
        ``fork`` inherited copy-on-write; under ``spawn``/``forkserver``
        pickled once, with every array inside it placed in shared memory.
    profile : Profile, str or path-like, optional
        A profile; a path to a profile file (what ``autotune search --out``
        wrote: a string with a ``/`` or ending in ``.yaml``); or a workload
        name looked up with :func:`autotune.load_profile` (the same lookup,
        the same backend choice).  A file that does not fit this CPU or
        backend raises :class:`autotune.ProfileError` naming why; a name with
        no fitting profile falls back to the heuristic with a warning and
        then chunks exactly as with no profile.  Explicit
        ``workers``/``chunk_len`` override it.
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
    adapt : bool, optional
        Tune chunk length (and, on 4 or more workers, the worker count) with
        the calls themselves (:mod:`autotune.adapt`): ``None`` (default) does
        so when the settings came from the heuristic (no ``workers``, no
        ``chunk_len``, no measured or published profile), ``True`` from any
        starting point, ``False`` never.  While adapting, a call too small to
        pay for the pool runs in this process (``stats.inline``), and what
        was learned is saved as an online profile (``$AUTOTUNE_PROFILE_DIR``,
        else the user's config directory), under the ``profile`` name given
        or the kernel's ``module:qualname``, for the next process.  Not with
        ``backend="dask"``.
    item_bytes : int, optional
        Bytes each item touches, temporaries included (a float64 input, a
        float64 output and two float64 temporaries: 32), when you know better
        than the evaluator's inference (the rows of the ``shared`` arrays of
        length ``n``).  The heuristic chunk is about L2 per core / 8 /
        ``item_bytes``; each call warns (``RuntimeWarning``) when ``chunk_len
        x item_bytes x workers`` exceeds the memory available
        (``MemAvailable``, narrowed by a cgroup ``memory.max``).

    Notes
    -----
    **Reproducibility.**  A ``map``'s result never depends on the chunking.
    A ``reduce`` over floats does, in the last bits: partials are summed
    chunk by chunk.  With an explicit ``chunk_len`` (or ``adapt=False``) the
    chunks are the same on every call and repeats are bit-identical: the
    cut depends on ``n``, ``workers`` and the chunk length alone
    (:func:`~autotune.backends.schedule.plan_chunks`); while adapting, the
    chunk length changes between calls and so may the last bits of a
    floating-point reduce.

    The pool starts in the constructor (an adapting evaluator: at the first
    call that pays for it, where a worker that cannot start is reported) and
    serves every call until :meth:`close` (or the end of a ``with`` block).  Calls from several
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
        adapt: bool | None = None,
        item_bytes: int | None = None,
    ) -> None:
        _refuse_nesting()
        settings = self.settings = resolve_settings(
            workers,
            chunk_len,
            profile=profile,
            start_method=start_method,
            blas_threads=blas_threads,
            pin=pin,
            retries=retries,
            backend=backend,
            cluster=client if client is not None else address,
            adapt=adapt,
            item_bytes=item_bytes,
        )
        shared_dict = check_names(shared)
        self.backend = settings.backend
        self.start_method = (
            None if settings.backend in ("threads", "dask") else settings.start_method
        )
        self.blas_threads = settings.blas_threads
        self.pin = settings.pin
        self.retries = settings.retries
        self.item_bytes = settings.item_bytes
        self.chunk_len: int = settings.chunk_len
        # Calls from several threads are serialised; close() from another
        # thread waits for the call in progress.  Reentrant so that a call that
        # fails can close the evaluator while holding it.
        self._lock = threading.RLock()
        self._busy: int | None = None  # thread running a call
        self._owner_pid = os.getpid()
        self._closed = False
        # The runner's whole life: started here, or by an adapting evaluator at
        # the first call that pays for it (a loop of small calls never starts a
        # pool at all); closed by close() or, unclosed, by the finalizer.
        self._runner = _lazy_runner(settings, shared_dict, client, address)
        # Online refinement: what is known of each kernel, by name.
        self._online = _online_tuning(settings, shared_dict, self._runner)
        # What was learned is saved and the runner closed by close(), or by
        # the finalizer when the evaluator is collected or the program exits.
        self._finalizer = weakref.finalize(self, _close_parts, self._online, self._runner)
        if not settings.adapt:
            self._runner.start()  # a worker that cannot start is reported here
        self.workers: int = self._runner.workers
        # What the last call cost, as measured; ``stats`` builds the CallStats
        # when asked (a small inline call should not pay for it).
        self._last: _LastCall | None = None
        self._stats_built: CallStats | None = None
        self._warned = False  # the EfficiencyWarning is given once per evaluator

    # -- public API -------------------------------------------------------
    def map(self, kernel: Callable[..., Any], n: int, *, progress: bool = False) -> Any:
        """Results of ``kernel(shared, start, stop)`` for every chunk, joined along axis 0.

        Parameters
        ----------
        kernel : callable
            Returns an array whose first axis has length ``stop - start``
            (structured dtypes too), or a tuple or dict of such arrays (say
            distances and indices); every chunk must give the same structure,
            row shapes and dtypes.
        n : int
            Number of items.
        progress : bool
            Show a tqdm progress bar on stderr, advanced as chunks complete.

        Returns
        -------
        numpy.ndarray, tuple or dict
            Shape ``(n, *row_shape)``; a tuple or dict of such arrays (the
            kernel's structure, a namedtuple as a plain tuple), each
            assembled in shared memory.  For ``n == 0`` an empty float64
            array (no chunk ran, so the row shape is unknown).

        Raises
        ------
        ValueError
            A chunk's result has the wrong length, or another structure,
            row shape or dtype than the first chunk's; the message names
            the chunk's items.
        """
        return self._call(kernel, n, "map", None, progress)

    def reduce(
        self,
        kernel: Callable[..., Any],
        n: int,
        combine: Callable[[Any, Any], Any] = operator.add,
        *,
        progress: bool = False,
    ) -> Any:
        """Partials of every chunk combined in index order.

        ``combine(combine(p0, p1), p2) ...``: the same operations in the same
        order as a serial loop over the same chunks, whichever worker
        finishes first, so the result is deterministic to the bit.  For
        ``n == 0`` the identity of ``combine`` (0 for ``operator.add``, 1 for
        ``operator.mul``); other combine functions raise ``ValueError``.

        With ``operator.add`` (the default) or ``operator.mul``, tuple and
        dict partials are combined element by element (``(s, n)`` partials
        give ``(sum of s, sum of n)``, never a concatenated tuple), and a
        partial of another structure is a ``ValueError`` naming its chunk.
        Any other ``combine`` is given whole partials, as the kernel
        returned them.  ``progress=True`` shows a tqdm bar on stderr.
        """
        if not callable(combine):
            raise TypeError(f"combine must be callable, got {type(combine).__name__}")
        return self._call(kernel, n, "reduce", combine, progress)

    def close(self) -> None:
        """End the workers and unlink every shared-memory segment (idempotent).

        Called from another thread while a call runs, it waits for that call.
        """
        with self._lock:
            self._closed = True
            self._finalizer()

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
        """Process ids of the current workers (empty for the threads and dask backends)."""
        return self._runner.pids

    # -- one call ---------------------------------------------------------
    def _call(
        self, kernel: Callable[..., Any], n: int, mode: str, combine: Any, progress: bool = False
    ) -> Any:
        if not callable(kernel):
            raise TypeError(f"kernel must be callable, got {type(kernel).__name__}")
        check_kernel_signature(kernel)  # here, before any worker runs it
        n = check_int("n", n, minimum=0)
        self._check_not_nested()
        if self._closed:
            raise RuntimeError("this Evaluator is closed")
        if n == 0:
            self._last = _LastCall(
                Meter(self.workers), 0, mode, self.chunk_len, 0, 0.0, False, False, False
            )
            self._stats_built = None
            if mode == "map":
                return np.empty((0,))
            if combine in _IDENTITY:
                return _IDENTITY[combine]
            raise ValueError("reduce over n=0 items with a combine function of unknown identity")
        with self._lock:
            if self._closed:
                raise RuntimeError("this Evaluator is closed")
            self._busy = threading.get_ident()
            bar = _progress_bar(n, mode) if progress else None
            meter = Meter(self.workers, None if bar is None else bar.update)
            chunk_len, inline, exploring = self.chunk_len, False, False
            plan = None
            if self._online is None:
                plan = plan_chunks(n, self.workers, self.chunk_len, self.settings.chunk_source)
                chunk_len = plan.chunk_len
                if self.item_bytes is not None and self.backend != "dask":
                    check_memory(plan, self.item_bytes)
            was_started = self._runner.started
            began = time.perf_counter()
            try:
                if plan is None:
                    assert self._online is not None
                    outcome = self._online.call(kernel, n, mode, combine, meter)
                    result, chunk_len, inline, exploring = outcome
                else:
                    result = self._runner.run(kernel, plan, mode, combine, meter)
            finally:
                # Stats on every path: a failed call's are as true as any.
                wall = time.perf_counter() - began
                if bar is not None:
                    bar.close()
                # The plan's chunks (a tail's pieces counted); an adapting call's at
                # the chunk length of its last run.
                chunks = plan.chunks if plan is not None else n_chunks(n, chunk_len)
                self._last = _LastCall(
                    meter, n, mode, chunk_len, chunks, wall, inline, exploring, not was_started
                )
                self._stats_built = None
                self._busy = None
                if self._runner.closed:
                    # The pool ended itself (Ctrl-C or a failure of our own
                    # mid-call): so does the evaluator.
                    self.close()
        self._warn_if_inefficient()
        return result

    @property
    def stats(self) -> CallStats | None:
        """What the last call cost (:class:`~autotune.CallStats`); None before the first."""
        last = self._last
        if self._stats_built is None and last is not None:
            self._stats_built = CallStats.of(
                last.meter,
                n=last.n,
                mode=last.mode,
                chunk_len=last.chunk_len,
                chunks=last.chunks,
                backend=self.backend,
                wall_s=last.wall_s,
                inline=last.inline,
                exploring=last.exploring,
            )
        return self._stats_built

    def _warn_if_inefficient(self) -> None:
        """One EfficiencyWarning per evaluator, for a long call that left workers idle."""
        last = self._last
        if self._warned or last is None or last.wall_s < call_stats.LONG_CALL_S:
            return
        if last.exploring:
            return  # autotune's own trial settings: nothing for the user to change
        if last.started_pool:
            return  # the workers' start, not the call, kept them idle: judge the next call
        message = advice(self.stats) if self.stats is not None else None
        if message is not None:
            self._warned = True
            # stacklevel: the user's line that called map/reduce.
            warnings.warn(message, EfficiencyWarning, stacklevel=4)

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


@dataclass(frozen=True)
class _LastCall:
    """What the last call was and what it cost, as measured (``ev.stats`` is built from it)."""

    meter: Meter
    n: int
    mode: str
    chunk_len: int
    chunks: int
    wall_s: float
    inline: bool
    exploring: bool
    started_pool: bool  # the workers started during the call (an adapting evaluator's)


def _progress_bar(n: int, mode: str) -> Any:
    """A tqdm bar on stderr for one call, counting items as their chunks complete."""
    # unit_scale writes 100k, not 100000; but 1.00/1.00 for small counts.
    return progress_bar(n, mode, "item", unit_scale=n >= 10_000)


def _refuse_nesting() -> None:
    """No evaluator inside a kernel, nor while a worker imports the main module."""
    if in_worker() or in_thread_kernel():
        raise RuntimeError(
            "autotune.Evaluator cannot be created inside an evaluator's kernel: nested "
            "process pools oversubscribe the cores and can deadlock; parallelise the outer "
            "level only"
        )
    check_not_bootstrapping()


def _online_tuning(
    settings: Settings, shared: dict[str, Any], runner: LazyRunner
) -> OnlineTuning | None:
    """The online state of an evaluator that adapts (None for one that does not)."""
    if not settings.adapt:
        return None
    assert settings.cpu is not None
    return OnlineTuning(
        settings.cpu,
        settings.backend,
        runner.workers,
        shared,
        settings.item_bytes,
        settings.profile_name,
        runner,
    )


def _close_parts(online: OnlineTuning | None, runner: LazyRunner) -> None:
    """Save what was learned and let the user's data go, then end the runner."""
    try:
        if online is not None:
            online.close()
    finally:
        runner.close()


def _lazy_runner(
    settings: Settings, shared: dict[str, Any], client: Any, address: str | None
) -> LazyRunner:
    """The evaluator's runner, not started yet."""
    workers = settings.workers
    pinned = _pin_cpus(workers) if settings.pin and workers is not None else None

    def start() -> Runner:
        return open_runner(
            settings.backend,
            workers,
            shared,
            start_method=settings.start_method,
            blas_threads=settings.blas_threads,
            cpus=pinned,
            retries=settings.retries,
            client=client,
            address=address,
        )

    return LazyRunner(start, int(workers or 1))


def _pin_cpus(workers: int) -> list[int]:
    """CPUs to pin ``workers`` workers to: distinct physical cores first."""
    order = list(probe().pin_order) or sorted(os.sched_getaffinity(0))
    return [order[i % len(order)] for i in range(workers)]
