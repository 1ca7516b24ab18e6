"""The pure scheduling pieces: batches cover every chunk once; partials fold in order."""

from __future__ import annotations

import heapq
import operator
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from autotune.backends.fold import OrderedFold
from autotune.backends.schedule import (
    EXACT,
    MIN_PIECE,
    Batches,
    ChunkPlan,
    n_chunks,
    plan_chunks,
)


def test_chunk_arithmetic():
    assert n_chunks(10, 3) == 4 and n_chunks(9, 3) == 3 and n_chunks(0, 3) == 0
    assert ChunkPlan(10, 2, 3).bounds(3, 4) == (9, 10)
    assert ChunkPlan(10, 2, 3).bounds(0, 4) == (0, 10)


def test_batches_cover_every_chunk_once_and_shrink():
    b = Batches(10_000, 2)
    taken = []
    while b:
        taken.append(b.take())
    chunks = [c for c0, c1 in taken for c in range(c0, c1)]
    assert chunks == list(range(10_000))
    sizes = [c1 - c0 for c0, c1 in taken]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 1
    assert sizes[0] <= 10_000 // 16 + 1
    assert len(taken) < 200  # the parent is not in a per-chunk loop


def test_requeued_batches_go_first_and_limit_applies():
    b = Batches(100, 2)
    first = b.take(1)
    assert first == (0, 1)
    b.requeue(first)
    assert b.take() == (0, 1)
    assert b.take(1) == (1, 2)


def test_ordered_fold_matches_serial_whatever_the_arrival_order():
    rng = random.Random(0)
    partials = [rng.random() * 10 ** rng.randint(-8, 8) for _ in range(1_000)]
    serial = partials[0]
    for p in partials[1:]:
        serial = serial + p
    cuts = sorted({0, 1_000, *rng.sample(range(1, 1_000), 60)})
    tiles = list(zip(cuts[:-1], cuts[1:], strict=True))
    rng.shuffle(tiles)
    fold = OrderedFold(operator.add)
    for c0, c1 in tiles:
        fold.extend(c0, partials[c0:c1])
    assert fold.done == 1_000
    assert fold.result() == serial  # bit for bit


def test_balanced_chunk_len_evens_out_few_chunks():
    from autotune.backends.schedule import balanced_chunk_len

    assert balanced_chunk_len(1_000_000, 131_072, 2) == 125_000  # 7.6 chunks -> 8
    assert n_chunks(1_000_000, balanced_chunk_len(1_000_000, 131_072, 2)) % 2 == 0
    assert balanced_chunk_len(1_000_000, 125_000, 2) == 125_000  # already even
    assert balanced_chunk_len(1_000_000, 1_000, 2) == 1_000  # many chunks: untouched
    assert balanced_chunk_len(10, 100, 3) == 4  # one chunk -> one per worker
    assert balanced_chunk_len(1_000, 300, 1) == 300


# -- the one chunk planner ----------------------------------------------------------------
def test_the_planner_keeps_an_exact_chunk_len_to_the_item():
    from autotune.backends.schedule import EXACT, plan_chunks

    assert plan_chunks(58_590, 2, 7812, EXACT).chunk_len == 7812
    assert plan_chunks(10, 4, 1000, EXACT).chunk_len == 1000  # one chunk: the user asked


def test_the_planner_fits_a_measured_chunk_len_to_the_call():
    from autotune.backends.schedule import MEASURED, plan_chunks

    assert plan_chunks(58_590, 2, 7812, MEASURED).chunk_len == 7324  # 7.5 chunks -> 8 equal
    assert plan_chunks(10_000_000, 2, 7812, MEASURED).chunk_len == 7801  # 1282 chunks, not 1281
    assert plan_chunks(10_000_000, 16, 65536, MEASURED).chunks == 160  # not 153
    assert plan_chunks(100, 4, 1000, MEASURED).chunk_len == 25  # one chunk per worker


@pytest.mark.parametrize(("source", "per_worker"), [("guessed", 4)])
def test_the_planner_gives_every_worker_chunks_of_a_length_it_was_not_told(source, per_worker):
    from autotune.backends.schedule import plan_chunks

    plan = plan_chunks(10_000, 2, 1 << 20, source)
    assert plan.chunks == 2 * per_worker
    assert plan.chunk_len * plan.chunks == 10_000


def test_the_planner_refuses_what_is_not_a_plan():
    from autotune._errors import RangeError
    from autotune.backends.schedule import plan_chunks

    with pytest.raises(ValueError, match="unknown chunk length source"):
        plan_chunks(10, 2, 5, "tuned")
    with pytest.raises(RangeError):
        plan_chunks(10, 2, 0, "measured")


