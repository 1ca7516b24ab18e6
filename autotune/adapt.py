"""Online refinement: the evaluator tunes itself with the user's own calls.

Most users never run ``autotune search`` on the machine where their code
runs, so an evaluator whose settings came from the heuristic keeps tuning
them while it works (``Evaluator(adapt=...)``):

- **Which setting next** comes from the same engine as the search
  (:func:`autotune.engine.auto_requests` over a :class:`~autotune.engine.Tally`):
  screen, coarse pass, refinement, successive halving.  Each call, or each
  slice of a long call, is one run of the point the engine asked for.  When
  the engine has nothing more to ask, the best point is *settled*.
- **Which workers.**  All of the pool's, half of them from four workers on
  and a quarter from eight on (:data:`FEWER_WORKERS`), screened most first:
  a memory-bound kernel that saturates before the last core is as fast on
  fewer.  No whole call is spent on a point the tally predicts slower than
  :data:`~autotune.engine.PREDICTED_SLOW` times the best so far: a lane the
  two above it bound below that is not run, and a lane of fewer workers is
  screened on a slice of a call where one can be cut (a quarter of a call
  too short for slices of two chunks per worker, :data:`PROBE_SHORT`).
- **Bounded exploration.**  The ladder is the search's, cut to chunks between
  a quarter of the heuristic's and eight times it: far-off rungs cost whole
  calls at a fraction of the speed and are almost never best (L2/16 to L2/4
  per chunk came within 0.92 of the best on five kernels: docs/design.md,
  "Evidence behind the heuristic"; the worst miss 2.5 times the rule).  After
  settling, one call in :data:`RECHECK` (doubling up to :data:`RECHECK_MAX`)
  re-times the runner-up; three settled calls in a row slower than the
  settled median by more than :data:`DRIFT` start a new exploration (the
  kernel's cost changed: other data, same code).
- **Inline below break-even** (:class:`~autotune.breakeven.BreakEven`): from
  the pool calls of a kernel, the kernel's time per item and the pool's time
  per call are known; a call with fewer items than the pool's time per call
  buys runs in the calling process, over the same chunks.
- **Remembered across processes**: what was measured is saved as a profile
  with ``source: online`` (:func:`~autotune.profile.online.save_learned`:
  on settling, every :data:`SAVE_EVERY` calls and when the evaluator
  closes), each point with its latest runs.  The next process with the same
  kernel on the same CPU starts settled where the last one settled, or, if
  it had not, *replays* the saved runs: each run the engine asks for at a
  point is taken from the saved ones while they last, so the exploration
  goes on where it stopped and a short script converges over its runs.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from autotune.breakeven import BreakEven
from autotune.engine import (
    NOISY,
    Checkpoint,
    Lane,
    Point,
    Request,
    Tally,
    auto_requests,
    pick_kept,
)
from autotune.profile import Profile
from autotune.profile.online import STORED_RUNS, Learned

__all__ = [
    "DRIFT",
    "PROBE_SLICES",
    "RECHECK",
    "RECHECK_MAX",
    "Learner",
    "Refiner",
    "SliceRun",
    "online_ladder",
]

#: Lanes of fewer workers the refinement may screen: (a share of the
#: workers, from how many workers on).  Fewer workers can match all of them on
#: a memory-bound kernel that saturates before the last core; on two cores one
#: worker never came close (0.59 of the best at most: docs/design.md,
#: "Evidence behind the heuristic"), hence none below four.  A quarter from
#: eight on, for a knee below half the cores (a replayed 64-core machine that
#: saturates at 16 workers); on the 16-core Xeon's recorded workloads (all
#: scale to 16 workers) the engine predicts it slow from the two lanes above
#: it and never runs it (:func:`autotune.engine.auto_requests`, ``online``).
FEWER_WORKERS = ((2, 4), (4, 8))
#: Settled calls between two re-checks of the runner-up (doubles each time).
RECHECK = 32
RECHECK_MAX = 512
#: Settled calls this much slower than the settled median, three in a row,
#: mean the kernel's cost changed: explore again.
DRIFT = 2 * NOISY
#: Runs kept per point: the median of the recent ones is what counts.  As
#: many as an online profile keeps, so that the next process sees what this
#: one saw.
KEEP_RUNS = STORED_RUNS
#: A long call while exploring is cut into this many slices (at most half
#: of them probe other points, the rest runs at the best one found).
PROBE_SLICES = 16
#: A point the engine asks to probe (:attr:`Refiner.probing`) in a call too
#: short for slices of two chunks per worker is timed on this fraction of it,
#: one chunk per worker (shorter chunks than the point's: a lane of fewer
#: workers is screened by its throughput, not its chunk length).
PROBE_SHORT = 4
#: Probing inside a call is worth it when what is left takes longer than this.
PROBE_WORTH_S = 0.2
#: A map is cut into slices only when its kernel takes this long per item.
SLICE_MAP_MIN_S = 50e-9
#: A settled point's lead over the others is looked at again after a re-check
#: and every this many settled calls (ranking every point costs a median each).
FOLLOW_EVERY = 16
#: Save an online profile again after this many more calls.
SAVE_EVERY = 100


def online_ladder(full: list[int], mid_len: int) -> list[int]:
    """The search's chunk ladder cut to [mid/4, 8 x mid] (the unchunked end kept if inside)."""
    lo, hi = mid_len / 4, mid_len * 8
    kept = [c for c in full if lo <= c <= hi]
    return kept or [min(full, key=lambda c: abs(c - mid_len))]


