"""How much CPU other processes took while we measured.

A timed run is only worth comparing with another if the machine gave both
the CPUs they needed.  :class:`CpuMeter` reads, at the start and the end of
a run, the busy time of the CPUs this process may run on (``/proc/stat``,
one ``cpuN`` line each; hypervisor *steal* counts as busy: the CPU was taken
from us) and the CPU time of this process, its reaped children and the
worker processes it is given (``/proc/PID/stat``).  What the CPUs were busy
with beyond our own time is what other processes took
(:class:`Contention`).  psutil is not needed: it is only a benchmark extra.

A run on ``needed`` CPUs is *contended* when others took more than
:data:`SHARE` of those CPUs beyond the ones the run left idle: a busy loop
on one of two cores contends a 2-worker run, not a 1-worker one.  The
counters tick in clock ticks (usually 10 ms), so a run shorter than a few
ticks cannot be judged on its own; :attr:`Contention.resolution` is what the
counters may be off by, and it is taken off before judging.

Nothing here changes the machine: a meter only reads.  Where ``/proc`` is
not there (macOS), :meth:`CpuMeter.sample` returns ``None`` and nothing is
judged.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["SHARE", "Contention", "CpuMeter", "CpuSample", "CpuSampler", "contention_between"]

#: Others taking more than this fraction of the CPUs a run needed make it
#: contended; the same bar the benchmark scripts use for "the machine was
#: not idle" (``scripts/_bench_common.py``, ``NOISY``).
SHARE = 0.10

# /proc/stat's cpuN fields, in order: user nice system idle iowait irq softirq
# steal guest guest_nice.  guest time is already inside user; idle and iowait
# are not busy.
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


@dataclass(frozen=True)
class CpuSample:
    """One reading of the meter.

    Attributes
    ----------
    wall : float
        Seconds on the meter's clock.
    busy : float
        CPU-seconds the CPUs in ``cpus`` have been busy since boot, steal included.
    ours : float
        CPU-seconds of this process, its reaped children and the workers named.
    cpus : frozenset of int
        The CPUs this process may run on when the sample was taken.
    counters : int
        How many tick counters went into ``busy`` and ``ours`` (for the resolution).
    tick : float
        Seconds per clock tick.
    """

    wall: float
    busy: float
    ours: float
    cpus: frozenset[int]
    counters: int = 0
    tick: float = 0.0


@dataclass(frozen=True)
class Contention:
    """What other processes took between two samples.

    Attributes
    ----------
    wall : float
        Seconds between the samples.
    others : float
        CPU-seconds others used on our CPUs (never below 0).
    cpus : int
        How many CPUs we could run on.
    resolution : float
        CPU-seconds the counters may be off by (taken off before judging).
    """

    wall: float
    others: float
    cpus: int
    resolution: float = 0.0

    @property
    def held(self) -> float:
        """CPUs other processes held on average."""
        return self.others / self.wall if self.wall > 0 else 0.0

    def taken(self, needed: int) -> float:
        """Fraction of ``needed`` CPUs others took beyond those a run on ``needed``
        CPUs left idle (0 when the idle ones were enough for them)."""
        needed = max(1, min(needed, self.cpus))
        if self.wall <= 0:
            return 0.0
        idle = self.cpus - needed
        excess = self.others - self.resolution - idle * self.wall
        return max(0.0, excess) / (needed * self.wall)

    def contended(self, needed: int) -> bool:
        """Whether others took more than :data:`SHARE` of the ``needed`` CPUs."""
        return self.taken(needed) > SHARE


def contention_between(first: CpuSample | None, last: CpuSample | None) -> Contention | None:
    """What others took between two samples (None: either is missing, or the CPUs
    we may run on changed in between, so the two do not compare)."""
    if first is None or last is None or first.cpus != last.cpus or not last.cpus:
        return None
    wall = last.wall - first.wall
    others = (last.busy - first.busy) - (last.ours - first.ours)
    # Each counter's difference is off by up to one tick, independently: their
    # sum by about sqrt(counters) ticks (2.5 standard deviations of uniform errors).
    counters = max(first.counters, last.counters)
    resolution = last.tick * math.sqrt(counters) if counters else 0.0
    return Contention(
        wall=wall, others=max(0.0, others), cpus=len(last.cpus), resolution=resolution
    )


class CpuSampler(Protocol):
    """What a bench reads around each timed run: :class:`CpuMeter`, or a scripted
    one that makes contention in tests without loading the machine."""

    def sample(self, pids: Iterable[int] = ()) -> CpuSample | None: ...


class CpuMeter:
    """Reads the machine's busy CPU time and ours (Linux ``/proc``).

    Parameters
    ----------
    proc : str
        Where procfs is mounted (a fixture tree in tests).
    clock : callable
        Seconds; :func:`time.monotonic` by default.
    """

    def __init__(self, proc: str = "/proc", clock: Callable[[], float] = time.monotonic) -> None:
        self.proc = proc
        self.clock = clock
        try:
            self.tick = 1.0 / os.sysconf("SC_CLK_TCK")
        except (AttributeError, ValueError, OSError):
            self.tick = 0.01

    def sample(self, pids: Iterable[int] = ()) -> CpuSample | None:
        """The busy time of the CPUs we may use and the CPU time of this process,
        its reaped children and ``pids``; None where ``/proc/stat`` cannot be read."""
        cpus = _affinity()
        busy = self._busy(cpus)
        if busy is None:
            return None
        pids = list(pids)
        mine = os.times()
        ours = mine.user + mine.system + mine.children_user + mine.children_system
        for pid in pids:
            ours += self._process(pid)
        return CpuSample(
            wall=self.clock(),
            busy=busy,
            ours=ours,
            cpus=cpus,
            counters=len(cpus) + 2 + len(pids),
            tick=self.tick,
        )

    def _busy(self, cpus: frozenset[int]) -> float | None:
        try:
            with open(os.path.join(self.proc, "stat"), encoding="ascii") as f:
                lines = f.readlines()
        except (OSError, UnicodeDecodeError):
            return None
        total = 0
        seen = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
                continue
            if int(name[3:]) not in cpus:
                continue
            fields = rest.split()
            total += sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields))
            seen += 1
        return total * self.tick if seen else None

    def _process(self, pid: int) -> float:
        """CPU-seconds of a live process (0 once it is gone)."""
        try:
            with open(os.path.join(self.proc, str(pid), "stat"), encoding="ascii") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            return 0.0
        # The command name is in parentheses and may hold spaces or ")": the
        # fields start after the last ")", at field 3 (state); utime and stime
        # are fields 14 and 15.
        fields = text.rpartition(")")[2].split()
        try:
            return (int(fields[11]) + int(fields[12])) * self.tick
        except (IndexError, ValueError):
            return 0.0


def _affinity() -> frozenset[int]:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        return frozenset(getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))
