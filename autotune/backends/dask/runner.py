"""The ``dask`` backend: the same calls, run as tasks on a Dask cluster.

For work that outgrows one machine.  The engine is ``dask.distributed``
(the scheduler numpy/scipy users already run); autotune only decides what a
task is and how results come back:

- the ``shared`` dict is scattered to every worker **once per evaluator**
  (``client.scatter(..., broadcast=True)``) and each worker keeps the copy
  it received for the evaluator's life (see :data:`_SHARED` for why tasks do
  not name it as a dependency); a worker that joins later gets it with its
  first task.  Kernels see it as the same read-only
  :class:`~autotune.backends.shared.SharedNamespace`;
- a task is a batch of chunks ``[c0, c1)``: the kernel still runs on
  cache-sized ``(start, stop)`` ranges, but a Dask task costs milliseconds
  of scheduling where a local pipe costs microseconds, so a call is a few
  tasks per worker thread (shrinking, so the tail balances), not one per
  chunk;
- at most ``workers`` tasks are in flight: the evaluator's ``workers`` means
  *tasks in flight* here (the cluster's size is the cluster's business);
- ``map`` rows are written into the output as tasks finish (fetched straight
  from the workers where that is safe, see :func:`_gather_direct`);
  ``reduce`` partials come back per chunk and are folded strictly in chunk
  order (:class:`~autotune.backends.fold.OrderedFold`): the same bits as a serial
  loop over the same chunks;
- a worker that dies is Dask's to handle: its tasks are re-run elsewhere,
  and when a task has been on more dying workers than the scheduler's
  ``distributed.scheduler.allowed-failures``, :class:`autotune.WorkerLost` is
  raised naming the items.

It also describes a cluster for the tuner's profiles (:func:`describe_cluster`)
and finds the profile measured on a cluster like the connected one
(:func:`load_cluster_profile`).  dask is an optional dependency
(``pip install 'autotune[dask]'``): nothing here imports it until used.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from autotune._errors import WorkerLost
from autotune._util import one_line
from autotune.backends.dask.tasks import Missing, adopt, forget_shared, run_batch
from autotune.backends.fold import OrderedFold
from autotune.backends.rows import check_row_like
from autotune.backends.schedule import ChunkPlan, Coverage
from autotune.backends.stats import Meter
from autotune.backends.structure import Structure, split_map_result

if TYPE_CHECKING:
    pass

__all__ = ["CONNECT_TIMEOUT", "DaskRunner", "connect"]

#: Seconds to wait for a scheduler given by address before giving up.
CONNECT_TIMEOUT = 10.0
#: Each task takes 1/(SPLIT * worker threads) of the chunks not yet sent.
#: The processes backend uses 8 (GUIDE): its batches cost microseconds.  A
#: Dask task costs a few milliseconds end to end, so far fewer, larger tasks,
#: still shrinking so that no worker is left with a long last one.
SPLIT = 2
#: Default tasks in flight per worker thread: one running, one queued on the
#: worker, so no thread idles while its result travels back.
DEFAULT_INFLIGHT = 2

_INSTALL = "pip install 'autotune[dask]'"


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            f"backend='dask' needs dask.distributed, which is not installed: {_INSTALL}"
        ) from exc
    return distributed


def connect(address: str, timeout: float | None = None) -> Any:
    """A ``dask.distributed.Client`` for the scheduler at ``address``.

    Raises
    ------
    ConnectionError
        Nothing answered as a Dask scheduler within ``timeout`` seconds
        (default :data:`CONNECT_TIMEOUT`); one line naming the address.
    """
    distributed = _distributed()
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"a Dask scheduler address looks like tcp://host:8786, got {address!r}")
    try:
        # set_as_default=False: our client must not capture the user's
        # dask.compute() calls.
        return distributed.Client(address, timeout=timeout, set_as_default=False)
    except Exception as exc:
        # Refused, timed out, an unknown scheme, or something that is not a
        # Dask scheduler answering (seen: garbage read as a message length).
        raise ConnectionError(
            f"cannot connect to a Dask scheduler at {address!r} within {timeout:g} s "
            f"({type(exc).__name__}: {one_line(str(exc))}); start one with `dask scheduler` "
            f"and pass the address it prints (tcp://host:8786)"
        ) from exc


def _closed(client: Any) -> RuntimeError:
    return RuntimeError(
        f"the Dask client is {client.status!r}, not running: close the Evaluator before its "
        f"client (nest `with Evaluator(...)` inside `with Client(...)`)"
    )


def check_client(client: Any) -> Any:
    distributed = _distributed()
    if not isinstance(client, distributed.Client):
        raise TypeError(
            f"client must be a dask.distributed.Client (or pass address='tcp://host:8786'), "
            f"got {type(client).__name__}"
        )
    if client.asynchronous:
        raise TypeError("the Evaluator needs a synchronous Client (asynchronous=False)")
    if client.status != "running":
        raise _closed(client)
    return client


def _gather_direct(client: Any) -> bool:
    """Fetch results straight from the workers, not relayed by the scheduler?

    Direct halves the traffic of a map's rows (measured: 134 MB in 0.06 s
    instead of 0.13 s on a LocalCluster), but a client that cannot reach the
    workers (a gateway, some Kubernetes setups) would wait for a connect
    timeout each time.  So: the client's own ``direct_to_workers`` when set,
    else direct only when the scheduler is on this machine.
    """
    if client.direct_to_workers is not None:
        return bool(client.direct_to_workers)
    from distributed.comm import get_address_host

    try:
        host = get_address_host(client.scheduler.address)
    except Exception:
        return False
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def _check_kernel(kernel: Callable[..., Any]) -> None:
    """Refuse a kernel that Dask could not send, before any task is made."""
    import cloudpickle

    try:
        cloudpickle.dumps(kernel)
    except Exception as exc:
        name = getattr(kernel, "__qualname__", None) or repr(kernel)
        raise TypeError(
            f"the kernel {name} cannot be pickled for the Dask cluster "
            f"({type(exc).__name__}: {one_line(str(exc))}); define it at module level in a module "
            f"the workers can import, and read data from `shared` instead of capturing it"
        ) from exc


# -- the client side -------------------------------------------------------------------
class _DaskCall:
    """One call: keep ``inflight`` batches submitted, consume results as they finish."""

    def __init__(
        self,
        runner: DaskRunner,
        kernel: Callable[..., Any],
        plan: ChunkPlan,
        mode: str,
        meter: Meter,
    ) -> None:
        self.runner = runner
        self.meter = meter
        self.kernel = kernel
        self.plan = plan
        self.mode = mode
        self.total = plan.chunks
        self.coverage = Coverage(self.total)  # chunks accepted, each once
        self.next = 0  # first chunk not yet submitted
        self.threads = meter.workers  # the cluster's worker threads
        name = "".join(ch for ch in getattr(kernel, "__name__", "") if ch.isalnum() or ch == "_")
        self.prefix = f"autotune-{name or 'kernel'}"  # task keys, as the dashboard shows them
        self.call = uuid.uuid4().hex[:8]
        self.resent = 0
        self.pending: dict[Any, tuple[int, int]] = {}  # future -> (c0, c1)
        self.structure: Structure | None = None
        self.out: list[np.ndarray] | None = None  # one array per output of the map

    def submit(self, batch: tuple[int, int] | None = None, worker: str | None = None) -> Any:
        """Submit the next batch; or resend ``batch`` with the shared data to ``worker``."""
        if batch is None:
            size = max(1, math.ceil((self.total - self.next) / (SPLIT * self.threads)))
            c0, c1 = self.next, min(self.total, self.next + size)
            self.next = c1
            key = f"{self.prefix}-{self.call}-{c0}"
        else:
            c0, c1 = batch
            self.resent += 1
            self.meter.retries += 1
            key = f"{self.prefix}-{self.call}-{c0}-resent{self.resent}"
        r = self.runner
        fut = r.client.submit(
            run_batch,
            self.kernel,
            r.token,
            None if batch is None else r.shared_future,
            self.mode,
            self.plan,
            c0,
            c1,
            r.blas_threads,
            key=key,
            # The worker that lacked the data gets it with this task (soft:
            # it may have died since).
            workers=None if worker is None else [worker],
            allow_other_workers=worker is not None,
        )
        self.pending[fut] = (c0, c1)
        return fut

    def fill(self, ac: Any) -> None:
        while self.next < self.total and len(self.pending) < self.runner.workers:
            ac.add(self.submit())

    def run(self, fold: OrderedFold | None) -> None:
        distributed = _distributed()
        client = self.runner.client
        first = []
        while self.next < self.total and len(self.pending) < self.runner.workers:
            first.append(self.submit())
        # loop= : as_completed otherwise asks for the *default* client, which
        # need not be ours.
        ac = distributed.as_completed(first, loop=client.loop)
        try:
            for done in ac.batches():
                for fut in done:
                    if fut.status != "finished":
                        raise self.failure(fut)
                ranges = [self.pending.pop(fut) for fut in done]
                self.fill(ac)  # workers get new tasks before we fetch these results
                results = client.gather(done, direct=self.runner.direct)
                del done  # the workers may drop the results now
                for (c0, c1), answer in zip(ranges, results, strict=True):
                    if isinstance(answer, Missing):
                        ac.add(self.submit((c0, c1), answer.worker))
                        continue
                    result, busy, worker = answer
                    self.coverage.accept(c0, c1)
                    self.meter.add_busy(worker, busy)
                    if fold is not None:
                        fold.extend(c0, result)
                    else:
                        self.store(c0, c1, result)
                    start, stop = self.plan.bounds(c0, c1)
                    self.meter.advance(stop - start)
                del results
            self.coverage.check_complete()
        except BaseException:
            # A kernel error, a lost worker, Ctrl-C: the rest is not wanted.
            if self.pending:
                with contextlib.suppress(Exception):
                    client.cancel(list(self.pending))
            self.pending.clear()
            raise

    def store(self, c0: int, c1: int, rows: Any) -> None:
        start, stop = self.plan.bounds(c0, c1)
        structure, arrays = split_map_result(rows, start, stop, self.structure)
        if self.out is None:
            self.structure = structure
            self.out = [np.empty((self.plan.stop, *a.shape[1:]), dtype=a.dtype) for a in arrays]
        for i, (arr, out) in enumerate(zip(arrays, self.out, strict=True)):
            check_row_like(arr, out, start, stop, structure.label(i))
            out[start:stop] = arr

    def failure(self, fut: Any) -> BaseException:
        c0, c1 = self.pending[fut]
        start, stop = self.plan.bounds(c0, c1)
        client = self.runner.client
        from distributed import KilledWorker

        exc = fut.exception() if fut.status == "error" else None
        if isinstance(exc, KilledWorker):
            # Checked first: the worker that died may also have held the
            # shared data, which does not make this any less a lost worker.
            allowed = exc.allowed_failures
            return WorkerLost(
                f"Dask workers died {allowed + 1} time(s) while holding items [{start}, {stop}); "
                f"giving up (the scheduler allows distributed.scheduler.allowed-failures="
                f"{allowed} per task)",
                start=start,
                stop=stop,
            )
        lost = self.runner.shared_future.status != "finished"
        if exc is None or lost:  # cancelled, or the shared data was lost
            if client.status != "running":
                return _closed(client)
            return RuntimeError(
                f"the Dask task for items [{start}, {stop}) was cancelled: the scheduler was "
                f"lost, or every worker holding the shared data died during the call (the next "
                f"call sends the data again)"
            )
        return exc.with_traceback(fut.traceback())


class DaskRunner:
    """Run calls as Dask tasks; ``shared`` is scattered to every worker once.

    Parameters
    ----------
    workers : int or None
        Tasks in flight at once; default two per worker thread of the cluster.
    shared : dict
        The shared objects (checked names).
    blas_threads : int or None
        BLAS/OpenMP threads per worker process, set by the first task run there.
    client : dask.distributed.Client, optional
        A running client; the runner never closes it.
    address : str, optional
        Instead of ``client``: the scheduler to connect to; the runner owns
        that client and closes it in :meth:`close`.
    """

    def __init__(
        self,
        workers: int | None,
        shared: dict[str, Any],
        blas_threads: int | None,
        *,
        client: Any = None,
        address: str | None = None,
    ) -> None:
        if client is not None and address is not None:
            raise ValueError("give client= or address=, not both")
        if client is None and address is None:
            raise ValueError(
                "backend='dask' needs client=dask.distributed.Client(...) or "
                "address='tcp://host:8786'"
            )
        self.client: Any = None
        self.shared_future: Any = None
        self.token = ""  # names the shared data in the workers' _SHARED
        self._data: dict[str, Any] | None = None
        self._owned = address is not None
        self.client = connect(address) if address is not None else check_client(client)
        try:
            threads = self.cluster_threads()
            if threads == 0:
                raise RuntimeError(
                    f"the Dask cluster at {self.client.scheduler.address} has no workers; start "
                    f"some (`dask worker ADDRESS`) or call client.wait_for_workers(n) first"
                )
            self.workers: int = workers or DEFAULT_INFLIGHT * threads
            self.blas_threads = blas_threads
            self.direct = _gather_direct(self.client)
            self._data = shared  # a reference, to send again if the cluster loses it
            self._scatter(shared)
        except BaseException:
            self.close()
            raise

    def _scatter(self, shared: dict[str, Any]) -> None:
        """Send ``shared`` to every worker, and have each keep its copy under a new token."""
        self._forget()
        try:
            # One future for the whole dict (a list of one item, not the dict,
            # which scatter would split by key); hash=False: no tokenizing of
            # big arrays, and no sharing of keys with another evaluator.
            [future] = self.client.scatter([shared], broadcast=True, hash=False)
        except Exception as exc:
            if self.client.status != "running":
                raise _closed(self.client) from exc
            raise TypeError(
                f"the shared objects cannot be sent to the Dask cluster "
                f"({type(exc).__name__}: {one_line(str(exc))}); share picklable data (arrays, "
                f"lists, scipy objects) and build anything else inside the kernel"
            ) from exc
        self.shared_future = future
        self.token = uuid.uuid4().hex
        # A worker that misses it (it joined later, or lost it in a race with
        # the memory manager) answers Missing and gets it with a resent task.
        self.client.run(adopt, self.token, future.key, on_error="ignore")

    def _forget(self) -> None:
        """Workers drop their copy of the current shared data (best effort)."""
        token, self.token = self.token, ""
        if token and self.client is not None and self.client.status == "running":
            with contextlib.suppress(Exception):
                self.client.run(forget_shared, token, on_error="ignore")

    def cluster_threads(self) -> int:
        """Worker threads the cluster has now."""
        return int(sum(self.client.nthreads().values()))

    def run(
        self,
        kernel: Callable[..., Any],
        plan: ChunkPlan,
        mode: str,
        combine: Callable[[Any, Any], Any] | None,
        meter: Meter | None = None,
    ) -> Any:
        """Run the ranges of ``plan``; ``plan.workers`` is not used (the tasks in flight
        are the runner's)."""
        if self.client is None or self.client.status != "running":
            raise _closed(self.client) if self.client is not None else RuntimeError("closed")
        _check_kernel(kernel)
        if self.shared_future.status != "finished" and self._data is not None:
            # Every worker holding the shared data died, or the cluster was
            # restarted, since the last call: send it again.
            self._scatter(self._data)
        nthreads = self.client.nthreads()
        meter = meter if meter is not None else Meter(self.workers)
        # Kernels run one per worker thread, whatever the tasks in flight.
        meter.workers = max(1, int(sum(nthreads.values())))
        meter.slots = sorted(nthreads)
        call = _DaskCall(self, kernel, plan, mode, meter)
        fold = None
        if mode == "reduce" and combine is not None:
            fold = OrderedFold(combine, lambda c: plan.bounds(c, c + 1))
        call.run(fold)
        if mode == "map":
            assert call.structure is not None and call.out is not None
            return call.structure.build(call.out)
        assert fold is not None
        return fold.result()

    @property
    def closed(self) -> bool:
        return self._data is None and self.shared_future is None

    def close(self) -> None:
        """Release the scattered data (and close a client we made); idempotent."""
        self._forget()
        future, self.shared_future = self.shared_future, None
        self._data = None
        client = self.client
        if future is not None and client is not None:
            with contextlib.suppress(Exception):
                if client.status == "running":
                    client.cancel([future])  # the workers drop their copies now
        del future
        if self._owned and client is not None:
            self._owned = False
            with contextlib.suppress(Exception):
                client.close()
