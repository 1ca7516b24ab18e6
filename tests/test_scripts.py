"""The benchmark scripts run end to end at the tiniest sizes and agree with serial.

They are run as a user runs them (``python scripts/NAME.py``) in a fresh
interpreter; nothing here times anything, it only checks that every form and
every peer ran, that each result matched the serial one, and that a script
leaves nothing in the temp directory (each runs with a ``TMPDIR`` of its own).
"""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing as mp
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import autotune

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TINY_SPLINE = ["--points", "2000", "--splines", "2", "--quick", "--repeats", "1"]


def usable_cpus() -> int:
    """Every contender's workers in the scripts, unless ``--workers`` says otherwise."""
    return autotune.probe().usable_cpus or 1


def run_script(
    name: str, *args: str, timeout: float = 120, leaves_nothing: bool = True
) -> subprocess.CompletedProcess:
    """Run ``scripts/name`` with ``args``; with ``leaves_nothing``, check that the script
    left nothing in its temp directory (``TMPDIR``, given by :func:`no_user_profiles`)."""
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if leaves_nothing:
        left = sorted(p.name for p in Path(os.environ["TMPDIR"]).iterdir())
        assert not left, f"{name} left {left} in the temp directory\n{done.stderr}"
    return done


@pytest.fixture(autouse=True)
def no_user_profiles(tmp_path, monkeypatch, child_tmpdir):
    # The scripts look profiles up like any program: keep the developer's own out.
    monkeypatch.delenv("AUTOTUNE_PROFILE", raising=False)
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    # And a temp directory of their own: what a script leaves there is seen (run_script).
    monkeypatch.setenv("TMPDIR", str(child_tmpdir))


def test_reproduce_seed_tiny():
    done = run_script("reproduce_seed.py", *TINY_SPLINE)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    rows = [line for line in out.splitlines() if re.search(r"\d\.\d+x +\d+\.\d{3} ", line)]
    # serial, do_multi x2, accepted x2, follow-up x5 (2 proc), autotune
    assert len(rows) == 11, out
    assert all(line.rstrip().endswith("OK") for line in rows), out
    assert "MISMATCH" not in out
    assert "autotune row: " in out
    assert "published (Intel i3-3227U, from the seed)" in out
    # The seed's process counts on purpose, whatever this machine has, and it says so.
    here = f"this machine has {usable_cpus()} usable CPUs"
    assert f"Process counts: the seed's (1-3), on purpose, beside the i3's table; {here}" in out
    assert re.search(r"^3 +(\d+\.\d\d +){5}\|", out, re.M), out  # the measured table's last row


def test_reproduce_seed_json_and_profile_file():
    shipped = SCRIPTS.parent / "profiles" / "i3-3227u-spline.yaml"
    done = run_script("reproduce_seed.py", *TINY_SPLINE, "--json", "--profile", str(shipped))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert all(f["agrees"] for f in report["forms"])
    assert report["autotune"]["source"].startswith("profile file")
    assert report["autotune"]["chunk_len"] == 7812  # the published best: 125K chunks
    assert set(report["table_here"]) == {"1", "2", "3"}


