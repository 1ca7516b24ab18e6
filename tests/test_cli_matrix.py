"""Bad input on the command line: every subcommand, every argument, missing, malformed and
out of range.

The contract (docs/design.md, "The command line's error contract"): exit status 2, exactly
one line on stderr that names the argument, no traceback, nothing on stdout.  A bad ``search``
is refused before anything is measured: here the tuner is replaced by one that fails the test
if it runs, so a case that slipped through validation costs nothing and writes nothing.  The
last group pins bugs this matrix found (and that were fixed).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SHIPPED

import autotune
import autotune.profile.lookup as profile_mod
import autotune.tuner as tuner_mod
from autotune import Workload
from autotune.cli import main


def tiny_kernel(shared, start, stop):
    return shared.x[start:stop] + 1.0


def tiny_workload():
    """A workload that measures in a blink (``--workload test_cli_matrix:tiny_workload``)."""
    x = np.arange(20_000, dtype=np.float64)
    return Workload("tiny", len(x), tiny_kernel, shared={"x": x}, mode="map", item_bytes=16)


class SearchRan(AssertionError):
    pass


_real_search = tuner_mod.search


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No profile from outside; the tuner must not run unless a test lets it."""
    monkeypatch.delenv("AUTOTUNE_PROFILE", raising=False)
    monkeypatch.delenv("AUTOTUNE_PROFILE_DIR", raising=False)
    monkeypatch.setattr(profile_mod, "user_profile_dir", lambda: tmp_path / "user-profiles")
    monkeypatch.setattr(profile_mod, "shipped_profile_dir", lambda: tmp_path / "shipped")

    def no_search(*args, **kwargs):
        raise SearchRan("bad input reached the measurements")

    monkeypatch.setattr(tuner_mod, "search", no_search)


def run(capsys, argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, out, err, fragment):
    assert code == 2, (code, err)
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("autotune") and "Traceback" not in err, err
    assert fragment in err, err


def special(tmp: Path, kind: str) -> str:
    path = tmp / f"{kind}.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "file":
        path.write_text("not a tree\n")
    elif kind == "dir":
        path.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "non-utf8":
        path.write_bytes(b"schema: 1\nworkload: \xff\n")
    elif kind == "tag":
        path.write_text(f"!!python/object/apply:os.system ['touch {tmp / 'pwned'}']\n")
    elif kind == "bad-field":
        path.write_text(SHIPPED.read_text().replace("best: {workers: 2,", "best: {workers: 0,", 1))
    elif kind == "missing":
        pass
    return str(path)


