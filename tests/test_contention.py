"""Measurements that know the machine was busy.

The CPU meter (``autotune.cpu.contention``) on fixture ``/proc`` trees, and
what counts as contended.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from autotune.cpu.contention import Contention, CpuMeter, CpuSample, contention_between


# -- what counts as contended (pure) ---------------------------------------------------------
def test_others_count_only_beyond_the_cpus_a_run_left_idle():
    busy_loop = Contention(wall=1.0, others=1.0, cpus=2)  # one of two CPUs taken
    assert busy_loop.held == 1.0
    assert busy_loop.contended(2) and busy_loop.taken(2) == 0.5
    assert not busy_loop.contended(1) and busy_loop.taken(1) == 0.0  # the idle CPU sufficed
    # On 16 CPUs one busy loop takes 1/16 of a 16-worker run: below the bar ...
    wide = Contention(wall=1.0, others=1.0, cpus=16)
    assert wide.taken(16) == pytest.approx(1 / 16) and not wide.contended(16)
    # ... two take 1/8 of it, above the bar.
    assert Contention(wall=1.0, others=2.0, cpus=16).contended(16)
    # More workers than CPUs need all of them, no more.
    assert busy_loop.taken(8) == busy_loop.taken(2)


def test_what_the_counters_cannot_resolve_is_not_contention():
    # 20 ms of others in a 20 ms run, with counters good to 20 ms: unknown, not contended.
    short = Contention(wall=0.02, others=0.02, cpus=2, resolution=0.02)
    assert not short.contended(2)
    assert Contention(wall=1.0, others=1.0, cpus=2, resolution=0.02).contended(2)
    assert Contention(wall=0.0, others=1.0, cpus=2).taken(2) == 0.0


def sample(wall, busy, ours, cpus=(0, 1), counters=0, tick=0.01):
    return CpuSample(wall, busy, ours, frozenset(cpus), counters, tick)


def test_contention_between_two_samples():
    load = contention_between(sample(10.0, 100.0, 5.0), sample(12.0, 103.0, 6.0, counters=4))
    assert load is not None
    assert (load.wall, load.others, load.cpus) == (2.0, 2.0, 2)  # 3 busy - 1 ours
    assert load.resolution == pytest.approx(0.01 * 2)  # sqrt(4) ticks
    # Our own time beyond what the CPUs show (counter skew) is never negative others.
    skew = contention_between(sample(0.0, 0.0, 0.0), sample(1.0, 1.0, 1.5))
    assert skew is not None and skew.others == 0.0
    assert contention_between(None, sample(1.0, 1.0, 1.0)) is None
    assert contention_between(sample(0.0, 0.0, 0.0), None) is None
    # The affinity changed in between: the two do not compare.
    assert contention_between(sample(0.0, 0.0, 0.0), sample(1.0, 1.0, 0.0, cpus=(0,))) is None


# -- the meter on /proc ---------------------------------------------------------------------
def write_proc(root: Path, busy_ticks: dict[int, int], processes: dict[int, tuple[int, int]]):
    """A /proc tree: ``cpuN`` lines whose busy fields sum to ``busy_ticks[N]`` (idle and
    iowait large, guest inside user as the kernel counts it), and ``PID/stat`` files."""
    lines = ["cpu  999999 0 0 999999 0 0 0 0 0 0"]
    for cpu, ticks in busy_ticks.items():
        user, system, irq, softirq, steal = ticks - 10, 4, 2, 2, 2
        # user nice system idle iowait irq softirq steal guest guest_nice
        lines.append(f"cpu{cpu} {user} 0 {system} 88888 777 {irq} {softirq} {steal} 3 0")
    lines.append("intr 12345 0 0")
    root.mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text("\n".join(lines) + "\n")
    for pid, (utime, stime) in processes.items():
        (root / str(pid)).mkdir(exist_ok=True)
        # A command name with a space and a parenthesis, as a process may have.
        fields = ["S", *["0"] * 10, str(utime), str(stime), *["0"] * 30]
        (root / str(pid) / "stat").write_text(f"{pid} (odd) name) {' '.join(fields)}\n")


def test_meter_reads_our_cpus_steal_included_and_the_workers(tmp_path):
    ours = sorted(os.sched_getaffinity(0))
    other_cpu = max(ours) + 1  # not ours: never counted
    busy = {cpu: 1000 + 100 * i for i, cpu in enumerate(ours)}
    write_proc(tmp_path, {**busy, other_cpu: 555_555}, {4242: (300, 200)})
    meter = CpuMeter(str(tmp_path), clock=lambda: 7.0)
    alone = meter.sample()
    with_worker = meter.sample([4242, 999_999])  # a worker, and one already gone
    assert alone is not None and with_worker is not None
    assert alone.busy == pytest.approx(sum(busy.values()) * meter.tick)
    assert alone.cpus == frozenset(ours) and alone.wall == 7.0
    assert with_worker.ours - alone.ours == pytest.approx(500 * meter.tick, abs=0.05)
    assert with_worker.counters == alone.counters + 2


def test_meter_without_proc_measures_nothing(tmp_path):
    assert CpuMeter(str(tmp_path / "none")).sample() is None
    (tmp_path / "stat").write_text("cpu  1 2 3 4\nintr 0\n")  # no per-CPU lines
    assert CpuMeter(str(tmp_path)).sample() is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc")
def test_meter_reads_this_machine():
    meter = CpuMeter()
    first, last = meter.sample([os.getpid()]), meter.sample([os.getpid()])
    load = contention_between(first, last)
    assert load is not None and load.cpus == len(os.sched_getaffinity(0)) and load.others >= 0
