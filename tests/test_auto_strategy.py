"""The search strategies' decisions, on a scripted bench: no processes, no clocks.

``run_auto`` and ``run_grid`` only ask a bench (:class:`~autotune.bench.Bench`)
to time points and read back what it measured, and read the clock they are
given.  Here the bench's ``run`` files the seconds a table of throughputs
says for that (lane, chunk length), and ticks a fake clock by one.  What ``measurement``,
``measured`` and ``leaders`` make of those seconds is the real code, so
these tests pin which points each strategy times, how often, and what it
ends up ranking first, for throughput landscapes chosen to exercise each
rule (screening, coarse pass, refinement, successive halving, noise, the
deadline).  ``scripts/bench_tuner.py`` measures how well that pays on a
real machine; nothing here times anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from autotune.bench import GRID_REPEATS, Bench, run_auto, run_grid
from autotune.engine import (
    NOISY,
    PREDICTED_SLOW,
    SCREEN,
    TIE_REPEATS,
    Point,
    Request,
    Tally,
    auto_requests,
    pick_kept,
)
from autotune.profile import Measurement

#: The chunk ladder of every lane: powers of two, then the unchunked length.
LADDER = [16, 32, 64, 128, 256, 512, 1024, 2048, 5000]
ITEM_BYTES = 8
#: The mid-sized chunk nearest this is 64 items (512 bytes); the screen's
#: second length is three rungs (8x) longer: 512 items.
MID_BYTES = 512
SCREENED = (64, 512)
#: The coarse pass: every other rung from the shortest (the unchunked end included).
COARSE = (16, 64, 256, 1024, 5000)
N = 1_000_000  # items per "run": seconds = N / throughput

P1, P2, T1, T2 = ("processes", 1), ("processes", 2), ("threads", 1), ("threads", 2)


@dataclass(frozen=True)
class Call:
    lane: tuple[str, int]
    chunk_len: int
    repeats: int
    warmup: bool


class FakeClock:
    """The clock the strategies are given; one tick per kernel run."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedBench(Bench):
    """The tuner's bench, its timing replaced by a table of throughputs.

    ``table[lane]`` lists items per second along ``ladder``.  ``noise``
    maps a point to factors on the seconds of its successive timed runs
    (1.0 past the end of the list).
    """

    def __init__(self, table, clock, noise=None, ladder=LADDER):
        super().__init__(N, ITEM_BYTES, label=True)
        self.runs = 0
        self.throughput = {
            (lane, c): tp for lane, row in table.items() for c, tp in zip(ladder, row, strict=True)
        }
        self.noise = noise or {}
        self.clock = clock
        self.calls: list[Call] = []

    def run(self, point, repeats, warmup=False):
        self.calls.append(Call(point.lane, point.chunk_len, repeats, warmup))
        key = (point.lane, point.chunk_len)
        for i in range(int(warmup) + repeats):
            self.clock.now += 1
            self.runs += 1
            if i >= int(warmup):
                done = self.times.setdefault(point, [])
                factors = self.noise.get(key, ())
                factor = factors[len(done)] if len(done) < len(factors) else 1.0
                done.append(N / self.throughput[key] * factor)

    # What the tests read back.
    def timed(self, lane):
        """Chunk lengths of ``lane`` that were timed, in ladder order."""
        return [c for c in LADDER if Point.of(lane, c) in self.times]

    def repeats(self, lane, chunk_len):
        return len(self.times.get(Point.of(lane, chunk_len), ()))

    def best(self):
        point, _ = self.leaders(1)[0]
        return point.lane, point.chunk_len


@pytest.fixture
def clock():
    return FakeClock()


def plan(*lanes, ladder=LADDER):
    return {lane: list(ladder) for lane in lanes}


def auto(table, clock, noise=None, deadline=math.inf, ladder=LADDER):
    bench = ScriptedBench(table, clock, noise, ladder)
    complete = run_auto(bench, plan(*table, ladder=ladder), deadline, MID_BYTES, clock)
    return bench, complete