# -- the matrix -----------------------------------------------------------------------------------
TOP = [
    ([], "COMMAND"),
    (["frob"], "frob"),
    (["--bogus"], "COMMAND"),
]
PROBE = [
    (["probe", "--bogus"], "--bogus"),
    (["probe", "extra"], "extra"),
    (["probe", "--sysfs-root"], "--sysfs-root"),
    (["probe", "--json", "--yaml"], "--yaml"),
    (["probe", "--sysfs-root", "{missing}"], "sysfs root"),
    (["probe", "--sysfs-root", "{file}"], "sysfs root"),
    (["probe", "--sysfs-root", "{fifo}"], "sysfs root"),
    (["probe", "--sysfs-root", "/dev/null"], "sysfs root"),
    (["probe", "--sysfs-root", "a\x00b"], "sysfs root"),
]
SEARCH = [
    (["search", "--bogus"], "--bogus"),
    (["search", "extra"], "extra"),
    *[(["search", opt], opt) for opt in ("--budget", "--workers", "--cpus", "--items")],
    *[(["search", opt], opt) for opt in ("--out", "--plot", "--workload", "--strategy")],
    *[
        (["search", "--budget", v], "--budget")
        for v in ("", " ", "0", "-1", "-0", "nan", "inf", "-inf", "1e999", "abc", "0x10", "1,5")
    ],
    *[
        (["search", "--workers", v], "--workers")
        for v in ("0", "-1", "2-1", "1,,2", "x", "1.5", "0-3", "1,999", "9" * 25, " ", ",")
    ],
    *[
        (["search", "--cpus", v], "--cpus")
        for v in ("-1", "abc", "999", "0-99999999999", "1.5", "1-0", ",", "0,,1")
    ],
    *[
        (["search", "--items", v], "--items")
        for v in ("", "0", "-3", "1.5", "abc", "1e3", " 5", "0x10", "+5")
    ],
    (["search", "--strategy", "random"], "--strategy"),
    (["search", "--strategy", ""], "--strategy"),
    (["search", "--workload", ""], "workload"),
    (["search", "--workload", "nope"], "workload"),
    (["search", "--workload", ":"], "workload"),
    (["search", "--workload", "os:"], "has no attribute ''"),
    (["search", "--workload", "a:b:c"], "workload"),
    (["search", "--workload", "os:getcwd"], "os:getcwd"),
    (["search", "--workload", "no_such_module_xyz:f"], "workload"),
    (["search", "--workload", "os:no_such_thing"], "no_such_thing"),
    (["search", "--out", "/"], "--out"),
    (["search", "--out", "{dir}"], "--out"),
    (["search", "--out", "{missing_dir_file}"], "--out"),
    (["search", "--json", "--json", "--budget", "0"], "--budget"),
]
SHOW = [
    (["show"], "PATH"),
    (["show", "a", "b"], "b"),
    (["show", "--plot"], "--plot"),
    (["show", "{missing}"], "missing.yaml"),
    (["show", "{dir}"], "dir.yaml"),
    (["show", "{fifo}"], "fifo.yaml"),
    (["show", "{socket}"], "socket.yaml"),
    (["show", "/dev/null"], "/dev/null"),
    (["show", "{non-utf8}"], "non-utf8.yaml"),
    (["show", "{tag}"], "tag.yaml"),
    (["show", "{bad-field}"], "best.workers"),
    (["show", "a\x00b"], "a\\x00b"),
]
RECOMMEND = [
    (["recommend", "--bogus"], "--bogus"),
    (["recommend", "x"], "x"),
    *[(["recommend", opt], opt) for opt in ("--workload", "--item-bytes", "--sysfs-root")],
    (["recommend", "--workload", ""], "--workload"),
    (["recommend", "--workload", " \t"], "--workload"),
    *[
        (["recommend", "--item-bytes", v], "--item-bytes")
        for v in ("", "0", "-1", "x", "1.5", "1e3", str(2**41), "²", "１６", "0x10", " ")
    ],
    (["recommend", "--sysfs-root", ""], "--sysfs-root"),
    (["recommend", "--sysfs-root", "{missing}"], "--sysfs-root"),
    (["recommend", "--sysfs-root", "{file}"], "--sysfs-root"),
    (["recommend", "--sysfs-root", "/dev/null"], "--sysfs-root"),
    (["recommend", "--sysfs-root", "a\x00b"], "--sysfs-root"),
    (["recommend", "--sysfs-root", "{dir}"], "cannot probe"),
]
MATRIX = TOP + PROBE + SEARCH + SHOW + RECOMMEND
KINDS = ("missing", "file", "dir", "fifo", "socket", "non-utf8", "tag", "bad-field")


@pytest.mark.parametrize(("argv", "fragment"), MATRIX, ids=[repr(a) for a, _ in MATRIX])
def test_bad_input_exits_2_with_one_line_naming_the_argument(tmp_path, capsys, argv, fragment):
    names = {k: special(tmp_path, k) for k in KINDS}
    names["missing_dir_file"] = str(tmp_path / "no-such-dir" / "p.yaml")
    argv = [a.format(**names) if "{" in a else a for a in argv]
    code, out, err = run(capsys, argv)
    assert_usage_error(code, out, err, fragment)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "no-such-dir").exists()  # nothing created on the way
    assert not (tmp_path / "user-profiles").exists()  # no profile written anywhere


