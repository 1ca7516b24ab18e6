"""Start-up failures are told apart from crashes: one clear error at construction.

A worker that ends before it says "ready" is not replaced (whatever stopped
it stops every replacement); the evaluator's constructor raises one error
naming the likely cause and the worker's own message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from autotune import Evaluator


def _explode():
    raise ImportError("No module named 'lab_private_helpers'")


class Unloadable:
    """Pickles fine in the parent; a worker cannot rebuild it (as a module it cannot import)."""

    def __reduce__(self):
        return (_explode, ())


SCRIPT = """
import numpy as np
import autotune

def kernel(shared, start, stop):
    return shared.x[start:stop] * 2

x = np.arange(1000.0)
with autotune.Evaluator(2, 100, shared={"x": x}, start_method=METHOD) as ev:
    print(ev.map(kernel, 1000).sum())
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_script_without_main_guard_gets_one_clear_error(tmp_path, method, child_tmpdir):
    script = tmp_path / "noguard.py"
    script.write_text(textwrap.dedent(SCRIPT).replace("METHOD", repr(method)))
    temp = child_tmpdir  # short: a forkserver's socket goes in it
    env = dict(os.environ, TMPDIR=str(temp))
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 1
    # The report file is gone, also when a second worker reported after the parent read it.
    assert not list(temp.glob("autotune_start_*")), list(temp.iterdir())
    err = done.stderr
    last = err.strip().splitlines()
    # The parent's error: once, naming the main guard; no retry cascade.
    assert err.count("ended before it was ready") == 1
    assert 'if __name__ == "__main__":' in err
    assert "re-run" not in err and "WorkerLost" not in err
    assert "bootstrapping phase" not in err
    if method == "spawn":  # the worker's own message came back through its report file
        assert "The worker's own message:" in err
        assert last[-1].startswith("autotune.Evaluator was created while a worker process")


def test_a_worker_that_cannot_load_the_shared_data_fails_the_constructor(no_leaks):
    with pytest.raises(RuntimeError) as info:
        Evaluator(2, 10, shared={"x": np.arange(10.0), "h": Unloadable()}, start_method="spawn")
    message = str(info.value)
    assert "ended before it was ready" in message
    assert "ImportError: No module named 'lab_private_helpers'" in message
    assert "no worker is retried" in message
    # The process is still fine: a good evaluator starts and runs.
    with Evaluator(2, 10, shared={"x": np.arange(10.0)}, start_method="spawn") as ev:
        assert ev.map(double, 10).tolist() == (np.arange(10.0) * 2).tolist()


def double(shared, start, stop):
    return shared.x[start:stop] * 2
