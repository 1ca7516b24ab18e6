"""The search's side of the engine: a bench that times points itself, and the
strategies run on it as fast as a budget allows.

:class:`Bench` is a :class:`~autotune.engine.Tally` that makes its own runs
(``autotune search``'s :class:`~autotune.searchbench.SearchBench`, or a
scripted one in tests), re-timing those the machine did not give their CPUs.
:func:`run_grid` times every point of a plan; :func:`run_auto` runs the
engine's ``auto`` strategy (:func:`~autotune.engine.auto_requests`) on a
bench until a deadline; :func:`planned_runs` says how many runs a search of
a plan makes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from autotune.cpu.contention import CpuSample, CpuSampler, contention_between
from autotune.engine import RETIMES, Lane, Point, Request, Tally, auto_requests

__all__ = [
    "GRID_REPEATS",
    "Bench",
    "planned_runs",
    "run_auto",
    "run_grid",
]


class Bench(Tally):
    r"""A :class:`Tally` that times points itself: the search's, or a scripted one.

    ``run`` makes ``repeats`` timed runs of ``point`` (after one warm-up run
    that is not recorded when ``warmup``) and :meth:`~Tally.add`\ s them,
    each through :meth:`timed` where the bench can say how busy the machine
    was.

    Parameters
    ----------
    meter : CpuSampler, optional
        What is read around every timed run
        (:class:`autotune.cpu.contention.CpuMeter`, or a scripted one in
        tests).  None: nothing is metered.
    """

    def __init__(
        self, n: int, item_bytes: int, label: bool, meter: CpuSampler | None = None
    ) -> None:
        super().__init__(n, item_bytes, label)
        self.meter = meter
        self.first: CpuSample | None = None  # before the first metered run
        self.last: CpuSample | None = None  # after the latest one
        self.metered = 0  # runs kept with a reading of the meter
        self.retimed = 0  # runs made again because they were contended
        self.persistent = False  # the last run stayed contended through its re-times

    def run(self, point: Point, repeats: int, warmup: bool = False) -> None:
        raise NotImplementedError

    def pids(self) -> Sequence[int]:
        """The bench's worker processes: their CPU time is ours, not others'."""
        return ()

    def timed(self, point: Point, once: Callable[[], float]) -> float:
        """Make one timed run of ``point`` with ``once`` (it returns the seconds)
        and add it; return the seconds kept.

        A run during which other processes took CPUs it needed
        (:meth:`~autotune.cpu.contention.Contention.contended`) is made again, up
        to :data:`RETIMES` times; if every attempt was contended, the least
        contended one is kept and counted as contended (the point is marked).
        Contention that outlasted a run's re-times is not a burst: the runs after
        it are not re-timed (only marked) until one comes out clean, so a steady
        load does not spend the budget three times over for nothing.
        """
        if self.meter is None:
            seconds = once()
            self.add(point, seconds)
            return seconds
        retimes = 0 if self.persistent else RETIMES
        attempts: list[tuple[float, float]] = []  # (share taken by others, seconds)
        for attempt in range(retimes + 1):
            before = self.meter.sample(self.pids())
            seconds = once()
            after = self.meter.sample(self.pids())
            self.first = self.first or before
            self.last = after or self.last
            load = contention_between(before, after)
            if load is None or not load.contended(point.workers):
                self.metered += load is not None
                self.persistent = False
                self.add(point, seconds)
                return seconds
            attempts.append((load.taken(point.workers), seconds))
            if attempt < retimes:
                self.retimed += 1
        _, seconds = min(attempts)
        self.metered += 1
        self.persistent = True
        self.add(point, seconds, contended=True)
        return seconds

    def contention(self) -> dict[str, Any] | None:
        """How busy the machine was over the metered runs, as a profile records it
        (``{others, cpus, runs, contended}``); None where nothing was metered."""
        load = contention_between(self.first, self.last)
        if load is None or not self.metered:
            return None
        return {
            "others": round(load.held, 3),
            "cpus": load.cpus,
            "runs": self.metered,
            "contended": sum(self.contended.values()),
        }


#: Timed runs per point in the grid (after one warm-up run).
GRID_REPEATS = 3


# -- the strategies --------------------------------------------------------------------
def run_grid(
    bench: Bench,
    plan: dict[Lane, list[int]],
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Every point of ``plan`` on ``bench`` until ``clock()`` passes ``deadline``;
    returns False when the budget ran out first."""
    for lane, lengths in plan.items():
        for c in lengths:
            if clock() > deadline:
                return False
            bench.run(Point.of(lane, c), GRID_REPEATS, warmup=True)
    return True


def run_auto(
    bench: Bench,
    plan: dict[Lane, list[int]],
    deadline: float,
    mid_bytes: int,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """The engine's ``auto`` strategy, tie rounds included, run on ``bench`` as
    fast as it can until ``clock()`` passes ``deadline``; False when the budget
    ran out before successive halving was done."""
    round_began: float | None = None
    last_round = 0.0
    for step in auto_requests(bench, plan, mid_bytes, ties=True):
        if isinstance(step, Request):
            bench.run(step.point, step.repeats, warmup=step.warmup)
            continue
        now = clock()
        if step.round:
            # One more tie round only if it fits, as long as the last one.
            if round_began is not None:
                last_round = now - round_began
            if now + last_round > deadline:
                return True
            round_began = now
        elif now > deadline:
            return step.complete
    return True


def planned_runs(plan: dict[Lane, list[int]], strategy: str) -> int:
    """Timed runs (warm-ups included) a search of ``plan`` makes, before ties."""
    points = sum(len(v) for v in plan.values())
    if strategy == "grid":
        return points * (GRID_REPEATS + 1)
    screening = 3 * len(plan)  # a warm-up and two lengths per lane
    # Every kept lane's coarse pass: at most every other rung and the end
    # (assume all lanes are kept; the mid and longer lengths may be among them).
    coarse = sum(len(v) // 2 + 1 for v in plan.values())
    refine = 4
    halving = 3 * 2 + 2 * 2 + 2 * 2  # the rounds, then the noise re-runs
    return screening + coarse + refine + halving
