"""Faults injected from inside a map over shared memory, and evaluators used concurrently.

The fast part of the fault campaign (``scripts/fault_campaign.py`` is the full run): a worker
SIGKILLed, crashed with SIGSEGV or out of memory in the middle of a map, and the parent
terminated; each time the result equals the serial one or the documented error comes, and
no process, zombie, segment or file descriptor is left.  Then two evaluators at once, one
evaluator from several threads, and nested use.  The last group pins bugs the campaign found
(and that were fixed): nested and re-entrant use, close() from another thread, descriptors.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import kernels
import numpy as np
import pytest
from conftest import START_METHODS, process_gone

from autotune import Evaluator
from autotune.backends.shm import list_segments

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
N = 1 << 19  # 4 MiB of float64: the map output goes through shared memory
CHUNK = 8192  # 64 chunks


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(7).random(N)


def open_fds(method: str = "fork") -> int:
    """Open descriptors, once Python's helper processes for ``method`` and autotune's segment
    guardian are running (they start with the first pool and keep their pipes: not a leak)."""
    from multiprocessing import forkserver, resource_tracker

    from autotune.backends import guardian as _guardian

    _guardian.ensure_running()
    resource_tracker.ensure_running()
    if method == "forkserver":
        forkserver.ensure_running()
    return len(os.listdir("/proc/self/fd"))


def zombies_below(root: int) -> list[int]:
    """Zombie processes anywhere below ``root`` (workers nobody reaped)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), fields[0])
    below, todo = [], [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, state) in table.items():
            if ppid == parent:
                todo.append(pid)
                if state == "Z":
                    below.append(pid)
    return below


def settle(measure, timeout: float = 5.0):
    """``measure()`` once it is falsy, or its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    value = measure()
    while value and time.monotonic() < deadline:
        time.sleep(0.05)
        value = measure()
    return value


def run_script(code: str, out: Path, timeout: float = 60, tmpdir: Path | None = None) -> int:
    """Run ``code`` in a fresh interpreter, stdout to ``out``; return the exit status.

    stdout goes to a file, not a pipe: workers inherit it, and reading a pipe to its end
    would wait for them as well as for the parent.  ``tmpdir``: the script's ``TMPDIR``
    (a script that is killed leaves what it made there, see ``conftest.child_tmpdir``).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    with open(out, "w") as fh:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=fh,
            stderr=subprocess.PIPE,
            env=env,
            timeout=timeout,
        )
    return proc.returncode


