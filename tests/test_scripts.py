"""The benchmark scripts run end to end at the tiniest sizes and agree with serial.

They are run as a user runs them (``python scripts/NAME.py``) in a fresh
interpreter; nothing here times anything, it only checks that every form and
every peer ran, and that each result matched the serial one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TINY_SPLINE = ["--points", "2000", "--splines", "2", "--quick", "--repeats", "1"]


def run_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def no_user_profiles(tmp_path, monkeypatch):
    # The scripts look profiles up like any program: keep the developer's own out.
    monkeypatch.delenv("AUTOTUNE_PROFILE", raising=False)
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


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
    for case in report["workloads"].values():
        for row in case["results"]:
            assert row.get("agrees") or "skipped" in row, row
    assert [t["target"] for t in report["targets"]] == ["stream: autotune >= 15x unchunked serial"]