@dataclass
class _Pending:
    request: Request
    left: int  # runs still to make, the warm-up included


class Refiner:
    """The online state of one kernel: exploring with the engine, or settled.

    Parameters
    ----------
    plan : dict of Lane to list of int
        Each lane's chunk ladder (ascending).
    mid_len : int
        The heuristic's chunk length: where screening starts.
    item_bytes : int
        Bytes per item, to express chunk lengths in bytes.
    settled : Point, optional
        Start settled here (an online profile found for this kernel and CPU).
    stored : mapping of Point to sequence of float, optional
        Runs an earlier process made (items per second each, oldest first).
        Settled, they are the tally's history; exploring, they are replayed:
        a run the engine asks for at a point is taken from that point's
        stored runs while they last (a warm-up is then not needed).

    ``fresh`` holds the runs made here (seconds for ``tally.n`` items, per
    point) until :meth:`take_fresh` hands them over to be saved.
    """

    def __init__(
        self,
        plan: dict[Lane, list[int]],
        mid_len: int,
        item_bytes: int,
        settled: Point | None = None,
        stored: Mapping[Point, Sequence[float]] | None = None,
    ) -> None:
        self.plan = plan
        self.item_bytes = item_bytes
        self.mid_bytes = mid_len * item_bytes
        self.tally = Tally(1_000_000, item_bytes, label=True)
        self.calls = 0  # runs recorded here, over every point
        self.explorations = 0
        self.fresh: dict[Point, list[float]] = {}
        self._stored = {
            point: deque(self.tally.n / t for t in runs) for point, runs in (stored or {}).items()
        }
        # A warm-up only before the first run of a kernel never measured: the
        # pool is then warm for every point (a later lane's screening, a new
        # exploration), and runs saved by an earlier process need none.
        self._warmed = bool(self._stored)
        # A run not counted here (a warm-up, a run on a busy machine), saved
        # if it is all this process ran: a script of one or two calls per run
        # still progresses.
        self._fallback: tuple[Point, float] | None = None
        self._steps: Iterator[Request | Checkpoint] | None = None
        self._pending: _Pending | None = None
        self._recheck_every = RECHECK
        self._since_check = 0
        self._recent: deque[float] = deque(maxlen=3)  # settled runs' seconds per item
        self.best: Point
        if settled is not None:
            self.best, self.settled = settled, True
            for point, runs in self._stored.items():
                self.tally.times[point] = list(runs)[-KEEP_RUNS:]
            self._stored.clear()
        else:
            self.best, self.settled = Point.of(next(iter(plan)), mid_len), False
            self._explore()

    # -- what to run ----------------------------------------------------------
    def next(self) -> Point:
        """The point the next run (a call, or a slice of a long call) should use."""
        if self.settled:
            self._since_check += 1
            if self._since_check < self._recheck_every:
                return self.best
            runner_up = self._runner_up()
            if runner_up is not None:
                self._since_check = 0
                self._recheck_every = min(2 * self._recheck_every, RECHECK_MAX)
                return runner_up
            return self.best
        while self._pending is None or self._pending.left == 0:
            step = next(self._steps, None) if self._steps is not None else None
            if step is None:
                self._settle()
                return self.best
            if isinstance(step, Request):
                self._pending = self._replay(_Pending(step, step.repeats + int(step.warmup)))
        return self._pending.request.point

    def record(self, point: Point, seconds: float, items: int) -> None:
        """What a run at ``point`` over ``items`` items took."""
        pending = self._pending
        self._warmed = True  # one run warms the pool for every point after it
        if not self.settled and pending is not None and point == pending.request.point:
            warm_up = self.warming_up
            pending.left -= 1
            if warm_up:
                self.keep_if_alone(point, seconds, items)
                return
        self._add(point, seconds, items)
        if self.settled:
            if point == self.best:
                self._watch(seconds / max(items, 1))
            else:
                self._follow_leader()  # a re-check may have put the runner-up ahead

    def keep_if_alone(self, point: Point, seconds: float, items: int) -> None:
        """A run that is not counted, to be saved if no counted one is made."""
        self._fallback = (point, seconds * self.tally.n / max(items, 1))

    @property
    def warming_up(self) -> bool:
        """Whether the next run is the kernel's warm-up (not counted in any case)."""
        pending = self._pending
        return (
            not self.settled
            and pending is not None
            and pending.request.warmup
            and pending.left == pending.request.repeats + 1
        )

    @property
    def probing(self) -> bool:
        """Whether the point :meth:`next` gave is to be timed on a slice of a call
        where one can be cut (nothing says it is near the best)."""
        pending = self._pending
        return not self.settled and pending is not None and pending.request.probe

    @property
    def kept_if_alone(self) -> bool:
        """Whether a run is waiting to be saved if no counted one is made."""
        return self._fallback is not None

    @property
    def exploring(self) -> bool:
        return not self.settled

    def throughput(self, point: Point | None = None) -> float | None:
        """Items per second measured at ``point`` (default: the best), if any."""
        point = point or self.best
        if point not in self.tally.times:
            return None
        return self.tally.measurement(point).throughput

    def runs_at(self, point: Point) -> int:
        return len(self.tally.times.get(point, ()))

    def take_fresh(self) -> dict[Point, list[float]]:
        """The runs made here since the last call (seconds for ``tally.n`` items);
        the warm-up run when it was the only one."""
        fresh, self.fresh = self.fresh, {}
        if not fresh and self._fallback is not None:
            point, seconds = self._fallback
            fresh = {point: [seconds]}
        self._fallback = None
        return fresh

    # -- inside -----------------------------------------------------------------
    def _replay(self, pending: _Pending) -> _Pending:
        """Take ``pending``'s runs from the stored ones of its point while they last."""
        stored = self._stored.get(pending.request.point)
        if pending.request.warmup and self._warmed:
            pending.left -= 1
        if not stored:
            return pending
        while pending.left and stored:
            self._add(pending.request.point, stored.popleft(), self.tally.n, fresh=False)
            pending.left -= 1
        return pending

    def _add(self, point: Point, seconds: float, items: int, fresh: bool = True) -> None:
        self.tally.add(point, seconds, items)
        runs = self.tally.times[point]
        if len(runs) > KEEP_RUNS:
            del runs[0]
        if fresh:
            self.fresh.setdefault(point, []).append(runs[-1])
            self.calls += 1

    def _explore(self) -> None:
        self.settled = False
        self.explorations += 1
        self._pending = None
        self._recent.clear()
        self._steps = auto_requests(self.tally, self.plan, self.mid_bytes, online=True)

    def _settle(self) -> None:
        self._steps, self._pending = None, None
        self._stored.clear()  # what was not replayed would be stale by a new exploration
        measured = self.tally.measured()
        if measured:
            best = pick_kept(m for _, m in measured)
            self.best = next(point for point, m in measured if m is best)
        self.settled = True
        self._since_check = 0

    def _runner_up(self) -> Point | None:
        others = [point for point, _ in self.tally.leaders(2) if point != self.best]
        return others[0] if others else None

    def _watch(self, seconds_per_item: float) -> None:
        """Re-explore when the settled point got slower and stayed slower."""
        self._recent.append(seconds_per_item)
        runs = self.tally.times.get(self.best, [])
        if len(self._recent) < 3 or len(runs) < 6:
            return  # enough history first
        baseline = statistics.median(runs[:-3]) / self.tally.n
        if all(s > baseline * (1 + DRIFT) for s in self._recent):
            # Start over with what the kernel costs now: the old runs describe
            # another workload.
            self.tally = Tally(self.tally.n, self.item_bytes, label=True)
            self.mid_bytes = self.best.chunk_len * self.item_bytes
            self._explore()
            return
        if self._since_check % FOLLOW_EVERY == 0:
            self._follow_leader()  # the best's own runs moved: is it still ahead?

    def _follow_leader(self) -> None:
        leaders = self.tally.leaders(1)
        if leaders:
            point, m = leaders[0]
            # A runner-up needs as many runs as the settled point had at
            # settling (3 or more) before it can take over.
            if point != self.best and m.repeats >= 3:
                self.best = point


