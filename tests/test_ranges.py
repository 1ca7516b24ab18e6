"""Every call hands its kernels disjoint ranges that cover exactly ``[0, n)``.

The one invariant a wrong answer without an error would break.  Checked at
three depths: the primitives that make ranges (chunk bounds, batches,
coverage, the slicing cursor) refuse a bad one before a kernel runs; the
online refinement, driven by scripted clocks through every branch it has
(first-call probe, inline below break-even, probing slices, settling,
re-checks, drift and a new exploration, a start from a saved profile), only
ever hands out ``range(n)`` exactly once per call, for any ``n`` from 1 to
10^7; and real evaluators (processes, threads, adapting or not) give the
serial answer of kernels that read only their indices (where an array
slice would hide a range past ``n``).
"""

from __future__ import annotations

import contextlib
import operator
import os
import uuid

import kernels
import numpy as np
import pytest
from conftest import I3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autotune import Evaluator, Workload
from autotune._errors import RangeError
from autotune.backends.runners import LazyRunner, open_runner
from autotune.backends.schedule import (
    EXACT,
    Batches,
    ChunkPlan,
    Coverage,
    Cursor,
    balanced_chunk_len,
    count_chunks,
    plan_chunks,
)
from autotune.backends.shared import SharedNamespace
from autotune.backends.stats import Meter
from autotune.backends.threads import run_inline
from autotune.online import PROBE_ITEMS, PROBE_S, OnlineCall, OnlineTuning
from autotune.tuner import search

PRIMES = [2, 3, 7, 61, 1009, 65537, 999_983, 9_999_991]
#: n from 1 to 10^7, primes and powers of two (and their neighbours) included.
SIZES = st.one_of(
    st.integers(1, 10_000_000),
    st.integers(1, 5000),
    st.sampled_from(PRIMES),
    st.integers(0, 23).flatmap(lambda k: st.sampled_from([2**k - 1, 2**k, 2**k + 1])),
).filter(lambda n: n >= 1)


def covers_exactly(ranges: list[tuple[int, int]], n: int) -> None:
    """``ranges`` (in any order) are non-empty, disjoint and their union is ``[0, n)``."""
    ordered = sorted(ranges)
    end = 0
    for start, stop in ordered:
        assert start == end, f"items [{end}, {start}) never run or run twice: {ordered[:8]}"
        assert stop > start, f"empty range [{start}, {stop})"
        end = stop
    assert end == n, f"the ranges end at {end}, the call has {n} items"


