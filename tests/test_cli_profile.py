"""``autotune show`` and ``autotune recommend``: output, exit codes, one-line errors."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
from conftest import I3, ROOT, SHIPPED

import autotune.profile.lookup as profile_mod
from autotune.cli import main
from autotune.cpu import CacheLevel, CpuInfo

I3_SYSFS = ROOT / "tests" / "fixtures" / "sysfs" / "i3-3227u"

OTHER = CpuInfo(
    brand="Other",
    logical_cpus=2,
    physical_cores=2,
    threads_per_core=1,
    usable_cpus=2,
    cpu_quota=None,
    caches=(CacheLevel(2, "unified", 2 << 20, 1, 2),),
)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Only the shipped profiles/ are searched; nothing from the developer's home."""
    monkeypatch.delenv("AUTOTUNE_PROFILE", raising=False)
    monkeypatch.delenv("AUTOTUNE_PROFILE_DIR", raising=False)
    monkeypatch.setattr(profile_mod, "user_profile_dir", lambda: tmp_path / "no-user-dir")
    monkeypatch.setattr(profile_mod, "shipped_profile_dir", lambda: SHIPPED.parent)


def fake_probe(monkeypatch, cpu):
    seen = []

    def probe(sysfs_root=None):
        seen.append(sysfs_root)
        return cpu

    monkeypatch.setattr(importlib.import_module("autotune.cpu"), "probe", probe)
    return seen


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, command, *fragments):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"autotune {command}: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


# ---------------------------------------------------------------------------
# show
# ---------------------------------------------------------------------------