def test_reproduce_seed_bad_profile(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: 99\n")
    done = run_script("reproduce_seed.py", *TINY_SPLINE, "--profile", str(bad))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_bench_peers_tiny():
    done = run_script(
        "bench_peers.py",
        *TINY_SPLINE,
        "--stream-items",
        "20000",
        "--wide-items",
        "3000",
        "--loop-items",
        "2000",
        "--calls",
        "3",
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "MISMATCH" not in out and "FAILED" not in out, out
    rows = [line for line in out.splitlines() if re.search(r" \d+\.\d{4} ", line)]
    # per workload: serial, autotune, 4 peers per split (2 splits except the loop),
    # and the chunked serial for stream; peers that are not installed print "skipped"
    skipped = out.count("skipped (")
    assert len(rows) + skipped == 10 + 11 + 10 + 6, out
    assert all(re.search(r"\bOK\b", line) for line in rows), out
    for title in ("1. spline", "2. stream", "3. wide", "4. loop", "Targets"):
        assert title in out
    assert f"\n{usable_cpus()} workers for every peer (the usable CPUs;" in out, out


def test_bench_peers_json():
    done = run_script(
        "bench_peers.py",
        *TINY_SPLINE,
        "--workloads",
        "stream,loop",
        "--stream-items",
        "5000",
        "--loop-items",
        "500",
        "--calls",
        "2",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["workloads"]) == {"stream", "loop"}
    assert report["workers"] == usable_cpus() and report["workers_from"].startswith("the usable")
    for case in report["workloads"].values():
        for row in case["results"]:
            assert row.get("agrees") or "skipped" in row, row
    assert [t["target"] for t in report["targets"]] == ["stream: autotune >= 15x unchunked serial"]


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def rows_of(out: str, names: list[str], value: str) -> dict[str, str]:
    """The line of each contender ``name`` whose figure matches ``value``, by name."""
    found = {}
    for name in names:
        match = re.search(rf"^ +{re.escape(name)} +({value})", out, re.M)
        assert match, f"no row {name!r} with {value!r} in:\n{out}"
        found[name] = match.group(1)
    return found


def test_bench_evaluator_quick():
    done = run_script(
        "bench_evaluator.py", "--quick", "--mib", "8", "--tasks", "200", "--repeats", "1"
    )
    assert done.returncode == 0, done.stderr  # a PSS child also checks its reduce's sum
    out = done.stdout
    peers = {
        "joblib(batch_size=1)": "joblib",
        "joblib(batch_size=auto)": "joblib",
        "mpire(chunk_size=1)": "mpire",
    }
    overhead = rows_of(
        out,
        [
            "autotune Evaluator.reduce(chunk_len=1)",
            "Pool.imap(chunksize=1)",
            "Pool.apply_async",
            "ProcessPoolExecutor.map",
            *peers,
        ],
        r"\d+\.\d\d +\d+\.\d{3}x|skipped \(not installed\)",
    )
    for name, figure in overhead.items():
        # A peer is skipped only where it is not installed (CI installs [bench]).
        assert figure.startswith("skipped") == (name in peers and not installed(peers[name]))
    methods = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
    rows_of(
        out,
        [f"{m}{suffix}" for m in methods for suffix in ("", " + autotune.shared_array")],
        r"\d+\.\d\dx$",
    )
    rows_of(out, [f"{who} {m}" for m in methods for who in ("autotune", "Pool")], r"\d+\.\d ms")
    workers = usable_cpus()
    assert out.startswith(f"{workers} workers for every contender (the usable CPUs;"), out
    assert f"1. Per-chunk overhead, empty kernel, {workers} workers," in out


def test_bench_tuner_quick():
    done = run_script("bench_tuner.py", "--quick", "--items", "4096", "--budget", "2")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for workload in ("stream", "spline"):
        sections = re.findall(rf"^{workload}: 4096 items per timed run\n((?:  .*\n?)+)", out, re.M)
        assert len(sections) == 1, out
        section = sections[0]
        for strategy, label in (("grid", "best"), ("auto", "pick")):
            runs = re.search(
                rf"^  {strategy} +\d+\.\d s +(\d+) runs  {label} \d+ workers", section, re.M
            )
            assert runs and int(runs.group(1)) > 0, out
        # Both picks were timed head to head; auto's is in the grid's table unless the
        # grid's 2 s ran out before it got there (a busy machine).
        ratios = re.search(
            r"grid best: (\S+) head to head, (?:(\S+) in the grid's table|not timed by the grid "
            r"\(its budget ran out first\))",
            section,
        )
        assert ratios and all(math.isfinite(float(r)) for r in ratios.groups() if r), out
        assert re.search(r"auto time / grid time: \d+\.\d{3}", section), out
        assert re.search(r"heuristic \(\d+ workers x \d+ items\) / best: \d+\.\d{3}", section), out


def test_bench_backends_quick():
    done = run_script("bench_backends.py", "--quick", "--budget", "0.5")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    sections = dict(re.findall(r"^(\w+) \(n=\d+\).*\n((?:  .*\n?)+)", out, re.M))
    assert set(sections) == {"stream", "spline", "ndimage"}, out
    threads = usable_cpus()  # what the script gives the executor
    contenders = [
        "serial",
        f"ThreadPoolExecutor({threads}), {4 * threads} chunks",
        "autotune processes (tuned)",
        "autotune threads (tuned)",
    ]
    for section in sections.values():
        # Every contender ran, and its result matched the serial one.
        rows_of(section, contenders, r"\d+\.\d{4} s +\d+\.\d\dx  OK$")
        for backend in ("processes", "threads"):
            assert re.search(rf"tuned {backend}: \d+ workers x \d+ items", section), out
        assert re.search(r"picks: (processes|threads), \d+ workers x \d+ items", section), out
    assert "DIFFERS" not in out


def test_bench_dask_quick():
    pytest.importorskip("distributed")
    # Not checked for leftovers: distributed keeps its workers' dask-scratch-space in the
    # temp directory (distributed's own, not the script's; not installed where this was written).
    done = run_script(
        "bench_dask.py", "--quick", "--budget", "1", "--repeats", "1", leaves_nothing=False
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    sections = dict(re.findall(r"^(\w+) \(n=\d+\).*\n((?:  .*\n?)+)", out, re.M))
    assert set(sections) == {"stream", "spline"}, out
    workers = usable_cpus()  # the cluster's, four blocks or tasks each
    assert f"LocalCluster(processes=True, n_workers={workers}," in out, out
    contenders = [
        "serial (this process)",
        f"dask.array, {4 * workers} blocks",
        "dask.array, chunks='auto'",
        f"client.map, scattered, {4 * workers} tasks",
        "autotune dask, heuristic",
        "autotune dask, tuned",
    ]
    for section in sections.values():
        rows_of(section, contenders, r".*\d+\.\d{4} s +\d+\.\d\dx +\d+\.\d\dx  OK$")
        assert re.search(r"tuned: \d+ tasks in flight x \d+ items per chunk", section), out
    assert "DIFFERS" not in out


def test_bench_repeatable_smoke():
    done = run_script(
        "bench_repeatable.py",
        *("--workload", "horner", "--searches", "2", "--budget", "0.5"),
        *("--rounds", "1", "--n", "20000"),
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert len(re.findall(r"^  search [AB]: ", out, re.M)) == 2, out
    ratios = re.findall(r"^    [AB]  .* items/s  (\d\.\d{3})$", out, re.M)
    assert len(ratios) == 2 and max(float(r) for r in ratios) == 1.0, out
    assert "worst pick over all workloads" in out


def test_bench_adapt_quick():
    """Every workload's three ratios, the per-call table and the loop line are printed."""
    done = run_script("bench_adapt.py", "--quick", "--calls", "6", timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    ratio = r"\d+\.\d\d"
    for workload in ("spline", "stream", "ndimage", "horner", "rows"):
        row = rf"^{workload} +\d+ x \d+ +{ratio} +{ratio} +{ratio}$"
        assert re.search(row, out, re.M), out
        assert re.search(rf"^  {workload} +[+-]\d+\.\d%", out, re.M), out
    for n in (1000, 10000, 100000, 1000000):
        assert re.search(rf"^ +{n} +\d+\.\d{{3}} +\d+\.\d{{3}} +{ratio} +\d+/\d+$", out, re.M), out
    assert re.search(r"^loop: 20 maps of 100000 values.* = \d+\.\d\dx$", out, re.M), out


def test_bench_tail_tiny():
    # Two workers whatever the cores: 20000 items in 5 chunks leave a last chunk
    # long enough to cut (on 16 workers, 33 chunks of 607 leave 576 items: too few).
    args = ["--n", "20000", "--k", "2", "--workers", "2", "--repeats", "1"]
    done = run_script("bench_tail.py", *args)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if " s  x" in line]
    assert len(rows) == 4 and "WRONG" not in done.stdout, done.stdout
    # The planner cut the odd count to a multiple of the workers.
    planned = next(line for line in rows if "planned" in line)
    workers = int(re.search(r"items, (\d+) workers", done.stdout).group(1))
    assert int(planned.split()[1]) % workers == 0, done.stdout
    # An explicit length's last chunk went to the idle workers in pieces; without
    # the tail, the odd count ran as it was.
    odd = 2 * workers + 1
    exact = next(line for line in rows if line.split()[:2] == ["exact", str(odd)])
    no_tail = next(line for line in rows if line.split()[:3] == ["no", "tail", str(odd)])
    assert int(no_tail.split()[3]) == odd < int(exact.split()[2]), done.stdout
    assert re.search(rf"plan: {odd - 1} chunks of \d+, then \d+ pieces of", done.stdout)
    for row in rows:
        assert re.search(rf"x\d+\.\d{{3}} of exact {odd - 1}$", row), row


def test_bench_runs_smoke():
    """A script run as separate processes with one profile directory: per-run ratios and
    the online profile's state after each zero-config run."""
    done = run_script("bench_runs.py", "--quick", "--runs", "2", "--only", "stream", timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"^stream: best fixed \d+ x \d+$", out, re.M), out
    for row in ("process", "calls"):
        assert re.search(rf"^  {row} +\d+\.\d\d +\d+\.\d\d$", out, re.M), out
    # The first zero-config run saved what it measured: the second found a profile.
    assert re.search(r"^  profile +[es] +[es]$", out, re.M), out


def test_bench_adapt_grid_stays_bounded_on_many_cores(monkeypatch):
    from replay import many_cores

    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_adapt

    per_count = len(bench_adapt.CHUNK_BYTES) + 1  # and unchunked
    two = bench_adapt.grid_points(many_cores(2), 1 << 22, 8)
    assert sorted({w for w, _ in two}) == [1, 2]  # every count, as on the 2-core VM
    wide = bench_adapt.grid_points(many_cores(64), 1 << 22, 8)
    counts = sorted({w for w, _ in wide})
    assert counts == [1, 2, 4, 8, 16, 32, 64]  # not 64 counts
    assert len(wide) <= len(counts) * per_count
    for workers, chunk_len in wide:
        assert 1 <= chunk_len <= -(-(1 << 22) // workers)


@pytest.mark.slow
def test_bench_manycore_quick_prints_every_part_and_writes_a_landscape(tmp_path):
    from replay import Landscape

    path = tmp_path / "landscape.json"
    done = run_script(
        "bench_manycore.py",
        *("--quick", "--budget", "5", "--splines", "2", "--landscape", str(path)),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    workers = usable_cpus()
    assert f"1. Per-chunk overhead, empty kernel, {workers} workers," in out, out
    us = r"\d+\.\d\d us +\d+\.\d{3}x"
    rows_of(out, ["autotune Evaluator.reduce(chunk_len=1)", "Pool.imap(chunksize=1)"], us)
    assert f"; {workers} workers for every contender" in out, out
    # The zero-config calls one by one: a ratio and a setting for each of the 8 quick calls.
    calls = re.search(
        r"the setting each call ran\n +((?:\d+\.\d\d ?){8})\n +(.*)\(\* exploring\)", out
    )
    assert calls, out
    assert all(re.fullmatch(r"inline|\d+x\d+\*?", s) for s in calls.group(2).split()), out
    ours = ["serial", "Pool over ranges of 7812", "autotune zero-config, after its calls"]
    ours.append("autotune, its search's pick")
    rows_of(out, ours, r"\d+\.\d{3} s +\d+\.\d\dx serial +\d+\.\d\d vs Pool$")
    peers = {
        "mpire over ranges of 7812": "mpire",
        "Pool, one task per spline": "multiprocessing",
        "joblib, one task per spline": "joblib",
        "mpire, one task per spline": "mpire",
    }
    for name, module in peers.items():
        ran = re.search(rf"^ +{re.escape(name)} +\d+\.\d{{3}} s .* vs Pool$", out, re.M)
        assert bool(ran) == installed(module), out
    assert "MISMATCH" not in out
    for kernel in ("tail", "loop", "wide"):
        row = rf"^ +{kernel} +\d+ +\d+ x \d+ +\d+ +\d+\.\d\d +\d+\.\d\d +[+-]\d+\.\d%$"
        assert re.search(row, out, re.M), out
        # The grid, as a landscape the replay tests can read: 3 timed calls a point.
        landscape = Landscape.load(path, kernel)
        assert landscape.cpu.logical_cpus == autotune.probe().logical_cpus
        assert landscape.points and all(len(s) == 3 for s in landscape.points.values())
        assert {w for w, _ in landscape.points} <= set(range(1, workers + 1))
    assert f"landscape written to {path}" in out
