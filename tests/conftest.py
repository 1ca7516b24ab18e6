"""Shared fixtures: start methods, a check that nothing leaks, the shipped i3 profile and CPU,
each YAML loader profiles may be read with, and no fork while other threads run."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import threading
import warnings
from pathlib import Path

import pytest
import yaml

import autotune.profile.files as profile_files
from autotune.backends.shm import list_segments
from autotune.cpu import CacheLevel, CpuInfo

ROOT = Path(__file__).resolve().parent.parent
#: The seed's published profile, shipped with the project.
SHIPPED = ROOT / "profiles" / "i3-3227u-spline.yaml"
#: The CPU that profile was published for (Intel Core i3-3227U).
I3 = CpuInfo(
    brand="Intel(R) Core(TM) i3-3227U CPU @ 1.90GHz",
    logical_cpus=4,
    physical_cores=2,
    threads_per_core=2,
    usable_cpus=4,
    cpu_quota=None,
    caches=(
        CacheLevel(1, "data", 32768, 2, 2),
        CacheLevel(2, "unified", 262144, 2, 2),
        CacheLevel(3, "unified", 3145728, 4, 1),
    ),
)


@pytest.fixture(autouse=True, scope="session")
def private_profile_dir(tmp_path_factory):
    """No test reads or writes the user's own profiles (online profiles included)."""
    saved = {k: os.environ.get(k) for k in ("AUTOTUNE_PROFILE_DIR", "AUTOTUNE_PROFILE")}
    os.environ["AUTOTUNE_PROFILE_DIR"] = str(tmp_path_factory.mktemp("profiles"))
    os.environ.pop("AUTOTUNE_PROFILE", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def child_tmpdir(tmp_path_factory) -> Path:
    """A temp directory of its own for a child process (``TMPDIR``), inside pytest's.

    What a child killed with SIGKILL made in the temp directory stays there:
    multiprocessing's ``pymp-*`` directory with a forkserver's ``listener-*``
    socket, for one.  Here it lands among pytest's own temp directories (which
    pytest prunes), never in the real temp directory.  A short one (``t0``,
    ``t1``, ... under the session's base directory) rather than ``tmp_path``:
    a socket's path must fit in AF_UNIX's 108 bytes, and a long test name under
    a long ``TMPDIR`` leaves no room (a forkserver then fails to start).
    """
    return tmp_path_factory.mktemp("t")


START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]

#: The loaders profiles are read with: libyaml's where PyYAML has it, and the pure-Python one.
YAML_LOADERS = {"libyaml": getattr(yaml, "CSafeLoader", None), "pure": yaml.SafeLoader}
YAML_LOADERS = {name: loader for name, loader in YAML_LOADERS.items() if loader is not None}


@pytest.fixture(scope="module", params=list(YAML_LOADERS))
def yaml_loader(request):
    """The module's tests run once with each loader (``pytestmark = usefixtures(...)``)."""
    loader = YAML_LOADERS[request.param]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(profile_files, "safe_loader", lambda: loader)
        yield loader


@pytest.fixture(params=START_METHODS)
def start_method(request):
    return request.param


def process_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie about to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().split(")")[-1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves autotune segments in /dev/shm or child processes."""
    before_segments = set(list_segments(os.getpid()))
    before_children = set(children_of(os.getpid()))
    yield
    leaked = set(list_segments(os.getpid())) - before_segments
    assert not leaked, f"leaked shared-memory segments: {sorted(leaked)}"
    # the forkserver and resource-tracker helpers are Python's, started once;
    # autotune's segment guardian too (autotune/backends/guardian.py)
    helpers = set()
    for pid in set(children_of(os.getpid())) - before_children:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read()
        if b"forkserver" in cmd or b"resource_tracker" in cmd or b"segment-guardian" in cmd:
            helpers.add(pid)
    left = set(children_of(os.getpid())) - before_children - helpers
    assert not left, f"child processes left running: {sorted(left)}"


#: Test modules that leave threads running for the rest of the process: Dask's client starts
#: process-wide threads (its offload executor, IO loops) that outlive every client and cluster.
THREADS_LEFT_BEHIND = ("test_dask.py",)


def pytest_collection_modifyitems(items):
    """Run the modules that leave threads behind last, so that no test that forks
    afterwards does it with their threads running (see ``no_fork_with_threads``)."""
    items.sort(key=lambda item: item.path.name in THREADS_LEFT_BEHIND)


#: What Python 3.12+ warns (DeprecationWarning) when this process forks while other threads
#: run: the child may deadlock on a lock one of them held.
FORK_WITH_THREADS = re.compile(r"This process \(pid=\d+\) is multi-threaded, use of \w+\(\)")


@pytest.fixture(autouse=True)
def no_fork_with_threads(request):
    """Fail a test during which this process forked with other threads running (a thread left
    behind by an earlier test counts too), unless it is marked ``forks_with_threads``.

    A filter "error" cannot do it: ``os.fork`` clears the exception such a filter raises and
    goes on.  So the warnings are recorded here, and every other one is passed on as it came.
    """
    if request.node.get_closest_marker("forks_with_threads"):
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        yield
    forked = [w for w in caught if FORK_WITH_THREADS.match(str(w.message))]
    for w in caught:
        if w not in forked:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if forked:
        others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        pytest.fail(
            f"forked while other threads ran ({', '.join(others) or 'gone by now'}): "
            f"{forked[0].message}",
            pytrace=False,
        )


#: Tests that let the evaluator or the search pick "one worker per core" start at most this
#: many workers: the suite must not start 64 of them on a 64-core machine.
MAX_TEST_CPUS = 4


@pytest.fixture(autouse=True)
def capped_cpus(request):
    """Narrow this thread's affinity to at most :data:`MAX_TEST_CPUS` CPUs for the test.

    The probe applies the live process's affinity (the seam ``usable_cpus`` comes
    from), so ``Evaluator()``, ``autotune search`` and every script a test runs (its
    children inherit the mask) see at most that many usable CPUs.  Nothing changes where
    the machine has no more.  A test marked ``all_cpus`` keeps the whole mask.
    """
    if request.node.get_closest_marker("all_cpus") or not hasattr(os, "sched_setaffinity"):
        yield
        return
    saved = os.sched_getaffinity(0)
    if len(saved) <= MAX_TEST_CPUS:
        yield
        return
    os.sched_setaffinity(0, sorted(saved)[:MAX_TEST_CPUS])
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)
