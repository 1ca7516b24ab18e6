"""The replay of measured landscapes (``tests/replay.py``) reads them by its rules."""

from __future__ import annotations

import random
import statistics

import pytest
from replay import Clock, ReplayBench, ReplayPool, recorded

from autotune.engine import Point


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
    pool.run(None, landscape.n // 4, 3125, "reduce", None)
    assert any(pool.clock.now == pytest.approx(s / 4) for s in landscape.points[(16, 3125)])