def test_env_profile_that_is_a_fifo_is_one_line_not_a_hang(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_PROFILE", special(tmp_path, "fifo"))
    code, out, err = run(
        capsys, ["recommend", "--sysfs-root", str(ROOT / "tests/fixtures/sysfs/i3-3227u")]
    )
    assert_usage_error(code, out, err, "fifo.yaml: is not a regular file")


# -- search --out: no partial file, ever --------------------------------------------------------
def test_search_out_into_a_missing_directory_creates_nothing(tmp_path, capsys):
    target = tmp_path / "a" / "b" / "p.yaml"
    code, out, err = run(capsys, ["search", "--budget", "1", "--out", str(target)])
    assert_usage_error(code, out, err, "--out")
    assert "does not exist" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_search_out_into_a_read_only_directory_creates_nothing(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, out, err = run(capsys, ["search", "--budget", "1", "--out", str(ro / "p.yaml")])
        assert_usage_error(code, out, err, "--out")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_search_whose_save_fails_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    """The write fails after the measurements (disk full): exit 2, one line, and neither the
    profile nor its temporary file is left; an existing profile is untouched."""
    monkeypatch.setattr(tuner_mod, "search", _real_search)
    target = tmp_path / "p.yaml"
    target.write_text("old profile\n")

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(profile_mod.os, "replace", disk_full)
    argv = ["search", "--workload", "test_cli_matrix:tiny_workload", "--budget", "0.5"]
    code, out, err = run(capsys, [*argv, "--workers", "1", "--items", "5000", "--out", str(target)])
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "cannot write: No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]
    assert target.read_text() == "old profile\n"


# -- the real entry point -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "COMMAND"),
        (["search", "--budget", "nan"], "--budget"),
        (["search", "--workers", "0"], "--workers"),
        (["show", "{fifo}"], "not a regular file"),
        (["recommend", "--item-bytes", "0"], "--item-bytes"),
        (["probe", "--sysfs-root", "{missing}"], "sysfs root"),
    ],
)
def test_python_dash_m_autotune_bad_input(tmp_path, argv, fragment):
    names = {"fifo": special(tmp_path, "fifo"), "missing": str(tmp_path / "absent")}
    argv = [a.format(**names) for a in argv]
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))
    env.pop("AUTOTUNE_PROFILE", None)
    env.pop("AUTOTUNE_PROFILE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-m", "autotune", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert_usage_error(done.returncode, done.stdout, done.stderr, fragment)


# -- bugs found by this matrix, fixed: these pin the fixes ----------------------------------
def test_search_items_superscript_digit(capsys):
    code, out, err = run(capsys, ["search", "--items", "²"])
    assert_usage_error(code, out, err, "--items")


@pytest.mark.parametrize("option", ["--workers", "--cpus", "--out"])
def test_search_empty_list_or_path_is_refused(capsys, option):
    code, out, err = run(capsys, ["search", option, ""])
    assert_usage_error(code, out, err, option)


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_search_out_onto_a_special_file_is_refused(tmp_path, capsys, kind):
    path = special(tmp_path, kind)
    code, out, err = run(capsys, ["search", "--out", path])
    assert_usage_error(code, out, err, "--out")


def test_search_plot_into_a_missing_directory_is_refused_first(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, out, err = run(capsys, ["search", "--plot", str(tmp_path / "no" / "h.png")])
    assert_usage_error(code, out, err, "--plot")


def test_show_empty_path_is_named(capsys):
    code, out, err = run(capsys, ["show", ""])
    assert_usage_error(code, out, err, "''")


def test_search_out_with_a_nul_byte(capsys):
    code, out, err = run(capsys, ["search", "--out", "a\x00b"])
    assert_usage_error(code, out, err, "--out")


def test_profile_save_onto_a_fifo_is_refused_and_keeps_the_fifo(tmp_path):
    """The library side of the --out bug, without the command line."""
    from autotune.profile import Profile

    fifo = Path(special(tmp_path, "fifo"))
    with pytest.raises(autotune.ProfileError, match="not a regular file"):
        Profile.load(SHIPPED).save(fifo)
    assert fifo.is_fifo()
