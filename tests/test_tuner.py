"""The tuner: candidates and picking on recorded numbers, and a short real search."""

from __future__ import annotations

import numpy as np
import pytest

from autotune import Workload
from autotune.cli import main
from autotune.cpu import CacheLevel, CpuInfo
from autotune.profile import Measurement, Profile
from autotune.tuner import candidate_workers, chunk_ladder, pick_best, search
from autotune.workloads import get_workload


def cpu(logical=4, physical=2, usable=None, l1d=32 * 1024, l2=256 * 1024):
    return CpuInfo(
        brand="test",
        logical_cpus=logical,
        physical_cores=physical,
        threads_per_core=logical // physical,
        usable_cpus=usable or logical,
        cpu_quota=None,
        caches=(
            CacheLevel(1, "data", l1d, 2, physical),
            CacheLevel(2, "unified", l2, 2, physical),
        ),
    )


def test_candidate_workers():
    assert candidate_workers(cpu()) == [1, 2, 3, 4]  # physical cores and all threads
    assert candidate_workers(cpu(logical=16, physical=8)) == [1, 2, 4, 8, 16]
    assert candidate_workers(cpu(logical=16, physical=8, usable=6)) == [1, 2, 4, 6]
    assert candidate_workers(cpu(), workers=[3, 1, 3]) == [1, 3]


def test_chunk_ladder_powers_of_two_then_unchunked():
    ladder = chunk_ladder(cpu(), item_bytes=16, n=1_000_000, workers=2)
    assert ladder[0] == 16 * 1024 // 16  # half the 32 KiB L1d
    assert ladder[-1] == 500_000  # unchunked: one chunk per worker
    body = ladder[:-1]
    assert all(b == 2 * a for a, b in zip(body, body[1:], strict=False))
    assert body[-1] * 16 < 500_000 * 16
    # tiny n: only the unchunked point
    assert chunk_ladder(cpu(), item_bytes=16, n=100, workers=2) == [50]


def test_chunk_ladder_has_no_repeats_when_items_are_big():
    # 40 KiB items: 16, 32 and 64 KiB chunks would all be 1 item long.
    ladder = chunk_ladder(cpu(), item_bytes=40 * 1024, n=1000, workers=2)
    assert ladder == sorted(set(ladder))
    assert ladder[:3] == [1, 3, 6] and ladder[-1] == 500


def test_planned_runs_count_every_phase_of_auto():
    from autotune.bench import planned_runs

    lanes = {("processes", 1): list(range(9)), ("processes", 2): list(range(8))}
    # screening 3 per lane; coarse 9 // 2 + 1 and 8 // 2 + 1; refine 4; halving 6 + 4 + 4
    assert planned_runs(lanes, "auto") == 6 + (5 + 5) + 4 + 14
    assert planned_runs(lanes, "grid") == 17 * 4


def test_is_tie_within_the_spread():
    from autotune.tuner import is_tie

    best = Measurement(2, 1000, 16000, 100.0, repeats=5, spread=0.1)
    assert is_tie(best, Measurement(2, 500, 8000, 96.0, repeats=5, spread=0.0))
    assert not is_tie(best, Measurement(2, 500, 8000, 90.0, repeats=5, spread=0.0))
    assert is_tie(best, Measurement(2, 500, 8000, 90.0, repeats=5, spread=0.12))


def test_pick_best_prefers_fewer_workers_on_ties():
    ms = [
        Measurement(4, 1000, 16000, 5.0),
        Measurement(2, 1000, 16000, 5.0),
        Measurement(2, 500, 8000, 4.0),
    ]
    assert pick_best(ms) == ms[1]


def square(shared, start, stop):
    return shared.x[start:stop] ** 2


def small_workload():
    x = np.random.default_rng(0).random(200_000)
    return Workload("square", len(x), square, shared={"x": x}, mode="map", item_bytes=16)


@pytest.mark.parametrize("strategy", ["auto", "grid"])
def test_search_measures_with_the_evaluator_and_makes_a_valid_profile(strategy, tmp_path):
    result = search(small_workload(), budget=5, strategy=strategy, workers=[1, 2])
    profile = result.profile
    assert profile.source == "measured" and profile.workload == "square"
    assert profile.best in profile.measurements
    assert {m.workers for m in profile.measurements} == {1, 2}
    assert all(m.throughput and m.throughput > 0 for m in profile.measurements)
    assert all(m.chunk_bytes == m.chunk_len * 16 for m in profile.measurements)
    saved = profile.save(tmp_path / "p.yaml")
    assert Profile.load(saved) == profile  # every number survives the YAML round trip
    assert "best" in result.table()


def test_search_bad_input():
    w = small_workload()
    with pytest.raises(ValueError, match="budget"):
        search(w, budget=0)
    with pytest.raises(ValueError, match="strategy"):
        search(w, strategy="random")
    with pytest.raises(ValueError, match="outside the usable CPUs"):
        search(w, budget=1, workers=[1, 999])
    with pytest.raises(ValueError, match="cpus"):
        search(w, budget=1, cpus=[999])


def test_get_workload_errors():
    assert get_workload("stream", n=1000).n == 1000
    with pytest.raises(ValueError, match="unknown workload"):
        get_workload("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        get_workload("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute"):
        get_workload("os:no_such_thing")
    with pytest.raises(ValueError, match="expected autotune.Workload"):
        get_workload("os:getcwd")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "0"], "--budget"),
        (["--budget", "abc"], "--budget"),
        (["--workload", "nope"], "unknown workload"),
        (["--workers", "1,99"], "--workers"),
        (["--workers", "x"], "--workers"),
        (["--cpus", "999"], "--cpus"),
        (["--out", "/nonexistent-dir/p.yaml"], "does not exist"),
        (["--items", "-3"], "--items"),
    ],
)
def test_cli_search_bad_input(argv, message, capsys):
    assert main(["search", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_search_writes_profile_that_show_reads(tmp_path, capsys):
    out = tmp_path / "stream.yaml"
    argv = ["search", "--workload", "test_tuner:small_workload", "--budget", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best" in printed and str(out) in printed
    assert main(["show", str(out)]) == 0
    assert "square: measured profile" in capsys.readouterr().out


def test_search_covers_both_backends_and_records_the_build(tmp_path):
    result = search(small_workload(), budget=5, strategy="grid", workers=[1, 2])
    profile = result.profile
    backends = {m.backend for m in profile.measurements if m.repeats == 3}
    assert backends == {"processes", "threads"}
    assert profile.backend == (profile.best.backend or "processes")
    assert set(profile.python) == {"version", "gil"}
    assert Profile.load(profile.save(tmp_path / "p.yaml")) == profile
    assert "thr" in result.table()
    only = search(small_workload(), budget=3, workers=[2], backends=("processes",))
    assert {m.backend for m in only.profile.measurements} == {None}
    with pytest.raises(ValueError, match="backends"):
        search(small_workload(), budget=1, backends=("mpi",))


def test_search_counts_bytes_per_item_as_the_evaluator_does():
    """A Workload without item_bytes: the rows of its shared arrays of length n, as an
    Evaluator with the same data infers them (not the 16 B default)."""
    import kernels

    from autotune import Workload, search
    from autotune.profile import item_bytes_of

    shared = {"rows": np.zeros((4000, 300)), "small": np.zeros(7)}
    workload = Workload("rows", 4000, kernels.count_items, shared)
    profile = search(workload, budget=1.0, workers=[1], backends=("processes",)).profile
    assert profile.item_bytes == item_bytes_of(shared, 4000) == 300 * 8
