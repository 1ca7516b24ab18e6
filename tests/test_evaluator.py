"""The evaluator's behaviour under fork, spawn and forkserver: results, sharing, faults, cleanup."""

from __future__ import annotations

import gc
import operator
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import kernels
import numpy as np
import pytest
from conftest import START_METHODS, process_gone
from scipy.interpolate import RectBivariateSpline

from autotune import Evaluator, WorkerLost
from autotune.backends.shm import list_segments


def serial_fold(kernel, shared, n, chunk_len, workers, combine=operator.add):
    from autotune.backends.shared import SharedNamespace

    ns = SharedNamespace(shared)
    acc = None
    for start, stop in kernels.ranges_of(n, workers, chunk_len):
        part = kernel(ns, start, stop)
        acc = part if acc is None else combine(acc, part)
    return acc


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(42).random(200_003)


# -- results equal to serial ---------------------------------------------------
def test_map_and_reduce_equal_serial(start_method, x, no_leaks):
    with Evaluator(2, 7_000, shared={"x": x}, start_method=start_method) as ev:
        out = ev.map(kernels.double, len(x))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert np.array_equal(out, x * 2.0)
        total = ev.reduce(kernels.exp_sum, len(x))
        # same chunks, same order of additions: the same bits, not just close
        assert total == serial_fold(kernels.exp_sum, {"x": x}, len(x), 7_000, ev.workers)
        # the pool serves many calls
        for _ in range(3):
            assert np.array_equal(ev.map(kernels.double, 1000), x[:1000] * 2.0)


def test_edge_sizes(start_method, x, no_leaks):
    with Evaluator(2, 1000, shared={"x": x}, start_method=start_method) as ev:
        empty = ev.map(kernels.double, 0)
        assert empty.shape == (0,)
        assert ev.reduce(kernels.exp_sum, 0) == 0
        assert ev.reduce(kernels.exp_sum, 0, combine=operator.mul) == 1
        with pytest.raises(ValueError, match="identity"):
            ev.reduce(kernels.exp_sum, 0, combine=max)
        # n smaller than one chunk, and exactly one chunk
        assert np.array_equal(ev.map(kernels.double, 17), x[:17] * 2.0)
        assert np.array_equal(ev.map(kernels.double, 1000), x[:1000] * 2.0)
        assert np.array_equal(ev.map(kernels.double, 1001), x[:1001] * 2.0)
        assert ev.reduce(kernels.exp_sum, 1) == float(np.exp(x[:1]).sum())
    with Evaluator(2, 10**9, shared={"x": x}, start_method=start_method) as ev:
        assert np.array_equal(ev.map(kernels.double, len(x)), x * 2.0)


def test_multidimensional_and_integer_map(start_method, x, no_leaks):
    with Evaluator(2, 3_001, shared={"x": x}, start_method=start_method) as ev:
        out = ev.map(kernels.pairs, len(x))  # 3.2 MB: through shared memory
        assert out.shape == (len(x), 2)
        assert np.array_equal(out, np.stack([x, x * x], axis=1))
        ints = ev.map(kernels.arange_map, 5_000)  # small: through the pipe
        assert ints.dtype == np.int64 and np.array_equal(ints, np.arange(5_000))


def test_map_result_is_writable_and_outlives_close(x, no_leaks):
    with Evaluator(2, 10_000, shared={"x": x}) as ev:
        out = ev.map(kernels.double, len(x))
    out[0] = -1.0  # an ordinary writable array, even after close
    assert out[0] == -1.0 and np.array_equal(out[1:], x[1:] * 2.0)


def test_vector_partials_reduce(start_method, no_leaks):
    labels = np.random.default_rng(1).integers(0, 4, 100_000)
    with Evaluator(2, 999, shared={"labels": labels}, start_method=start_method) as ev:
        counts = ev.reduce(kernels.vector_partial, len(labels))
    assert np.array_equal(counts, np.bincount(labels, minlength=4))


def test_spline_objects_shared(start_method, no_leaks):
    rng = np.random.default_rng(3)
    grid = np.linspace(0, 1, 50)
    splines = [RectBivariateSpline(grid, grid, rng.random((50, 50)), kx=1, ky=1) for _ in range(5)]
    shared = {"x": rng.random(20_000), "y": rng.random(20_000), "splines": splines}
    with Evaluator(2, 2_500, shared=shared, start_method=start_method) as ev:
        got = ev.reduce(kernels.spline_sum, 20_000)
        workers = ev.workers
    assert got == serial_fold(kernels.spline_sum, shared, 20_000, 2_500, workers)


