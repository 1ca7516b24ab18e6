"""What the search and the online refinement pick on landscapes measured on other machines.

The development and CI hosts have 2 cores; the landscapes in
``tests/data/landscapes/`` were measured on a 16-core Xeon.  Replayed
(``tests/replay.py``: seconds drawn from the recorded ones, seeded, on a
scripted clock), they say what the real search strategy
(:func:`autotune.bench.run_auto`) and the real online refinement (an
:class:`autotune.online.OnlineTuning` as an adapting evaluator builds it)
would settle on there.  A point the file does not hold (most runs the code
makes are cut to lengths nobody recorded) is read by the rule of
:class:`replay.Landscape`: between recorded neighbours without a tail, so a
figure at such a point is that rule's reading, not a measurement.

The targets (issue 19), each over 10 seeded replays of each recorded workload:

(a) the search and (b) the refinement settle on a point whose median is at
least :data:`GOOD` of the landscape's best median in at least 9 replays;
(c) the refinement's first :data:`REGRET_CALLS` calls take at most
:data:`REGRET_MAX` more than as many calls at the best point's median, in
every replay; (d) on a synthetic 64-core machine that saturates at 24
workers, the refinement settles on 20 to 32 workers; (e) no call the
refinement runs whole while it explores is slower than
:data:`~autotune.engine.PREDICTED_SLOW` times the best (issue 19, item 2).

A target today's code misses is ``xfail(strict=True)`` with the measured
figure in its reason: the gap stays visible, and a change that closes it
fails the suite until the mark goes.  Each test prints its figures (``-s``)
and puts them in its assertion message.
"""

from __future__ import annotations

import functools
import random
import statistics
from collections import Counter
from collections.abc import Sequence

import pytest
from replay import (
    Clock,
    OnlineReplay,
    ReplayBench,
    ReplayPool,
    Settled,
    recorded,
    replay_online,
    replay_search,
    saturating,
)

from autotune.backends.schedule import ChunkPlan
from autotune.engine import PREDICTED_SLOW, Point

WORKLOADS = ("spline", "stream", "ndimage")
SEEDS = range(10)
#: A settled point is good at this fraction of the best median or more ...
GOOD = 0.95
#: ... in this many replays of ``len(SEEDS)``.
ENOUGH = 9
#: Calls over which the refinement's extra time is counted, and its bound.
REGRET_CALLS = 30
REGRET_MAX = 0.15
#: Calls per online replay: every replay here settles within 25.
CALLS = 60


def known_gaps(**reasons: str) -> list:
    """The workloads, those named marked as a target not met (the reason: the figure)."""
    return [
        pytest.param(w, marks=pytest.mark.xfail(strict=True, reason=reasons[w]))
        if w in reasons
        else w
        for w in WORKLOADS
    ]


@functools.cache
def searches(workload: str) -> tuple[Settled, ...]:
    return tuple(replay_search(recorded(workload), seed) for seed in SEEDS)


@functools.cache
def refinements(workload: str) -> tuple[OnlineReplay, ...]:
    return tuple(replay_online(recorded(workload), seed, CALLS) for seed in SEEDS)