# Landscapes: items per second along the ladder, one row per lane.
#                         16   32   64  128  256  512 1024 2048 5000
# The best (200) sits between the screened lengths, on no coarse rung: only
# refinement around the coarse leaders (64 and 256) reaches it.
OFF_SCREEN = {
    P1: [60, 70, 80, 90, 80, 70, 60, 50, 40],  # screens at 80/180: pruned
    P2: [150, 170, 180, 200, 175, 160, 140, 120, 100],  # screens best (180)
    T1: [50, 60, 70, 80, 70, 60, 50, 40, 30],  # pruned
    T2: [100, 110, 130, 140, 150, 155, 150, 130, 120],  # screens 155/180: kept
}
# The best (260) is on the lane that screens second, far from its screened lengths.
SECOND_LANE = {
    P1: [60, 70, 80, 90, 80, 70, 60, 50, 40],
    P2: [150, 160, 180, 170, 165, 175, 150, 130, 120],  # screens best (180)
    T1: [50, 60, 70, 80, 70, 60, 50, 40, 30],
    T2: [100, 110, 150, 155, 158, 160, 200, 260, 220],  # screens second (160)
}
# The best is unchunked: the coarse pass always times the ladder's end.
UNCHUNKED = {
    P1: [90, 95, 100, 105, 110, 115, 120, 125, 130],
    P2: [100, 110, 120, 130, 140, 150, 160, 170, 300],
    T2: [100, 105, 110, 115, 120, 125, 130, 135, 140],
}
# The same on a ladder of even length, where every other rung misses the end
# and no leader of the coarse pass is next to it.
EVEN_LADDER = LADDER[1:]
#                         32   64  128  256  512 1024 2048 5000
UNCHUNKED_EVEN = {
    P2: [100, 110, 120, 130, 140, 150, 90, 300],
    T2: [100, 100, 100, 100, 100, 100, 100, 100],  # screens 100/140: pruned
}


@pytest.mark.parametrize(
    ("table", "ladder", "planted"),
    [
        (OFF_SCREEN, LADDER, (P2, 128)),
        (SECOND_LANE, LADDER, (T2, 2048)),
        (UNCHUNKED, LADDER, (P2, 5000)),
        (UNCHUNKED_EVEN, EVEN_LADDER, (P2, 5000)),
    ],
    ids=["between-screened-lengths", "on-the-lane-screening-second", "unchunked", "unchunked-even"],
)
def test_auto_finds_the_planted_best(clock, table, ladder, planted):
    bench, complete = auto(table, clock, ladder=ladder)
    assert complete
    assert bench.best() == planted
    assert bench.repeats(*planted) == 5  # and confirmed by the halving rounds


def test_auto_screens_every_lane_at_two_lengths_and_prunes_those_below_the_threshold(clock):
    top = 180.0  # P2 at 64, the best screened value
    table = {
        P2: [150, 170, 180, 200, 175, 160, 140, 120, 100],
        # T2 screens just above SCREEN x top, P1 just below (at 512 and 64).
        T2: [100, 110, (SCREEN + 0.01) * top, 140, 150, 120, 150, 130, 120],
        P1: [900, 900, 100, 900, 900, (SCREEN - 0.01) * top, 900, 900, 900],
    }
    bench, _ = auto(table, clock)
    # Every lane's first two calls: the mid chunk with a warm-up, then 8x longer.
    for lane in table:
        first = [c for c in bench.calls if c.lane == lane][:2]
        assert first == [Call(lane, 64, 1, True), Call(lane, 512, 1, False)]
    # The lane below the threshold is never timed again, though its other
    # chunk lengths (900) would have beaten everything: screening decides.
    assert [c.chunk_len for c in bench.calls if c.lane == P1] == list(SCREENED)
    # The lane just above it gets the coarse pass.
    assert set(COARSE) <= set(bench.timed(T2))


