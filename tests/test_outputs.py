"""Several outputs: tuple and dict map results and reduce partials, on the local backends.

Every result is compared with a serial loop; bad input gives one error naming the chunk,
leaves the evaluator usable and no segment behind.  The dask backend has the same tests in
tests/test_dask.py.
"""

from __future__ import annotations

import mmap
import operator
import os
import re

import kernels
import numpy as np
import pytest
from conftest import START_METHODS

from autotune import Evaluator
from autotune.backends.shared import SharedNamespace
from autotune.backends.shm import list_segments
from autotune.backends.structure import ElementWise, PartialMismatch

BIG = 1 << 16  # two outputs of 65536 rows: well over the shared-memory threshold
SMALL = 1_000  # results come back through the pipe
CHUNK = 1_000

LOCAL = [("processes", m) for m in START_METHODS] + [("threads", None)]


@pytest.fixture(params=LOCAL, ids=[m or b for b, m in LOCAL])
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(13).random(BIG)


def evaluator(backend, shared, chunk_len=CHUNK):
    name, method = backend
    return Evaluator(2, chunk_len, shared=shared, backend=name, start_method=method)


def serial_map(kernel, shared, n):
    return kernel(SharedNamespace(shared), 0, n)


def serial_reduce(kernel, shared, n, chunk_len, workers):
    """A serial loop over the same ranges, combining tuples/dicts element by element."""
    ns = SharedNamespace(shared)
    acc = None
    for start, stop in kernels.ranges_of(n, workers, chunk_len):
        part = kernel(ns, start, stop)
        if acc is None:
            acc = part
        elif isinstance(part, dict):
            acc = {k: acc[k] + part[k] for k in acc}
        else:
            acc = tuple(a + p for a, p in zip(acc, part, strict=True))
    return acc


def root(arr):
    """The object at the end of an array's ``base`` chain (the mapping it views)."""
    while isinstance(arr, np.ndarray) and arr.base is not None:
        arr = arr.base
    return arr.obj if isinstance(arr, memoryview) else arr


def assert_same(got, want):
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        pairs = [(got[k], want[k]) for k in want]
    else:
        assert len(got) == len(want)
        pairs = list(zip(got, want, strict=True))
    for g, w in pairs:
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype
        assert np.array_equal(g, w)


# -- results equal to serial ------------------------------------------------------------
@pytest.mark.parametrize("n", [BIG, SMALL], ids=["shm", "pipe"])
def test_tuple_and_dict_maps_equal_serial(backend, x, n, no_leaks):
    shared = {"x": x}
    with evaluator(backend, shared) as ev:
        for kernel in (kernels.dist_idx, kernels.fit_dict):
            got = ev.map(kernel, n)
            assert_same(got, serial_map(kernel, shared, n))
        # and a single array still comes back as an array
        assert np.array_equal(ev.map(kernels.double, n), x[:n] * 2.0)


def test_tuple_outputs_share_one_segment_and_are_reused(x, no_leaks):
    with Evaluator(2, CHUNK, shared={"x": x}) as ev:
        d, i = ev.map(kernels.dist_idx, BIG)
        # both outputs view one shared mapping: written in place by the workers
        assert isinstance(root(d), mmap.mmap) and root(d) is root(i)
        segments = set(list_segments(os.getpid()))
        del d, i
        d2, i2 = ev.map(kernels.dist_idx, BIG)  # the released segment is reused
        assert set(list_segments(os.getpid())) == segments  # none made, none let go
        assert np.array_equal(d2, x * 2.0)


def test_structured_dtypes_keep_working(backend, x, no_leaks):
    shared = {"x": x}
    with evaluator(backend, shared) as ev:
        rec, plus = ev.map(kernels.records, BIG)
        want_rec, want_plus = serial_map(kernels.records, shared, BIG)
        assert rec.dtype == want_rec.dtype and np.array_equal(rec, want_rec)
        assert np.array_equal(plus, want_plus)


def test_tuple_and_dict_reduce_element_by_element(backend, x, no_leaks):
    shared = {"x": x}
    with evaluator(backend, shared) as ev:
        got = ev.reduce(kernels.sum_count, BIG)
        want = serial_reduce(kernels.sum_count, shared, BIG, CHUNK, ev.workers)
        assert isinstance(got, tuple) and len(got) == 3  # never concatenated
        assert got[0] == want[0] and got[1] == BIG  # same chunks, same bits
        assert np.array_equal(got[2], want[2])
        got = ev.reduce(kernels.moments, BIG)
        assert got == serial_reduce(kernels.moments, shared, BIG, CHUNK, ev.workers)
        assert got["n"] == BIG


