"""The kernel checked in the parent; autotune's own checks not reported as the kernel's;
``MODULE:CALLABLE`` found from the current directory, as ``python -m`` does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from autotune import Evaluator, Workload


def two_args(shared, start):
    return 0.0


def short_rows(shared, start, stop):
    return shared.x[start : stop - 1] if stop - start > 1 else shared.x[start:stop]


def double(shared, start, stop):
    return shared.x[start:stop] * 2.0


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_the_signature_is_checked_before_any_worker_runs(backend, no_leaks):
    x = np.arange(100.0)
    with Evaluator(2, 10, shared={"x": x}, backend=backend) as ev:
        pids = ev.pids
        with pytest.raises(TypeError, match=r"kernel two_args\(shared, start\) must accept"):
            ev.reduce(two_args, 100)
        assert ev.pids == pids  # no worker ran it (and none was lost)
        assert np.array_equal(ev.map(double, 100), x * 2.0)
    with pytest.raises(TypeError, match="Workload kernel two_args"):
        Workload("w", 10, two_args)


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_autotunes_own_result_check_is_not_reported_as_the_kernels(backend, no_leaks):
    x = np.arange(100.0)
    with Evaluator(2, 10, shared={"x": x}, backend=backend) as ev:
        with pytest.raises(ValueError) as info:
            ev.map(short_rows, 100)
        text = str(info.value) + "".join(getattr(info.value, "__notes__", []))
        assert "found by autotune's check of the kernel's result" in text
        assert "raised by the kernel" not in text
        assert np.array_equal(ev.map(double, 100), x * 2.0)  # still usable


MODULE = """
import numpy as np
import autotune

def kernel(shared, start):  # a mistake: no stop
    return 0.0

def make():
    return autotune.Workload("mine", 1000, kernel, {"x": np.arange(1000.0)})
"""


def test_cli_finds_module_in_the_current_directory(tmp_path):
    (tmp_path / "mywork.py").write_text(textwrap.dedent(MODULE))
    script = shutil.which("autotune", path=str(Path(sys.executable).parent))
    assert script is not None
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [script, "search", "--workload", "mywork:make", "--budget", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    # Imported (from the current directory), then refused for its signature:
    # exit 2, one line, no traceback.
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "must accept (shared, start, stop)" in lines[0]