def test_show_prints_the_table_and_best_point(capsys):
    code, out, err = run(capsys, "show", str(SHIPPED))
    assert code == 0 and err == ""
    assert "      2    4.28*   1.96    1.30    1.31" in out
    assert "best    4.28 M items/s: 2 workers, chunk_len 7812 (125000 bytes)" in out
    assert "speedup 5.22x vs serial, unchunked" in out


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("schema: 2\n", "unknown schema 2"),
        ("schema: [1\n", "YAML syntax error at line"),
        ("!!python/object/apply:os.system ['true']\n", "refused YAML tag"),
    ],
)
def test_show_bad_file_is_one_line_exit_2(tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, out, err = run(capsys, "show", str(path))
    assert out == ""
    assert_one_line_error(code, err, "show", f"{path}: ", fragment)


def test_show_missing_file_and_directory(tmp_path, capsys):
    code, _, err = run(capsys, "show", str(tmp_path / "absent.yaml"))
    assert_one_line_error(code, err, "show", "no such file")
    code, _, err = run(capsys, "show", str(tmp_path))
    assert_one_line_error(code, err, "show", "is a directory")


def test_show_bad_field_names_the_field(tmp_path, capsys):
    path = tmp_path / "neg.yaml"
    path.write_text(SHIPPED.read_text().replace("best: {workers: 2,", "best: {workers: -2,", 1))
    code, _, err = run(capsys, "show", str(path))
    assert_one_line_error(code, err, "show", "best.workers must be an integer >= 1, got -2")


def test_show_plot_without_matplotlib_fails_before_printing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run(capsys, "show", str(SHIPPED), "--plot", str(tmp_path / "h.png"))
    assert out == ""
    assert_one_line_error(
        code, err, "show", "--plot needs matplotlib: pip install 'autotune[plot]'"
    )
    assert not (tmp_path / "h.png").exists()


def test_show_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "h.png"
    code, out, err = run(capsys, "show", str(SHIPPED), "--plot", str(png))
    assert code == 0 and "4.28*" in out and str(png) in err
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_show_plot_into_a_missing_directory(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, _, err = run(capsys, "show", str(SHIPPED), "--plot", str(tmp_path / "no" / "h.png"))
    assert_one_line_error(code, err, "show", "cannot write")


def test_show_through_the_real_entry_point(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: 1\nworkload: [\n")
    proc = subprocess.run(
        [sys.executable, "-m", "autotune", "show", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------
# recommend
# ---------------------------------------------------------------------------


def test_recommend_uses_the_shipped_profile_on_the_i3(capsys, monkeypatch):
    seen = fake_probe(monkeypatch, I3)
    code, out, err = run(capsys, "recommend", "--workload", "spline", "--sysfs-root", str(ROOT))
    assert code == 0 and err == ""
    assert seen == [str(ROOT)]
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["workers"] == "2"
    assert lines["chunk_len"] == "7812 items"
    assert lines["chunk_bytes"].startswith("125000")
    assert lines["source"] == f"published profile {SHIPPED} (shipped profiles)"
    assert "matches this CPU" in lines["why"]


def test_recommend_json(capsys, monkeypatch):
    fake_probe(monkeypatch, I3)
    code, out, _ = run(capsys, "recommend", "--json")
    answer = json.loads(out)
    assert code == 0
    assert (answer["workers"], answer["chunk_len"], answer["chunk_bytes"]) == (2, 7812, 125000)
    assert answer["source"] == "published" and answer["profile"] == str(SHIPPED)


def test_recommend_falls_back_to_the_heuristic_and_says_why(capsys, monkeypatch):
    fake_probe(monkeypatch, OTHER)
    code, out, err = run(capsys, "recommend", "--item-bytes", "8", "--json")
    answer = json.loads(out)
    assert code == 0 and err == ""
    assert answer["source"] == "heuristic" and answer["profile"] is None
    assert (answer["workers"], answer["chunk_len"], answer["chunk_bytes"]) == (2, 32768, 262144)
    assert answer["origin"] == "heuristic"
    assert "no profile for 'spline' fits this CPU" in answer["why"]
    assert "8 B/item" in answer["why"]


def test_recommend_reports_skipped_files_as_warnings(tmp_path, capsys, monkeypatch):
    fake_probe(monkeypatch, I3)
    broken = tmp_path / "broken.yaml"
    broken.write_text("schema: [\n")
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path))
    code, out, err = run(capsys, "recommend")
    assert code == 0 and "7812 items" in out
    assert err.startswith("autotune recommend: warning: skipped ") and "broken.yaml" in err


def test_recommend_bad_env_profile_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    fake_probe(monkeypatch, I3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: 1\n")
    monkeypatch.setenv("AUTOTUNE_PROFILE", str(bad))
    code, _, err = run(capsys, "recommend")
    assert_one_line_error(code, err, "recommend", "bad.yaml: missing field workload")


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", "", "1e3", "16x", "99999999999999999"])
def test_recommend_item_bytes_must_be_a_positive_integer(capsys, monkeypatch, value):
    seen = fake_probe(monkeypatch, I3)
    code, out, err = run(capsys, "recommend", f"--item-bytes={value}")
    assert out == "" and seen == []
    assert_one_line_error(code, err, "recommend", "--item-bytes must be a positive integer")


def test_recommend_sysfs_root_must_be_a_directory(tmp_path, capsys):
    code, _, err = run(capsys, "recommend", "--sysfs-root", str(tmp_path / "absent"))
    assert_one_line_error(code, err, "recommend", "is not a directory")


def test_recommend_empty_workload(capsys):
    code, _, err = run(capsys, "recommend", "--workload", "")
    assert_one_line_error(code, err, "recommend", "--workload")


def test_recommend_on_the_i3_fixture_answers_from_the_shipped_profile(capsys):
    # The "done when": the real probe on the fixture tree finds the
    # i3's topology and caches, and the shipped published profile matches.
    code, out, err = run(
        capsys, "recommend", "--workload", "spline", "--sysfs-root", str(I3_SYSFS), "--json"
    )
    assert code == 0, err
    answer = json.loads(out)
    assert (answer["workers"], answer["chunk_bytes"]) == (2, 125000)
    assert answer["source"] == "published" and answer["profile"] == str(SHIPPED)
