"""Online refinement on scripted throughputs: no processes, no clocks.

The refiner asks the engine which point to run next and files what each
"call" took; here a call at chunk length ``c`` takes ``n / rate(c)``
seconds from a table, so each test pins what the refiner decides: where it
settles, how many calls it spends away from the best, when it re-checks and
when a slower kernel makes it explore again.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import pytest

from autotune.adapt import (
    RECHECK,
    BreakEven,
    PoolCost,
    Refiner,
    online_ladder,
)
from autotune.engine import Point
from autotune.profile import infer_item_bytes
from autotune.profile.online import kernel_name

LANE = ("processes", 2)
LADDER = [1000, 2000, 4000, 8000, 16000, 32000, 64000, 125000, 500000]
N = 1_000_000


def peaked(best: int, top: float = 1e8):
    """A throughput landscape with one peak, falling off by ~25% per rung."""

    def rate(chunk_len: int) -> float:
        return top * 0.75 ** abs(math.log2(chunk_len / best))

    return rate


def drive(refiner: Refiner, rate, calls: int) -> list[Point]:
    used = []
    for _ in range(calls):
        point = refiner.next()
        refiner.record(point, N / rate(point.chunk_len), N)
        used.append(point)
    return used


@pytest.mark.parametrize("best", [2000, 8000, 32000, 64000])
def test_settles_on_the_planted_best_and_stays(best):
    rate = peaked(best)
    refiner = Refiner({LANE: online_ladder(LADDER, 8000)}, 8000, 8)
    used = drive(refiner, rate, 60)
    assert refiner.settled and refiner.best == Point.of(LANE, best)
    # After settling, only the best (and a rare re-check) is run.
    assert sum(p == Point.of(LANE, best) for p in used[-20:]) >= 19


def test_first_call_is_the_heuristic_and_regret_is_bounded():
    rate = peaked(32000)
    refiner = Refiner({LANE: online_ladder(LADDER, 8000)}, 8000, 8)
    used = drive(refiner, rate, 100)
    assert used[0] == Point.of(LANE, 8000)
    spent = sum(N / rate(p.chunk_len) for p in used)
    ideal = 100 * N / rate(32000)
    assert spent / ideal - 1 < 0.15  # the engine's exploration costs under 15 calls in 100


def test_a_settled_profile_starts_settled():
    refiner = Refiner({LANE: LADDER}, 8000, 8, settled=Point.of(LANE, 16000))
    assert refiner.settled and refiner.next() == Point.of(LANE, 16000)


def test_rechecks_the_runner_up_rarely():
    rate = peaked(16000)
    refiner = Refiner({LANE: online_ladder(LADDER, 8000)}, 8000, 8)
    drive(refiner, rate, 60)
    assert refiner.settled
    used = drive(refiner, rate, 4 * RECHECK)
    away = [p for p in used if p != refiner.best]
    assert 1 <= len(away) <= 4


def test_a_kernel_that_got_slower_is_explored_again():
    refiner = Refiner({LANE: online_ladder(LADDER, 8000)}, 8000, 8)
    drive(refiner, peaked(8000), 60)
    assert refiner.settled and refiner.best == Point.of(LANE, 8000)
    # Same name, other data: everything is 3x slower and the peak moved.
    slower = peaked(64000, top=1e8 / 3)
    drive(refiner, slower, 80)
    assert refiner.explorations == 2
    assert refiner.best == Point.of(LANE, 64000)


def test_break_even_is_measured():
    be, pool = BreakEven(), PoolCost(2)
    assert not be.known and not be.inline(10, 2, pool.per_call())  # unknown kernel: not inline
    # A pool not started: its start (per worker) spread over calls, and a call.
    assert pool.per_call() > PoolCost(1).per_call() > PoolCost.CALL_PRIOR_S
    assert PoolCost(64).per_call() > 10 * PoolCost(2).per_call() / 2
    pool.started(0.2)
    assert pool.per_call() == PoolCost.CALL_PRIOR_S  # started: the start is paid for
    # 1 us per item in the kernel, 1 ms per pool call on top.
    for n in (10_000, 100_000):
        be.kernel_time(n, n * 1e-6, inline=False)
        pool.pool_call(wall=1e-3 + n * 1e-6 / 2, busy=n * 1e-6, workers=2)
    assert pool.per_call() == pytest.approx(1e-3)
    assert be.items(2, pool.per_call()) == pytest.approx(2000, rel=0.01)  # 1 ms / (1 us x 1/2)
    assert be.inline(1000, 2, pool.per_call()) and not be.inline(10_000, 2, pool.per_call())
    # A long run of inline calls near the break-even sends one to the pool again.
    for _ in range(RECHECK):
        be.kernel_time(1000, 1000e-6, inline=True)
    assert not be.inline(1000, 2, pool.per_call())
    assert be.inline(10, 2, pool.per_call())  # far below: stays inline


def test_item_bytes_inferred_from_arrays_of_length_n():
    shared = {"x": np.zeros(1000), "y": np.zeros((1000, 3), np.float32), "k": np.zeros(7)}
    assert infer_item_bytes(shared, 1000) == 8 + 12
    assert infer_item_bytes(shared, 1000, row_bytes=8) == 28
    assert infer_item_bytes({"s": [1, 2]}, 1000) is None


def test_kernel_name():
    assert kernel_name(peaked) == f"{__name__}:peaked"


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_a_call_can_use_fewer_workers_than_the_pool(backend, no_leaks):
    """What online refinement uses to try fewer workers without a new pool."""
    import kernels

    from autotune.backends.runners import open_runner
    from autotune.backends.schedule import ChunkPlan
    from autotune.backends.stats import Meter

    x = np.random.default_rng(0).random(50_000)
    runner = open_runner(backend, 2, {"x": x})
    try:
        meter = Meter(1)
        out = runner.run(kernels.double, ChunkPlan(len(x), 1, 1000), "map", None, meter)
        assert np.array_equal(out, x * 2.0)
        assert set(meter.busy) == {0}  # worker 1 took no part
        if backend == "processes":  # the first batches go one per worker
            meter = Meter(2)
            runner.run(kernels.double, ChunkPlan(len(x), 2, 1000), "map", None, meter)
            assert set(meter.busy) == {0, 1}
    finally:
        runner.close()


def test_run_inline_gives_the_workers_bits():
    import kernels

    from autotune import Evaluator
    from autotune.backends.schedule import EXACT, plan_chunks
    from autotune.backends.shared import SharedNamespace
    from autotune.backends.stats import Meter
    from autotune.backends.threads import run_inline

    x = np.random.default_rng(3).random(100_000)
    with Evaluator(2, 3000, shared={"x": x}, adapt=False) as ev:
        pooled = ev.reduce(kernels.exp_sum, len(x))
    plan = plan_chunks(len(x), ev.workers, 3000, EXACT)  # the plan the evaluator ran
    assert plan.piece_len < plan.chunk_len  # its last round cut into a guided tail
    inline = run_inline(
        kernels.exp_sum, SharedNamespace({"x": x}), plan, "reduce", operator.add, Meter(1)
    )
    assert inline == pooled  # the same ranges folded in the same order: the same bits
