"""What the benchmark scripts share: a witness of how busy the machine was, and a fresh
profile directory that does not outlive the run.

Imported by the scripts in this folder (run as ``python scripts/NAME.py``, so
this folder is on ``sys.path``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "KEEP_PROFILES_HELP",
    "CpuWitness",
    "NOISY",
    "agrees",
    "contention_note",
    "fresh_profile_dir",
    "time_interleaved",
    "usable_cpus",
    "workers_for_all",
]

#: Above this fraction of the machine's CPU taken by others, a run is flagged as noisy.
NOISY = 0.10


class CpuWitness:
    """How much of the machine's CPU other processes took while we measured.

    The machine's busy CPU time (psutil) minus ours and our children's, as a
    fraction of all CPUs over the wall time; hypervisor steal counts as taken.
    Ratios measured while others held a CPU are not to be trusted.  ``None``
    where psutil (the ``[bench]`` extra) is not installed.
    """

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            self.psutil = None
            return
        self.psutil = psutil
        self.start = (time.perf_counter(), self._machine_busy(), self._ours())

    def _machine_busy(self) -> float:
        t = self.psutil.cpu_times()
        # guest time is already inside user on Linux; idle and iowait are not busy
        skip = {"idle", "iowait", "guest", "guest_nice"}
        return sum(getattr(t, f) for f in t._fields if f not in skip)

    def _ours(self) -> float:
        me = self.psutil.Process()
        t = me.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in me.children(recursive=True):  # live workers (joblib keeps its own)
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except self.psutil.Error:
                pass
        return total

    def others(self) -> float | None:
        """Fraction of the machine's CPU time taken by others since construction."""
        if self.psutil is None:
            return None
        wall0, busy0, ours0 = self.start
        wall = time.perf_counter() - wall0
        others = (self._machine_busy() - busy0) - (self._ours() - ours0)
        return max(0.0, others / (wall * (self.psutil.cpu_count() or 1)))


def usable_cpus() -> int:
    """CPUs this process may use: the probe's ``usable_cpus`` (online CPUs narrowed by
    the affinity mask, then by a cgroup quota), what autotune's own heuristic caps at."""
    import autotune

    return autotune.probe().usable_cpus or os.cpu_count() or 1


def workers_for_all(given: int | None) -> tuple[int, str]:
    """Workers every contender gets, and a phrase that says where the count came from:
    ``--workers`` when given, else every usable CPU (never an assumed 2)."""
    if given is not None:
        return given, "--workers"
    return usable_cpus(), "the usable CPUs; --workers N to change"


def contention_note(fraction: float | None) -> str:
    """One line saying how busy the machine was while we measured."""
    if fraction is None:
        return "CPU taken by other processes: unknown (install psutil)"
    note = f"CPU taken by other processes during the run: {fraction:.0%} of the machine"
    if fraction > NOISY:
        note += " -- WARNING: the machine was not idle, so the ratios are not reliable; rerun"
    return note


#: ``--keep-profiles``' help, the same in every script that learns online profiles.
KEEP_PROFILES_HELP = "keep the fresh profile directory (printed); removed at exit otherwise"


def fresh_profile_dir(prefix: str, keep: bool) -> str:
    """A new, empty directory in the temp directory for the profiles a benchmark's
    evaluators learn, removed when the script exits (an exception or Ctrl-C included)
    unless ``keep`` (``--keep-profiles``): a benchmark run by hand or by CI should not
    leave a directory behind each time."""
    path = tempfile.mkdtemp(prefix=prefix)
    if not keep:
        atexit.register(_remove_dir, path, os.getpid())
    return path


def _remove_dir(path: str, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked child that runs the exit handlers
        shutil.rmtree(path, ignore_errors=True)


def agrees(a: Any, b: Any) -> bool:
    """A result equal to the serial one: arrays to 1e-12, numbers to 1e-9 (relative)."""
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-12, atol=0))
    return abs(a - b) <= 1e-9 * abs(b)


def time_interleaved(
    runners: dict[str, Callable[[], Any]], expected: Any, repeats: int
) -> tuple[dict[str, list[float]], dict[str, bool]]:
    """Seconds of each runner over ``repeats`` rounds, runs interleaved so drift hits all.

    A first round warms every runner up and checks its result against ``expected``.
    """
    times: dict[str, list[float]] = {k: [] for k in runners}
    ok = {name: agrees(fn(), expected) for name, fn in runners.items()}
    for _ in range(repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - t0)
            del result
    return times, ok
