"""The ``dask`` backend: the same calls, run as tasks on a Dask cluster.

For work that outgrows one machine.  The engine is ``dask.distributed``
(the scheduler numpy/scipy users already run); autotune only decides what a
task is and how results come back:

- the ``shared`` dict is scattered to every worker **once per evaluator**
  (``client.scatter(..., broadcast=True)``) and each worker keeps the copy
  it received for the evaluator's life (see :data:`_SHARED` for why tasks do
  not name it as a dependency); a worker that joins later gets it with its
  first task.  Kernels see it as the same read-only
  :class:`~autotune._shared.SharedNamespace`;
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
  order (:class:`~autotune._schedule.OrderedFold`): the same bits as a serial
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
import hashlib
import json
import math
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from autotune._errors import WorkerLost
from autotune._schedule import OrderedFold, chunk_bounds, n_chunks
from autotune._shared import SharedNamespace
from autotune._worker import check_map_result, check_row_like

if TYPE_CHECKING:
    from autotune.cpu import CpuInfo
    from autotune.profile import Profile

__all__ = [
    "DaskRunner",
    "ClusterInfo",
    "connect",
    "describe_cluster",
    "cluster_mismatch",
    "load_cluster_profile",
    "CONNECT_TIMEOUT",
]

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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


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
            f"({type(exc).__name__}: {_one_line(exc)}); start one with `dask scheduler` "
            f"and pass the address it prints (tcp://host:8786)"
        ) from exc


def _closed(client: Any) -> RuntimeError:
    return RuntimeError(
        f"the Dask client is {client.status!r}, not running: close the Evaluator before its "
        f"client (nest `with Evaluator(...)` inside `with Client(...)`)"
    )


def _check_client(client: Any) -> Any:
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
            f"({type(exc).__name__}: {_one_line(exc)}); define it at module level in a module "
            f"the workers can import, and read data from `shared` instead of capturing it"
        ) from exc


# -- what runs on a worker -------------------------------------------------------------
_blas_limit: int | None = None
_blas_limiter: Any = None


def _limit_blas(threads: int | None) -> None:
    """Cap BLAS/OpenMP threads in this worker process, once (threadpoolctl is not cheap)."""
    global _blas_limit, _blas_limiter
    if threads is None or threads == _blas_limit:
        return
    from threadpoolctl import threadpool_limits

    _blas_limiter = threadpool_limits(limits=threads)  # process-wide until changed
    _blas_limit = threads


# The shared dicts this worker process holds, by evaluator token.  Tasks read
# them from here rather than naming the scattered data as a dependency: the
# scheduler's Active Memory Manager drops "extra" replicas of data no task is
# waiting for (every 2 s by default), and each later task naming it would make
# the worker fetch it again, once per call instead of once per evaluator.
_SHARED: dict[str, Mapping[str, Any]] = {}


@dataclass(frozen=True)
class _Missing:
    """A task's answer when its worker lacks the shared data (a new or restarted worker)."""

    worker: str


def _adopt(token: str, key: str, dask_worker: Any = None) -> bool:
    """Run on every worker after the broadcast: keep the copy it received."""
    if dask_worker is None or key not in dask_worker.data:
        return False
    _SHARED[token] = dask_worker.data[key]
    return True


def _forget(token: str) -> None:
    """Run on every worker when the evaluator closes."""
    _SHARED.pop(token, None)


