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

import math
import operator
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from autotune._errors import EfficiencyWarning
from autotune._util import (
    BACKENDS,
    check_int,
    check_kernel_signature,
    positive_int,
    progress_bar,
)
from autotune.backends import stats as call_stats
from autotune.backends.processes.worker import check_not_bootstrapping, in_worker
from autotune.backends.runners import Runner, open_runner
from autotune.backends.schedule import balanced_chunk_len, n_chunks
from autotune.backends.shared import check_names
from autotune.backends.stats import CallStats, Meter, advice
from autotune.backends.threads import in_thread_kernel
from autotune.cpu import probe
from autotune.cpu.memory import available_memory as _available_memory
from autotune.online import OnlineTuning
from autotune.profile import (
    Profile,
)
from autotune.settings import (
    checked_start_method,
    heuristic_settings,
    looks_like_path,
    resolve_adapt,
    resolve_profile,
    settings_from,
)

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
    chunks are the same on every call and repeats are bit-identical; while
    adapting, the chunk length changes between calls and so may the last
    bits of a floating-point reduce.

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
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if adapt not in (None, True, False):
            raise TypeError(f"adapt must be None, True or False, got {adapt!r}")
        workers = positive_int("workers", workers)
        chunk_len = explicit_chunk_len = positive_int("chunk_len", chunk_len)
        explicit = workers is not None or chunk_len is not None
        blas_threads = positive_int("blas_threads", blas_threads)
        self.item_bytes = positive_int("item_bytes", item_bytes)
        retries = check_int("retries", retries, minimum=0)
        method = checked_start_method(start_method)
        shared_dict = check_names(shared)

        self._profile = None
        # Online profiles are saved under the name given (else the kernel's).
        self._profile_name = (
            profile if isinstance(profile, str) and not looks_like_path(profile) else None
        )
        from_heuristic = False  # the chunk comes from the probe's rule, not a measurement
        if profile is not None and (workers is None or chunk_len is None or backend is None):
            self._profile = resolve_profile(
                profile, backend, client if client is not None else address, self.item_bytes
            )
            workers, chunk_len, backend, from_heuristic = settings_from(
                self._profile, workers, chunk_len, backend
            )
        backend = backend or "processes"
        if pin and backend != "processes":
            raise ValueError("pin=True needs backend='processes'")
        if backend != "dask" and (client is not None or address is not None):
            raise ValueError("client= and address= are for backend='dask'")
        self._adapt = resolve_adapt(adapt, backend, explicit, self._profile)
        # The heuristic's chunk may be too long for a small n; a chunk from a
        # profile or the heuristic was measured at another n and is fitted to
        # each call's; an explicit chunk_len is honoured to the item.
        self._heuristic_chunks = chunk_len is None or from_heuristic
        self._fit_chunks = explicit_chunk_len is None
        self._cpu = probe() if workers is None or chunk_len is None or self._adapt else None
        if workers is None or chunk_len is None:
            assert self._cpu is not None
            workers, chunk_len = heuristic_settings(
                self._cpu, workers, chunk_len, backend, self.item_bytes
            )

        self.start_method = None if backend in ("threads", "dask") else method
        self.blas_threads = blas_threads
        self.pin = bool(pin)
        self.retries = retries
        self.backend = backend
        # Calls from several threads are serialised; close() from another
        # thread waits for the call in progress.  Reentrant so that a call that
        # fails can close the evaluator while holding it.
        self._lock = threading.RLock()
        self._busy: int | None = None  # thread running a call
        self._owner_pid = os.getpid()
        self._closed = False
        # The runner, once started (the finalizer closes what it holds).
        self._holder: list[Runner] = []
        self._finalizer = weakref.finalize(self, _close_all, self._holder)
        runner_args = dict(
            start_method=method,
            blas_threads=blas_threads,
            cpus=_pin_cpus(workers) if self.pin and workers is not None else None,
            retries=retries,
            client=client,
            address=address,
        )
        self._open = lambda: open_runner(backend, workers, shared_dict, **runner_args)
        if not self._adapt:
            self._pool()  # started now: a worker that cannot start is reported here
        # An adapting evaluator starts its workers at the first call that pays
        # for them: a loop of small calls never starts a pool at all.
        self.workers: int = self._holder[0].workers if self._holder else int(workers or 1)
        self.chunk_len: int = chunk_len
        # What the last call cost, as measured; ``stats`` builds the CallStats
        # when asked (a small inline call should not pay for it).
        self._last: tuple[Meter, int, str, int, float, bool] | None = None
        self._stats_built: CallStats | None = None
        self._warned = False  # the EfficiencyWarning is given once per evaluator
        # Online refinement: what is known of each kernel, by name.
        self._online: OnlineTuning | None = None
        if self._adapt:
            assert self._cpu is not None
            args = (self._cpu, backend, self.workers, shared_dict, self.item_bytes)
            self._online = OnlineTuning(*args, self._profile_name, self._pool)

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
            if self._online is not None:
                self._online.close()  # the user's data goes with the pool
            self._open = _closed_runner

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
        return list(getattr(self._holder[0], "pids", [])) if self._holder else []

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
            self._record(Meter(self.workers), 0, mode, self.chunk_len, 0.0, False)
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
            chunk_len, inline = (self.chunk_len if self._adapt else self._chunk_len_for(n)), False
            if self.item_bytes is not None:
                _check_memory(n, chunk_len, self.item_bytes, self.workers, self.backend)
            began = time.perf_counter()
            try:
                if self._online is not None:
                    result, chunk_len, inline = self._online.call(kernel, n, mode, combine, meter)
                else:
                    result = self._pool().run(kernel, n, chunk_len, mode, combine, meter)
            finally:
                # Stats on every path: a failed call's are as true as any.
                wall = time.perf_counter() - began
                if bar is not None:
                    bar.close()
                self._record(meter, n, mode, chunk_len, wall, inline)
                self._busy = None
                if self._holder and self._holder[0].closed:
                    # The pool ended itself (Ctrl-C or a failure of our own
                    # mid-call): so does the evaluator.
                    self.close()
        self._warn_if_inefficient()
        return result

    # -- online refinement ------------------------------------------------
    def _pool(self) -> Runner:
        """The runner, started on first use."""
        if not self._holder:
            self._holder.append(self._open())
        return self._holder[0]

    @property
    def stats(self) -> CallStats | None:
        """What the last call cost (:class:`~autotune.CallStats`); None before the first."""
        if self._stats_built is None and self._last is not None:
            meter, n, mode, chunk_len, wall, inline = self._last
            self._stats_built = CallStats.of(
                meter,
                n=n,
                mode=mode,
                chunk_len=chunk_len,
                chunks=n_chunks(n, chunk_len) if n else 0,
                backend=self.backend,
                wall_s=wall,
                inline=inline,
            )
        return self._stats_built

    def _record(
        self, meter: Meter, n: int, mode: str, chunk_len: int, wall: float, inline: bool
    ) -> None:
        self._last, self._stats_built = (meter, n, mode, chunk_len, wall, inline), None

    def _warn_if_inefficient(self) -> None:
        """One EfficiencyWarning per evaluator, for a long call that left workers idle."""
        if self._warned or self._last is None or self._last[4] < call_stats.LONG_CALL_S:
            return
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

    def _chunk_len_for(self, n: int) -> int:
        chunk_len = self.chunk_len
        if self._heuristic_chunks:
            # The heuristic chunk may be larger than a small n deserves: keep
            # a few chunks per worker so all of them get work.
            chunk_len = max(1, min(chunk_len, math.ceil(n / (4 * self.workers))))
        if not self._fit_chunks:
            return chunk_len
        return balanced_chunk_len(n, chunk_len, self.workers)


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


def _close_all(holder: list[Runner]) -> None:
    for runner in holder:
        runner.close()


def _closed_runner() -> Runner:
    raise RuntimeError("this Evaluator is closed")


def _pin_cpus(workers: int) -> list[int]:
    """CPUs to pin ``workers`` workers to: distinct physical cores first."""
    order = list(probe().pin_order) or sorted(os.sched_getaffinity(0))
    return [order[i % len(order)] for i in range(workers)]


def _check_memory(n: int, chunk_len: int, item_bytes: int, workers: int, backend: str) -> None:
    """Warn when the chunks in progress at once would not fit the memory left."""
    if backend == "dask":
        return  # the cluster's memory, not ours
    chunk_len = min(chunk_len, n)
    workers = min(workers, math.ceil(n / chunk_len))
    need = chunk_len * item_bytes * workers
    room = _available_memory()
    if room is not None and need > room:
        warnings.warn(
            f"chunk_len {chunk_len} x item_bytes {item_bytes} x {workers} workers = "
            f"{need} bytes in flight, more than the {room} bytes of memory available "
            f"(MemAvailable, cgroup memory.max); pass a smaller chunk_len or fewer workers",
            RuntimeWarning,  # shown by default, unlike ResourceWarning
            stacklevel=4,
        )
