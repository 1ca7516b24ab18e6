"""The threads backend: the same contract as processes, in threads of this process."""

from __future__ import annotations

import operator
import os
import threading

import kernels
import numpy as np
import pytest

from autotune import Evaluator
from autotune.backends.shm import list_segments
from autotune.workloads import stream_kernel


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(7).random(300_001)


def serial(kernel, shared, n, chunk_len, workers):
    from autotune.backends.shared import SharedNamespace

    ns = SharedNamespace(shared)
    return [kernel(ns, s, e) for s, e in kernels.ranges_of(n, workers, chunk_len)]


def test_map_reduce_equal_serial(x):
    with Evaluator(2, 4_000, shared={"x": x}, backend="threads") as ev:
        assert ev.pids == [] and ev.start_method is None
        out = ev.map(stream_kernel, len(x))
        rows = serial(stream_kernel, {"x": x}, len(x), 4_000, ev.workers)
        assert np.array_equal(out, np.concatenate(rows))
        total = ev.reduce(kernels.exp_sum, len(x))
        parts = serial(kernels.exp_sum, {"x": x}, len(x), 4_000, ev.workers)
        expected = parts[0]
        for p in parts[1:]:
            expected = expected + p
        assert total == expected  # folded in chunk order: the same bits
        assert ev.map(kernels.pairs, 10).shape == (10, 2)
        assert ev.map(kernels.double, 0).shape == (0,)
        assert ev.reduce(kernels.exp_sum, 0, combine=operator.mul) == 1


def test_no_pickling_at_all(x):
    shared = {"x": x, "o": kernels.RefusesPickle(), "lock": threading.Lock()}
    with Evaluator(2, 1_000, shared=shared, backend="threads") as ev:
        # a closure over a lock cannot be pickled; threads never need to
        lock = threading.Lock()
        assert np.array_equal(ev.map(lambda s, a, b: (lock, s.x[a:b])[1], 5_000), x[:5_000])


def test_exceptions_keep_type_and_traceback(x):
    with Evaluator(2, 1_000, shared={"x": x, "bad": 2_500}, backend="threads") as ev:
        with pytest.raises(KeyError) as info:
            ev.map(kernels.fail_at, 10_000)
        assert any("fail_at" in str(tb.name) for tb in info.traceback)
        with pytest.raises(ValueError, match="first axis has length stop - start"):
            ev.map(kernels.wrong_length, 5_000)
        with pytest.raises(ValueError, match="same row shape and dtype"):
            ev.map(kernels.changing_dtype, 50_000)
        with pytest.raises(ValueError, match="read-only"):
            ev.map(kernels.write_shared, 5_000)
        assert np.array_equal(ev.map(kernels.double, 5_000), x[:5_000] * 2.0)  # still usable


def test_threads_bad_arguments():
    with pytest.raises(ValueError, match="pin"):
        Evaluator(2, 10, backend="threads", pin=True)
    ev = Evaluator(2, 10, backend="threads")
    ev.close()
    with pytest.raises(RuntimeError, match="closed"):
        ev.map(kernels.double, 10)


def test_map_output_reused_only_when_released(x):
    with Evaluator(2, 10_000, shared={"x": x}, backend="threads") as ev:
        first = ev.map(kernels.double, len(x))
        second = ev.map(kernels.double, len(x))
        assert second is not first  # first is still held: never overwritten
        assert np.array_equal(first, x * 2.0) and np.array_equal(second, x * 2.0)
        view = second[10:]
        del second
        third = ev.map(kernels.pairs, len(x))  # another shape: fresh memory
        assert np.array_equal(view, x[10:] * 2.0)  # a view keeps its base from reuse
        assert third.shape == (len(x), 2)


def test_released_map_output_is_reused(x):
    with Evaluator(2, 10_000, shared={"x": x}, backend="threads") as ev:
        before = set(list_segments(os.getpid()))
        first = ev.map(kernels.double, len(x))
        kept = set(list_segments(os.getpid())) - before
        assert len(kept) == 1  # a 1.6 MB output lives in a kept segment
        del first
        again = ev.map(kernels.double, len(x))
        # The same segment, the same pages: none to fault in, none made.
        assert set(list_segments(os.getpid())) - before == kept
        assert np.array_equal(again, x * 2.0)


def test_a_view_of_the_same_shape_keeps_the_output_from_reuse(x):
    """No reference counts are read: a view alone must keep its rows intact."""
    with Evaluator(2, 10_000, shared={"x": x}, backend="threads") as ev:
        before = set(list_segments(os.getpid()))
        first = ev.map(kernels.double, len(x))
        kept = set(list_segments(os.getpid())) - before
        view = first[::2]
        del first
        second = ev.map(kernels.triple, len(x))
        assert set(list_segments(os.getpid())) - before - kept  # another segment
        assert np.array_equal(view, x[::2] * 2.0)
        assert np.array_equal(second, x * 3.0)