def test_auto_coarse_pass_then_refines_the_neighbours_of_the_two_best(clock):
    # After the coarse pass the two best points are P2 at 256 (190) and T2 at
    # 1024 (185), on different lanes: their ladder neighbours are timed (P2
    # at 128, T2 at 2048; P2 at 512 and T2 at 512 were screened already),
    # nothing else is.
    table = {
        P2: [150, 160, 170, 100, 190, 175, 140, 130, 120],
        T2: [100, 110, 160, 100, 150, 150, 185, 120, 110],
    }
    bench, _ = auto(table, clock)
    assert bench.timed(P2) == [16, 64, 128, 256, 512, 1024, 5000]
    assert bench.timed(T2) == [16, 64, 256, 512, 1024, 2048, 5000]
    # The order of the phases: both screens, then each lane's coarse rungs, then refinement.
    single = [(c.lane, c.chunk_len) for c in bench.calls if c.repeats == 1]
    assert single == [
        (P2, 64), (P2, 512), (T2, 64), (T2, 512),
        (P2, 16), (P2, 256), (P2, 1024), (P2, 5000),
        (T2, 16), (T2, 256), (T2, 1024), (T2, 5000),
        (P2, 128), (T2, 2048),
    ]  # fmt: skip


def test_auto_successive_halving_retimes_the_leaders(clock):
    bench, _ = auto(OFF_SCREEN, clock)
    halving = [c for c in bench.calls if c.repeats > 1]
    # Three leaders get two more runs each, then the best two two more again.
    assert halving == [
        Call(P2, 128, 2, False),  # 200
        Call(P2, 64, 2, False),  # 180
        Call(P2, 256, 2, False),  # 175
        Call(P2, 128, 2, False),
        Call(P2, 64, 2, False),
    ]
    assert [bench.repeats(P2, c) for c in (128, 64, 256)] == [5, 5, 3]
    # Everything else was timed once.
    kept = {Point.of(P2, c) for c in (128, 64, 256)}
    others = [p for p in bench.times if p not in kept]
    assert others and all(len(bench.times[p]) == 1 for p in others)


def after_halving(bench):
    """The calls after the successive-halving rounds (5 calls of 2 runs)."""
    rounds = [i for i, c in enumerate(bench.calls) if c.repeats > 1]
    return bench.calls[rounds[4] + 1 :]


def test_auto_reruns_a_leader_whose_runs_spread(clock):
    # Factors on the seconds of successive runs; the medians stay unchanged,
    # so the leaders are the same as without noise.
    noisy = (1.0, 1.0, 1.0 + NOISY + 0.05, 1.0, 1.0)  # spread above NOISY
    steady = (1.0, 1.0 + NOISY - 0.05, 1.0, 1.0, 1.0)  # spread below it
    bench, complete = auto(OFF_SCREEN, clock, noise={(P2, 128): noisy, (P2, 64): steady})
    assert complete
    later = after_halving(bench)
    assert later[0] == Call(P2, 128, 2, False)  # the noise re-run, for the noisy one only
    assert bench.measurement(Point.of(P2, 64)).spread == pytest.approx(NOISY - 0.05)
    # 200 and 180 then tie within their spreads: both are re-timed, one run
    # each, alternately, until each has TIE_REPEATS runs; the pick holds.
    ties = later[1:]
    assert {(c.lane, c.chunk_len, c.repeats) for c in ties} == {(P2, 128, 1), (P2, 64, 1)}
    pairs = [(ties[i].chunk_len, ties[i + 1].chunk_len) for i in range(0, len(ties) - 1, 2)]
    assert pairs[:4] == [(128, 64), (64, 128), (128, 64), (64, 128)]
    assert bench.repeats(P2, 128) == bench.repeats(P2, 64) == TIE_REPEATS
    assert bench.best() == (P2, 128)


def test_auto_noise_rerun_is_for_the_top_two_only(clock):
    # The third leader spreads (its median unchanged): it gets no noise re-run ...
    bench, _ = auto(OFF_SCREEN, clock, noise={(P2, 256): (1.0, 1.0, 1.0 + 2 * NOISY)})
    assert bench.measurement(Point.of(P2, 256)).spread > NOISY
    later = after_halving(bench)
    assert all(c.repeats == 1 for c in later)
    # ... but its spread makes it a tie with the best (175 vs 200): the tie
    # rounds re-time both; 180 (no spread) is told apart from 200 and left.
    assert {(c.lane, c.chunk_len) for c in later} == {(P2, 128), (P2, 256)}
    assert bench.repeats(P2, 64) == 5
    assert bench.best() == (P2, 128)


