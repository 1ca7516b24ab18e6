"""The evaluator tuning itself: inline small calls, online profiles, reproducibility.

Nothing here times anything against a target: the tests pin the decisions
(which calls ran inline, what was saved and found again, which settings
were left alone) and that every result equals the serial one.
``scripts/bench_adapt.py`` measures what the decisions are worth.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
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

import autotune.online
from autotune import Evaluator, Profile, ProfileWarning
from autotune.backends.schedule import MEASURED, plan_chunks
from autotune.backends.shared import SharedNamespace
from autotune.breakeven import TINY_S, BreakEven, PoolCost
from autotune.cpu import probe
from autotune.engine import KEPT_REPEATS
from autotune.online import PROBE_ITEMS
from autotune.profile import Measurement
from autotune.profile.online import (
    MAX_POINTS,
    file_slug,
    kernel_name,
    online_path,
    online_profile,
)

N = 200_000


@pytest.fixture
def x():
    return np.random.default_rng(7).random(N)


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path))
    return tmp_path


def serial_sum(kernel, x, chunk_len, workers):
    ns = SharedNamespace({"x": x})
    total = None
    for start, stop in kernels.ranges_of(len(x), workers, chunk_len):
        part = kernel(ns, start, stop)
        total = part if total is None else total + part
    return total


@pytest.fixture
def pool_only(monkeypatch):
    """Every call on the pool: what settles must not hang on the machine's load,
    which moves the break-even (tested on its own above)."""
    monkeypatch.setattr(BreakEven, "inline", lambda self, n, workers, overhead: False)


@pytest.fixture
def quiet_machine(monkeypatch):
    """Every run counts: what other processes do to the CPUs is not looked at (a test that
    counts runs must not depend on the machine's load)."""
    from replay import QuietMachine

    monkeypatch.setattr(autotune.online, "CpuMeter", QuietMachine)


#: What every kernel is timed at under ``scripted_cost``: 1 us an item.
COST = 1e-6


@pytest.fixture
def scripted_cost(monkeypatch):
    """Every kernel timing handed to the break-even (an inline call's, the workers' busy
    time) becomes ``COST`` an item, so which calls run inline no longer depends on the
    machine's load.  Gives the list of timings handed over, as ``(items, inline)``."""
    given: list[tuple[int, bool]] = []
    measured = BreakEven.kernel_time

    def scripted(self, items, seconds, *, inline):
        given.append((items, inline))
        measured(self, items, items * COST, inline=inline)

    monkeypatch.setattr(BreakEven, "kernel_time", scripted)
    return given


def settle(ev, kernel, n, calls=80):
    for _ in range(calls):
        ev.map(kernel, n)


#: Map calls a refiner may take to settle: the engine's strategy asks for a bounded number
#: of runs (about 25 for one lane; two lanes when the pool has four workers or more), one
#: per call or slice of a call.  A bound against a hang, not a measure of speed.
SETTLE_CALLS = 200


def until_saved(ev, kernel, n, path):
    """Map calls until the evaluator has saved what it learned (it does on the call that
    settles): how many that takes follows from the engine's strategy, not from the load.
    Returns the profile saved and the number of calls made."""
    for calls in range(1, SETTLE_CALLS + 1):
        ev.map(kernel, n)
        if path.is_file():
            return Profile.load(path), calls
    pytest.fail(f"nothing saved to {path} after {SETTLE_CALLS} calls")


def test_explicit_settings_do_not_adapt_and_repeat_to_the_bit(x, profile_dir, no_leaks):
    with Evaluator(2, 3000, shared={"x": x}) as ev:
        first = ev.reduce(kernels.exp_sum, N)
        for _ in range(5):
            assert ev.reduce(kernels.exp_sum, N) == first  # adapt=None: explicit, left alone
            assert ev.stats.chunk_len == 3000 and not ev.stats.inline
        workers = ev.workers
    assert first == serial_sum(kernels.exp_sum, x, 3000, workers)
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
    expected = serial_sum(kernels.heavy_sum, x, N, 1)
    assert all(abs(r - expected) <= 1e-9 * abs(expected) for r in results)


def test_small_calls_run_inline_and_start_no_worker(x, profile_dir, no_leaks, scripted_cost):
    # Two workers whatever this machine has: with one, the pool never pays.
    with Evaluator(2, shared={"x": x}, adapt=True) as ev:
        # Before the pool has started, a call is taken to cost its prior beyond the
        # kernel (the start spread over calls, and a call): at COST an item it pays
        # from n_star items on.
        n_star = PoolCost(ev.workers).per_call() / (COST * (1 - 1 / ev.workers))
        small = int(n_star / 8)
        for _ in range(3):
            out = ev.map(kernels.double, small)
            assert ev.stats.inline and ev.stats.workers == 1
            assert np.array_equal(out, x[:small] * 2.0)
        assert ev.pids == []  # a loop of small calls never starts the pool
        # The kernel, never seen before, was timed here first, on its first items.
        assert scripted_cost[0] == (PROBE_ITEMS, True)
        assert 10 * n_star < N  # N items pay for the pool
        assert np.array_equal(ev.map(kernels.double, N), x * 2.0)
        assert not ev.stats.inline and len(ev.pids) == ev.workers
        assert any(not inline for _, inline in scripted_cost)  # the workers' time counted
        # Less kernel work than any pool round trip: here, whatever the pool cost.
        assert 10 * COST < TINY_S
        assert np.array_equal(ev.map(kernels.double, 10), x[:10] * 2.0) and ev.stats.inline


def _memory_of(array: np.ndarray) -> object:
    """What ``array``'s memory belongs to, past every view."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_a_first_call_on_the_pool_is_the_pools_output_with_the_probes_rows(
    backend, profile_dir, no_leaks, pool_only
):
    """A map kernel never seen: its first items run here, the rest on the pool, which
    writes them into an output with a row for every item of the call; the probe's rows
    are copied into it.  The result is that shared output, not a join of two arrays (a
    copy of the whole output, on a memory-bound kernel's first call)."""
    n = 300_000
    x = np.random.default_rng(3).random(n)
    with Evaluator(shared={"x": x, "spin": 0.0}, backend=backend) as ev:
        rows = ev.map(kernels.hash_rows, n)
        assert not ev.stats.inline and ev.stats.n == n
        assert np.array_equal(rows, kernels.hash_rows(SharedNamespace({"spin": 0.0}), 0, n))
        assert isinstance(_memory_of(rows), mmap.mmap)
        doubled, idx = ev.map(kernels.dist_idx, n)  # a new kernel: probed again
        want_doubled, want_idx = kernels.dist_idx(SharedNamespace({"x": x}), 0, n)
        assert np.array_equal(doubled, want_doubled) and np.array_equal(idx, want_idx)
        assert isinstance(_memory_of(doubled), mmap.mmap)
        del rows, doubled, idx


_BUFFERS: dict[int, np.ndarray] = {}


def doubled_into_a_kept_buffer(shared, start, stop):
    """A kernel that keeps one output array per length and returns it (found in a review):
    its result is overwritten by its next call of the same length."""
    out = _BUFFERS.get(stop - start)
    if out is None:
        out = _BUFFERS[stop - start] = np.empty(stop - start)
    return np.multiply(shared.x[start:stop], 2.0, out=out)


@pytest.mark.parametrize("n", [2064, 5000])
def test_a_first_call_keeps_its_probes_rows_from_a_kernel_that_reuses_its_output(
    n, profile_dir, no_leaks
):
    """The probe's slices run here, one after another, 64 items and 64 more: a kernel that
    returns the same array for both must not leave the first slice's rows overwritten."""
    x = np.arange(float(n))
    _BUFFERS.clear()
    with Evaluator(2, shared={"x": x}, adapt=True) as ev:
        assert np.array_equal(ev.map(doubled_into_a_kept_buffer, n), x * 2.0)


def test_a_call_run_here_in_slices_refuses_rows_of_another_dtype(
    profile_dir, no_leaks, monkeypatch
):
    """A first call run whole in this process (probe slices, then the rest, whatever the
    machine's timing): a slice whose rows have another dtype is refused with the items, as
    on the pool (not upcast)."""
    from autotune.backends.rows import ResultError

    monkeypatch.setattr(BreakEven, "inline", lambda self, n, workers, overhead: True)

    with (
        Evaluator(2, shared={}, adapt=True) as ev,
        pytest.raises(ResultError, match=r"items \[64, \d+\).*same row shape and dtype"),
    ):
        ev.map(kernels.changing_dtype, 300)


def test_a_kernel_slow_per_chunk_pays_for_the_pool_from_its_first_call(profile_dir, no_leaks):
    """20 ms a chunk: the first chunk, timed here, says the rest pays on the pool (a busy
    machine can only make that chunk look slower, which says it all the more)."""
    with Evaluator(2, shared={"delay": 0.02}, adapt=True) as ev:
        assert ev.reduce(kernels.slow, 40_000) == 40_000.0
        assert not ev.stats.inline and len(ev.pids) == ev.workers
        assert ev.reduce(kernels.slow, 2) == 2.0 and ev.stats.inline  # one chunk: here


def test_a_kernel_error_inline_is_the_kernels(x, profile_dir, no_leaks, monkeypatch):
    from autotune.breakeven import BreakEven

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
    path = online_path(file_slug(kernel_name(kernels.heavy_map)), probe())
    assert path.parent == profile_dir
    with Evaluator(shared={"x": x}) as ev:
        saved, calls = until_saved(ev, kernels.heavy_map, N, path)
        assert not ev.stats.exploring  # the call that settled ran at a settled point
    assert saved.source == "online" and saved.workload == "kernels:heavy_map"
    assert not saved.exploring and saved.sessions == 1
    # Each point's repeats: its runs (the first call's inline probe and the warm-up are
    # not runs); the best was confirmed by several.
    assert sum(m.repeats for m in saved.measurements) < calls, saved.measurements
    assert all(len(m.runs) == m.repeats for m in saved.measurements)
    assert saved.best.repeats >= KEPT_REPEATS, saved.best
    best = Profile.load(path).best  # as closing the evaluator left it
    before = path.read_bytes()
    with Evaluator(shared={"x": x}) as ev:
        ev.map(kernels.heavy_map, N)
        assert not ev.stats.exploring and not ev.stats.inline  # settled from its first call
        planned = plan_chunks(N, best.workers, best.chunk_len, MEASURED).chunk_len
        assert (ev.stats.workers, ev.stats.chunk_len) == (best.workers, planned)
    assert path.read_bytes() == before  # a call that confirms the file does not rewrite it


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
        chunks = set()
        for _ in range(5):
            ev.map(kernels.double, N)
            assert not ev.stats.exploring
            chunks.add(ev.stats.chunk_len)
        assert len(chunks) == 1  # the profile's point, every call
    assert not list(profile_dir.iterdir())  # nothing is learned: the profile is used as it is


WRITER = textwrap.dedent(
    """
    import dataclasses, sys
    from pathlib import Path
    from autotune import Profile
    from autotune.profile.online import save_online
    src, dst, tag = Profile.load(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    mine = dataclasses.replace(src, n=tag)  # tells the reader whose file it found
    while True:
        save_online(mine, dst)
    """
)
#: The race runs until the writer that is killed was seen writing, then killed, this many
#: times, and the reader found a new file this many times: counts of what happened, however
#: long a busy machine takes for them.  The deadline only stops a hang.
KILLS, REPLACED, RACE_DEADLINE_S = 5, 50, 300


def test_writers_killed_mid_write_or_racing_never_leave_a_torn_file(tmp_path):
    """Two processes save the same online profile in a loop; one is SIGKILLed at random
    moments once it is seen writing, and started again; a reader must find the old file or
    the new one, never less."""
    best = Measurement(2, 4096, 32768, 1e8, repeats=3, backend="processes")
    profile = online_profile(
        "kernels:heavy_map", probe(), best, [best], backend="processes", item_bytes=8, n=N
    )
    source = tmp_path / "source.yaml"
    profile.save(source)
    target = tmp_path / "shared" / "online-race.yaml"
    target.parent.mkdir()
    shutil.copy(source, target)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def writer(tag: int) -> subprocess.Popen:
        args = [sys.executable, str(script), str(source), str(target), str(tag)]
        return subprocess.Popen(args, env=env)

    rng = random.Random(0)
    # Writer 1 runs throughout; the others (tags 2, 3, ...) are killed in turn, each once it
    # was seen writing, while the next one is already starting.
    tag, writers = 2, [writer(1), writer(2), writer(3)]
    kills = replaced = 0
    last, countdown = None, None
    deadline = time.monotonic() + RACE_DEADLINE_S
    try:
        while kills < KILLS or replaced < REPLACED:
            assert time.monotonic() < deadline, f"a hang? {kills} kills, {replaced} new files"
            found = Profile.load(target)  # raises on a torn file
            assert found.source == "online" and found.best == best
            stamp = os.stat(target)
            replaced += (stamp.st_ino, stamp.st_mtime_ns) != last
            last = (stamp.st_ino, stamp.st_mtime_ns)
            if countdown is None and found.n == tag:
                countdown = rng.randrange(20)  # it writes: kill it a few reads later
            elif countdown is not None:
                countdown -= 1
            if countdown == 0:
                victim = writers.pop(1)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                kills, tag, countdown = kills + 1, tag + 1, None
                writers.append(writer(tag + 1))
    finally:
        for w in writers:
            w.kill()
            w.wait()
    assert Profile.load(target).best == best


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
    if saved.exploring:  # settled, then found the kernel slower and explores again
        assert f"exploring: {len(saved.measurements)} points measured over 1 program run" in out
    else:
        assert f"rests on {calls} calls over 1 program run ({saved.best.repeats} at the" in out


def test_an_evaluator_closed_while_exploring_saves_what_it_measured(
    x, profile_dir, no_leaks, pool_only, quiet_machine
):
    """A script's two calls are not enough to settle: what they measured is saved when the
    evaluator closes, and the next evaluator goes on from it (a run counts once)."""
    path = online_path(file_slug(kernel_name(kernels.heavy_map)), probe())
    expected = kernels.heavy_map(SharedNamespace({"x": x}), 0, N)
    runs = []
    for session in (1, 2, 3):
        with Evaluator(shared={"x": x}) as ev:
            for _ in range(2):
                assert np.array_equal(ev.map(kernels.heavy_map, N), expected)
        saved = Profile.load(path)
        assert saved.sessions == session
        runs.append(sum(m.repeats for m in saved.measurements))
    assert saved.exploring or saved.best.repeats >= KEPT_REPEATS
    assert runs[0] >= 1 and runs[0] < runs[1] < runs[2], runs  # every session added runs


EXITS = textwrap.dedent(
    """
    import numpy as np, kernels
    from autotune import Evaluator
    ev = Evaluator(shared={"x": np.linspace(0.0, 1.0, %d)})
    ev.map(kernels.heavy_map, %d)
    ev.map(kernels.heavy_map, %d)
    # no close(): the program just ends
    """
)


def test_an_evaluator_never_closed_saves_when_the_program_exits(tmp_path, profile_dir):
    script = tmp_path / "script.py"
    big = 10 * N  # tens of ms of work per call: the pool pays, whatever the load
    script.write_text(EXITS % (big, big, big))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    saved = Profile.load(online_path(file_slug(kernel_name(kernels.heavy_map)), probe()))
    assert saved.sessions == 1 and sum(m.repeats for m in saved.measurements) >= 1


MERGER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from autotune.cpu import probe
    from autotune.profile.online import Learned, save_learned
    path, tag, saves = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for i in range(saves):
        run = {(tag, 1000 + i): [1000.0 * tag + i]}  # this process's i-th run, recognisable
        learned = Learned("kernels:merged", "processes", 8, 100000, (tag, 1000), True,
                          fresh=run, known=run, first=i == 0)
        assert save_learned(learned, probe(), path)
    """
)


def test_evaluators_saving_at_once_lose_no_run(tmp_path, profile_dir):
    """Processes that save the same online profile at the same time: every run of every
    process is in the file at the end, and every process counts as a session."""
    writers, saves = 3, 15  # 45 points of one run each: within what a file keeps
    assert writers * saves <= MAX_POINTS
    path = online_path(file_slug("kernels:merged"), probe())
    script = tmp_path / "merger.py"
    script.write_text(MERGER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [
        subprocess.Popen([sys.executable, str(script), str(path), str(tag), str(saves)], env=env)
        for tag in range(1, writers + 1)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * writers
    saved = Profile.load(path)
    runs = sorted(run for m in saved.measurements for run in m.runs)
    assert runs == sorted(1000.0 * tag + i for tag in range(1, writers + 1) for i in range(saves))
    assert saved.sessions == writers and saved.exploring


def test_show_prints_an_exploring_profile_as_exploring(profile_dir, capsys):
    from autotune.cli import main
    from autotune.profile.online import Learned, save_learned

    path = online_path(file_slug("kernels:shown"), probe())
    runs = {(2, 4096): [4.0e7, 4.2e7, 4.1e7], (2, 8192): [3.0e7], (1, 4096): [2.2e7]}
    for _ in range(3):  # three programs, each saving the same runs once
        learned = Learned(
            "kernels:shown", "processes", 8, 100000, (2, 4096), True, runs, runs, first=True
        )
        assert save_learned(learned, probe(), path)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    # Three saves of the same runs: 5 runs each time, three program runs.
    assert out[1] == (
        "exploring: 3 points measured over 3 program runs (15 calls), best so far 2 x 4096 "
        "at 41.0 M items/s, spread 5%"
    ), out[1]
