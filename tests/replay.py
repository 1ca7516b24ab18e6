"""Replays: the search and the online refinement run on a measured landscape, without its machine.

A :class:`Landscape` holds what a workload took, per ``(workers, chunk_len)``,
on one machine (``tests/data/landscapes/``) or by a formula
(:func:`saturating`).  Two stand-ins for the timing layer read it:

- :class:`ReplayBench`, the search's bench (:class:`autotune.bench.Bench`):
  each timed run of a point cuts the call as ``autotune search`` does and
  files seconds drawn from the landscape; :func:`replay_search` runs
  :func:`autotune.bench.run_auto` on it with the plan the search would build
  on the landscape's CPU and picks as the search picks;
- :class:`ReplayPool`, a runner whose calls take what the landscape says
  (no kernel runs), under a real :class:`autotune.online.OnlineTuning` built
  as an adapting evaluator on the landscape's CPU builds it:
  :func:`replay_online` makes calls of the landscape's ``n`` items.

Seconds come from a scripted :class:`Clock` that only the replay moves, and
every draw from a seeded generator: a replay is the same on every run.
"""

from __future__ import annotations

import json
import math
import operator
import random
import statistics
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autotune.backends.runners import LazyRunner
from autotune.backends.schedule import MEASURED, n_chunks, plan_chunks
from autotune.backends.stats import Meter
from autotune.bench import Bench, run_auto
from autotune.cpu import CacheLevel, CpuInfo
from autotune.cpu.model import FALLBACK_L2_BYTES
from autotune.engine import Lane, Point, candidate_workers, chunk_ladder, pick_kept
from autotune.online import OnlineTuning
from autotune.settings import heuristic_settings

DATA = Path(__file__).parent / "data" / "landscapes"
#: More chunks per worker than this: a recorded tail is a small part of the call.
SELF_BALANCING = 8
BACKEND = "processes"  # what the landscapes were recorded with (fork)

Pick = Callable[[Sequence[float]], float]


class Clock:
    """Scripted seconds: only the replay moves them on."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the landscape ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Landscape:
    """What calls of all ``n`` items took at each recorded ``(workers, chunk_len)``.

    ``chunk_len`` is the length the call ran with (a recording's ``Evaluator``
    is given it exactly: no balancing), so a recorded point whose chunk count
    leaves a tail carries that tail.

    A point is read (:meth:`draw`, :meth:`median`) at the chunk length its
    run actually used (the caller applies
    :func:`~autotune.backends.schedule.plan_chunks`):

    1. a recorded ``(workers, chunk_len)``: its seconds;
    2. a recorded worker count, another chunk length: read between the two
       recorded lengths of that worker count around it whose chunk count is
       *even* (a multiple of the workers, or more than :data:`SELF_BALANCING`
       chunks per worker, whose tail is a small part of the call), linearly in log(seconds) over
       log(chunk_len); beyond the first or last even length, that length
       (all recorded lengths of that count where none is even).
       Even lengths only, because every plan the search and the refinement
       make is even (``plan_chunks`` shortens a few chunks to a multiple of
       the workers): a tail recorded at a neighbouring length is not theirs;
    3. a worker count not recorded: the same reading at the two recorded
       counts around it, interpolated linearly in throughput over workers;
       beyond the fewest or the most recorded, those.

    A draw picks one of the recorded seconds of each point it reads, at
    random; the median reads each point's median.  A run of ``items`` items
    takes the reading times ``items / n``.
    """

    name: str
    n: int
    mode: str
    item_bytes: int
    cpu: CpuInfo
    points: Mapping[tuple[int, int], tuple[float, ...]] = field(repr=False)

    @classmethod
    def load(cls, path: Path, workload: str) -> Landscape:
        """One workload of a landscape file (format: ``tests/data/landscapes/README.md``)."""
        data = json.loads(path.read_text())
        w = data["workloads"][workload]
        points = {(p["workers"], p["chunk_len"]): tuple(p["seconds"]) for p in w["points"]}
        return cls(workload, w["n"], w["mode"], w["item_bytes"], cpu_of(data["cpu"]), points)

    # -- reading it --------------------------------------------------------------------------
    def draw(self, workers: int, chunk_len: int, rng: random.Random) -> float:
        """Seconds of one call of all ``n`` items: recorded seconds drawn at random."""
        return self._at(workers, chunk_len, rng.choice)

    def median(self, workers: int, chunk_len: int) -> float:
        """The median seconds of a call of all ``n`` items."""
        return self._at(workers, chunk_len, statistics.median)

    def best(self) -> tuple[tuple[int, int], float]:
        """The recorded point with the lowest median, and that median."""
        key = min(self.points, key=lambda k: statistics.median(self.points[k]))
        return key, statistics.median(self.points[key])

    def ratio(self, workers: int, chunk_len: int) -> float:
        """The best median over this point's median (1.0: as fast as the best)."""
        return self.best()[1] / self.median(workers, chunk_len)

    def even(self, workers: int, chunk_len: int) -> bool:
        """Whether ``n`` in chunks of ``chunk_len`` splits over ``workers`` without a tail."""
        chunks = n_chunks(self.n, chunk_len)
        return chunks % workers == 0 or chunks > SELF_BALANCING * workers

    def _at(self, workers: int, chunk_len: int, pick: Pick) -> float:
        counts = sorted({w for w, _ in self.points})
        if workers in counts:
            return self._along(workers, chunk_len, pick)
        fewer = [w for w in counts if w < workers]
        more = [w for w in counts if w > workers]
        if not fewer or not more:
            return self._along(fewer[-1] if fewer else more[0], chunk_len, pick)
        lo, hi = fewer[-1], more[0]
        t = (workers - lo) / (hi - lo)
        rate = (1 - t) / self._along(lo, chunk_len, pick) + t / self._along(hi, chunk_len, pick)
        return 1 / rate

    def _along(self, workers: int, chunk_len: int, pick: Pick) -> float:
        recorded = self.points.get((workers, chunk_len))
        if recorded is not None:
            return pick(recorded)
        lengths = sorted(c for w, c in self.points if w == workers)
        lengths = [c for c in lengths if self.even(workers, c)] or lengths
        below = [c for c in lengths if c < chunk_len]
        above = [c for c in lengths if c > chunk_len]
        if not below or not above:
            return pick(self.points[(workers, below[-1] if below else above[0])])
        a, b = below[-1], above[0]
        t = math.log(chunk_len / a) / math.log(b / a)
        sa, sb = pick(self.points[(workers, a)]), pick(self.points[(workers, b)])
        return math.exp((1 - t) * math.log(sa) + t * math.log(sb))