def test_auto_tie_rounds_stop_when_the_budget_is_spent(clock):
    noise = {(P2, 64): (1.0, 1.3)}  # 180 with a 0.3 spread ties with 200
    full, _ = auto(OFF_SCREEN, clock, noise=noise)
    ties = after_halving(full)[1:]  # after the noise re-run of (P2, 64)
    assert len(ties) > 4 and all(c.repeats == 1 for c in ties)
    start = sum(c.repeats + c.warmup for c in full.calls) - len(ties)
    clock.now = 0.0
    # Time for two rounds of the two tied points (one tick per run) and a
    # half: a third round would not fit, going by the last round's length.
    bench, complete = auto(OFF_SCREEN, clock, noise=noise, deadline=start + 4.5)
    assert complete
    assert len(after_halving(bench)[1:]) == 4


def runs_before_halving(clock):
    bench, _ = auto(OFF_SCREEN, clock)
    first = next(i for i, c in enumerate(bench.calls) if c.repeats > 1)
    return sum(c.repeats + c.warmup for c in bench.calls[:first])


def test_auto_stops_at_a_deadline_already_past(clock):
    clock.now = 10.0
    bench, complete = auto(OFF_SCREEN, clock, deadline=5.0)
    assert not complete
    # Every phase reads the clock: the first lane is screened (a search
    # needs one point), then nothing else is timed.
    assert bench.calls == [Call(P1, 64, 1, True), Call(P1, 512, 1, False)]
    assert all(len(t) == 1 for t in bench.times.values())


@pytest.mark.parametrize(
    ("margin", "rounds", "complete"),
    [
        (5.5, 1, False),  # the first round (3 x 2 runs) crosses it: no second
        (6.5, 2, True),  # crossed in the second round: done, bar noise re-runs
    ],
)
def test_auto_deadline_between_halving_rounds(clock, margin, rounds, complete):
    start = runs_before_halving(clock)  # a full search, to count its first phases
    clock.now = 0.0
    noise = {(P2, 128): (1.0, 1.0, 1.5)}  # would be re-run with time left
    bench, done = auto(OFF_SCREEN, clock, noise=noise, deadline=start + margin)
    assert done is complete
    halving = [c for c in bench.calls if c.repeats > 1]
    assert len(halving) == [3, 5][rounds - 1]
    assert bench.repeats(P2, 128) == 1 + 2 * rounds  # never the noise re-run


def test_grid_times_every_planned_point_once_with_a_warmup(clock):
    table = {P1: [100] * len(LADDER), T2: [200] * len(LADDER)}
    the_plan = {P1: LADDER[:4], T2: LADDER[3:]}
    bench = ScriptedBench(table, clock)
    assert run_grid(bench, the_plan, math.inf, clock)
    expected = [Call(lane, c, GRID_REPEATS, True) for lane, cs in the_plan.items() for c in cs]
    assert bench.calls == expected
    assert all(len(t) == GRID_REPEATS for t in bench.times.values())


@pytest.mark.parametrize("points", [0, 1, 5])
def test_grid_stops_at_the_deadline(clock, points):
    table = {P1: [100] * len(LADDER), T2: [200] * len(LADDER)}
    bench = ScriptedBench(table, clock)
    per_point = GRID_REPEATS + 1  # the warm-up
    # The clock is checked before each point; the deadline falls inside point ``points``.
    done = run_grid(bench, plan(P1, T2), per_point * points - 0.5, clock)
    assert not done
    assert len(bench.calls) == points
    assert bench.calls == [Call(P1, c, GRID_REPEATS, True) for c in LADDER[:points]]


def test_auto_screens_short_ladders_at_their_longest_length_too(clock):
    # A ladder too short for a rung 8x past the mid one: the second screening
    # length is its longest (the unchunked end), not skipped.
    ladder = [64, 128, 5000]
    table = {P2: [100, 120, 130], T2: [50, 60, 200]}
    bench, _ = auto(table, clock, ladder=ladder)
    for lane in table:
        first = [c for c in bench.calls if c.lane == lane][:2]
        assert first == [Call(lane, 64, 1, True), Call(lane, 5000, 1, False)]
    assert bench.best() == (T2, 5000)


