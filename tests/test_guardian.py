"""The segment guardian: segments are unlinked even when the whole process group is killed,
and a parent killed outright leaves nothing behind, on its terminal included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import process_gone

from autotune.backends.shm import list_segments

SCRIPT = """
    import json, sys, time
    import numpy as np
    import kernels
    from autotune import Evaluator

    x = np.random.default_rng(0).random(200_000)
    ev = Evaluator(2, 1000, shared={"x": x}, start_method=sys.argv[1])
    print(json.dumps(ev.pids), flush=True)
    time.sleep(60)
"""


def child_env(tmpdir: Path) -> dict[str, str]:
    """The environment of a script these tests kill: the tests' modules importable, and a
    ``TMPDIR`` of its own (what it made there stays, see ``conftest.child_tmpdir``)."""
    path = os.pathsep.join([os.path.dirname(__file__), *sys.path])
    return dict(os.environ, PYTHONPATH=path, TMPDIR=str(tmpdir))


def test_killpg_of_the_parent_and_its_workers_unlinks_the_segments(child_tmpdir):
    """As Jupyter restarts a kernel: SIGKILL to its process group, resource tracker included."""
    env = child_env(child_tmpdir)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), "spawn"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        workers = json.loads(proc.stdout.readline())
        assert list_segments(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            list_segments(proc.pid) or not all(process_gone(p) for p in workers)
        ):
            time.sleep(0.05)
        assert not list_segments(proc.pid)
        assert all(process_gone(p) for p in workers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Those of ``pids`` still running after ``timeout`` seconds (a hang guard)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(process_gone(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not process_gone(p)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_parent_leaves_no_segment_and_says_nothing(start_method, signum, child_tmpdir):
    """The parent alone is killed (``timeout`` sends SIGTERM): the guardian unlinks its
    segments, and Python's resource tracker, which outlives it, has none to report as
    leaked, nor to find gone ("No such file or directory") after the guardian's unlink."""
    env = child_env(child_tmpdir)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), start_method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        workers = json.loads(proc.stdout.readline())
        assert list_segments(proc.pid)
        proc.send_signal(signum)
        # stderr ends when every process that shares it has exited: the workers, the
        # resource tracker and the forkserver (which exit after the parent), the guardian
        # (after it unlinked the segments).  Whatever any of them said is in it.
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signum
    assert err == ""
    assert not list_segments(proc.pid)
    # A process closes its files a moment before it is gone (a busy machine stretches it).
    assert wait_gone(workers) == []


WITHOUT_GUARDIAN = """
    import json, os, signal, sys, time
    import numpy as np
    import kernels
    from autotune import Evaluator
    from autotune.backends import guardian

    if sys.argv[1] == "cannot start":
        sys.executable = "/nonexistent/python"  # the guardian's interpreter: none
    x = np.random.default_rng(0).random(200_000)
    ev = Evaluator(2, 1000, shared={"x": x}, start_method="fork")  # its control segment
    if sys.argv[1] == "died":
        os.kill(guardian.pid, signal.SIGKILL)
        os.waitpid(guardian.pid, 0)
    out = ev.map(kernels.double, len(x))  # a new segment, the output
    print(json.dumps(ev.pids), flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("case", ["cannot start", "died"])
def test_without_a_guardian_the_resource_tracker_unlinks_the_segments(case, child_tmpdir):
    """Where the guardian cannot start, or has died (found at the next segment), Python's
    resource tracker takes every segment the parent holds, and unlinks them when it dies."""
    env = child_env(child_tmpdir)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WITHOUT_GUARDIAN), case],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        workers = json.loads(proc.stdout.readline())
        assert len(list_segments(proc.pid)) == 2
        proc.kill()
        _, err = proc.communicate(timeout=60)  # see above: every process sharing it is gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not list_segments(proc.pid)
    assert wait_gone(workers) == []
    assert "leaked shared_memory objects" in err  # the tracker's way of saying it did it