def _run_batch(
    kernel: Callable[..., Any],
    token: str,
    data: Mapping[str, Any] | None,
    mode: str,
    n: int,
    chunk_len: int,
    c0: int,
    c1: int,
    blas_threads: int | None,
) -> Any:
    """One task: chunks ``[c0, c1)``; partials (reduce) or the batch's rows (map).

    ``data`` is the shared dict only where the client resent the task with
    the scattered data as a dependency, after this worker answered
    :class:`_Missing`.
    """
    if data is not None:
        _SHARED[token] = data
    else:
        found = _SHARED.get(token)
        if found is None:
            from distributed import get_worker

            return _Missing(get_worker().address)
        data = found
    _limit_blas(blas_threads)
    shared = SharedNamespace(data)  # read-only views; the data itself is not copied
    start = stop = c0 * chunk_len
    try:
        if mode == "reduce":
            partials = []
            for c in range(c0, c1):
                start = c * chunk_len
                stop = min(n, start + chunk_len)
                partials.append(kernel(shared, start, stop))
            return partials
        s0, s1 = chunk_bounds(c0, c1, chunk_len, n)
        rows: np.ndarray | None = None
        for c in range(c0, c1):
            start = c * chunk_len
            stop = min(n, start + chunk_len)
            arr = check_map_result(kernel(shared, start, stop), start, stop)
            if c1 - c0 == 1:
                return arr
            if rows is None:
                rows = np.empty((s1 - s0, *arr.shape[1:]), dtype=arr.dtype)
            else:
                check_row_like(arr, rows, start, stop)
            rows[start - s0 : stop - s0] = arr
        return rows
    except Exception as exc:
        if hasattr(exc, "add_note"):
            exc.add_note(f"[raised by the kernel on a Dask worker on items [{start}, {stop})]")
        raise


# -- the client side -------------------------------------------------------------------
class _DaskCall:
    """One call: keep ``inflight`` batches submitted, consume results as they finish."""

    def __init__(
        self, runner: DaskRunner, kernel: Callable[..., Any], n: int, chunk_len: int, mode: str
    ) -> None:
        self.runner = runner
        self.kernel = kernel
        self.n = n
        self.chunk_len = chunk_len
        self.mode = mode
        self.total = n_chunks(n, chunk_len)
        self.next = 0  # first chunk not yet submitted
        self.threads = max(1, runner.cluster_threads())
        name = "".join(ch for ch in getattr(kernel, "__name__", "") if ch.isalnum() or ch == "_")
        self.prefix = f"autotune-{name or 'kernel'}"  # task keys, as the dashboard shows them
        self.call = uuid.uuid4().hex[:8]
        self.resent = 0
        self.pending: dict[Any, tuple[int, int]] = {}  # future -> (c0, c1)
        self.out: np.ndarray | None = None

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
            key = f"{self.prefix}-{self.call}-{c0}-resent{self.resent}"
        r = self.runner
        fut = r.client.submit(
            _run_batch,
            self.kernel,
            r.token,
            None if batch is None else r.shared_future,
            self.mode,
            self.n,
            self.chunk_len,
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
                for (c0, c1), result in zip(ranges, results, strict=True):
                    if isinstance(result, _Missing):
                        ac.add(self.submit((c0, c1), result.worker))
                    elif fold is not None:
                        fold.extend(c0, result)
                    else:
                        self.store(c0, c1, result)
                del results
        except BaseException:
            # A kernel error, a lost worker, Ctrl-C: the rest is not wanted.
            if self.pending:
                with contextlib.suppress(Exception):
                    client.cancel(list(self.pending))
            self.pending.clear()
            raise

    def store(self, c0: int, c1: int, rows: Any) -> None:
        start, stop = chunk_bounds(c0, c1, self.chunk_len, self.n)
        arr = check_map_result(rows, start, stop)
        if self.out is None:
            self.out = np.empty((self.n, *arr.shape[1:]), dtype=arr.dtype)
        check_row_like(arr, self.out, start, stop)
        self.out[start:stop] = arr

    def failure(self, fut: Any) -> BaseException:
        c0, c1 = self.pending[fut]
        start, stop = chunk_bounds(c0, c1, self.chunk_len, self.n)
        client = self.runner.client
        lost = self.runner.shared_future.status != "finished"
        if fut.status != "error" or lost:  # cancelled, or the shared data was lost
            if client.status != "running":
                return _closed(client)
            return RuntimeError(
                f"the Dask task for items [{start}, {stop}) was cancelled: the scheduler was "
                f"lost, or every worker holding the shared data died during the call (the next "
                f"call sends the data again)"
            )
        exc, tb = fut.exception(), fut.traceback()
        from distributed import KilledWorker

        if isinstance(exc, KilledWorker):
            allowed = exc.allowed_failures
            return WorkerLost(
                f"Dask workers died {allowed + 1} time(s) while holding items [{start}, {stop}); "
                f"giving up (the scheduler allows distributed.scheduler.allowed-failures="
                f"{allowed} per task)",
                start=start,
                stop=stop,
            )
        return exc.with_traceback(tb)


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
        self.client = connect(address) if address is not None else _check_client(client)
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
                f"({type(exc).__name__}: {_one_line(exc)}); share picklable data (arrays, "
                f"lists, scipy objects) and build anything else inside the kernel"
            ) from exc
        self.shared_future = future
        self.token = uuid.uuid4().hex
        # A worker that misses it (it joined later, or lost it in a race with
        # the memory manager) answers _Missing and gets it with a resent task.
        self.client.run(_adopt, self.token, future.key, on_error="ignore")

    def _forget(self) -> None:
        """Workers drop their copy of the current shared data (best effort)."""
        token, self.token = self.token, ""
        if token and self.client is not None and self.client.status == "running":
            with contextlib.suppress(Exception):
                self.client.run(_forget, token, on_error="ignore")

    def cluster_threads(self) -> int:
        """Worker threads the cluster has now."""
        return int(sum(self.client.nthreads().values()))

    def run(
        self,
        kernel: Callable[..., Any],
        n: int,
        chunk_len: int,
        mode: str,
        combine: Callable[[Any, Any], Any] | None,
    ) -> Any:
        if self.client is None or self.client.status != "running":
            raise _closed(self.client) if self.client is not None else RuntimeError("closed")
        _check_kernel(kernel)
        if self.shared_future.status != "finished" and self._data is not None:
            # Every worker holding the shared data died, or the cluster was
            # restarted, since the last call: send it again.
            self._scatter(self._data)
        call = _DaskCall(self, kernel, n, chunk_len, mode)
        fold = OrderedFold(combine) if mode == "reduce" and combine is not None else None
        call.run(fold)
        if mode == "map":
            return call.out
        assert fold is not None
        return fold.result()

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


