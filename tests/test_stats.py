"""``ev.stats`` after every call, ``progress=True``, and the EfficiencyWarning.

Nothing here times code: the figures are checked for what they must be (one busy figure per
worker, efficiency as its definition, a retry counted when a worker died), and the warning
is forced with a kernel that sleeps in one chunk.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import kernels
import numpy as np
import pytest

import autotune
from autotune import CallStats, EfficiencyWarning, Evaluator
from autotune.backends import stats as stats_module
from autotune.backends.stats import advice

N = 100_000
CHUNK = 2_500


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(5).random(N)


def check_stats(st, *, n, mode, workers, chunk_len, backend):
    assert isinstance(st, CallStats)
    assert (st.n, st.mode, st.workers, st.chunk_len, st.backend) == (
        n,
        mode,
        workers,
        chunk_len,
        backend,
    )
    assert st.chunks == math.ceil(n / chunk_len)
    assert st.inline is False
    assert st.wall_s > 0
    assert len(st.busy_s) == workers and all(b >= 0 for b in st.busy_s)
    assert st.efficiency == pytest.approx(sum(st.busy_s) / (workers * st.wall_s))


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_stats_after_map_reduce_and_n_zero(backend, x, no_leaks):
    with Evaluator(2, CHUNK, shared={"x": x}, backend=backend) as ev:
        assert ev.stats is None
        ev.map(kernels.double, N)
        check_stats(ev.stats, n=N, mode="map", workers=2, chunk_len=CHUNK, backend=backend)
        assert sum(ev.stats.busy_s) > 0 and ev.stats.retries == 0
        ev.reduce(kernels.exp_sum, N)
        check_stats(ev.stats, n=N, mode="reduce", workers=2, chunk_len=CHUNK, backend=backend)
        ev.map(kernels.dist_idx, N)  # several outputs: the same figures
        check_stats(ev.stats, n=N, mode="map", workers=2, chunk_len=CHUNK, backend=backend)
        ev.reduce(kernels.exp_sum, 0)
        st = ev.stats
        assert (st.n, st.chunks, st.busy_s, st.retries, st.inline) == (0, 0, (0.0, 0.0), 0, False)
        assert "CallStats(n=0" in repr(st)


def test_stats_count_a_batch_rerun_after_a_worker_died(start_method, x, tmp_path, no_leaks):
    flag = tmp_path / "killed"
    shared = {"x": x, "at": 60_000, "flag": str(flag)}
    with Evaluator(2, CHUNK, shared=shared, start_method=start_method) as ev:
        out = ev.map(kernels.kill_once, N)
        assert flag.exists() and np.array_equal(out, x * 2.0)
        assert ev.stats.retries == 1
        check_stats(ev.stats, n=N, mode="map", workers=2, chunk_len=CHUNK, backend="processes")
        ev.map(kernels.kill_once, N)  # the fault has fired: nothing re-run
        assert ev.stats.retries == 0


def test_stats_after_a_failed_call(x, no_leaks):
    with Evaluator(2, 100, shared={"x": x, "bad": 5_000}) as ev:
        with pytest.raises(KeyError):
            ev.map(kernels.fail_at, 10_000)
        assert ev.stats.n == 10_000 and ev.stats.retries == 0


# -- progress -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_progress_bar_on_stderr_only_when_asked(backend, x, capsys, no_leaks):
    with Evaluator(2, CHUNK, shared={"x": x}, backend=backend) as ev:
        ev.map(kernels.double, N)
        ev.reduce(kernels.exp_sum, N)
        out, err = capsys.readouterr()
        assert out == "" and err == ""
        ev.map(kernels.double, N, progress=True)
        out, err = capsys.readouterr()
        assert out == "" and "map" in err and "100%" in err and "100k/100k" in err
        ev.reduce(kernels.exp_sum, N, progress=True)
        out, err = capsys.readouterr()
        assert "reduce" in err and "100%" in err


NO_THREAD_LEFT = """
    import threading
    import numpy as np
    import tqdm
    import kernels
    from autotune import Evaluator, Workload, search

    if __name__ == "__main__":
        before = threading.enumerate()
        x = np.random.default_rng(5).random(100_000)
        with Evaluator(2, 2_500, shared={"x": x}) as ev:
            ev.map(kernels.double, len(x), progress=True)
            ev.reduce(kernels.exp_sum, len(x), progress=True)
        work = Workload("double", len(x), kernels.double, shared={"x": x}, mode="map")
        search(work, budget=1, workers=[2], backends=("processes",), progress=True)
        print(threading.enumerate() == before, tqdm.tqdm.monitor_interval)