# -- the primitives ------------------------------------------------------------------------
@given(n=SIZES, data=st.data())
@settings(max_examples=300, deadline=None)
def test_chunks_of_a_call_cover_it_exactly(n, data):
    # Chunk lengths from 1 item to past n; at most ~20000 chunks to walk.
    chunk_len = data.draw(st.integers(max(1, n // 20_000), n + 3), label="chunk_len")
    workers = data.draw(st.integers(1, 64), label="workers")
    for length in (chunk_len, balanced_chunk_len(n, chunk_len, workers)):
        plan = ChunkPlan(n, workers, length)
        total = plan.chunks
        assert total == count_chunks(n, length)
        covers_exactly([plan.bounds(c, c + 1) for c in range(total)], n)
        assert list(plan.ranges()) == [plan.bounds(c, c + 1) for c in range(total)]
        # A batch is the union of its chunks.
        assert plan.bounds(0, total) == (0, n)
        with pytest.raises(RangeError):
            plan.bounds(total, total + 1)  # one chunk past the end


@pytest.mark.parametrize(
    ("c0", "c1", "chunk_len", "n"),
    [(0, 0, 10, 100), (3, 2, 10, 100), (-1, 1, 10, 100), (0, 11, 10, 100), (10, 11, 10, 100)],
)
def test_plans_refuse_chunks_that_are_not_the_calls(c0, c1, chunk_len, n):
    with pytest.raises(RangeError, match="bug in autotune"):
        ChunkPlan(n, 2, chunk_len).bounds(c0, c1)
    with pytest.raises(RangeError, match="bug in autotune"):
        next(ChunkPlan(n, 2, chunk_len).ranges(c0, c1))


@pytest.mark.parametrize(("n", "chunk_len"), [(10, 0), (-1, 5), (10, 2.5), (10.0, 2)])
def test_a_call_is_whole_numbers_of_items(n, chunk_len):
    with pytest.raises(RangeError):
        count_chunks(n, chunk_len)


@given(
    total=st.integers(1, 400),
    workers=st.integers(1, 16),
    script=st.lists(st.tuples(st.sampled_from("dlp"), st.integers(0, 10**6)), max_size=400),
)
@settings(max_examples=200, deadline=None)
def test_batches_with_lost_workers_accept_every_chunk_once(total, workers, script):
    """Batches taken, finished, lost (re-queued whole or chunk by chunk, as the pool
    does) in any order: each chunk is accepted exactly once, and all of them."""
    batches, coverage = Batches(total, workers), Coverage(total)
    out: list[tuple[int, int]] = []
    steps = iter(script)
    while batches or out:
        what, pick = next(steps, ("d", 0))
        if batches and (not out or len(out) < workers):
            out.append(batches.take())
            continue
        batch = out.pop(pick % len(out))
        if what == "d":
            coverage.accept(*batch)
        elif what == "l":
            batches.requeue(batch)
        else:  # lost while running: re-run one chunk at a time
            for c in range(*batch):
                batches.requeue((c, c + 1))
    coverage.check_complete()
    assert not coverage


def test_coverage_refuses_a_chunk_twice_and_a_call_with_one_missing():
    coverage = Coverage(5)
    coverage.accept(0, 2)
    with pytest.raises(RangeError, match="chunk 1 of 5 accepted twice"):
        coverage.accept(1, 3)
    with pytest.raises(RangeError):
        coverage.accept(4, 6)
    coverage.accept(3, 5)
    with pytest.raises(RangeError, match="the first: chunk 2"):
        coverage.check_complete()


def test_batches_take_back_only_chunks_they_handed_out():
    batches = Batches(10, 2)
    c0, c1 = batches.take()
    batches.requeue((c0, c1))
    for bad in [(c1, c1 + 1), (0, 11), (2, 2)]:
        with pytest.raises(RangeError):
            batches.requeue(bad)


def test_cursor_cuts_consecutive_slices_that_end_at_n():
    cut = Cursor(10)
    assert cut.take(4) == (0, 4)
    with pytest.raises(RangeError, match="a slice of 7 items asked after 4 of a call of 10"):
        cut.take(7)
    with pytest.raises(RangeError):
        cut.take(0)
    with pytest.raises(RangeError, match="ended after 4"):
        cut.check_complete()
    assert cut.take(6) == (4, 10)
    cut.check_complete()


@given(n=SIZES, data=st.data())
@settings(max_examples=200, deadline=None)
def test_a_plan_at_a_start_cuts_its_items_as_from_zero(n, data):
    """A slice of a longer call: the same chunks, every item number moved by ``start``,
    and nothing outside ``[start, start + n)``."""
    chunk_len = data.draw(st.integers(max(1, n // 20_000), n + 3), label="chunk_len")
    workers = data.draw(st.integers(1, 64), label="workers")
    start = data.draw(st.integers(0, 10**9), label="start")
    plan = plan_chunks(n, workers, chunk_len, EXACT)
    moved = plan.at(start)
    assert (moved.start, moved.stop, moved.chunks) == (start, start + n, plan.chunks)
    assert list(moved.ranges()) == [(a + start, b + start) for a, b in plan.ranges()]
    assert moved.bounds(0, moved.chunks) == (start, start + n)
    c = data.draw(st.integers(0, plan.chunks - 1), label="c")
    assert list(moved.ranges(c, c + 1)) == [moved.bounds(c, c + 1)]
    with pytest.raises(RangeError):
        moved.bounds(moved.chunks, moved.chunks + 1)


@pytest.mark.parametrize("start", [-1, 2.5])
def test_a_plan_refuses_a_start_that_is_not_an_item(start):
    with pytest.raises(RangeError):
        ChunkPlan(10, 2, 3).at(start)


@pytest.mark.parametrize("backend", ["processes", "threads"])
@pytest.mark.parametrize(("n", "chunk_len"), [(10_000, 1000), (300_000, 50_000)])
def test_a_runner_runs_a_slice_of_a_call_where_its_items_are(backend, n, chunk_len):
    """A plan at ``start``: the kernel is given the slice's item numbers, a map fills
    the rows ``[start, stop)`` of an output of ``stop`` rows (small outputs come back
    through the pipe, large ones through shared memory), a reduce folds the slice."""
    start = 7 * n // 3
    plan = plan_chunks(n, 2, chunk_len, EXACT).at(start)
    runner = open_runner(backend, 2, {"spin": 0.0})
    try:
        rows = runner.run(kernels.hash_rows, plan, "map", None)
        assert rows.shape[0] == start + n
        want = serial(kernels.hash_rows, start + n)[start:]
        assert np.array_equal(rows[start:], want)
        seen = runner.run(kernels.range_rows, plan, "map", None)[start:]
        assert kernels.ranges_seen(seen) == list(plan.ranges())
        total = runner.run(kernels.hash_sum, plan, "reduce", operator.add)
        assert total == serial(kernels.hash_sum, start + n) - serial(kernels.hash_sum, start)
    finally:
        runner.close()


# -- the online refinement, scripted ------------------------------------------------------
class Clock:
    """Scripted seconds: kernels and the scripted pool move it on."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class IndexKernel:
    """A kernel whose result depends on its indices only; it records every range
    it is given and costs ``cost`` scripted seconds per item."""

    def __init__(self, clock: Clock, cost: float) -> None:
        self.clock = clock
        self.cost = cost
        self.mode = "reduce"
        self.ranges: list[tuple[int, int]] = []

    def __call__(self, shared, start, stop):
        self.ranges.append((start, stop))
        self.clock.now += self.cost * (stop - start)
        if self.mode == "map":
            return np.arange(start, stop, dtype=np.int64)
        return index_moments(start, stop)


def index_moments(start: int, stop: int) -> tuple[int, int, int]:
    """(items, sum of indices, sum of squares) of [start, stop): exact, whatever the chunks."""

    def upto(m: int) -> tuple[int, int, int]:  # the same over [0, m)
        return m, m * (m - 1) // 2, (m - 1) * m * (2 * m - 1) // 6

    (n0, s0, q0), (n1, s1, q1) = upto(start), upto(stop)
    return n1 - n0, s1 - s0, q1 - q0


class ScriptedPool:
    """A runner that runs every chunk in this process (the threads backend's own
    chunking, one thread) and says the call took what a landscape says: the
    kernel's time spread over the workers at an efficiency that depends on the
    chunk length, plus a fixed cost per call, with noise."""

    closed = False

    def __init__(self, workers: int, clock: Clock, best_len: int, seed: int) -> None:
        self.workers = workers
        self.clock = clock
        self.best_len = best_len
        self.noise = np.random.default_rng(seed)
        self.calls = 0
        self.items = 0  # run here, over every call

    def run(self, kernel, plan, mode, combine, meter=None):
        self.calls += 1
        self.items += plan.n
        active = max(1, min(plan.workers, self.workers))
        began = self.clock.now
        result = run_inline(kernel, SharedNamespace({}), plan, mode, combine, Meter(1))
        if mode == "map" and plan.start:
            # A runner's map output has rows up to the plan's stop; the ones
            # before its start are the caller's to fill (here: -1 until it does).
            frame = np.full(plan.stop, -1, dtype=result.dtype)
            frame[plan.start :] = result
            result = frame
        work = self.clock.now - began
        off = np.log2(plan.chunk_len / self.best_len)
        efficiency = self.noise.uniform(0.8, 1.2) / (1 + off * off / 16)
        self.clock.now = began + 3e-4 + work / (active * efficiency)
        if meter is not None:
            for w in range(active):
                meter.add_busy(w, work / active)
        return result

    def close(self) -> None:
        pass


@contextlib.contextmanager
def scripted(workers: int, item_bytes: int, name: str, best_len: int, seed: int):
    """An adapting evaluator's online state on a scripted pool and clock (closed after:
    its inline map outputs live in shared memory)."""
    clock = Clock()
    pool = ScriptedPool(workers, clock, best_len, seed)
    runner = LazyRunner(lambda: pool, workers)
    tuning = OnlineTuning(I3, "processes", workers, {}, item_bytes, name, runner, clock)
    try:
        yield tuning, pool, clock
    finally:
        tuning.close()


def check_call(tuning: OnlineTuning, kernel: IndexKernel, n: int, mode: str) -> OnlineCall:
    """One call: every item exactly once, the exact result; how it ran."""
    kernel.ranges.clear()
    kernel.mode = mode
    outcome = tuning.call(kernel, n, mode, operator.add, Meter(tuning.workers))
    result, chunk_len = outcome.result, outcome.chunk_len
    covers_exactly(kernel.ranges, n)
    if mode == "map":
        assert np.array_equal(result, np.arange(n, dtype=np.int64))
    else:
        assert result == index_moments(0, n)
    assert chunk_len >= 1
    return outcome


@pytest.mark.parametrize("mode", ["reduce", "map"])
def test_a_first_calls_probe_runs_its_first_items_here_for_about_probe_s(mode):
    """A kernel never seen, 10 us an item: its first call runs its first items in this
    process, slices of PROBE_ITEMS and then doubling, until they took PROBE_S; the rest
    goes to the pool (before, a sixteenth of the call or a chunk: 41 ms here)."""
    cost = 1e-5
    with scripted(2, 8, f"probe-{uuid.uuid4().hex}", 1024, 0) as (tuning, pool, clock):
        kernel = IndexKernel(clock, cost)
        n = 1_000_000
        outcome = check_call(tuning, kernel, n, mode)
        here = n - pool.items
        assert not outcome.inline and pool.items
        assert PROBE_S <= here * cost <= 2 * PROBE_S + PROBE_ITEMS * cost
        assert kernel.ranges[:3] == [(0, 64), (64, 128), (128, 256)]


def test_a_probes_last_slice_takes_what_is_left_rather_than_leave_less():
    """A cheap kernel never reaches PROBE_S: the probe stops at a sixteenth of the call,
    129 items of 2064; its slices are 64 and 65, not 64, 64 and 1 (a slice of one item
    would time mostly its own overhead, and the break-even counts the last slice)."""
    with scripted(2, 8, f"probe-{uuid.uuid4().hex}", 1024, 0) as (tuning, pool, clock):
        kernel = IndexKernel(clock, 1e-9)
        check_call(tuning, kernel, 2064, "reduce")
        assert kernel.ranges[:2] == [(0, 64), (64, 129)]


@given(
    workers=st.integers(1, 64),
    item_bytes=st.sampled_from([8, 64, 512, 4096, 24000]),
    cost=st.sampled_from([2e-9, 5e-8, 1e-6, 2e-4]),
    best_len=st.sampled_from([64, 1024, 16384, 262144]),
    calls=st.lists(st.tuples(SIZES, st.sampled_from(["reduce", "map"])), min_size=1, max_size=40),
    drift_at=st.integers(0, 40),
    fresh=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_call_of_an_adapting_evaluator_covers_range_n(
    workers, item_bytes, cost, best_len, calls, drift_at, fresh, seed
):
    """Any sequence of calls, any landscape, any n: each item exactly once per call."""
    # A fresh name explores from the heuristic; the shared one may start from
    # what an earlier example saved (settled).
    name = f"ranges-{uuid.uuid4().hex}" if fresh else "ranges-shared"
    with scripted(workers, item_bytes, name, best_len, seed) as (tuning, _, clock):
        kernel = IndexKernel(clock, cost)
        for i, (n, mode) in enumerate(calls):
            # What runs here chunk by chunk stays quick: n up to 10^7 for reduces
            # of 8-byte items (chunks of 1024 and more), 10^6 else, maps 3 x 10^5.
            if mode == "map":
                n = 1 + n % 300_000
            elif item_bytes > 8:
                n = 1 + n % 1_000_000
            if i == drift_at:
                kernel.cost *= 4  # the same code on other data: the refiner sees a drift
            check_call(tuning, kernel, n, mode)


def test_the_scripted_evaluator_goes_through_every_branch(no_leaks):
    """One long scripted run through every branch of the refinement (the property
    above, made sure of), each call covering its items exactly once."""
    name = f"branches-{uuid.uuid4().hex}"
    seen = {"inline": 0, "sliced": 0, "whole on the pool": 0}
    exploring = []
    sizes = [6000, 6001, 4099, 250_000, 999_983, 7, 1, 64, 65, 300, 99_991]
    with scripted(4, 64, name, 4096, 1) as (tuning, pool, clock):
        kernel = IndexKernel(clock, 2e-6)  # 2 us an item: a 99991-item call is worth slicing
        for i in range(400):
            n, mode = sizes[i % len(sizes)], ("reduce", "map")[i % 3 == 0]
            if i == 250:
                kernel.cost *= 4
            before = pool.calls
            outcome = check_call(tuning, kernel, n, mode)
            exploring.append(outcome.exploring)
            if outcome.inline:
                seen["inline"] += 1
            elif pool.calls - before > 1:
                seen["sliced"] += 1
            else:
                seen["whole on the pool"] += 1
        refiner = tuning.learners[name].refiner
    assert all(seen.values()), seen
    assert refiner.settled
    assert refiner.explorations >= 2, "the drift at call 250 did not start a new exploration"
    # Calls say whether they ran while exploring: the first ones did, settled ones not.
    assert exploring[0] and not all(exploring) and not exploring[-1]


def test_an_adapting_evaluator_starts_settled_from_its_profile_and_still_covers_n(no_leaks):
    name = f"saved-{uuid.uuid4().hex}"
    for _ in range(2):  # the second one finds what the first one saved
        with scripted(2, 64, name, 2048, 3) as (tuning, _, clock):
            kernel = IndexKernel(clock, 1e-6)
            for n in [6000, 99_991, 12_345] * 30:
                check_call(tuning, kernel, n, "reduce")
            assert tuning.learners[name].refiner.settled


# -- real evaluators -----------------------------------------------------------------------
def serial(kernel, n: int, **shared):
    """The kernel over [0, n) in one call, in this process: the reference."""
    return kernel(SharedNamespace({"spin": 0.0, **shared}), 0, n)


def test_the_reported_reproduction_gives_the_serial_answer_every_call():
    """The report: an index-only kernel, n = 6000, rows of 24000 bytes in `shared`
    (so the heuristic chunk is small), 0.2 ms an item, zero configuration; call 4
    returned 24412578.0 instead of 17997000.0."""
    with Evaluator(shared={"rows": np.zeros((6000, 3000))}) as ev:
        for call in range(8):
            assert ev.reduce(kernels.busy_index_sum, 6000) == 17997000.0, f"call {call + 1}"


def run_calls(ev: Evaluator, n: int, calls: int) -> None:
    """``calls`` alternating reduces and maps of index-only kernels, each equal to serial."""
    want_sum, want_rows = serial(kernels.hash_sum, n), serial(kernels.hash_rows, n)
    for call in range(calls):
        if call % 2:
            rows = ev.map(kernels.hash_rows, n)
            assert rows.shape == want_rows.shape, f"call {call + 1}: {rows.shape}"
            assert np.array_equal(rows, want_rows), f"call {call + 1} (map, n={n})"
        else:
            assert ev.reduce(kernels.hash_sum, n) == want_sum, f"call {call + 1} (reduce, n={n})"


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_index_kernels_equal_serial_on_every_call_quick(backend):
    """A short version of the slow test below, in the fast suite."""
    for n, cols, spin in [(4099, 500, 2e-5), (99_991, 1, 0.0), (1, 1, 0.0), (7, 1, 0.0)]:
        shared = {"rows": np.zeros((n, cols)), "spin": spin}
        with Evaluator(shared=shared, backend=backend) as ev:
            run_calls(ev, n, 6)


#: (n, float64 columns of data per item in `shared`, seconds of work an item):
#: long calls that the refinement slices, primes, calls too short to leave here.
CASES = [
    (6000, 3000, 1e-4),
    (4099, 64, 1e-4),
    (99_991, 1, 3e-6),
    (1_000_003, 1, 0.0),
    (31, 1, 1e-5),
]


@pytest.mark.slow
@pytest.mark.parametrize(("n", "cols", "spin"), CASES)
@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_zero_config_evaluators_equal_serial_for_40_calls(backend, n, cols, spin):
    with Evaluator(shared={"rows": np.zeros((n, cols)), "spin": spin}, backend=backend) as ev:
        run_calls(ev, n, 40)


@pytest.mark.slow
def test_adapting_from_a_measured_profile_equals_serial_for_40_calls(tmp_path):
    shared = {"rows": np.zeros((6000, 3000)), "spin": 1e-4}
    workload = Workload("index-hash", 6000, kernels.hash_sum, shared, item_bytes=24_000)
    path = tmp_path / "index-hash.yaml"
    search(workload, budget=3.0, backends=["processes"]).profile.save(path)
    with Evaluator(shared=shared, profile=str(path), adapt=True) as ev:
        for n in (6000, 4099):
            run_calls(ev, n, 20)


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_a_guided_tail_runs_as_planned_and_a_reduce_repeats_to_the_bit(backend, workers):
    """``workers * 3 + 1`` chunks of an explicit length: the last one is cut into
    pieces for the idle workers.  The runner hands kernels exactly the plan's
    ranges, maps equal serial, and a float reduce gives the same bits on every
    call, those of a serial loop over the same ranges."""
    chunk_len = 4096
    n = (workers * 3 + 1) * chunk_len
    x = np.random.default_rng(5).random(n)
    with Evaluator(workers, chunk_len, shared={"x": x, "spin": 0.0}, backend=backend) as ev:
        plan = plan_chunks(n, ev.workers, chunk_len, EXACT)
        assert plan.piece_len < chunk_len and plan.head == workers * 3  # it has a tail
        assert kernels.ranges_seen(ev.map(kernels.range_rows, n)) == list(plan.ranges())
        assert ev.stats.chunks == plan.chunks and ev.stats.chunk_len == chunk_len
        assert np.array_equal(ev.map(kernels.hash_rows, n), serial(kernels.hash_rows, n))
        first = ev.reduce(kernels.exp_sum, n)
        for _ in range(3):
            assert ev.reduce(kernels.exp_sum, n) == first
    want = None
    for start, stop in plan.ranges():
        part = kernels.exp_sum(SharedNamespace({"x": x}), start, stop)
        want = part if want is None else want + part
    assert first == want  # the plan's ranges folded in order: the same bits


@pytest.mark.filterwarnings("ignore::autotune.EfficiencyWarning")  # a replacement's start
@pytest.mark.parametrize("adapt", [False, True])
def test_a_killed_workers_chunks_run_once_more_and_no_item_twice(tmp_path, start_method, adapt):
    """A worker killed mid-batch: its chunks re-run on a replacement, and the
    exact total of an index-only reduce says no item was counted twice or never."""
    n = 99_991
    shared = {"spin": 2e-6, "at": 77_777, "flag": str(tmp_path / "killed"), "parent": os.getpid()}
    kwargs = {"adapt": True} if adapt else {"workers": 2, "chunk_len": 1000}
    with Evaluator(shared=shared, start_method=start_method, **kwargs) as ev:
        pids = set(ev.pids)
        for _ in range(3):
            assert ev.reduce(kernels.kill_once_hash_sum, n) == serial(kernels.hash_sum, n)
        assert (tmp_path / "killed").exists()
        if pids:  # an adapting evaluator may have started its pool during the calls
            assert set(ev.pids) != pids


def item_seeded(shared, start, stop):
    """The README's example: one generator per item, keyed by (seed, index)."""
    return np.array([np.random.default_rng([shared.seed, i]).normal() for i in range(start, stop)])


@pytest.mark.parametrize("kwargs", [{"workers": 2, "chunk_len": 333}, {}, {"backend": "threads"}])
def test_random_numbers_keyed_by_item_do_not_depend_on_the_cut(kwargs):
    want = item_seeded(SharedNamespace({"seed": 42}), 0, 3000)
    with Evaluator(shared={"seed": 42}, **kwargs) as ev:
        for _ in range(3):
            assert np.array_equal(ev.map(item_seeded, 3000), want)
