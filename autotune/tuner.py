"""The tuner: measure backends x worker counts x chunk lengths with the real evaluator.

Candidates come from the probe: worker counts up to the usable CPUs
(physical cores and all hardware threads both tried), chunk sizes a ladder
of powers of two from half the L1d cache up to what one worker would get
unchunked.  Every point is timed with the runner :class:`autotune.Evaluator`
delegates to (one pool per backend and worker count, reused, the chunk
length given per call), so the profile describes the runtime production
code will use.

Both local backends are searched: processes, and threads (which win when
the kernel releases the GIL, as numpy's ufuncs do, and lose when it holds
it, as ``RectBivariateSpline.ev`` does).  The profile names the backend of
its best point and the Python build (GIL or free-threaded) it ran on.

``strategy="grid"`` times every point (a warm-up, then 3 runs, the median).
``strategy="auto"`` reaches nearly the same pick for a fraction of that:

0. a screening run of every (backend, worker count) at a mid-sized chunk (an
   eighth of the L2 per core) and at one eight times longer (the longest the
   ladder has, when it is short); those below 80% of the best are not
   searched further;
1. a coarse pass over every other chunk size for each remaining count, one
   run each (the pool is already warm);
2. the ladder neighbours of the two best points;
3. successive halving: the three leaders get two more runs each (so every
   point kept is timed at least 3 times), the best two two more, and a
   point whose runs spread over 15% gets two more;
4. ties: while the best and the points that tie with it within their
   spread (:func:`~autotune.profile.is_tie`) are not told apart, they are
   timed again, one run each per round, in alternating order, until they
   separate, each has :data:`~autotune.engine.TIE_REPEATS` runs, or the
   budget is spent.

The strategy lives in :mod:`autotune.engine`, shared with the evaluator's
online refinement; this module runs it as fast as it can.  Every phase
checks the clock.  Runs are sized from a quick serial estimate so that
phases 0-3 fit two thirds of ``budget`` seconds and the rest goes to ties:
on a slow kernel the measured range is a prefix of the workload's ``n``
items (throughput is items per second, so it compares).  The pick is the
fastest median among the points timed at least 3 times.

Every timed run is metered (:mod:`autotune.cpu.contention`): one during
which other processes took CPUs it needed is re-timed, and what stays
contended is kept but marked; the profile records how busy the machine was
(docs/design.md, "Measurements that know the machine was busy").
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from autotune._util import LOCAL_BACKENDS, STRATEGIES, check_int, progress_bar, utc_timestamp
from autotune._version import __version__
from autotune.bench import planned_runs, run_auto, run_grid
from autotune.cpu import CpuInfo, probe
from autotune.cpu.contention import CpuMeter, CpuSampler
from autotune.cpu.model import FALLBACK_L2_BYTES
from autotune.engine import Lane, candidate_workers, chunk_ladder, pick_best, pick_kept
from autotune.profile import (
    Measurement,
    Profile,
    cpu_section,
    is_tie,
    item_bytes_of,
    python_build,
)
from autotune.searchbench import SearchBench, items_per_second, measured_items, serial_seconds
from autotune.workload import Workload
from autotune.workloads import short_runs

__all__ = [
    "SearchResult",
    "search",
    "candidate_workers",
    "chunk_ladder",
    "is_tie",
    "pick_best",
]


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search` found.

    Attributes
    ----------
    profile : Profile
        The best point, every measurement and the serial baseline; ``save`` it.
    measurements : tuple of Measurement
        Every point measured, the serial one included.
    elapsed : float
        Seconds the search took.
    runs : int
        Timed runs of the kernel (warm-ups included).
    strategy : str
    notes : tuple of str
        What the search could not measure as it should, one line each (runs too short
        for every worker to get several chunks of the longest length); ``table`` ends
        with them.
    """

    profile: Profile
    measurements: tuple[Measurement, ...]
    elapsed: float
    runs: int
    strategy: str
    notes: tuple[str, ...] = ()

    def table(self) -> str:
        """The seed-style table, the serial baseline and the best point, then the notes
        (what the search could not measure)."""
        from autotune.report import backend_reason, format_table

        reason = backend_reason(self.profile)
        text = format_table(self.profile)
        text = f"{text}\nbackend {self.profile.backend}: {reason}" if reason else text
        return "\n".join([text, *(f"note: {note}" for note in self.notes)])


