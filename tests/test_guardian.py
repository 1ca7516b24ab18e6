"""The segment guardian: segments are unlinked even when the whole process group is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

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


def test_killpg_of_the_parent_and_its_workers_unlinks_the_segments():
    """As Jupyter restarts a kernel: SIGKILL to its process group, resource tracker included."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
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
