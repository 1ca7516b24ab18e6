"""The pure scheduling pieces: batches cover every chunk once; partials fold in order."""

from __future__ import annotations

import operator
import random

from autotune.backends.schedule import Batches, OrderedFold, chunk_bounds, n_chunks


def test_chunk_arithmetic():
    assert n_chunks(10, 3) == 4 and n_chunks(9, 3) == 3 and n_chunks(0, 3) == 0
    assert chunk_bounds(3, 4, 3, 10) == (9, 10)
    assert chunk_bounds(0, 4, 3, 10) == (0, 10)


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