def span(values: Sequence[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f} (median {statistics.median(values):.3f})"


def settled_figures(what: str, settled: Sequence[Settled | None]) -> tuple[str, int]:
    """One line of where the replays settled and how good that was; how many were good."""
    counts = Counter("not settled" if s is None else str(s) for s in settled)
    ratios = [0.0 if s is None else s.ratio for s in settled]
    good = sum(r >= GOOD for r in ratios)
    where = ", ".join(f"{p} x{k}" for p, k in counts.most_common())
    line = (
        f"{what}: settled on {where}; ratio to the best {span(ratios)}; "
        f"{good}/{len(ratios)} >= {GOOD}"
    )
    print(line)
    return line, good


# -- (a) the search -------------------------------------------------------------------------
@pytest.mark.parametrize("workload", known_gaps())
def test_the_search_settles_near_the_best(workload):
    line, good = settled_figures(f"{workload} search", searches(workload))
    assert good >= ENOUGH, line


# -- (b), (c) the online refinement ---------------------------------------------------------
# No gap left: while a timed run kept 2 chunks per worker, ndimage's best
# (16 x 512 of 8192 rows, one chunk per worker) was never run and the
# refinement settled on 16 x 256 at 0.903 of it, 0.177 extra over 30 calls.
REFINEMENT_GAPS: dict[str, str] = {}
REGRET_GAPS: dict[str, str] = {}


@pytest.mark.parametrize("workload", known_gaps(**REFINEMENT_GAPS))
def test_the_refinement_settles_near_the_best(workload):
    replays = refinements(workload)
    line, good = settled_figures(f"{workload} refinement", [r.settled for r in replays])
    after = [r.calls_to_settle for r in replays if r.calls_to_settle is not None]
    if after:
        print(f"{workload} refinement: settled after {min(after)}-{max(after)} calls")
    assert good >= ENOUGH, line


@pytest.mark.parametrize("workload", known_gaps(**REGRET_GAPS))
def test_the_refinement_costs_little_while_it_explores(workload):
    best_s = recorded(workload).best()[1]
    regret = [r.regret(REGRET_CALLS, best_s) for r in refinements(workload)]
    line = f"{workload} refinement: extra time over {REGRET_CALLS} calls {span(regret)}"
    print(line)
    assert max(regret) <= REGRET_MAX, line


# -- (d) a machine that saturates -----------------------------------------------------------
def test_the_refinement_stops_adding_workers_where_a_machine_saturates():
    landscape = saturating(cores=64, knee=24)
    replays = [replay_online(landscape, seed, CALLS) for seed in SEEDS]
    line, _ = settled_figures("saturating-64 refinement", [r.settled for r in replays])
    regret = [r.regret(REGRET_CALLS, landscape.best()[1]) for r in replays]
    print(f"saturating-64 refinement: extra time over {REGRET_CALLS} calls {span(regret)}")
    workers = [r.settled.point.workers for r in replays if r.settled is not None]
    assert len(workers) == len(SEEDS) and all(20 <= w <= 32 for w in workers), line


# -- (e) no whole call at a point the tally predicts slow -----------------------------------
# stream is a map too fast per item to be cut into slices (its join would cost
# as much as its work): the half lane's first run is a whole call (nothing
# measured bounds it: 8 x 8192 at 0.65 of the best), and so is the coarse
# pass's 16 x 2048 (0.67; the tally predicts nothing along the chunk lengths).
WHOLE_CALL_GAPS = {
    "stream": "worst whole call while exploring 0.614-0.664 of the best (median 0.633)",
}


@pytest.mark.parametrize("workload", known_gaps(**WHOLE_CALL_GAPS))
def test_no_whole_call_while_exploring_is_slower_than_predicted_slow(workload):
    """Every call the refinement runs whole before it settles is within 1 / PREDICTED_SLOW
    of the best median; the lanes of fewer workers (0.5-0.7 of the best on the Xeon) are
    screened on slices of calls, or not at all."""
    landscape = recorded(workload)
    worst = [r.worst_whole_call(landscape) for r in refinements(workload)]
    line = f"{workload} refinement: worst whole call while exploring {span(worst)}"
    print(line)
    assert min(worst) >= 1 / PREDICTED_SLOW, line


def test_the_refinement_finds_a_knee_at_a_quarter_of_the_workers():
    """A 64-core machine whose kernel saturates at 16 workers and loses 1% per worker past
    it (32 workers: 0.84 of 16): the lane of a quarter of the workers is screened because
    the two above it bound it near the best, and wins."""
    landscape = saturating(cores=64, knee=16, fall=0.01)
    replays = [replay_online(landscape, seed, CALLS) for seed in SEEDS]
    line, good = settled_figures("saturating-64 at 16 refinement", [r.settled for r in replays])
    regret = [r.regret(REGRET_CALLS, landscape.best()[1]) for r in replays]
    print(f"saturating-64 at 16 refinement: extra time over {REGRET_CALLS} calls {span(regret)}")
    workers = [r.settled.point.workers for r in replays if r.settled is not None]
    assert good >= ENOUGH and workers == [16] * len(SEEDS), line


# -- the replay itself ----------------------------------------------------------------------
def test_the_replay_reads_the_landscape_by_its_rules():
    spline, ndimage = recorded("spline"), recorded("ndimage")
    # A recorded point: its own seconds.
    assert ndimage.median(16, 512) == statistics.median(ndimage.points[(16, 512)])
    assert ndimage.best() == ((16, 512), ndimage.median(16, 512))
    # Between recorded lengths: those with an even chunk count only.  1563 items
    # (32 chunks of spline's 50000) read between 782 (64 chunks) and 3125 (16),
    # not 2048 (25 chunks: a tail on 16 workers), halfway in log scale.
    assert not spline.even(16, 2048) and spline.even(16, 782) and spline.even(16, 3125)
    halfway = (spline.median(16, 782) * spline.median(16, 3125)) ** 0.5
    assert spline.median(16, 1563) == pytest.approx(halfway, rel=1e-3)
    # Past the longest even length: that length.
    assert spline.median(16, 4000) == spline.median(16, 3125)
    # Between recorded worker counts: throughput interpolated over workers.
    rate = (1 / ndimage.median(8, 512) + 1 / ndimage.median(12, 512)) / 2
    assert ndimage.median(10, 512) == pytest.approx(1 / rate)


def test_the_replays_cut_and_scale_runs_as_the_real_ones():
    landscape = recorded("spline")
    # The search's bench cuts a point as the search does: 2048 items on 16
    # workers run as 32 chunks of 1563, read between 782 and 3125.
    bench = ReplayBench(landscape, Clock(), seed=0)
    point = Point("processes", 16, 2048)
    bench.run(point, repeats=3, warmup=True)
    around = landscape.points[(16, 782)] + landscape.points[(16, 3125)]
    assert len(bench.times[point]) == 3
    assert all(min(around) <= s <= max(around) for s in bench.times[point])
    assert bench.clock.now > sum(bench.times[point])  # the warm-up took time too
    # A pool run of a quarter of the items takes a quarter of a recorded call.
    pool = ReplayPool(landscape, 16, Clock(), random.Random(0))
    pool.run(None, ChunkPlan(landscape.n // 4, 16, 3125), "reduce", None)
    assert any(pool.clock.now == pytest.approx(s / 4) for s in landscape.points[(16, 3125)])