"""


def test_progress_bars_leave_no_thread_behind():
    """tqdm's first bar starts a monitor thread that outlives it, and every pool forked
    afterwards would fork a multi-threaded process; autotune's bars start none, and leave
    the user's bars their monitor.  A fresh interpreter: no bar has run there yet."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_THREAD_LEFT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "map" in proc.stderr and "reduce" in proc.stderr and "search double" in proc.stderr
    assert proc.stdout.split() == ["True", "10"]


# -- the efficiency warning -------------------------------------------------------------
def test_efficiency_warning_once_per_evaluator(monkeypatch, no_leaks):
    # A long call is >= 1 s; a shorter threshold keeps the test short (same code path).
    monkeypatch.setattr(stats_module, "LONG_CALL_S", 0.25)
    with Evaluator(2, 1, shared={"delay": 0.3}) as ev:
        with pytest.warns(EfficiencyWarning, match="one worker was busy") as record:
            assert ev.reduce(kernels.sleep_first, 16) == 16.0
        assert len(record) == 1 and record[0].filename == __file__
        assert ev.stats.efficiency < 0.8 and ev.stats.wall_s >= 0.25
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ev.reduce(kernels.sleep_first, 16)  # as poor again: said once only
        assert ev.stats.efficiency < 0.8


def test_a_call_that_started_the_workers_is_not_judged(monkeypatch, tmp_path, no_leaks):
    """An evaluator settled from its online profile starts its workers at its first call;
    that call's idle workers were starting, not badly set: the warning waits for the next."""
    from autotune.cpu import probe
    from autotune.profile import item_bytes_of
    from autotune.profile.online import Learned, file_slug, kernel_name, online_path, save_learned

    monkeypatch.setattr(stats_module, "LONG_CALL_S", 0.25)
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path))
    name = kernel_name(kernels.sleep_first)
    runs = {(2, 1): [20.0, 20.0, 20.0]}  # 20 items/s: every call pays for the pool
    shared = {"delay": 0.3}
    item_bytes = item_bytes_of(shared, 16)  # what the evaluator will count: the file must match
    settled = Learned(name, "processes", item_bytes, 16, (2, 1), False, runs, runs, first=True)
    assert save_learned(settled, probe(), online_path(file_slug(name), probe()))
    with Evaluator(shared=shared) as ev:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ev.reduce(kernels.sleep_first, 16) == 16.0
        assert not ev.stats.inline and not ev.stats.exploring and ev.stats.efficiency < 0.8
        with pytest.warns(EfficiencyWarning, match="one worker was busy"):
            ev.reduce(kernels.sleep_first, 16)


def make(**kw):
    base = dict(
        n=1_000_000,
        mode="map",
        workers=2,
        chunk_len=10_000,
        chunks=100,
        backend="processes",
        inline=False,
        wall_s=2.0,
        busy_s=(1.0, 1.0),
        efficiency=0.5,
        retries=0,
    )
    base.update(kw)
    return CallStats(**base)


def test_advice_names_the_likely_cause():
    assert advice(make(efficiency=0.9)) is None
    assert advice(make(wall_s=0.5)) is None  # short calls are not judged
    assert advice(make(retries=1, busy_s=(1.9, 0.1))) is None  # a replacement started
    assert "too few chunks" in advice(make(chunks=5))
    assert "one worker was busy 1.9 s" in advice(make(busy_s=(1.9, 0.1)))
    gil = advice(make(backend="threads", busy_s=(1.0, 1.0)))
    assert "hold the GIL" in gil and "backend='processes'" in gil
    assert "memory-bound" in advice(make(busy_s=(1.0, 1.0)))
    line = advice(make(busy_s=(1.0, 1.0)))
    assert "\n" not in line and "efficiency 0.50" in line


def test_public_names():
    assert issubclass(autotune.EfficiencyWarning, RuntimeWarning)
    assert autotune.CallStats is CallStats
    assert {"CallStats", "EfficiencyWarning"} <= set(autotune.__all__)


def test_stats_say_whether_a_call_was_autotunes_exploration(no_leaks):
    import kernels

    x = np.arange(1000.0)
    with Evaluator(2, 100, shared={"x": x}) as ev:
        ev.map(kernels.double, 1000)
        assert ev.stats.exploring is False  # settings given: nothing explored
        assert "exploring=False" in repr(ev.stats)