# -- sharing without copies ----------------------------------------------------
def test_shared_not_pickled_per_task(start_method, tmp_path, no_leaks):
    counter = tmp_path / "pickles"
    obj = kernels.CountsPickles(str(counter), np.arange(100_000, dtype=np.float64))
    with Evaluator(2, 1_000, shared={"obj": obj}, start_method=start_method) as ev:
        for _ in range(5):
            assert ev.reduce(kernels.uses_counted, 100_000) == float(obj.data.sum())
    count = len(counter.read_text()) if counter.exists() else 0
    # fork: inherited, never pickled; spawn/forkserver: pickled once, whatever the
    # number of workers, calls and chunks
    assert count == (0 if start_method == "fork" else 1)


def test_fork_never_pickles_shared(x, no_leaks):
    with Evaluator(2, 1_000, shared={"x": x, "o": kernels.RefusesPickle()}) as ev:
        assert np.array_equal(ev.map(kernels.double, 5_000), x[:5_000] * 2.0)


def test_nested_arrays_live_in_shared_memory(start_method, no_leaks):
    holder = {"big": np.ones(100_000)}  # inside another object, not top level
    with Evaluator(2, 10, shared={"holder": holder}, start_method=start_method) as ev:
        flags = ev.map(kernels.nested_flags, 20)
    if start_method == "fork":
        assert flags[0, 0]  # the parent's own (inherited) array
    else:
        # a read-only view of the shared segment, not a private copy
        assert not flags[:, 0].any() and flags[:, 1].all()


def test_shared_is_read_only(start_method, x, no_leaks):
    ev = Evaluator(2, 1_000, shared={"x": x}, start_method=start_method)
    with ev, pytest.raises(ValueError, match="read-only"):
        ev.map(kernels.write_shared, 5_000)


# -- kernel exceptions ------------------------------------------------------------
def test_kernel_exception_keeps_type_and_traceback(start_method, x, no_leaks):
    with Evaluator(2, 1_000, shared={"x": x, "bad": 4_321}, start_method=start_method) as ev:
        with pytest.raises(KeyError) as info:
            ev.map(kernels.fail_at, 10_000)
        assert info.value.__cause__ is not None
        assert "fail_at" in str(info.value.__cause__)  # the worker's traceback
        with pytest.raises(ValueError) as info2:
            ev.reduce(kernels.fail_value, 10_000)
        message = str(info2.value)
        assert message.startswith("value out of range")
        assert "Worker traceback" in message and "kernels.py" in message
        assert "[4000, 5000)" in message
        # still usable, same workers
        pids = ev.pids
        assert np.array_equal(ev.map(kernels.double, 10_000), x[:10_000] * 2.0)
        assert ev.pids == pids


def test_unpicklable_exception(start_method, no_leaks):
    from autotune import RemoteError

    ev = Evaluator(1, 10, start_method=start_method)
    with ev, pytest.raises(RemoteError, match="Unpicklable: odd"):
        ev.reduce(kernels.fail_unpicklable, 10)


# -- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"workers": 0}, ValueError, "workers must be an integer >= 1"),
        ({"workers": 1.5}, TypeError, "workers"),
        ({"workers": True}, TypeError, "workers"),
        ({"chunk_len": 0}, ValueError, "chunk_len must be an integer >= 1"),
        ({"retries": -1}, ValueError, "retries"),
        ({"start_method": "thread"}, ValueError, "start_method must be one of"),
        ({"backend": "mpi"}, ValueError, "backend must be one of"),
        ({"shared": {"not ok": 1}}, ValueError, "not a Python identifier"),
        ({"shared": {"class": 1}}, ValueError, "not a Python identifier"),
        ({"shared": {"_x": 1}}, ValueError, "reserved"),
        ({"shared": [1, 2]}, TypeError, "shared must be a dict"),
    ],
)
def test_bad_arguments(kwargs, error, match, no_leaks):
    args = {"workers": 1, "chunk_len": 10, **kwargs}
    with pytest.raises(error, match=match):
        Evaluator(**args)


