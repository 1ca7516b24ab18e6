"""The online state of one kernel: exploring with the engine, or settled.

A :class:`Refiner` asks the engine (:func:`autotune.engine.auto_requests`)
which point each run should use, files what each run took in a
:class:`~autotune.engine.Tally`, settles on the best point when the engine
has nothing more to ask, re-checks the runner-up now and then, and explores
again when the settled point drifts.  An evaluator's
:class:`~autotune.adapt.Learner` holds one per kernel and feeds it the
kernel's calls; :mod:`autotune.adapt` says why it works this way.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

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
from autotune.profile.online import STORED_RUNS

__all__ = [
    "DRIFT",
    "RECHECK",
    "RECHECK_MAX",
    "Refiner",
]

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
#: A settled point's lead over the others is looked at again after a re-check
#: and every this many settled calls (ranking every point costs a median each).
FOLLOW_EVERY = 16


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
    reach : dict of Lane to list of int, optional
        Each lane's whole ladder, of which ``plan``'s is a cut: a best point
        at an end of the cut walks past it (:func:`~autotune.engine.auto_requests`).
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
        reach: dict[Lane, list[int]] | None = None,
    ) -> None:
        self.plan = plan
        self.reach = reach
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
        # exploration), and a process that goes on from saved runs makes none:
        # a warm-up per process halves what a script of two calls adds to the
        # exploration (bench_runs: rows' calls of runs 4-6 at 0.66-0.72 of the
        # best fixed setting with one, 0.78-0.85 without).  Its first run, cold,
        # is judged against saved runs where its point has some (below).
        self._warmed = bool(self._stored)
        # ... but the first run of a process that goes on from saved runs is
        # made by workers that just started (a module to import under spawn,
        # the data's pages to map): not counted when it is slower than its
        # point's saved runs say (its point is asked for again).
        self._cold = bool(self._stored)
        # The kernel's cost changed (drift) since the runs an earlier process
        # saved: the next save replaces them (Learned.restart).
        self.restarted = False
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
        cold, self._cold = self._cold, False
        if cold and self._slower_than_saved(point, seconds, items):
            self.keep_if_alone(point, seconds, items)
            return
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

    def _slower_than_saved(self, point: Point, seconds: float, items: int) -> bool:
        """Whether a run is slower than the median of its point's runs by more than
        :data:`~autotune.engine.NOISY` (False when the point has none)."""
        runs = self.tally.times.get(point)
        if not runs or items <= 0:
            return False
        per_item = statistics.median(runs) / self.tally.n
        return seconds / items > per_item * (1 + NOISY)

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
        self._steps = auto_requests(
            self.tally, self.plan, self.mid_bytes, online=True, reach=self.reach
        )

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
            # another workload, here and in the saved file.
            self.tally = Tally(self.tally.n, self.item_bytes, label=True)
            self.fresh, self.restarted = {}, True
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
