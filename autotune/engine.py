"""The measuring engine: which points to time next, and what the times say.

One engine serves both ways of tuning.  ``autotune search`` (:mod:`autotune.tuner`)
times points as fast as it can within a budget (on a
:class:`~autotune.bench.Bench`); the evaluator's online
refinement (:mod:`autotune.adapt`) times them with the user's own calls, one
call (or a slice of a long call) per run.  Both keep their runs in a
:class:`Tally` and take their next runs from the same strategy,
:func:`auto_requests`, so they prune, refine and settle by the same rules.

The strategy (``auto``):

0. screen every lane (backend, workers) at a mid-sized chunk and at one
   eight times longer; lanes below :data:`SCREEN` of the best are dropped
   (online, a run the tally predicts slower than :data:`PREDICTED_SLOW`
   times the best is not made: a lane of fewer workers bound below it by the
   lanes above it, a longer length after a slow first run);
1. a coarse pass over every other chunk length of each remaining lane;
2. the ladder neighbours of the two best points (online, and past a cut
   ladder's end while the best is at it);
3. successive halving: the three leaders get two more runs each (so every
   point kept is timed at least :data:`KEPT_REPEATS` times), the best two
   two more, and a leader whose runs spread over :data:`NOISY` two more;
4. ties (optional): while the best and the points tied with it within
   their spread (:func:`~autotune.profile.is_tie`) are not told apart, one
   run of each per round, in alternating order, until they separate or each
   has :data:`TIE_REPEATS` runs.

A :class:`Point` is ``(backend, workers, chunk_len)``; its ``lane`` is
``(backend, workers)``, which the strategy screens and gives a chunk ladder.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from autotune.cpu import CpuInfo
from autotune.cpu.model import FALLBACK_L1D_BYTES
from autotune.profile import Measurement, is_tie

__all__ = [
    "KEPT_REPEATS",
    "MIN_CHUNK_BYTES",
    "NOISY",
    "PREDICTED_SLOW",
    "RETIMES",
    "SCREEN",
    "TIE_POINTS",
    "TIE_REPEATS",
    "Checkpoint",
    "Lane",
    "Point",
    "Request",
    "Tally",
    "auto_requests",
    "candidate_workers",
    "chunk_ladder",
    "pick_best",
    "pick_kept",
]

#: A point whose runs spread more than this (relative) is re-measured.
NOISY = 0.15
#: auto keeps the lanes within this fraction of the best at screening.
SCREEN = 0.8
#: The online refinement spends no whole call on a point the tally predicts
#: slower than this many times the best known (issue 19: "no call while
#: exploring slower than 1.3x the settled call" on a 16-core Xeon).
PREDICTED_SLOW = 1.3
#: Smallest chunk tried, whatever the L1d says.
MIN_CHUNK_BYTES = 8 * 1024
#: Timed runs of every point auto keeps (the leaders it picks among).
KEPT_REPEATS = 3
#: Tie rounds stop when each tied point has this many runs (a budget
#: usually ends them first).
TIE_REPEATS = 1000
#: At most this many points (the best and those tied with it) per tie round.
TIE_POINTS = 3
#: A run contended by other processes is made again at most this many times;
#: then the least contended attempt is kept, and marked.  Two: enough to step
#: past a burst of another job (a test, a build step); a steady load (a busy
#: loop) is re-timed only once, not on every run
#: (:meth:`autotune.bench.Bench.timed`).
RETIMES = 2

Lane = tuple[str, int]  # (backend, workers)


class Point(NamedTuple):
    """Where runs are timed: a backend, its worker count and a chunk length."""

    backend: str
    workers: int
    chunk_len: int

    @property
    def lane(self) -> Lane:
        return self.backend, self.workers

    @classmethod
    def of(cls, lane: Lane, chunk_len: int) -> Point:
        return cls(lane[0], lane[1], chunk_len)


# -- candidates and picking (pure) -----------------------------------------------------
def candidate_workers(cpu: CpuInfo, workers: Sequence[int] | None = None) -> list[int]:
    """Worker counts to try: 1..usable CPUs (thinned out past 4), or the given ones."""
    if workers:
        return sorted(set(workers))
    usable = cpu.usable_cpus or cpu.logical_cpus or os.cpu_count() or 1
    physical = min(cpu.physical_cores or usable, usable)
    if usable <= 4:
        return list(range(1, usable + 1))
    counts = {1, physical, usable}
    k = 2
    while k < usable:
        counts.add(k)
        k *= 2
    return sorted(counts)


def chunk_ladder(cpu: CpuInfo, item_bytes: int, n: int, workers: int) -> list[int]:
    """Chunk lengths to try with ``workers``: powers of two in bytes, then unchunked.

    From half the L1d cache (at least :data:`MIN_CHUNK_BYTES`) up to, but
    not including, what one worker would get unchunked (the last entry).
    """
    unchunked = max(1, math.ceil(n / workers))
    lo = max(MIN_CHUNK_BYTES, (cpu.l1d or FALLBACK_L1D_BYTES) // 2)
    size = 1 << (lo - 1).bit_length()
    lengths: list[int] = []
    while True:
        length = max(1, size // item_bytes)
        if length >= unchunked:
            break
        # Items bigger than the smallest sizes give 1 item for several
        # rungs: time each length once.
        if not lengths or length > lengths[-1]:
            lengths.append(length)
        size *= 2
    lengths.append(unchunked)
    return lengths


def pick_best(measurements: Iterable[Measurement]) -> Measurement:
    """The fastest point; among equals, fewer workers, then the longer chunk."""
    return max(measurements, key=lambda m: (m.throughput or 0.0, -m.workers, m.chunk_len))


# -- what the runs say -------------------------------------------------------------------
class Tally:
    """Every timed run, per point, as seconds for ``n`` items.

    A run over another number of items is scaled to ``n`` (the online
    refinement times calls of whatever size the user makes), so a point's
    throughput is ``n`` over the median of its runs and its spread is
    (max - min) / median, whatever the calls' sizes were.
    """

    def __init__(self, n: int, item_bytes: int, label: bool) -> None:
        self.n = n
        self.item_bytes = item_bytes
        self.label = label  # record the backend in each measurement
        self.times: dict[Point, list[float]] = {}
        self.contended: dict[Point, int] = {}  # runs timed under contention, per point

    def add(
        self, point: Point, seconds: float, items: int | None = None, contended: bool = False
    ) -> None:
        scale = 1.0 if items is None or items == self.n else self.n / items
        self.times.setdefault(point, []).append(seconds * scale)
        if contended:
            self.contended[point] = self.contended.get(point, 0) + 1

    def measurement(self, point: Point) -> Measurement:
        times = self.times[point]
        med = statistics.median(times)
        return Measurement(
            workers=point.workers,
            chunk_len=point.chunk_len,
            chunk_bytes=point.chunk_len * self.item_bytes,
            throughput=self.n / med,
            repeats=len(times),
            spread=(max(times) - min(times)) / med if len(times) > 1 else 0.0,
            backend=point.backend if self.label else None,
            contended=self.contended.get(point, 0),
        )

    def measured(self) -> list[tuple[Point, Measurement]]:
        return [(point, self.measurement(point)) for point in self.times]

    def leaders(self, k: int) -> list[tuple[Point, Measurement]]:
        return sorted(self.measured(), key=lambda pm: -(pm[1].throughput or 0.0))[:k]


# -- which runs next -------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """Time ``point`` ``repeats`` times (after one unrecorded warm-up run).

    ``probe``: nothing measured says the point is within
    :data:`PREDICTED_SLOW` of the best (a lane of fewer workers, never run):
    the online refinement times it on a slice of a call where it can cut one.
    """

    point: Point
    repeats: int
    warmup: bool = False
    probe: bool = False


@dataclass(frozen=True)
class Checkpoint:
    """A point where a budget may end the strategy; ``complete``: whether the
    result then counts as a complete search.  ``round``: a tie round starts
    (stop unless one more round, as long as the last, fits)."""

    complete: bool
    round: bool = False


def auto_requests(
    tally: Tally,
    plan: dict[Lane, list[int]],
    mid_bytes: int,
    ties: bool = False,
    online: bool = False,
    reach: dict[Lane, list[int]] | None = None,
) -> Iterator[Request | Checkpoint]:
    """The ``auto`` strategy as a sequence of runs to make.

    The caller makes each :class:`Request`'s runs and adds them to ``tally``
    before asking for the next; at a :class:`Checkpoint` it may stop.
    ``plan`` gives each lane its chunk ladder (ascending, unchunked last);
    ``ties`` adds the tie rounds (phase 4).

    ``online``: the runs are the user's calls (:mod:`autotune.adapt`), so
    screening spends none on what the tally predicts slower than
    :data:`PREDICTED_SLOW` times the best so far.  Lanes are screened in
    ``plan``'s order (most workers first); a lane whose throughput the lanes
    screened with more workers bound below that (:func:`_ceiling`) is not
    screened, and a lane whose first run, times the most the longer length
    gained on a lane screened before, is below it is not run at the longer
    length.  The other lanes' screening requests have ``probe`` (time them on
    a slice where a call can be cut).

    ``reach``: each lane's longer ladder (the online refinement's plan is a
    cut of the search's).  After the refinement (phase 2), while the best
    point is at an end of its lane's ladder and ``reach`` has a rung beyond
    it, that rung is timed and added to the lane's ladder in ``plan``
    (:func:`_past_the_ends`): a cut ladder whose end is best may stop short
    of the best.
    """
    # 0. screen every lane; keep those near the best
    screen = yield from _screen(tally, plan, mid_bytes, online)
    top = max(screen.values())
    kept = {lane: v for lane, v in plan.items() if screen.get(lane, 0.0) >= SCREEN * top}
    # 1. coarse: every other rung (and always the unchunked end) per kept lane
    for lane, lengths in kept.items():
        rungs = lengths[::2] + ([lengths[-1]] if len(lengths) % 2 == 0 else [])
        for c in rungs:
            if Point.of(lane, c) not in tally.times:
                yield Checkpoint(complete=False)
                yield Request(Point.of(lane, c), 1)
    # 2. refine: ladder neighbours of the two best points
    for point, _ in tally.leaders(2):
        lengths = plan[point.lane]
        i = lengths.index(point.chunk_len)
        for j in (i - 1, i + 1):
            if 0 <= j < len(lengths) and Point.of(point.lane, lengths[j]) not in tally.times:
                yield Checkpoint(complete=False)
                yield Request(Point.of(point.lane, lengths[j]), 1)
    if reach:
        yield from _past_the_ends(tally, plan, reach)
    # 3. successive halving among the leaders: every point kept gets at
    #    least KEPT_REPEATS runs
    for keep, more in ((3, 2), (2, 2)):
        yield Checkpoint(complete=False)
        for point, _ in tally.leaders(keep):
            yield Request(point, more)
    for point, m in tally.leaders(2):
        if m.spread > NOISY:
            yield Checkpoint(complete=True)
            yield Request(point, 2)
    # 4. spend what is left on the points still tied with the best
    if ties:
        yield from _tie_rounds(tally)


def _screen(
    tally: Tally, plan: dict[Lane, list[int]], mid_bytes: int, online: bool
) -> Generator[Request | Checkpoint, None, dict[Lane, float]]:
    """Phase 0 of :func:`auto_requests`: each lane screened, and what it reached.

    Every (backend, workers) at a mid-sized chunk and at one eight times
    longer.  For threads this is the GIL test: a kernel that holds the GIL
    gains nothing from a second thread; one whose GIL-free numpy calls are
    short gains only with the longer chunk, hence two lengths (the ladder's
    longest, if it is short).
    """

    def nearest(lengths: list[int]) -> int:
        return min(lengths[:-1] or lengths, key=lambda c: abs(c * tally.item_bytes - mid_bytes))

    screen: dict[Lane, float] = {}
    gains: list[float] = []  # each lane's longer probe over its first
    for lane, lengths in plan.items():
        top = max(screen.values(), default=0.0)
        if screen:
            yield Checkpoint(complete=False)
            if online and _predicted_slow(_ceiling(screen, lane), top):
                continue  # the lanes of more workers bound it below the best: not run
        mid = nearest(lengths)
        i = lengths.index(mid)
        longer = lengths[min(i + 3, len(lengths) - 1)]
        probes = [mid] + ([longer] if longer != mid else [])
        probe = online and bool(screen)
        yield Request(Point.of(lane, probes[0]), 1, warmup=True, probe=probe)
        if online and len(probes) > 1:
            # Its first run times the most the longer length gained on a lane
            # screened before: too slow for a whole call there, it is not run.
            first = tally.measurement(Point.of(lane, probes[0])).throughput or 0.0
            if probe and _predicted_slow(first * max(gains, default=1.0), top):
                screen[lane] = first
                continue
            yield Request(Point.of(lane, probes[1]), 1, probe=probe)
            if first:
                gains.append(
                    (tally.measurement(Point.of(lane, probes[1])).throughput or 0.0) / first
                )
        elif len(probes) > 1:
            yield Request(Point.of(lane, probes[1]), 1)
        screen[lane] = max(tally.measurement(Point.of(lane, c)).throughput or 0.0 for c in probes)
    return screen


def _past_the_ends(
    tally: Tally, plan: dict[Lane, list[int]], reach: dict[Lane, list[int]]
) -> Iterator[Request | Checkpoint]:
    """Phase 2's walk past a cut ladder: while the best point is at an end of its
    lane's ladder, the next rung of ``reach`` beyond that end, one run each, added
    to ``plan``; the walk stops where a rung is not best or ``reach`` ends."""
    while True:
        best = tally.leaders(1)[0][0]
        lengths = plan.get(best.lane)
        if not lengths:
            return
        beyond = [c for c in reach.get(best.lane, ()) if c not in lengths]
        if best.chunk_len == lengths[0]:
            step = max((c for c in beyond if c < lengths[0]), default=None)
        elif best.chunk_len == lengths[-1]:
            step = min((c for c in beyond if c > lengths[-1]), default=None)
        else:
            return
        if step is None or Point.of(best.lane, step) in tally.times:
            return
        plan[best.lane] = sorted([*lengths, step])
        yield Checkpoint(complete=False)
        yield Request(Point.of(best.lane, step), 1)


def _ceiling(screen: dict[Lane, float], lane: Lane) -> float | None:
    """The most ``lane`` can reach by what the screened lanes of its backend with more
    workers reached; None where fewer than two were screened.

    Throughput over workers is taken as concave (each worker adds at most what
    the one before it added: a shared memory bus, a shared L3), so below two
    measured counts it lies under the line through them, extended: 16 workers
    at 1.0 and 8 at 0.5 bound 4 workers at 0.25; 64 at 0.9 and 32 at 1.0 (past
    a knee) bound 16 at 1.05, not below the best.
    """
    backend, workers = lane
    above = sorted((w, t) for (b, w), t in screen.items() if b == backend and w > workers)
    if len(above) < 2:
        return None
    (w1, t1), (w2, t2) = above[:2]
    return t1 + (workers - w1) * (t2 - t1) / (w2 - w1)


def _predicted_slow(throughput: float | None, top: float) -> bool:
    return throughput is not None and throughput * PREDICTED_SLOW < top


def _tie_rounds(tally: Tally) -> Iterator[Request | Checkpoint]:
    """Re-time the best kept point and those tied with it, alternately."""
    flip = False
    while True:
        kept = [(point, m) for point, m in tally.measured() if m.repeats >= KEPT_REPEATS]
        if len(kept) < 2:
            return
        kept.sort(key=lambda pm: -(pm[1].throughput or 0.0))
        best = kept[0][1]
        tied = [kept[0]] + [pm for pm in kept[1:] if is_tie(best, pm[1])][: TIE_POINTS - 1]
        if len(tied) < 2:
            return  # the best stands apart
        tied = [(point, m) for point, m in tied if m.repeats < TIE_REPEATS]
        if not tied:
            return
        yield Checkpoint(complete=True, round=True)
        # Alternate the order so that neither point always runs just after
        # the other (a warm cache, a clock ramping up).
        for point, _ in reversed(tied) if flip else tied:
            yield Request(point, 1)
        flip = not flip


def pick_kept(measurements: Iterable[Measurement]) -> Measurement:
    """The best point among those confirmed by :data:`KEPT_REPEATS` runs (else
    by two or more, else any): a point timed once may have been lucky."""
    measured = list(measurements)
    return pick_best(
        [m for m in measured if m.repeats >= KEPT_REPEATS]
        or [m for m in measured if m.repeats > 1]
        or measured
    )