def test_bad_calls(x, no_leaks):
    ev = Evaluator(2, 100, shared={"x": x})
    with pytest.raises(TypeError, match="kernel must be callable"):
        ev.map(42, 10)
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        ev.map(kernels.double, -1)
    with pytest.raises(ValueError, match="first axis has length stop - start"):
        ev.map(kernels.wrong_length, 1_000)
    with pytest.raises(ValueError, match="a scalar"):
        ev.map(kernels.scalar_result, 1_000)
    with pytest.raises(ValueError, match="same row shape and dtype"):
        ev.map(kernels.changing_dtype, 100_000)
    lock = threading.Lock()
    with pytest.raises(TypeError, match="define it at module level"):
        ev.map(lambda s, a, b: (lock, a)[1], 10)
    # lambdas that can be pickled by value work
    assert np.array_equal(ev.map(lambda s, a, b: s.x[a:b] + 1, 500), x[:500] + 1)
    ev.close()
    ev.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        ev.map(kernels.double, 10)


def test_nested_evaluator_refused(no_leaks):
    with Evaluator(1, 10) as ev, pytest.raises(RuntimeError, match="nested"):
        ev.reduce(kernels.nested_evaluator, 10)


# -- dying workers ------------------------------------------------------------------
def test_killed_worker_chunks_rerun(start_method, x, tmp_path, no_leaks):
    flag = tmp_path / "killed"
    shared = {"x": x, "at": 150_000, "flag": str(flag)}
    with Evaluator(2, 5_000, shared=shared, start_method=start_method) as ev:
        before = set(ev.pids)
        out = ev.map(kernels.kill_once, len(x))
        assert flag.exists(), "the fault was not injected"
        assert np.array_equal(out, x * 2.0)
        victim = int(flag.read_text())
        assert victim in before and victim not in ev.pids  # replaced
        assert process_gone(victim)


def test_segfault_worker_rerun(tmp_path, no_leaks):
    flag = tmp_path / "segv"
    with Evaluator(2, 100, shared={"at": 5_050, "flag": str(flag)}) as ev:
        assert ev.reduce(kernels.segfault_once, 10_000) == 10_000.0
    assert flag.exists()


def test_worker_lost_after_retries(start_method, no_leaks):
    with Evaluator(2, 100, shared={"at": 2_345}, start_method=start_method, retries=1) as ev:
        t0 = time.monotonic()
        with pytest.raises(WorkerLost, match=r"SIGKILL.*\[2300, 2400\)"):
            ev.reduce(kernels.kill_always, 10_000)
        assert time.monotonic() - t0 < 20
        # still usable afterwards
        assert ev.reduce(kernels.kill_always, 2_000) == 2_000.0


def test_worker_killed_between_calls(x, no_leaks):
    import signal

    with Evaluator(2, 1_000, shared={"x": x}) as ev:
        os.kill(ev.pids[0], signal.SIGKILL)
        time.sleep(0.2)
        assert np.array_equal(ev.map(kernels.double, 50_000), x[:50_000] * 2.0)


# -- cleanup on every path ---------------------------------------------------------------
def test_close_ends_workers_and_unlinks(start_method, x, no_leaks):
    ev = Evaluator(2, 1_000, shared={"x": x}, start_method=start_method)
    pids = ev.pids
    ev.map(kernels.double, 100_000)
    assert list_segments(os.getpid()), "expected the evaluator's segments while it is open"
    ev.close()
    assert all(process_gone(p) for p in pids)


