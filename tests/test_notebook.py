"""A real Jupyter kernel (ipykernel, driven by nbclient) running autotune under every start method.

The notebook defines what scientists define in notebooks: a kernel
function, a class whose instance goes in ``shared``, a ``combine`` function
and a workload for ``autotune.search``.  Under spawn and forkserver none of
them can be found by name in a worker (the notebook's ``__main__`` is not a
file), so they must travel by value.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
from conftest import ROOT, START_METHODS, process_gone

from autotune.backends.shm import list_segments

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

SETUP = """
import json, operator, os, pickle, threading
import numpy as np
import autotune
from autotune.backends.sending import dumps_code

METHOD = {method!r}
OFFSET = 0.25  # a notebook global the kernel reads without `shared`
"""

DEFINE = """
class Scaler:
    def __init__(self, k):
        self.k = k

    def __call__(self, v):
        return v * self.k

def scaled(shared, start, stop):
    return shared.scaler(shared.x[start:stop]) + OFFSET

def partial_stats(shared, start, stop):
    x = shared.x[start:stop]
    return (float(x.sum()), float(x.max()))

def combine_stats(a, b):
    return (a[0] + b[0], max(a[1], b[1]))

x = np.random.default_rng(7).random(100_000)
shared = {"x": x, "scaler": Scaler(3.0)}
"""

RUN = """
with autotune.Evaluator(2, 3000, shared=shared, start_method=METHOD) as ev:
    out = ev.map(scaled, len(x))
    stats = ev.reduce(partial_stats, len(x), combine=combine_stats)
    pids = ev.pids
acc = None
# The evaluator's ranges: chunks of 3000, a last round that leaves a worker idle in pieces.
plan = autotune.backends.schedule.plan_chunks(len(x), ev.workers, 3000)
for s, e in plan.ranges():
    part = partial_stats(autotune.backends.shared.SharedNamespace(shared), s, e)
    acc = part if acc is None else combine_stats(acc, part)
result = autotune.search(
    autotune.Workload("notebook", len(x), partial_stats, shared=shared),
    budget=1.0, workers=[2], backends=("processes",), items=20_000, start_method=METHOD,
    progress=False,
)
print(json.dumps({
    "method": METHOD,
    "map_equal": bool(np.array_equal(out, x * 3.0 + 0.25)),
    "reduce_equal": stats == acc,
    "search_points": len(result.measurements),
    "search_workers": sorted({m.workers for m in result.measurements}),
    "kernel_pickle_bytes": len(dumps_code(scaled, "kernel")),
    "threads_in_kernel": threading.active_count(),
    "kernel_pid": os.getpid(),
    "worker_pids": pids,
}))
"""


#: A kernel spec of our own for this interpreter: a user's "python3" spec may name another one.
KERNEL = "autotune-test"


@pytest.fixture(autouse=True)
def kernel_spec(tmp_path, monkeypatch, child_tmpdir):
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel's temp directory (it inherits our environment): one killed by a restart,
    # or shut down by its manager, leaves a forkserver's pymp-* directory there.
    monkeypatch.setenv("TMPDIR", str(child_tmpdir))


def _notebook(method: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(SETUP.format(method=method)),
        nbformat.v4.new_code_cell(DEFINE),
        nbformat.v4.new_code_cell(RUN),
    ]
    return nb


def stdout_of(cell) -> str:
    """What a cell printed on stdout: its report's JSON is the last line there.  A warning
    (the search's budget running out on a loaded machine) goes to stderr, whose output may
    come after it in the cell's outputs."""
    return "".join(
        o.get("text", "")
        for o in cell.outputs
        if o.output_type == "stream" and o.get("name") == "stdout"
    )


def _wait_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(process_gone(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not process_gone(p)]


def _wait_no_segments(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and list_segments(pid):
        time.sleep(0.05)
    return list_segments(pid)


@pytest.mark.parametrize("method", START_METHODS)
def test_notebook_kernel_class_combine_and_search(method):
    nb = _notebook(method)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name=KERNEL, resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    text = stdout_of(nb.cells[-1])
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    report = json.loads(text.strip().splitlines()[-1])
    print(f"\n{method}: {report}")
    assert report["map_equal"] and report["reduce_equal"]
    assert report["search_points"] >= 1 and 2 in report["search_workers"]
    assert report["kernel_pickle_bytes"] < 8192
    # The kernel has shut down: its workers and its segments are gone with it.
    assert not _wait_gone([report["kernel_pid"], *report["worker_pids"]])
    assert not _wait_no_segments(report["kernel_pid"])


RESTART_SETUP = """
import json, os, time
import numpy as np
import autotune

MARK = {mark!r}

def slow(shared, start, stop):  # a map that takes a while, and says it started
    open(MARK, "a").close()
    time.sleep(0.05)
    return shared.x[start:stop] * 2.0

x = np.random.default_rng(0).random(400_000)  # 3.2 MB: placed in a segment under spawn
ev = autotune.Evaluator(2, 1000, shared={{"x": x}}, start_method={method!r})
print(json.dumps({{"kernel_pid": os.getpid(), "worker_pids": ev.pids}}))
"""


@pytest.mark.parametrize("method", START_METHODS)
def test_kernel_restart_in_the_middle_of_a_map_leaves_nothing(method, tmp_path):
    """The notebook's kernel restarted mid-map: its workers exit and its segments are unlinked."""
    from nbclient.util import run_sync

    mark = tmp_path / "started"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(RESTART_SETUP.format(mark=str(mark), method=method))]
    client = nbclient.NotebookClient(
        nb, timeout=60, kernel_name=KERNEL, resources={"metadata": {"path": str(ROOT)}}
    )
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        out = stdout_of(nb.cells[0])
        report = json.loads(out.strip().splitlines()[-1])
        kernel_pid = report["kernel_pid"]
        assert list_segments(kernel_pid), "the evaluator should hold segments"
        client.kc.execute("y = ev.map(slow, len(x))")  # not waited for
        deadline = time.monotonic() + 30
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mark.exists(), "the map never started"
        run_sync(client.km.restart_kernel)(now=True)  # the kernel is killed mid-map
        assert process_gone(kernel_pid)
    assert not _wait_gone(report["worker_pids"])
    assert not _wait_no_segments(kernel_pid), "segments of the dead kernel left in /dev/shm"