# -- describing a cluster (for profiles) -----------------------------------------------
def _probe_worker() -> dict[str, Any]:
    """Run on each worker by :func:`describe_cluster`."""
    from autotune.cpu import probe

    return probe().to_dict()


@dataclass(frozen=True)
class ClusterInfo:
    """What :func:`describe_cluster` found.

    Attributes
    ----------
    section : dict
        The profile's ``cpu`` section for this cluster (see :func:`cluster_section`).
    cpus : tuple of CpuInfo
        Each worker's probe, in the order of ``section["worker_probes"]``.
    threads : int
        Worker threads in all.
    """

    section: dict[str, Any]
    cpus: tuple[CpuInfo, ...]
    threads: int

    @property
    def cpu(self) -> CpuInfo:
        """The first worker's CPU: what chunk sizes and profile matching go by."""
        return self.cpus[0]


def describe_cluster(client: Any) -> ClusterInfo:
    """Probe every worker of ``client``'s cluster (one ``client.run``)."""
    from autotune.cpu import CpuInfo

    _check_client(client)
    nthreads = client.nthreads()
    if not nthreads:
        raise RuntimeError("the Dask cluster has no workers to describe")
    probes = client.run(_probe_worker)
    addresses = sorted(a for a in probes if a in nthreads)
    cpus = tuple(CpuInfo.from_dict(probes[a]) for a in addresses)
    section = cluster_section([(a, int(nthreads[a])) for a in addresses], cpus)
    return ClusterInfo(section, cpus, int(sum(nthreads[a] for a in addresses)))