@dataclass(frozen=True)
class SliceRun:
    """What one run of a call on the pool took.

    ``items`` items at ``point``: ``wall`` seconds, ``busy`` seconds of
    kernel work summed over the workers; ``measured``: whether the refiner
    counts it (the rest of a probing call is not); ``contended``: it was
    meant to count, but other processes held the CPUs it needed.
    """

    point: Point
    items: int
    wall: float
    busy: float
    measured: bool = True
    contended: bool = False


class Learner:
    """What an evaluator knows of one kernel (by name): its refiner and its break-even.

    Parameters
    ----------
    name : str
        The kernel's ``module:qualname``, or the ``profile=`` name given.
    lane : Lane
        ``(backend, workers)`` of the pool.
    mid_len : int
        The heuristic's chunk length for this kernel.
    ladder : list of int
        The search's chunk ladder for the first call's ``n``.
    item_bytes : int
    known : Profile, optional
        This kernel's online profile on this CPU: settled, start settled on
        its best; exploring, replay its runs (see :class:`Refiner`).
    """

    def __init__(
        self,
        name: str,
        lane: Lane,
        mid_len: int,
        ladder: list[int],
        item_bytes: int,
        known: Profile | None = None,
    ) -> None:
        self.name = name
        self.lane = lane
        self.item_bytes = item_bytes
        backend, workers = lane
        plan = {lane: online_ladder(ladder, mid_len)}
        for share, least in FEWER_WORKERS:
            if workers >= least:
                plan[(backend, workers // share)] = plan[lane]
        start, stored = None, {}
        if known is not None:
            for m in known.measurements:
                if m.throughput and m.workers <= workers and m.backend in (None, backend):
                    stored[Point(backend, m.workers, m.chunk_len)] = m.runs or (m.throughput,)
            if not known.exploring:
                start = Point(backend, min(known.workers, workers), known.chunk_len)
        self.refiner = Refiner(plan, mid_len, item_bytes, settled=start, stored=stored)
        self.breakeven = BreakEven()
        if known is not None and known.best.throughput:
            # What an item cost at the best point, as if every worker were
            # busy the whole call (an upper bound, corrected by the first pool
            # call): enough to decide the first call without a probe.
            per_item = known.best.workers / known.best.throughput
            self.breakeven.kernel_time(1, per_item, inline=False)
        self.n = 0  # items of the latest call, for the profile
        self._saved_at: tuple[int, Point] | None = None
        self._saves = 0

    # -- one call -------------------------------------------------------------
    def inline(self, n: int, overhead: float) -> bool:
        """Whether a call of ``n`` items is cheaper in the calling process, given
        what a pool call costs beyond the kernel (``overhead`` seconds)."""
        return self.breakeven.inline(n, self.refiner.best.workers, overhead)

    def run_call(self, n: int, mode: str, run: Callable[[int, Point, bool], SliceRun]) -> None:
        """Run a call of ``n`` items on the pool as consecutive runs, and learn from them.

        ``run(items, point, measured)`` runs the call's next ``items`` items
        at ``point`` and says what that took; the items of the runs add up to
        ``n`` exactly.  A call too short to cut is one run at the point the
        engine asks for, except a point to probe (:attr:`Refiner.probing`: a
        lane of fewer workers), timed on a :data:`PROBE_SHORT`-th of it.  A
        long one, while exploring, probes one slice per point (each long
        enough for two chunks per worker) within its first half, while what
        is left is worth it, and runs the rest at the best point so far; that
        rest is not a measurement (a run of another size is not comparable).
        A map is cut only when its kernel is slow per item: its slices come
        back as separate arrays that must be joined, a copy that a
        memory-bound map would pay as much for as for its work.
        """
        self.n = max(self.n, n)
        point = self.refiner.next()
        cuttable = mode == "reduce" or self.breakeven.per_item() >= SLICE_MAP_MIN_S
        size = self._first_slice(n, point) if self.refiner.exploring and cuttable else None
        if size is None:
            self._learn(run(n, point, True))
            return
        done = 0
        while True:
            probe = run(size, point, True)
            self._learn(probe)
            done += probe.items
            if self._probing(n, done, probe):
                # Each point probes with a slice of its own length: the next
                # one must fit in the first half of the call too.
                following = self.refiner.next()
                size = self._slice(n, following)
                if n - done - size >= n // 2:
                    point = following
                    continue
            self._learn(run(n - done, self.leader(), False))
            return

    def _first_slice(self, n: int, point: Point) -> int | None:
        """The items of a call's first slice at ``point``; None: the call is run whole.

        Two chunks per worker within the first half of the call; else, for a
        point to probe (:attr:`Refiner.probing`), a :data:`PROBE_SHORT`-th of
        the call, whose chunks the plan shortens to one per worker.
        """
        size = self._slice(n, point)
        if size <= n // 2:
            return size
        if self.refiner.probing and n // PROBE_SHORT >= point.workers:
            return n // PROBE_SHORT
        return None

    @staticmethod
    def _slice(n: int, point: Point) -> int:
        return max(n // PROBE_SLICES, 2 * point.workers * point.chunk_len)

    def _probing(self, n: int, done: int, last: SliceRun) -> bool:
        """Whether the call may probe again after ``done`` of its ``n`` items: still
        exploring, more than half of it left, and what is left worth it at the
        rate of the ``last`` run."""
        remaining = n - done
        return (
            self.refiner.exploring
            and remaining > n // 2
            and last.wall > 0
            and remaining * last.wall / last.items > PROBE_WORTH_S
        )

    def _learn(self, run: SliceRun) -> None:
        if run.measured:
            self.refiner.record(run.point, run.wall, run.items)
        elif run.contended:
            self.refiner.keep_if_alone(run.point, run.wall, run.items)
        self.breakeven.kernel_time(run.items, run.busy, inline=False)

    def leader(self) -> Point:
        """The fastest point measured so far (the settled one once settled)."""
        if self.refiner.settled:
            return self.refiner.best
        leaders = self.refiner.tally.leaders(1)
        return leaders[0][0] if leaders else self.refiner.best

    # -- what to remember ---------------------------------------------------------
    def save_due(self, closing: bool = False) -> bool:
        """Whether what was learned should be saved now: newly settled, moved or
        aged by :data:`SAVE_EVERY` calls; and on ``closing``, any run not saved yet."""
        refiner = self.refiner
        if closing:
            return bool(refiner.fresh) or refiner.kept_if_alone
        if not refiner.settled or refiner.best not in refiner.tally.times:
            return False
        if self._saved_at is None or self._saved_at[1] != refiner.best:
            return True
        return refiner.calls - self._saved_at[0] >= SAVE_EVERY

    def unsaved(self, learned: Learned) -> None:
        """``learned`` (from :meth:`learned`) could not be saved: keep its runs for the
        next save, and this evaluator's first save still to come."""
        n = self.refiner.tally.n
        backend = self.lane[0]
        for (workers, chunk_len), runs in learned.fresh.items():
            point = Point(backend, workers, chunk_len)
            kept = self.refiner.fresh.setdefault(point, [])
            kept[:0] = [n / t for t in runs]
        if learned.first:
            self._saves -= 1

    def learned(self) -> Learned:
        """What to save (and remember that it was handed over)."""
        refiner = self.refiner
        best = refiner.best if refiner.settled else self.leader()
        n = refiner.tally.n

        def throughputs(runs: Mapping[Point, list[float]]) -> dict[tuple[int, int], list[float]]:
            return {
                (p.workers, p.chunk_len): [n / s for s in r if s > 0]
                for p, r in runs.items()
                if any(s > 0 for s in r)
            }

        self._saved_at = (refiner.calls, refiner.best)
        self._saves += 1
        fresh = throughputs(refiner.take_fresh())
        known = throughputs(refiner.tally.times)
        return Learned(
            workload=self.name,
            backend=self.lane[0],
            item_bytes=self.item_bytes,
            n=max(self.n, 1),
            best=(best.workers, best.chunk_len),
            exploring=refiner.exploring,
            fresh=fresh,
            known={**fresh, **known},  # a saved warm-up is in fresh only
            first=self._saves == 1,
        )