# -- a worker dies or runs out of memory in the middle of a map --------------------------------
def test_worker_faults_in_a_map_complete_and_leave_nothing(start_method, x, tmp_path, no_leaks):
    fds0 = open_fds(start_method)
    ev = Evaluator(2, CHUNK, shared={"x": x}, start_method=start_method, retries=2)
    with ev:
        # first chunk (before the output exists), last chunk, and two in the middle
        for kind, at in [
            ("sigkill", 0),
            ("sigsegv", N - 1),
            ("sigkill", N // 2 + 5),
            ("sigsegv", 12_345),
        ]:
            flag = tmp_path / f"{kind}-{at}"
            before = set(ev.pids)
            out = ev.map(kernels.FaultAt(kind, at, str(flag)), N)
            assert flag.exists(), "the fault was not injected"
            assert np.array_equal(out, x * 2.0)
            victim = int(flag.read_text())
            assert victim in before and victim not in ev.pids  # replaced
            assert process_gone(victim)
            del out
            assert settle(lambda: zombies_below(os.getpid())) == []
        with pytest.raises(MemoryError, match="Unable to allocate") as info:
            ev.map(kernels.FaultAt("memoryerror", N // 3, str(tmp_path / "mem")), N)
        # numpy's error has its own __str__: the items are named in a note (also on 3.10)
        notes = " ".join(getattr(info.value, "__notes__", []))
        assert f"[{N // 3 // CHUNK * CHUNK}, " in notes
        del info
        assert np.array_equal(ev.map(kernels.double, N), x * 2.0)  # the pool still serves
    del ev
    gc.collect()  # see test_kernel_error_releases_the_output_without_the_collector
    assert settle(lambda: open_fds() - fds0) == 0


@pytest.mark.parametrize(
    "method",
    [m if m == "fork" else pytest.param(m, marks=pytest.mark.slow) for m in START_METHODS],
)
def test_parent_terminated_mid_map(method, tmp_path, child_tmpdir):
    """SIGTERM has no handler: the parent dies; workers exit on pipe EOF, segments go."""
    out = tmp_path / "out"
    code = run_script(
        f"""
        import os
        import numpy as np
        import kernels
        from autotune import Evaluator

        if __name__ == "__main__":
            x = np.random.default_rng(0).random({N})
            ev = Evaluator(2, {CHUNK}, shared={{"x": x}}, start_method={method!r})
            print(os.getpid(), *ev.pids, flush=True)
            ev.map(kernels.FaultAt("sigterm", {N // 2}, {str(tmp_path / "flag")!r}, os.getpid()),
                   {N})
            print("survived", flush=True)
        """,
        out,
        tmpdir=child_tmpdir,
    )
    assert code == -signal.SIGTERM
    parent, *pids = (int(p) for p in out.read_text().split())
    assert len(pids) == 2
    assert settle(lambda: [p for p in pids if not process_gone(p)], 10) == []
    # the parent's segment guardian unlinks the control word, x's copy and the output
    assert settle(lambda: list_segments(parent), 10) == []


def test_ctrl_c_mid_map_leaves_no_descriptor_or_zombie(tmp_path):
    out = tmp_path / "out"
    code = run_script(
        f"""
        import gc, json, os
        import numpy as np
        import kernels
        from multiprocessing import resource_tracker
        from autotune import Evaluator
        from autotune.backends import guardian as _guardian
        from autotune.backends.shm import list_segments
        from conftest import process_gone
        from test_faults import zombies_below

        def run(x, pids):
            with Evaluator(2, {CHUNK}, shared={{"x": x}}) as ev:
                pids.extend(ev.pids)
                flag = {str(tmp_path / "flag")!r}
                ev.map(kernels.FaultAt("sigint", {N // 2}, flag, os.getpid()), {N})

        if __name__ == "__main__":
            resource_tracker.ensure_running()
            _guardian.ensure_running()
            x = np.random.default_rng(0).random({N})
            fds0 = len(os.listdir("/proc/self/fd"))
            pids, interrupted = [], False
            try:
                run(x, pids)
            except KeyboardInterrupt:
                interrupted = True
            # measured after the except block, which holds the evaluator in its traceback
            print(json.dumps({{
                "interrupted": interrupted,
                "gone": all(process_gone(p) for p in pids),
                "zombies": zombies_below(os.getpid()),
                "segments": list_segments(os.getpid()),
                "fds": len(os.listdir("/proc/self/fd")) - fds0,
            }}))
        """,
        out,
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report == {
        "interrupted": True,
        "gone": True,
        "zombies": [],
        "segments": [],
        "fds": 0,
    }


# -- two evaluators, several threads ------------------------------------------------------------
def test_two_evaluators_alive_at_once(start_method, x, tmp_path, no_leaks):
    # b forks after a exists: b's workers inherit a's pipes (and must close them)
    a = Evaluator(2, 5_000, shared={"x": x, "offset": 1.0}, start_method=start_method)
    b = Evaluator(2, 7_000, shared={"x": x, "offset": -1.0}, start_method="fork")
    with a, b:
        for _ in range(2):  # interleaved calls: no cross-talk between the pools
            assert np.array_equal(a.map(kernels.offset_map, N), x + 1.0)
            assert np.array_equal(b.map(kernels.offset_map, N), x - 1.0)
        assert a.reduce(kernels.offset_sum, 50_000) != b.reduce(kernels.offset_sum, 50_000)
        # a worker of a dies mid-map while b is alive: b is untouched
        b_pids = b.pids
        flag = tmp_path / "killed"
        assert np.array_equal(a.map(kernels.FaultAt("sigkill", 77_777, str(flag)), N), x * 2.0)
        assert flag.exists() and b.pids == b_pids
        # both at the same time, from two threads
        results: dict[str, list[bool]] = {"a": [], "b": []}

        def use(ev, key, offset):
            for _ in range(3):
                results[key].append(np.array_equal(ev.map(kernels.offset_map, N), x + offset))

        threads = [
            threading.Thread(target=use, args=(a, "a", 1.0)),
            threading.Thread(target=use, args=(b, "b", -1.0)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {"a": [True] * 3, "b": [True] * 3}
        pids = a.pids + b.pids
    assert all(process_gone(p) for p in pids)


def test_parent_killed_with_two_evaluators_alive(tmp_path, child_tmpdir):
    """Under fork the second pool's workers inherit the first's pipe ends: all must exit."""
    out = tmp_path / "out"
    run_script(
        """
        import os, signal
        import kernels
        from autotune import Evaluator

        if __name__ == "__main__":
            a = Evaluator(2, 100)
            b = Evaluator(2, 100)
            a.map(kernels.arange_map, 100_000)
            b.map(kernels.arange_map, 100_000)
            print(os.getpid(), *a.pids, *b.pids, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        out,
        tmpdir=child_tmpdir,
    )
    parent, *pids = (int(p) for p in out.read_text().split())
    assert len(pids) == 4
    assert settle(lambda: [p for p in pids if not process_gone(p)], 10) == []
    assert settle(lambda: list_segments(parent), 10) == []


@pytest.mark.forks_with_threads  # the killed worker is replaced while the other threads call
def test_one_evaluator_from_three_threads(start_method, x, tmp_path, no_leaks):
    """Calls from several threads are serialised: each gets its own, correct, result."""
    failures: list[str] = []

    def serial_exp_sum(n):
        # A left fold, ((p0 + p1) + p2) ..., as the evaluator's: not sum(), whose floats
        # are compensated from Python 3.12 on (other bits).
        total = 0.0
        for s, e in kernels.ranges_of(n, ev.workers, 3_000):
            total += float(np.exp(x[s:e]).sum())
        return total

    with Evaluator(2, 3_000, shared={"x": x}, start_method=start_method) as ev:

        def maps():
            for i in range(4):
                if not np.array_equal(ev.map(kernels.double, N - i), x[: N - i] * 2.0):
                    failures.append(f"map {i}")

        def reduces():
            for i in range(4):
                if ev.reduce(kernels.exp_sum, 40_000 + i) != serial_exp_sum(40_000 + i):
                    failures.append(f"reduce {i}")

        def faulty():  # a worker killed in this thread's call does not disturb the others
            flag = str(tmp_path / "killed")
            if not np.array_equal(ev.map(kernels.FaultAt("sigkill", 9_999, flag), N), x * 2):
                failures.append("faulty map")

        threads = [threading.Thread(target=f) for f in (maps, reduces, faulty)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert failures == []
        assert (tmp_path / "killed").exists()


@pytest.mark.parametrize("method", START_METHODS)
def test_nested_evaluator_refused_under_every_start_method(method, no_leaks):
    with Evaluator(2, 10, start_method=method) as ev:
        with pytest.raises(RuntimeError, match="nested process pools"):
            ev.reduce(kernels.nested_evaluator, 40)
        assert ev.reduce(kernels.exp_sum, 0) == 0
        assert ev.map(kernels.arange_map, 50).tolist() == list(range(50))  # still serves


# -- bugs found by the campaign, fixed: these pin the fixes ---------------------------------
def test_inherited_evaluator_used_in_a_kernel_is_refused(no_leaks):
    kernels.INHERITED = Evaluator(2, 10)
    try:
        # fork: the workers of the second pool inherit kernels.INHERITED
        with Evaluator(2, 10) as ev, pytest.raises(RuntimeError, match="nested"):
            ev.reduce(kernels.uses_inherited, 20)
        result: list = []
        t = threading.Thread(
            target=lambda: result.append(kernels.INHERITED.map(kernels.arange_map, 20)),
            daemon=True,
        )
        t.start()
        t.join(10)
        assert result and result[0].tolist() == list(range(20)), "the parent's evaluator hangs"
    finally:
        kernels.INHERITED.close()
        kernels.INHERITED = None


def test_threads_backend_kernel_creating_an_evaluator_is_refused(no_leaks):
    def kernel(shared, start, stop):
        with Evaluator(1, 5, start_method="fork") as inner:
            return inner.reduce(kernels.exp_sum, 0) + float(stop - start)

    with Evaluator(1, 10, backend="threads") as ev, pytest.raises(RuntimeError, match="nested"):
        ev.reduce(kernel, 10)


def test_close_from_another_thread_during_a_call(no_leaks):
    ev = Evaluator(2, 10, shared={"delay": 0.02})
    outcome: list = []

    def call():
        try:
            outcome.append(ev.reduce(kernels.slow, 600))
        except Exception as exc:
            outcome.append(exc)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    ev.close()
    t.join(30)
    assert not t.is_alive()
    # either the call finished first, or it says the evaluator was closed
    assert outcome[0] == 600.0 or (
        isinstance(outcome[0], RuntimeError) and "closed" in str(outcome[0])
    ), repr(outcome[0])


def test_close_releases_every_descriptor(x, no_leaks):
    fds0 = open_fds()
    ev = Evaluator(2, CHUNK, shared={"x": x})
    ev.map(kernels.double, 1_000)
    ev.close()
    assert settle(lambda: open_fds() - fds0, 1.0) == 0


def test_kernel_error_releases_the_output_without_the_collector(x, tmp_path, no_leaks):
    fds0 = open_fds()
    gc.disable()
    try:
        with Evaluator(2, CHUNK, shared={"x": x}) as ev, pytest.raises(MemoryError):
            ev.map(kernels.FaultAt("memoryerror", N - 1, str(tmp_path / "f")), N)
        del ev
        assert open_fds() == fds0
    finally:
        gc.enable()
        gc.collect()


NESTED_DEADLOCKS = {
    "threads kernel calls its own evaluator": """
        with Evaluator(2, 10, backend="threads") as ev:
            ev.reduce(lambda s, a, b: ev.reduce(lambda s, a, b: float(b - a), 10), 40)
    """,
    "combine function calls its own evaluator": """
        with Evaluator(2, 10) as ev:
            def combine(p, q):
                ev.map(kernels.arange_map, 10)
                return p + q
            ev.reduce(kernels.scalar_result, 40, combine=combine)
    """,
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(NESTED_DEADLOCKS))
def test_reentrant_use_is_refused_not_deadlocked(case, tmp_path):
    body = textwrap.indent(textwrap.dedent(NESTED_DEADLOCKS[case]).strip(), " " * 8)
    code = (
        "import kernels\n"
        "from autotune import Evaluator\n\n"
        'if __name__ == "__main__":\n'
        "    try:\n" + body + "\n"
        "    except RuntimeError as exc:\n"
        '        print("refused:", exc)\n'
    )
    try:
        status = run_script(code, tmp_path / "out", timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("deadlocked")
    assert status == 0 and "refused:" in (tmp_path / "out").read_text()


# -- the campaign and soak scripts themselves ------------------------------------------------------
def _script(*args: str, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fault_campaign.py"), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_fault_campaign_script_small_run_passes():
    result = _script("--runs", "5", "--mib", "8", timeout=300)
    s = result["summary"]
    assert s["failures"] == [] and s["pass"], s["failures"]
    total = s["total"]
    assert total["runs"] == 5 * len(START_METHODS)
    assert total["wrong"] == total["hangs"] == total["undocumented"] == 0
    assert total["zombies"] == total["orphans"] == total["shm_left"] == total["fds_left"] == 0
    assert total["stderr_lines"] == 0  # a killed parent's terminal: nothing but its end
    assert s["killed_completed_equal"] == s["killed_runs"] > 0
    assert s["index_reduce_deaths"] >= s["killed_runs"]  # and the index-only reduce too


@pytest.mark.slow
def test_soak_script_is_flat():
    result = _script("--soak", "--calls", "200", "--every", "50", timeout=300)
    assert result["pass"], result
    for r in result["methods"].values():
        assert len(r["samples"]) == 4 and all(s["equal"] for s in r["samples"])
