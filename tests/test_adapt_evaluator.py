"""The evaluator tuning itself: inline small calls, online profiles, reproducibility.

Nothing here times anything against a target: the tests pin the decisions
(which calls ran inline, what was saved and found again, which settings
were left alone) and that every result equals the serial one.
``scripts/bench_adapt.py`` measures what the decisions are worth.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import kernels
import numpy as np
import pytest

from autotune import Evaluator, Profile, ProfileWarning
from autotune.backends.shared import SharedNamespace
from autotune.cpu import probe
from autotune.profile.online import file_slug, kernel_name, online_path

N = 200_000


@pytest.fixture
def x():
    return np.random.default_rng(7).random(N)


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path))
    return tmp_path


def serial_sum(kernel, x, chunk_len):
    ns = SharedNamespace({"x": x})
    total = None
    for start in range(0, len(x), chunk_len):
        part = kernel(ns, start, min(len(x), start + chunk_len))
        total = part if total is None else total + part
    return total


@pytest.fixture
def pool_only(monkeypatch):
    """Every call on the pool: what settles must not hang on the machine's load,
    which moves the break-even (tested on its own above)."""
    from autotune.adapt import BreakEven

    monkeypatch.setattr(BreakEven, "inline", lambda self, n, workers, overhead: False)


def settle(ev, kernel, n, calls=80):
    for _ in range(calls):
        ev.map(kernel, n)
    learner = next(iter(ev._online.learners.values()))
    return learner


def test_explicit_settings_do_not_adapt_and_repeat_to_the_bit(x, profile_dir, no_leaks):
    with Evaluator(2, 3000, shared={"x": x}) as ev:
        first = ev.reduce(kernels.exp_sum, N)
        for _ in range(5):
            assert ev.reduce(kernels.exp_sum, N) == first  # adapt=None: explicit, left alone
            assert ev.stats.chunk_len == 3000 and not ev.stats.inline
    assert first == serial_sum(kernels.exp_sum, x, 3000)
    with Evaluator(shared={"x": x}, adapt=False) as ev:
        first = ev.reduce(kernels.exp_sum, N)
        chunks = {ev.stats.chunk_len}
        for _ in range(5):
            assert ev.reduce(kernels.exp_sum, N) == first
            chunks.add(ev.stats.chunk_len)
        assert len(chunks) == 1
    assert not list(profile_dir.iterdir())  # nothing learned, nothing saved


def test_adapting_changes_chunks_and_a_reduce_only_in_the_last_bits(
    x, profile_dir, no_leaks, pool_only
):
    with Evaluator(shared={"x": x}) as ev:
        assert ev.settings.adapt
        results, chunks = [], set()
        for _ in range(12):
            results.append(ev.reduce(kernels.heavy_sum, N))
            if not ev.stats.inline:
                chunks.add(ev.stats.chunk_len)
    assert len(chunks) > 1  # it explored
    expected = serial_sum(kernels.heavy_sum, x, N)
    assert all(abs(r - expected) <= 1e-9 * abs(expected) for r in results)


def test_small_calls_run_inline_and_start_no_worker(x, profile_dir, no_leaks):
    with Evaluator(shared={"x": x, "delay": 0.02}) as ev:
        for _ in range(3):
            out = ev.map(kernels.double, 500)
            assert ev.stats.inline and ev.stats.workers == 1
            assert np.array_equal(out, x[:500] * 2.0)
        assert ev.pids == []  # a loop of small calls never starts the pool
        # 20 ms a chunk: the first chunk, timed here, says the rest pays on the pool.
        assert ev.reduce(kernels.slow, 40_000) == 40_000.0
        assert not ev.stats.inline and len(ev.pids) == 2
        assert ev.reduce(kernels.slow, 2) == 2.0 and ev.stats.inline  # one chunk: here


def test_a_kernel_error_inline_is_the_kernels(x, profile_dir, no_leaks, monkeypatch):
    from autotune.adapt import BreakEven

    monkeypatch.setattr(BreakEven, "inline", lambda self, n, workers, overhead: True)
    with Evaluator(shared={"x": x}) as ev:
        ev.map(kernels.double, 100)
        ev.map(kernels.double, 100)
        assert ev.stats.inline
        with pytest.raises(ValueError, match="first axis has length stop - start"):
            ev.map(kernels.wrong_length, 1000)
        assert np.array_equal(ev.map(kernels.double, 100), x[:100] * 2.0)


def test_what_was_learned_is_saved_and_found_by_the_next_evaluator(
    x, profile_dir, no_leaks, pool_only
):
    with Evaluator(shared={"x": x}) as ev:
        learner = settle(ev, kernels.heavy_map, N)
        assert learner.refiner.settled
        best = learner.refiner.best
    path = online_path(file_slug(kernel_name(kernels.heavy_map)), probe())
    assert path.parent == profile_dir and path.is_file()
    saved = Profile.load(path)
    assert saved.source == "online" and saved.workload == "kernels:heavy_map"
    assert (saved.workers, saved.chunk_len) == (best.workers, best.chunk_len)
    assert sum(m.repeats for m in saved.measurements) >= 15  # the calls it rests on
    with Evaluator(shared={"x": x}) as ev:
        ev.map(kernels.heavy_map, N)
        learner = next(iter(ev._online.learners.values()))
        assert learner.refiner.settled and learner.refiner.best == best  # from its first call


def test_a_named_profile_is_saved_under_that_name(x, profile_dir, no_leaks, pool_only):
    with pytest.warns(ProfileWarning):  # no profile named 'doubler' yet: the heuristic
        ev = Evaluator(shared={"x": x}, profile="doubler")
    with ev:
        settle(ev, kernels.heavy_map, N)
    assert online_path("doubler", probe()).is_file()


def test_a_corrupt_online_profile_is_refused_with_a_warning(x, profile_dir, no_leaks):
    path = online_path(file_slug(kernel_name(kernels.double)), probe())
    path.write_text("schema: 1\nworkload: !!python/object/apply:os.system ['touch pwned']\n")
    with Evaluator(shared={"x": x}) as ev, pytest.warns(ProfileWarning, match="not used"):
        assert np.array_equal(ev.map(kernels.double, N), x * 2.0)
    assert not Path("pwned").exists()


def test_a_read_only_profile_directory_is_a_warning(x, tmp_path, monkeypatch, no_leaks, pool_only):
    target = tmp_path / "file-not-dir"
    target.write_text("")
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(target / "profiles"))  # cannot be made
    with Evaluator(shared={"x": x}) as ev, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settle(ev, kernels.heavy_map, N)
        assert np.array_equal(ev.map(kernels.double, N), x * 2.0)
    messages = [str(w.message) for w in caught if issubclass(w.category, ProfileWarning)]
    assert len(messages) == 1 and "could not save" in messages[0]


def test_adapt_true_with_dask_says_it_is_not_supported():
    with pytest.raises(ValueError, match="adapt=True is not supported with backend='dask'"):
        Evaluator(backend="dask", address="tcp://127.0.0.1:1", adapt=True)


def test_adapt_must_be_a_bool_or_none():
    with pytest.raises(TypeError, match="adapt must be None, True or False"):
        Evaluator(adapt="yes")


def test_a_measured_profile_is_used_as_is(x, profile_dir, no_leaks):
    from conftest import SHIPPED

    with Evaluator(shared={"x": x}, profile=Profile.load(SHIPPED)) as ev:
        assert not ev.settings.adapt
        ev.map(kernels.double, N)
        assert ev._online is None  # nothing is learned: the profile is used as it is


WRITER = textwrap.dedent(
    """
    import sys
    from autotune import Profile
    from autotune.profile.online import save_online
    from pathlib import Path
    src, dst = Profile.load(sys.argv[1]), Path(sys.argv[2])
    while True:
        save_online(src, dst)
    """
)


def test_writers_killed_mid_write_or_racing_never_leave_a_torn_file(
    tmp_path, profile_dir, pool_only
):
    """Two processes save the same online profile in a loop; one is SIGKILLed at
    random moments; a reader must find the old file or the new one, never less."""
    with Evaluator(shared={"x": np.random.default_rng(0).random(N)}) as ev:
        settle(ev, kernels.heavy_map, N, calls=60)
    (source,) = [p for p in profile_dir.iterdir() if p.name.startswith("online-")]
    target = tmp_path / "shared" / "online-race.yaml"
    target.parent.mkdir()
    target.write_text(source.read_text())
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    writers = [
        subprocess.Popen([sys.executable, str(script), str(source), str(target)], env=env)
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 3.0
        reads = 0
        while time.monotonic() < deadline:
            Profile.load(target)  # raises on a torn file
            reads += 1
            if reads % 50 == 0:
                writers[0].send_signal(signal.SIGKILL)
                writers[0].wait()
                writers[0] = subprocess.Popen(
                    [sys.executable, str(script), str(source), str(target)], env=env
                )
        assert reads > 100
    finally:
        for w in writers:
            w.kill()
            w.wait()
    assert Profile.load(target).source == "online"


def test_show_prints_an_online_profile_with_its_calls(x, profile_dir, pool_only, capsys):
    from autotune.cli import main

    with Evaluator(shared={"x": x}) as ev:
        settle(ev, kernels.heavy_map, N)
    path = online_path(file_slug(kernel_name(kernels.heavy_map)), probe())
    saved = Profile.load(path)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    calls = sum(m.repeats for m in saved.measurements)
    assert out.startswith("kernels:heavy_map: online profile, ")
    assert f"rests on {calls} calls ({saved.best.repeats} at the best point)" in out