def test_a_given_combine_gets_whole_partials(x, no_leaks):
    def keep_max(a, b):  # (sum, count, minmax) -> (sum, largest count)
        return (a[0] + b[0], max(a[1], b[1]))

    with Evaluator(2, CHUNK, shared={"x": x}, backend="threads") as ev:
        total, largest = ev.reduce(kernels.sum_count, 5_500, combine=keep_max)
        assert largest == CHUNK
        assert total == pytest.approx(x[:5_500].sum())


def test_elementwise_keeps_namedtuples_and_refuses_broadcasting():
    from collections import namedtuple

    pair = namedtuple("pair", "a b")
    add = ElementWise(operator.add)
    assert add(pair(1, 2), pair(3, 4)) == pair(4, 6)
    assert type(add(pair(1, 2), pair(3, 4))) is pair
    assert add(1.5, 2) == 3.5
    with pytest.raises(PartialMismatch, match="a tuple of 2 partials"):
        add(np.ones(2), (1.0, 2.0))  # numpy would broadcast this silently
    with pytest.raises(PartialMismatch, match=r"at \[1\]"):
        add((1, (2, 3)), (1, (2, 3, 4)))


# -- bad input: one clear error naming the chunk, the evaluator usable, nothing leaked ---
@pytest.mark.parametrize("n", [BIG, SMALL], ids=["shm", "pipe"])
def test_tuple_of_disagreeing_lengths(backend, x, n, no_leaks):
    with evaluator(backend, {"x": x, "bad": 500 if n == SMALL else 5_500}, 100) as ev:
        where = re.escape("[500, 600)" if n == SMALL else "[5500, 5600)")
        with pytest.raises(ValueError, match=rf"a tuple of 2 arrays for items {where}.*100, 99"):
            ev.map(kernels.ragged_tuple, n)
        assert_same(ev.map(kernels.dist_idx, n), serial_map(kernels.dist_idx, {"x": x}, n))


@pytest.mark.parametrize("n", [BIG, SMALL], ids=["shm", "pipe"])
def test_dict_whose_keys_change(backend, x, n, no_leaks):
    with evaluator(backend, {"x": x, "bad": 700}, 100) as ev:
        with pytest.raises(ValueError, match=r"keys 'a', 'c' for items \[700, 800\).*'a', 'b'"):
            ev.map(kernels.changing_keys, n)
        assert np.array_equal(ev.map(kernels.double, n), x[:n] * 2.0)


def test_tuple_partial_then_scalar_partial(backend, x, no_leaks):
    with evaluator(backend, {"x": x, "bad": 5_432}, 100) as ev:
        with pytest.raises(
            ValueError, match=r"returned a float for items \[5400, 5500\).*a tuple of 2 partials"
        ):
            ev.reduce(kernels.tuple_then_scalar, BIG)
        assert ev.reduce(kernels.sum_count, 1_000)[1] == 1_000


def test_what_was_returned_is_named(x, no_leaks):
    with Evaluator(1, 10, backend="threads", shared={"x": x}) as ev:
        with pytest.raises(ValueError, match=r"an empty tuple for items \[0, 10\)"):
            ev.map(lambda s, a, b: (), 10)
        with pytest.raises(ValueError, match=r"a dict of arrays with keys 'a' for items.*a scalar"):
            ev.map(lambda s, a, b: {"a": 1.0}, 10)
        with pytest.raises(ValueError, match=r"an array for items \[10, 20\), but the first"):
            ev.map(lambda s, a, b: (s.x[a:b],) if a == 0 else s.x[a:b], 20)
        with pytest.raises(ValueError, match=r"\(output 1\) for items \[10, 20\)"):
            ev.map(lambda s, a, b: (s.x[a:b], s.x[a:b].astype(np.float32 if a else float)), 20)


def test_a_combine_that_raises_fails_the_call_only(backend, x, no_leaks):
    def refuse(a, b):
        raise ZeroDivisionError("combine refused")

    with evaluator(backend, {"x": x}) as ev:
        with pytest.raises(ZeroDivisionError, match="combine refused"):
            ev.reduce(kernels.exp_sum, BIG, combine=refuse)
        assert ev.reduce(kernels.sum_count, 5_000)[1] == 5_000  # still usable