def test_garbage_collected_evaluator_cleans_up(start_method, x, no_leaks):
    ev = Evaluator(2, 1_000, shared={"x": x}, start_method=start_method)
    pids = ev.pids
    ev.map(kernels.double, 100_000)
    del ev
    gc.collect()
    deadline = time.monotonic() + 5
    while not all(process_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(process_gone(p) for p in pids)


def _run_script(
    code: str, timeout: float = 60, tmpdir: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; ``tmpdir``: its ``TMPDIR`` (a script that is
    killed leaves what it made there, see ``conftest.child_tmpdir``)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize("method", START_METHODS)
def test_ctrl_c_ends_workers_and_unlinks(method):
    result = _run_script(
        f"""
        import os
        import numpy as np
        import kernels
        from autotune import Evaluator
        from autotune.backends.shm import list_segments
        from conftest import process_gone

        if __name__ == "__main__":
            shared = {{"at": 3_000, "parent": os.getpid(), "x": np.ones(10**6)}}
            ev = Evaluator(2, 100, shared=shared, start_method={method!r})
            pids = ev.pids
            try:
                ev.reduce(kernels.interrupt_parent, 100_000)
            except KeyboardInterrupt:
                print("interrupted")
            print("gone", all(process_gone(p) for p in pids))
            print("segments", list_segments(os.getpid()))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "interrupted" in result.stdout
    assert "gone True" in result.stdout
    assert "segments []" in result.stdout


@pytest.mark.parametrize("method", START_METHODS)
def test_workers_exit_when_parent_is_killed(method, child_tmpdir):
    result = _run_script(
        f"""
        import os, signal
        import kernels
        from autotune import Evaluator

        if __name__ == "__main__":
            ev = Evaluator(3, 100, start_method={method!r})
            ev.map(kernels.arange_map, 100_000)  # leaves a map output segment too
            print(os.getpid(), " ".join(map(str, ev.pids)), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        tmpdir=child_tmpdir,
    )
    parent, *pids = (int(p) for p in result.stdout.split())
    assert len(pids) == 3
    deadline = time.monotonic() + 10
    while not all(process_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(process_gone(p) for p in pids), "orphaned workers survived their parent"
    # the resource tracker unlinks what the killed parent created
    deadline = time.monotonic() + 10
    while list_segments(parent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list_segments(parent)


# -- workers on a shared machine --------------------------------------------------------
def test_blas_threads_capped(no_leaks):
    with Evaluator(2, 10, blas_threads=1) as ev:
        assert set(ev.map(kernels.blas_threads, 40).tolist()) == {1}


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity")
def test_pin_gives_each_worker_one_cpu(no_leaks):
    usable = sorted(os.sched_getaffinity(0))
    with Evaluator(len(usable), 1, pin=True) as ev:
        cpus = ev.map(kernels.affinity, 200)
    assert set(cpus.tolist()) <= {c * 100 + 1 for c in usable}


def test_two_threads_share_one_evaluator(x, no_leaks):
    results = {}

    def use(key):
        results[key] = ev.map(kernels.double, 100_000)

    with Evaluator(2, 1_000, shared={"x": x}) as ev:
        threads = [threading.Thread(target=use, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(2):
        assert np.array_equal(results[i], x[:100_000] * 2.0)


def test_default_start_method_is_explicit():
    with Evaluator(1, 10) as ev:
        assert ev.start_method == "fork"  # Linux; never left to Python's default


def test_shared_array_is_not_copied(start_method, no_leaks):
    import autotune

    x = autotune.shared_array(200_000)
    x[:] = np.arange(200_000)
    assert len(list_segments(os.getpid())) == 1
    with Evaluator(2, 10_000, shared={"x": x}, start_method=start_method) as ev:
        created = set(list_segments(os.getpid()))
        assert np.array_equal(ev.map(kernels.double, len(x)), x * 2.0)
    # no segment was made for x itself: only the control word's
    assert len(created) == 2
    del x
    gc.collect()  # the segment goes with the last view


def test_forked_workers_start_no_blas_threads_and_the_limit_is_restored(no_leaks):
    from threadpoolctl import threadpool_info

    before = [i["num_threads"] for i in threadpool_info()]
    with Evaluator(2, 10, blas_threads=1) as ev:
        assert set(ev.map(kernels.blas_threads, 40).tolist()) == {1}
        # a worker has its main thread only: no BLAS pool spinning on the cores
        assert set(ev.map(kernels.thread_count, 40).tolist()) == {1}
    assert [i["num_threads"] for i in threadpool_info()] == before


def test_profile_chunks_are_fitted_to_n_explicit_ones_are_not(no_leaks):
    from conftest import SHIPPED

    from autotune import Profile

    shipped = Profile.load(SHIPPED)
    with Evaluator(profile=shipped) as ev:
        assert (ev.workers, ev.chunk_len) == (2, 7812)
        # 7.5 chunks of 7812 would leave one worker idle for half a chunk: 8 even ones
        assert ev.reduce(kernels.count_items, 58_590) == 58_590
        assert ev.stats.chunk_len == 7_324
        assert ev.reduce(kernels.count_items, 10_000_000) == 10_000_000
        # 1281 chunks of 7812 leave one over for a worker: 1282 of 7801
        assert ev.stats.chunk_len == 7_801
    with Evaluator(2, 7812) as ev:
        assert ev.reduce(kernels.count_items, 58_590) == 58_590
        assert ev.stats.chunk_len == 7_812


def test_as_many_chunks_as_workers_go_one_to_each(start_method, no_leaks):
    # the first worker must not queue both chunks while the second one idles
    with Evaluator(2, 50_000, start_method=start_method) as ev:
        pids = ev.map(kernels.pid, 100_000)
        assert len(set(pids[:50_000].tolist())) == 1
        assert len(set(pids.tolist())) == 2