# -- the documented figures, as behaviour (a change of any of them fails here) ---------------
def test_a_lane_screening_below_four_fifths_of_the_best_is_dropped(clock):
    top = 180.0
    table = {
        P2: [150, 170, top, 200, 175, 160, 140, 120, 100],
        T2: [100, 110, 0.85 * top, 140, 150, 120, 150, 130, 120],  # kept: 0.85 of the top
        P1: [900, 900, 0.75 * top, 900, 900, 0.75 * top, 900, 900, 900],  # dropped: 0.75
    }
    bench, _ = auto(table, clock)
    assert [c.chunk_len for c in bench.calls if c.lane == P1] == list(SCREENED)
    assert set(COARSE) <= set(bench.timed(T2))


def test_the_best_rests_on_five_runs_and_every_leader_on_three(clock):
    bench, _ = auto(OFF_SCREEN, clock)
    runs = {point: len(times) for point, times in bench.times.items()}
    best = max(bench.measured(), key=lambda pm: pm[1].throughput)[0]
    assert runs[best] >= 5
    assert sorted(runs.values(), reverse=True)[:3] >= [5, 5, 3]


def test_a_point_timed_twice_does_not_beat_one_timed_three_times():
    lucky = Measurement(2, 64, 512, 300.0, repeats=2)
    sure = Measurement(2, 256, 2048, 200.0, repeats=3)
    assert pick_kept([lucky, sure]) is sure
    assert pick_kept([lucky, Measurement(2, 16, 128, 100.0)]) is lucky  # else two runs win


# -- online: no whole call the tally predicts slower than PREDICTED_SLOW x the best ---------
def online_requests(rates: dict[int, tuple[float, float]]) -> list[Request]:
    """Every request of the online strategy on process lanes of these worker counts (most
    first); a lane runs at ``rates[w][0]`` at its first screening length, ``rates[w][1]``
    at every other."""
    tally = Tally(N, ITEM_BYTES, False)
    plan = {("processes", w): LADDER for w in rates}
    asked = []
    for step in auto_requests(tally, plan, MID_BYTES, online=True):
        if isinstance(step, Request):
            asked.append(step)
            first, other = rates[step.point.workers]
            rate = first if step.point.chunk_len == SCREENED[0] else other
            for _ in range(step.repeats):
                tally.add(step.point, N / rate)
    return asked


def lengths_asked(asked: list[Request], workers: int) -> list[int]:
    return [r.point.chunk_len for r in asked if r.point.workers == workers]


def test_online_a_lane_the_lanes_above_bound_below_the_best_is_not_run():
    # 16 workers at 1.0 and 8 at 0.5 bound 4 at 0.25: never run.  8 is run
    # once, at its first length (0.5 is too slow for a whole call at another).
    asked = online_requests({16: (1.0, 1.0), 8: (0.5, 0.5), 4: (0.25, 0.25)})
    assert lengths_asked(asked, 4) == []
    assert lengths_asked(asked, 8) == [SCREENED[0]]
    assert 1 / PREDICTED_SLOW > 0.5
    # The search screens every lane at both lengths.
    table = {("processes", 16): [1.0] * 9, ("processes", 8): [0.5] * 9, P1: [0.25] * 9}
    bench, _ = auto(table, FakeClock())
    assert [c.chunk_len for c in bench.calls if c.lane == P1] == list(SCREENED)


def test_online_a_kernel_that_saturates_is_screened_on_fewer_workers():
    # Past a knee (8 workers as fast as 16), 4 workers may be as fast: run, as a probe.
    asked = online_requests({16: (0.9, 0.9), 8: (1.0, 1.0), 4: (1.0, 1.0)})
    assert lengths_asked(asked, 4)[:2] == list(SCREENED)
    first = {r.point.workers: r for r in reversed(asked) if r.warmup}  # screening's first
    assert not first[16].probe and first[8].probe and first[4].probe


def test_online_a_slow_first_length_is_judged_by_what_the_longer_one_gained_above():
    # The first lane gained 1.6x at the longer length: 8 workers at 0.63 of the
    # best at the first length may reach 1.0 at the longer one (a knee at 8).
    asked = online_requests({16: (0.6, 0.96), 8: (0.63, 1.0)})
    assert lengths_asked(asked, 8)[:2] == list(SCREENED)