def cluster_section(workers: list[tuple[str, int]], cpus: tuple[CpuInfo, ...]) -> dict[str, Any]:
    """A profile's ``cpu`` section for a Dask cluster.

    The usual keys (brand, topology, caches) describe the first worker's
    machine, so a profile is matched like a local one; ``dask_workers``,
    ``threads``, ``threads_per_worker`` (null when workers differ) and
    ``worker_probes`` (each worker's address, threads and CPU) describe the
    cluster.
    """
    probes: list[dict[str, Any]] = []
    for (address, threads), cpu in zip(workers, cpus, strict=True):
        probes.append(
            {
                "address": address,
                "nthreads": threads,
                "brand": cpu.brand,
                "fingerprint": cpu.fingerprint,
                "logical_cpus": cpu.logical_cpus,
                "physical_cores": cpu.physical_cores,
                "usable_cpus": cpu.usable_cpus,
                "caches": {"l1d": cpu.l1d, "l2": cpu.l2, "l3": cpu.l3},
            }
        )
    per_worker = {t for _, t in workers}
    first = probes[0]
    return {
        "brand": first["brand"],
        "fingerprint": _cluster_fingerprint(probes),
        "logical_cpus": first["logical_cpus"],
        "physical_cores": first["physical_cores"],
        "caches": dict(first["caches"]),
        "dask_workers": len(probes),
        "threads": sum(t for _, t in workers),
        "threads_per_worker": per_worker.pop() if len(per_worker) == 1 else None,
        "worker_probes": probes,
    }


def _shape(section: Mapping[str, Any]) -> list[Any]:
    """What must be equal for two clusters to count as the same (addresses are not)."""
    probes = section.get("worker_probes") or []
    return sorted([p.get("nthreads"), p.get("fingerprint")] for p in probes)


def _cluster_fingerprint(probes: list[dict[str, Any]]) -> str:
    key = json.dumps(_shape({"worker_probes": probes}), sort_keys=True)
    return "dask-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def cluster_mismatch(section: Mapping[str, Any], info: ClusterInfo) -> str | None:
    """Why a profile's cluster is not the connected one (``None``: same shape)."""
    if _shape(section) == _shape(info.section):
        return None

    def describe(s: Mapping[str, Any]) -> str:
        per = s.get("threads_per_worker")
        return f"{s.get('dask_workers', '?')} workers x {per if per else 'mixed'} threads"

    return (
        f"measured on a Dask cluster of {describe(section)} ({section.get('fingerprint')}), "
        f"this one has {describe(info.section)} ({info.section['fingerprint']})"
    )


def load_cluster_profile(
    workload: str, cluster: Any, *, item_bytes: int | None = None, path: Any = None
) -> Profile:
    """The dask profile for ``workload`` measured on a cluster like ``cluster``'s.

    ``cluster`` is a Client or a scheduler address.  Profiles are looked up
    as :func:`autotune.load_profile` does, with ``backend="dask"`` and the
    first worker's CPU, then the cluster's shape (workers, threads, each
    worker's CPU) must match too.  Otherwise the heuristic, with a warning:
    its chunk length from the workers' caches, two tasks in flight per thread.
    """
    from autotune.profile import ProfileWarning, load_profile

    client = connect(cluster) if isinstance(cluster, str) else cluster
    try:
        info = describe_cluster(client)
    finally:
        if client is not cluster:
            with contextlib.suppress(Exception):
                client.close()
    profile = load_profile(workload, path, info.cpu, item_bytes=item_bytes, backend="dask")
    if profile.source != "heuristic":
        why = cluster_mismatch(profile.cpu, info)
        if why is None:
            return profile
        warnings.warn(f"profile {profile.path} not used: {why}", ProfileWarning, stacklevel=2)
        from autotune.profile import heuristic_profile

        profile = heuristic_profile(info.cpu, workload, item_bytes)
    best = replace(profile.best, workers=DEFAULT_INFLIGHT * info.threads)
    return replace(profile, best=best, backend="dask", cpu=info.section)
