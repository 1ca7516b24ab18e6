"""A reader that stops early (``autotune show PATH | head -1``) ends a command quietly.

As a coreutils command that SIGPIPE ends: nothing on stderr, exit status 141.  Each command
runs in its own process with stdout a pipe: one whose reader is already gone (so the first
write fails, whether stdout is buffered or not), and one whose reader takes the first line of
an output larger than the pipe holds and then closes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHIPPED

from autotune.cli import EXIT_STDOUT_CLOSED

STREAM = ROOT / "profiles" / "xeon-2vcpu-stream.yaml"


def run_into_closed_pipe(argv: list[str], unbuffered: bool, cwd: Path) -> tuple[int, str]:
    """Run ``autotune argv`` with stdout a pipe nobody reads any more: (status, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "autotune", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
            timeout=120,
        )
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


def case_id(argv: list[str]) -> str:
    return " ".join(Path(a).name for a in argv)  # no temporary or checkout paths in test ids


COMMANDS = [
    ["probe"],
    ["probe", "--json"],
    ["probe", "--yaml"],
    ["show", str(STREAM)],
    ["recommend"],
    ["recommend", "--json", "--sysfs-root", str(ROOT / "tests/fixtures/sysfs/i3-3227u")],
    # argparse's own output (when unbuffered, argparse ignores the failed write itself)
    ["--help"],
    ["--version"],
    ["show", "--help"],
]


@pytest.mark.parametrize(
    ("argv", "unbuffered"),
    # Buffered (the default), the write fails when main() flushes stdout; unbuffered
    # (PYTHONUNBUFFERED=1), in the command's first print.
    [(argv, False) for argv in COMMANDS]
    + [(argv, True) for argv in (["probe"], ["show", str(STREAM)])],
    ids=lambda v: ("unbuffered" if v else "buffered") if isinstance(v, bool) else case_id(v),
)
def test_a_reader_that_is_gone_ends_the_command_quietly(tmp_path, argv, unbuffered):
    code, err = run_into_closed_pipe(argv, unbuffered, tmp_path)
    assert (code, err) == (EXIT_STDOUT_CLOSED, "") and EXIT_STDOUT_CLOSED == 141


def test_search_into_a_closed_pipe_still_writes_its_profile(tmp_path):
    out = tmp_path / "p.yaml"
    argv = ["search", "--workload", "stream", "--budget", "0.5", "--items", "20000"]
    argv += ["--workers", "1", "--backend", "threads", "--out", str(out)]
    code, err = run_into_closed_pipe(argv, False, tmp_path)
    assert (code, err) == (141, "")
    assert out.is_file()


def test_head_1_takes_the_first_line_and_the_rest_ends_quietly(tmp_path):
    # A profile whose table (one row per worker count) is far larger than a pipe
    # holds (64 KiB), so the command is still writing when the reader leaves.
    doc = yaml.safe_load(SHIPPED.read_text())
    doc["measurements"] = [
        {"workers": w, "chunk_len": 7812, "chunk_bytes": 125000, "throughput": 1e6 + w}
        for w in range(1, 4001)
    ]
    doc["best"] = dict(doc["measurements"][-1])
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(doc, sort_keys=False))
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "autotune", "show", str(big)],
        stdout=write_end,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    first = b""
    while not first.endswith(b"\n"):  # a byte at a time: nothing past the line
        byte = os.read(read_end, 1)
        assert byte, f"no line before end of output: {first!r}"
        first += byte
    os.close(read_end)
    _, err = proc.communicate(timeout=120)
    assert first.startswith(b"spline: published profile")
    assert (proc.returncode, err) == (141, b"")