def cpu_of(d: Mapping[str, Any]) -> CpuInfo:
    """A landscape file's ``cpu`` as the probe would report it (every CPU usable)."""
    logical, cores = d["logical"], d["cores"]
    return CpuInfo(
        brand=d["brand"],
        logical_cpus=logical,
        physical_cores=cores,
        threads_per_core=logical // cores,
        usable_cpus=logical,
        cpu_quota=None,
        caches=tuple(
            CacheLevel(level, kind, size, shared, logical // shared)
            for level, kind, size, shared in d["caches"]
        ),
    )


def recorded(workload: str, machine: str = "xeon-16core") -> Landscape:
    return Landscape.load(DATA / f"{machine}.json", workload)


def many_cores(
    cores: int, l2: int = 2 << 20, l3: int | None = None, brand: str = "many cores"
) -> CpuInfo:
    """A probe's answer for a machine of ``cores`` cores, 1 thread each, 48 KiB L1d and ``l2``
    per core (the lent Xeon's shape), and an ``l3`` shared by all when given."""
    caches = [CacheLevel(1, "data", 48 << 10, 1, cores), CacheLevel(2, "unified", l2, 1, cores)]
    if l3 is not None:
        caches.append(CacheLevel(3, "unified", l3, cores, 1))
    return CpuInfo(
        brand=brand,
        logical_cpus=cores,
        physical_cores=cores,
        threads_per_core=1,
        usable_cpus=cores,
        cpu_quota=None,
        caches=tuple(caches),
    )


def saturating(
    cores: int = 64,
    knee: int = 24,
    fall: float = 0.0025,
    best_len: int = 65536,
    spread: float = 0.04,
) -> Landscape:
    """A synthetic ``cores``-core machine that saturates at ``knee`` workers.

    A map of ``2**24`` items of 16 bytes (2 MiB L2 per core: the heuristic's
    chunk is 16384 items), 10 ns per item on one worker.  Throughput rises
    linearly with the workers up to ``knee``, then falls by ``fall`` per
    worker past it (contention: 64 workers are 10% slower than 24 with the
    defaults); along the chunk length it peaks at ``best_len`` and falls as
    ``1 / (1 + log2(c / best_len)**2 / 8)`` (0.89 one rung away, 0.67 two).
    Each point is recorded as three calls, the median and +-``spread``.
    Worker counts: what the search and the refinement try on that CPU, and
    the knee; chunk lengths: powers of two from 1024 items to ``n / workers``.
    """
    n, item_bytes, per_item = 2**24, 16, 10e-9
    cpu = many_cores(
        cores, l3=256 * 1024 * 1024, brand=f"synthetic {cores}-core, saturating at {knee} workers"
    )
    counts = sorted({*candidate_workers(cpu), cores // 2, knee})
    points: dict[tuple[int, int], tuple[float, ...]] = {}
    for w in counts:
        scale = min(w, knee) * (1 - fall * max(0, w - knee))
        c = 1024
        while c <= n // w:
            along = 1 / (1 + math.log2(c / best_len) ** 2 / 8)
            median = n * per_item / (scale * along)
            points[(w, c)] = (median * (1 - spread), median, median * (1 + spread))
            c *= 2
    return Landscape(f"saturating-{cores}", n, "map", item_bytes, cpu, points)


# -- the search ------------------------------------------------------------------------------
class ReplayBench(Bench):
    """The search's bench on a landscape: each run moves ``clock`` on by what it drew.

    A point's runs are cut as :class:`autotune.tuner.search` cuts them
    (``plan_chunks(n, workers, chunk_len, MEASURED)``) and each takes seconds
    drawn from the landscape at the plan's chunk length; a warm-up run takes
    them too and is not filed.
    """

    def __init__(self, landscape: Landscape, clock: Clock, seed: int) -> None:
        super().__init__(landscape.n, landscape.item_bytes, label=False)
        self.landscape = landscape
        self.clock = clock
        self.rng = random.Random(seed)
        self.runs = 0

    def run(self, point: Point, repeats: int, warmup: bool = False) -> None:
        plan = plan_chunks(self.n, point.workers, point.chunk_len, MEASURED)
        for i in range(int(warmup) + repeats):
            seconds = self.landscape.draw(plan.workers, plan.chunk_len, self.rng)
            self.clock.now += seconds
            self.runs += 1
            if i >= int(warmup):
                self.add(point, seconds)


def search_plan(landscape: Landscape) -> dict[Lane, list[int]]:
    """The lanes and chunk ladders ``autotune search`` builds on the landscape's CPU
    for all its ``n`` items (the processes backend: what was recorded)."""
    cpu = landscape.cpu
    return {
        (BACKEND, w): chunk_ladder(cpu, landscape.item_bytes, landscape.n, w)
        for w in candidate_workers(cpu)
    }


@dataclass(frozen=True)
class Settled:
    """Where a replay ended: the point, the chunk length its calls run with, its ratio
    to the landscape's best median."""

    point: Point
    chunk_len: int
    ratio: float

    def __str__(self) -> str:
        asked = self.point.chunk_len
        nominal = "" if self.chunk_len == asked else f" (asked {asked})"
        return f"{self.point.workers}x{self.chunk_len}{nominal}"


def replay_search(landscape: Landscape, seed: int, budget: float = 20.0) -> Settled:
    """``run_auto`` on a :class:`ReplayBench` for ``budget`` scripted seconds, and the
    pick ``autotune search`` makes of it (the best point timed 3 times or more).

    All ``n`` items per run, as ``autotune search`` times them where they fit
    its budget.  20 s rather than the command's 60: on the 16-core landscapes
    the picks were the same at every budget from 10 s to 300 s (the longer
    ones add tie rounds), and a replay of 60 s takes four times as long to run.
    """
    clock = Clock()
    bench = ReplayBench(landscape, clock, seed)
    mid_bytes = (landscape.cpu.l2 or FALLBACK_L2_BYTES) // 8  # as tuner._search
    run_auto(bench, search_plan(landscape), budget, mid_bytes, clock)
    measured = bench.measured()
    best = pick_kept(m for _, m in measured)
    point = next(p for p, m in measured if m is best)
    used = plan_chunks(landscape.n, point.workers, point.chunk_len, MEASURED).chunk_len
    return Settled(point, used, landscape.ratio(point.workers, used))


# -- the online refinement -------------------------------------------------------------------
@dataclass(frozen=True)
class PoolRun:
    """One run of a :class:`ReplayPool`: which call, its items, workers, chunk length
    and seconds."""

    call: int
    items: int
    workers: int
    chunk_len: int
    seconds: float


class ReplayPool:
    """A runner whose calls run no kernel and take what the landscape says.

    A call of a plan's ``n`` items at its ``chunk_len`` on its ``workers`` (at most the pool's)
    moves ``clock`` on by the landscape's seconds drawn at that point, times
    ``n`` over the landscape's ``n``; each worker is counted busy the whole
    call (what a balanced call reports), so a call costs nothing beyond its
    kernel time (calls of these sizes are far above the break-even with
    ~1 ms per call anyway).  A map returns ``n`` uninitialised bytes, a
    reduce 0.0.
    """

    closed = False

    def __init__(
        self, landscape: Landscape, workers: int, clock: Clock, rng: random.Random
    ) -> None:
        self.landscape = landscape
        self.workers = workers
        self.clock = clock
        self.rng = rng
        self.call = 0  # the replay's call number, for the log
        self.log: list[PoolRun] = []

    def run(self, kernel, plan, mode, combine, meter=None):
        active = max(1, min(plan.workers, self.workers))
        n = plan.n
        seconds = self.landscape.draw(active, plan.chunk_len, self.rng) * n / self.landscape.n
        self.clock.now += seconds
        self.log.append(PoolRun(self.call, n, active, plan.chunk_len, seconds))
        if meter is not None:
            meter.taking_part(active)
            for w in range(active):
                meter.add_busy(w, seconds)
        return np.empty(plan.stop, np.uint8) if mode == "map" else 0.0

    def close(self) -> None:
        pass


class QuietMachine:
    """A CPU meter for replays: nothing is known of other processes (the landscape's
    noise is the recorded one; the machine running the test must not add its own)."""

    def sample(self, pids=()):
        return None


class ReplayKernel:
    """The kernel as the calling process runs it (the refinement's first-call probe,
    inline calls): a range of ``k`` items takes the landscape's one-worker seconds
    at chunk length ``k``, times ``k / n``."""

    def __init__(self, landscape: Landscape, clock: Clock, rng: random.Random) -> None:
        self.landscape = landscape
        self.clock = clock
        self.rng = rng

    def __call__(self, shared, start, stop):
        items = stop - start
        self.clock.now += self.landscape.draw(1, items, self.rng) * items / self.landscape.n
        return np.empty(items, np.uint8) if self.landscape.mode == "map" else 0.0


@dataclass(frozen=True)
class OnlineReplay:
    """What an adapting evaluator did over a replay's calls."""

    settled: Settled | None  # None: still exploring after the last call
    ends: tuple[float, ...]  # scripted seconds at the end of each call
    calls_to_settle: int | None
    runs: tuple[PoolRun, ...] = ()  # every pool run, in order

    def regret(self, calls: int, best_s: float) -> float:
        """Time of the first ``calls`` calls over ``calls`` calls at ``best_s``, less 1."""
        return self.ends[calls - 1] / (calls * best_s) - 1

    def whole_calls(self, n: int) -> list[PoolRun]:
        """The pool runs of all ``n`` items of a call, up to the call that settled.

        The first call's pool run counts as whole: it is what the call's probe in
        this process (at most a sixteenth of it) left.
        """
        last = self.calls_to_settle or len(self.ends)
        return [r for r in self.runs if r.call < last and r.items >= n - n // 16]

    def worst_whole_call(self, landscape: Landscape) -> float:
        """The lowest ratio to the best median of a whole call made while exploring
        (by the seconds drawn)."""
        best_s = landscape.best()[1]
        return min(
            (best_s * r.items / landscape.n / r.seconds for r in self.whole_calls(landscape.n)),
            default=1.0,
        )


def replay_online(landscape: Landscape, seed: int, calls: int) -> OnlineReplay:
    """An adapting evaluator on the landscape's machine (the heuristic's workers: one per
    physical core) making ``calls`` calls of all ``n`` items, from a fresh start.

    Each call goes through :meth:`OnlineTuning.call`, as ``Evaluator.map`` and
    ``reduce`` send it: the first call's probe in this process, the break-even,
    slices, settling and re-checks are the real code's; only the runner and
    the kernel are the landscape's (:class:`ReplayPool`, :class:`ReplayKernel`).
    """
    clock = Clock()
    rng = random.Random(seed)
    workers, _ = heuristic_settings(landscape.cpu, None, None, BACKEND, landscape.item_bytes)
    assert workers is not None
    pool = ReplayPool(landscape, workers, clock, rng)
    # A name of its own: no online profile saved by another replay is found.
    name = f"replay-{landscape.name}-{seed}-{uuid.uuid4().hex}"
    tuning = OnlineTuning(
        landscape.cpu,
        BACKEND,
        workers,
        {},
        landscape.item_bytes,
        name,
        LazyRunner(lambda: pool, workers),
        clock,
        meter=QuietMachine(),
    )
    kernel = ReplayKernel(landscape, clock, rng)
    ends: list[float] = []
    settled_at = None
    for i in range(calls):
        pool.call = i
        tuning.call(kernel, landscape.n, landscape.mode, operator.add, Meter(workers))
        ends.append(clock.now)
        if settled_at is None and tuning.learners[name].refiner.settled:
            settled_at = i + 1
    refiner = tuning.learners[name].refiner
    tuning.close()
    if not refiner.settled:
        return OnlineReplay(None, tuple(ends), None, tuple(pool.log))
    point = refiner.best
    used = plan_chunks(landscape.n, point.workers, point.chunk_len, MEASURED).chunk_len
    settled = Settled(point, used, landscape.ratio(point.workers, used))
    return OnlineReplay(settled, tuple(ends), settled_at, tuple(pool.log))