@given(
    n=st.integers(1, 10**7),
    workers=st.integers(1, 128),
    chunk_len=st.integers(1, 10**7),
    source=st.sampled_from(["exact", "measured", "guessed"]),
)
@example(n=24_011, workers=49, chunk_len=49, source="measured")  # see "never longer"
@settings(max_examples=500, deadline=None)
def test_every_plan_is_a_cut_of_the_call(n, workers, chunk_len, source):
    from autotune.backends.schedule import (
        GUESSED_CHUNKS_PER_WORKER,
        plan_chunks,
    )

    plan = plan_chunks(n, workers, chunk_len, source)
    assert 1 <= plan.chunk_len <= chunk_len
    if source == "exact":
        assert plan.chunk_len == chunk_len
    per_worker = {"guessed": GUESSED_CHUNKS_PER_WORKER}
    if source in per_worker:
        assert plan.chunk_len <= -(-n // (per_worker[source] * workers))
    if source != "guessed" and n_chunks(n, chunk_len) <= 10_000:
        # Fitting never makes the call longer: the busiest worker has at most the
        # items it would have had with the length asked, the ranges handed out in
        # order to the first free worker.  (Balancing alone could: 24011 items on
        # 49 workers in 534 chunks of 45 rather than 491 of 49 gave the busiest
        # 495 items, not 491; the tail cuts its last round back to 491.)
        assert makespan(plan) <= makespan(ChunkPlan(n, workers, chunk_len))
    # The ranges: the first from 0, each from where the last stopped, the last at n.
    assert plan.bounds(0, plan.chunks) == (0, n)
    if plan.chunks <= 10_000:
        ranges = list(plan.ranges())
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        lengths = [stop - start for start, stop in ranges]
        assert all(1 <= length <= plan.chunk_len for length in lengths)  # none longer
        # Before the tail, chunks of the planned length to the item.
        head = plan.head if plan.piece_len < plan.chunk_len else plan.chunks - 1
        assert set(lengths[:head]) <= {plan.chunk_len}
        if plan.piece_len < plan.chunk_len:
            pieces = lengths[plan.head :]
            assert 2 <= len(pieces) <= workers and len(set(pieces[:-1])) <= 1
            assert plan.piece_len >= min(MIN_PIECE, plan.chunk_len // 2)
            # The tail never makes the call longer than its chunks alone.
            assert makespan(plan) <= makespan(ChunkPlan(n, workers, plan.chunk_len))


def makespan(plan: ChunkPlan) -> int:
    """Items the busiest worker runs when each range goes, in order, to the worker
    that is free first (the dispatcher's dynamic schedule, every item alike)."""
    free = [0] * plan.workers
    for start, stop in plan.ranges():
        heapq.heappush(free, heapq.heappop(free) + stop - start)
    return max(free)


@given(
    workers=st.integers(2, 64),
    k=st.integers(1, 40),
    chunk_len=st.integers(2, 1 << 21),
)
@settings(max_examples=300, deadline=None)
def test_one_chunk_too_many_costs_no_more_than_a_chunk_count_of_the_workers(workers, k, chunk_len):
    """``workers * k + 1`` equal chunks, an explicit length: the last one, alone in
    its round, is cut for the idle workers.  The busiest worker then has at most
    half a chunk more than the others, and, when the chunk is long enough to cut
    into a piece per worker (always on 2 workers), no more than with ``workers * k``
    longer chunks of the same items, give or take an item of rounding."""
    n = (workers * k + 1) * chunk_len
    plan = plan_chunks(n, workers, chunk_len, EXACT)
    assert plan.head == workers * k and plan.piece_len < chunk_len
    assert makespan(plan) <= k * chunk_len + -(-chunk_len // 2)
    if workers == 2 or chunk_len >= MIN_PIECE * workers:
        even = ChunkPlan(n, workers, -(-n // (workers * k)))  # workers * k chunks
        assert makespan(plan) <= makespan(even) + 1


def test_the_tail_cuts_a_last_round_only_where_pieces_are_worth_it():
    plan = plan_chunks(5_000, 2, 1_000, EXACT)  # 5 chunks: the fifth cut in 2
    assert list(plan.ranges())[3:] == [(3_000, 4_000), (4_000, 4_500), (4_500, 5_000)]
    plan = plan_chunks(8_005, 2, 1_000, EXACT)  # 8 chunks, then 5 items alone
    assert plan.piece_len == plan.chunk_len == 1_000 and plan.chunks == 9
    assert plan_chunks(5_000, 1, 1_000, EXACT).chunks == 5  # one worker: nothing to even out
    assert plan_chunks(10, 4, 1000, EXACT).chunks == 1  # 10 items: below any piece