def check_search(
    budget: object,
    strategy: object,
    items: object,
    name: Callable[[str], str] = lambda arg: arg,
) -> tuple[float, int | None]:
    """The checks of :func:`search`'s numbers and strategy, in one place (the CLI
    runs them before it loads a workload); ``name`` spells the arguments in
    messages (``--budget`` on the command line).  Returns (budget, items)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"{name('budget')} must be a number of seconds > 0, got {budget!r}")
    if not math.isfinite(budget):
        raise ValueError(f"{name('budget')} must be finite, got {budget!r}")
    if strategy not in STRATEGIES:
        raise ValueError(
            f"{name('strategy')} must be one of {', '.join(STRATEGIES)}; got {strategy!r}"
        )
    checked = None if items is None else check_int(name("items"), items)
    return float(budget), checked


def search(
    workload: Workload | str,
    budget: float = 60.0,
    workers: Sequence[int] | None = None,
    strategy: str = "auto",
    cpus: Iterable[int] | None = None,
    *,
    backends: Sequence[str] = LOCAL_BACKENDS,
    items: int | None = None,
    progress: bool | None = None,
    client: Any = None,
    start_method: str | None = None,
    meter: CpuSampler | None = None,
) -> SearchResult:
    """Find the best worker count and chunk length for ``workload`` on this CPU.

    Parameters
    ----------
    workload : Workload or str
        A workload, or a built-in name / ``MODULE:CALLABLE``.
    budget : float
        Seconds the search should take, about.
    workers : sequence of int, optional
        Worker counts to try (default: from the probe).
    strategy : {"auto", "grid"}
    cpus : iterable of int, optional
        Run on these CPUs only (affinity), to tune for a smaller machine.
    backends : sequence of str
        Backends to search: ``("processes", "threads")`` by default.  The
        profile names the backend of its best point.
    items : int, optional
        Items per timed run (default: sized from ``budget``; at most ``n``).
    progress : bool, optional
        A progress bar on stderr (default: when stderr is a terminal).
    client : dask.distributed.Client, optional
        The cluster for ``backends=("dask",)``.  There ``workers`` are tasks
        in flight (default 1, 2 and 4 per worker thread), chunk sizes come
        from the workers' caches, and the profile's ``cpu`` section describes
        the cluster (each worker's probe included).
    start_method : {"fork", "spawn", "forkserver"}, optional
        How the ``"processes"`` backend starts its workers, as for
        :class:`autotune.Evaluator` (default ``"fork"`` where available).
    meter : CpuSampler, optional
        What says how busy the machine was around each timed run
        (:class:`~autotune.cpu.contention.CpuSampler`: ``sample(pids)``
        returning a :class:`~autotune.cpu.contention.CpuSample` or None;
        default: a :class:`~autotune.cpu.contention.CpuMeter` reading ``/proc``).  A run
        during which other processes held CPUs it needed is re-timed (see
        :meth:`autotune.bench.Bench.timed`), and the profile records how busy
        the machine was (``Profile.contention``).  Never used on Dask, whose
        CPUs are not this machine's.

    Returns
    -------
    SearchResult
    """
    if isinstance(workload, str):
        from autotune.workloads import get_workload

        workload = get_workload(workload)
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be an autotune.Workload, got {type(workload).__name__}")
    budget, items = check_search(budget, strategy, items)
    if workload.n < 1:
        raise ValueError("the workload has no items (n = 0)")
    chosen = tuple(backends)
    _check_backends(chosen, client, cpus)
    with _on_cpus(cpus):
        return _search(
            workload,
            float(budget),
            workers,
            strategy,
            chosen,
            items,
            progress,
            client,
            start_method,
            meter,
        )


def _check_backends(backends: tuple[str, ...], client: Any, cpus: Iterable[int] | None) -> None:
    """Both local backends or some of them, or ``("dask",)`` alone with a client."""
    if backends == ("dask",):
        if client is None:
            raise ValueError("backends=('dask',) needs client=, a dask.distributed.Client")
        if cpus is not None:
            raise ValueError("cpus= restricts local CPUs; it does not apply to the dask backend")
    else:
        unknown = [b for b in backends if b not in LOCAL_BACKENDS]
        if unknown or not backends:
            raise ValueError(
                f"backends must be some of {', '.join(LOCAL_BACKENDS)}, or ('dask',) alone; "
                f"got {backends!r}"
            )
        if client is not None:
            raise ValueError("client= is for backends=('dask',)")


@contextlib.contextmanager
def _on_cpus(cpus: Iterable[int] | None) -> Iterator[None]:
    """Run on ``cpus`` only (the workers inherit the affinity), restored afterwards."""
    if cpus is None:
        yield
        return
    wanted = set(cpus)
    saved_affinity = os.sched_getaffinity(0)
    if not wanted or not wanted <= saved_affinity:
        raise ValueError(
            f"cpus {sorted(wanted)} must be a non-empty subset of the usable CPUs "
            f"{sorted(saved_affinity)}"
        )
    os.sched_setaffinity(0, wanted)  # workers inherit it
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved_affinity)


def _search(
    workload: Workload,
    budget: float,
    workers: Sequence[int] | None,
    strategy: str,
    backends: tuple[str, ...],
    items: int | None,
    progress: bool | None,
    client: Any = None,
    start_method: str | None = None,
    meter: CpuSampler | None = None,
) -> SearchResult:
    started = time.monotonic()
    deadline = started + budget
    cpu, counts, cluster = _lanes_of(workers, client)
    item_bytes = item_bytes_of(workload.shared, workload.n, workload.item_bytes)
    lanes = [(b, w) for b in backends for w in counts]
    n, plan = _sized_plan(workload, cpu, item_bytes, lanes, budget, items, strategy)

    bar = _progress(progress, planned_runs(plan, strategy) + 3, workload.name)
    bench = SearchBench(
        workload,
        n,
        item_bytes,
        bar,
        label=len(backends) > 1,
        client=client,
        start_method=start_method,
        # A cluster's CPUs are not this machine's: nothing to meter there.
        meter=None if cluster is not None else meter or CpuMeter(),
    )
    try:
        serial = _time_serial(workload, bench)
        if strategy == "grid":
            complete = run_grid(bench, plan, deadline)
        else:
            complete = run_auto(bench, plan, deadline, (cpu.l2 or FALLBACK_L2_BYTES) // 8)
    finally:
        bench.close()
        if bar is not None:
            bar.close()

    section = cluster.section if cluster is not None else cpu_section(cpu)
    profile = _profile_of(workload, bench, serial, section, backends, local=cluster is None)
    _warn_about(profile, serial, complete, budget, strategy, on_cluster=cluster is not None)
    return SearchResult(
        profile=profile,
        measurements=profile.measurements,
        elapsed=time.monotonic() - started,
        runs=bench.runs,
        strategy=strategy,
        notes=()
        if cluster is not None
        else short_runs(cpu, item_bytes, max(counts), n, workload.n),
    )


def _sized_plan(
    workload: Workload,
    cpu: CpuInfo,
    item_bytes: int,
    lanes: list[Lane],
    budget: float,
    items: int | None,
    strategy: str,
) -> tuple[int, dict[Lane, list[int]]]:
    """Items per timed run (``items``, else sized from a quick serial estimate to fit
    ``budget``) and each lane's chunk ladder for runs of that size."""
    rate = items_per_second(workload)
    rough = {lane: chunk_ladder(cpu, item_bytes, workload.n, lane[1]) for lane in lanes}
    if items is not None:
        n = min(int(items), workload.n)
    else:
        n = measured_items(workload, budget, planned_runs(rough, strategy) + 4, rate)
    return n, {lane: chunk_ladder(cpu, item_bytes, n, lane[1]) for lane in lanes}


def _progress(progress: bool | None, total: int, name: str) -> Any:
    """A progress bar of ``total`` runs on stderr (by default when it is a terminal), or None."""
    if progress or (progress is None and sys.stderr.isatty()):
        return progress_bar(total, f"search {name}", "run")
    return None


def _time_serial(workload: Workload, bench: SearchBench) -> Measurement:
    """The serial baseline over ``bench.n`` items: 3 runs in this process, unchunked."""
    n = bench.n
    serial_s, serial_spread = serial_seconds(workload, n, 3)
    bench.runs += 3
    if bench.progress is not None:
        bench.progress.update(3)
    return Measurement(
        workers=1,
        chunk_len=n,
        chunk_bytes=n * bench.item_bytes,
        throughput=n / serial_s,
        repeats=3,
        spread=serial_spread,
    )


def _lanes_of(workers: Sequence[int] | None, client: Any) -> tuple[CpuInfo, list[int], Any]:
    """The CPU chunk sizes come from, the worker counts to try, and the cluster (or None)."""
    if client is not None:
        from autotune.backends.dask.cluster import describe_cluster

        # Chunk sizes come from the workers' caches; "workers" are tasks in flight.
        cluster = describe_cluster(client)
        counts = sorted(set(workers or [k * cluster.threads for k in (1, 2, 4)]))
        if counts[0] < 1:
            raise ValueError(f"tasks in flight must be >= 1, got {counts}")
        return cluster.cpu, counts, cluster
    cpu = probe()
    counts = candidate_workers(cpu, workers)
    usable = cpu.usable_cpus or os.cpu_count() or 1
    bad = [w for w in counts if not 1 <= w <= usable]
    if bad:
        raise ValueError(f"workers {bad} outside the usable CPUs 1..{usable}")
    return cpu, counts, None


def _profile_of(
    workload: Workload,
    bench: SearchBench,
    serial: Measurement,
    section: dict[str, Any],
    backends: tuple[str, ...],
    local: bool,
) -> Profile:
    """The measured profile: every point, the serial baseline, the pick."""
    n = serial.chunk_len
    measured = [m for _, m in bench.measured()]
    if local and not any(
        m.workers == 1 and m.chunk_len >= n and m.backend != "threads" for m in measured
    ):
        # (On a cluster, one local process is the baseline, not a point to pick.)
        measured.append(serial)
    # A point timed once may have been lucky: the pick is among those that
    # were confirmed by KEPT_REPEATS runs (all of them in the grid).
    best = pick_kept(measured)
    return Profile(
        workload=workload.name,
        source="measured",
        cpu=section,
        best=best,
        serial_throughput=serial.throughput,
        measurements=tuple(
            sorted(measured, key=lambda m: (m.backend == "threads", m.workers, m.chunk_len))
        ),
        created=utc_timestamp(),
        autotune_version=__version__,
        item_bytes=bench.item_bytes,
        n=n,
        backend=best.backend or backends[0],
        python=python_build(),
        contention=bench.contention(),
    )


def _warn_about(
    profile: Profile,
    serial: Measurement,
    complete: bool,
    budget: float,
    strategy: str,
    on_cluster: bool,
) -> None:
    """A cluster slower than one local process, or a budget that ran out: say so."""
    import warnings

    best = profile.best.throughput or 0.0
    if on_cluster and best < (serial.throughput or 0.0):
        warnings.warn(
            f"on this Dask cluster the best point ({best:.4g} items/s) is "
            f"slower than one local process ({serial.throughput:.4g} items/s): the tasks' "
            f"overhead and data transfer outweigh the work; a local backend fits better",
            stacklevel=4,
        )
    if not complete:
        warnings.warn(
            f"the {budget:g} s budget ran out before the {strategy} search finished; "
            f"the profile holds what was measured",
            stacklevel=4,
        )
