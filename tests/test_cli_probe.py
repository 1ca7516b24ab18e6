"""``autotune probe``: the table, ``--json``, ``--yaml``, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autotune import probe
from autotune.cli import main

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"
I3 = str(SYSFS / "i3-3227u")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["probe", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_table_shows_model_cores_usable_and_each_cache(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--sysfs-root", I3)
    assert (rc, err) == (0, "")
    assert "Intel(R) Core(TM) i3-3227U CPU @ 1.90GHz" in out
    assert "4 logical CPUs, 2 physical cores, 2 threads per core, 1 socket" in out
    assert "Usable CPUs:  4 (online in sysfs: 4; cgroup v2: no CPU quota)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("L")]
    # level, type, size per instance, instances, CPUs sharing one, line
    assert rows == [
        ["L1", "data", "32", "KiB", "2", "2", "64", "B"],
        ["L1", "instruction", "32", "KiB", "2", "2", "64", "B"],
        ["L2", "unified", "256", "KiB", "2", "2", "64", "B"],
        ["L3", "unified", "3", "MiB", "1", "4", "64", "B"],
    ]


def test_table_explains_a_quota_and_shows_notes(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--sysfs-root", str(SYSFS / "container-v2"))
    assert rc == 0
    assert "Usable CPUs:  2 (online in sysfs: 4; cgroup v2: quota 1.5 CPUs -> at most 2)" in out
    assert "Model:        unknown" in out
    assert "Notes:\n  - brand unknown:" in out


def test_table_without_caches(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--sysfs-root", str(SYSFS / "vm-nocache"))
    assert rc == 0
    assert "Caches:       unknown (see notes)" in out
    assert "sysfs has no cache directories" in out


def test_json_is_to_dict(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--json", "--sysfs-root", I3)
    assert (rc, err) == (0, "")
    assert json.loads(out) == json.loads(json.dumps(probe(I3).to_dict()))


def test_yaml_is_to_dict(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--yaml", "--sysfs-root", str(SYSFS / "container-v2"))
    assert rc == 0
    d = yaml.safe_load(out)
    assert d == probe(SYSFS / "container-v2").to_dict()
    assert d["cpu_quota"] == 1.5 and d["usable_cpus"] == 2


def test_live_probe_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys)
    assert rc == 0 and out.startswith("Model:") and "Usable CPUs:" in out


@pytest.mark.parametrize("root", ["does-not-exist", "."])
def test_unusable_root_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, root: str
) -> None:
    rc, out, err = run(capsys, "--sysfs-root", str(tmp_path / root))
    assert rc == 2 and out == ""
    assert err.startswith("autotune probe: error: sysfs root ") and err.count("\n") == 1


def test_garbage_tree_prints_notes_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cpu = tmp_path / "devices" / "system" / "cpu"
    (cpu / "cpu0" / "cache" / "index0").mkdir(parents=True)
    (cpu / "online").write_text("\x00\x01")
    (cpu / "cpu0" / "cache" / "index0" / "size").write_text("huge")
    (tmp_path / "fs" / "cgroup").mkdir(parents=True)
    (tmp_path / "fs" / "cgroup" / "cpu.max").write_text("150000")
    rc, out, err = run(capsys, "--sysfs-root", str(tmp_path))
    assert (rc, err) == (0, "")
    assert "Notes:" in out and "cpu0/cache/index0/size" in out
    assert "expected '<quota> <period>'" in out


def test_json_and_yaml_together_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["probe", "--json", "--yaml"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_python_dash_m_autotune_probe_json() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "autotune", "probe", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    d = json.loads(done.stdout)
    assert d["logical_cpus"] >= 1 and 1 <= d["usable_cpus"] <= d["logical_cpus"]
    for key in ("brand", "physical_cores", "threads_per_core", "cpu_quota", "caches"):
        assert key in d


def test_python_dash_m_autotune_bad_root_has_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "autotune", "probe", "--sysfs-root", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
