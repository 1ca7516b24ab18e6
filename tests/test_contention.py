"""Measurements that know the machine was busy.

The CPU meter (``autotune.cpu.contention``) on fixture ``/proc`` trees; what
counts as contended; a bench re-timing contended runs and marking what stays
contended; a search given a scripted meter (the documented seam:
``search(meter=...)``, ``Bench(meter=...)``), so contention is injected, never
made by loading the machine; the profile recording it; and the evaluator
warning before it adopts a doubtful 1-worker verdict.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from autotune import Evaluator, Profile, ProfileWarning, Workload, search
from autotune.bench import Bench
from autotune.cpu import probe
from autotune.cpu.contention import SHARE, Contention, CpuMeter, CpuSample, contention_between
from autotune.engine import RETIMES, Point
from autotune.profile import Measurement, heuristic_profile, python_build


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


# -- re-timing on a bench -------------------------------------------------------------------
class ScriptedMeter:
    """A /proc that says, around run k, that other processes held ``loads[k]`` CPUs
    (the last entry repeats); between runs, nothing.  Each run takes 1 s of its clock."""

    def __init__(self, loads, cpus):
        self.loads = list(loads)
        self.cpus = frozenset(range(cpus))
        self.wall = self.busy = 0.0
        self.runs = 0
        self.inside = False

    def sample(self, pids=()):
        if self.inside:  # the end of a run
            self.busy += self.loads[min(self.runs, len(self.loads) - 1)]
            self.runs += 1
        self.wall += 1.0 if self.inside else 0.5
        self.inside = not self.inside
        return CpuSample(self.wall, self.busy, 0.0, self.cpus)


class ListBench(Bench):
    """Every attempt of a run takes the next of ``seconds``."""

    def __init__(self, seconds, meter=None):
        super().__init__(n=1000, item_bytes=8, label=False, meter=meter)
        self.seconds = list(seconds)
        self.attempts = 0

    def once(self):
        self.attempts += 1
        return self.seconds.pop(0)

    def run(self, point, repeats, warmup=False):
        for _ in range(repeats):
            self.timed(point, self.once)


TWO = Point("processes", 2, 100)


def test_a_contended_run_is_retimed_and_the_clean_one_kept():
    bench = ListBench([9.0, 1.0], ScriptedMeter([1.0, 0.0], cpus=2))
    bench.run(TWO, 1)
    assert bench.attempts == 2 and bench.retimed == 1
    m = bench.measurement(TWO)
    assert m.throughput == 1000 / 1.0 and m.contended == 0 and m.repeats == 1


def test_contention_that_persists_is_kept_and_marked():
    # Every attempt contended; the second least (others held 1.5, 2.0, then 1.2 CPUs).
    bench = ListBench([3.0, 4.0, 2.5], ScriptedMeter([1.5, 2.0, 1.2], cpus=2))
    bench.run(TWO, 1)
    assert bench.attempts == RETIMES + 1 == 3
    m = bench.measurement(TWO)
    assert m.throughput == 1000 / 2.5 and m.contended == 1
    summary = bench.contention()
    assert summary is not None
    assert (summary["cpus"], summary["runs"], summary["contended"]) == (2, 1, 1)
    # 4.7 CPU-seconds of others over 3 runs of 1 s and the gaps between them.
    assert summary["others"] == pytest.approx(4.7 / 4.0, abs=1e-3)


def test_contention_that_persisted_is_not_retimed_again_until_a_run_is_clean():
    # Run 1: three contended attempts.  Run 2: one attempt, kept and marked.
    # Run 3: clean.  Run 4: contended, so re-timed again (and clean the second time).
    loads = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    bench = ListBench([5.0, 6.0, 7.0, 8.0, 1.0, 9.0, 2.0], ScriptedMeter(loads, cpus=2))
    bench.run(TWO, 2)
    assert bench.attempts == RETIMES + 2 and bench.measurement(TWO).contended == 2
    bench.run(TWO, 2)
    assert bench.attempts == RETIMES + 5 and bench.retimed == RETIMES + 1
    m = bench.measurement(TWO)
    assert m.repeats == 4 and m.contended == 2
    assert sorted(bench.times[TWO]) == [1.0, 2.0, 5.0, 8.0]


def test_a_busy_machine_leaves_a_one_worker_run_alone():
    one = Point("processes", 1, 100)
    bench = ListBench([2.0], ScriptedMeter([1.0], cpus=2))  # one CPU of two taken
    bench.run(one, 1)
    assert bench.attempts == 1 and bench.measurement(one).contended == 0


def test_without_a_meter_nothing_is_judged():
    bench = ListBench([1.0, 2.0])
    bench.run(TWO, 2)
    assert bench.attempts == 2 and bench.contention() is None
    assert bench.measurement(TWO).repeats == 2


# -- a search given a scripted meter --------------------------------------------------------
def square(shared, start, stop):
    return shared.x[start:stop] ** 2


def small_workload():
    x = np.random.default_rng(0).random(100_000)
    return Workload("square", len(x), square, shared={"x": x}, mode="map", item_bytes=16)


def test_a_search_on_a_busy_machine_retimes_marks_and_says_so(tmp_path):
    # Other processes hold the one CPU the meter knows of during every run.
    meter = ScriptedMeter([1.0], cpus=1)
    result = search(small_workload(), budget=1.0, workers=[1], backends=("processes",), meter=meter)
    profile = result.profile
    busy = profile.contention
    assert busy is not None and busy["cpus"] == 1 and busy["others"] > SHARE
    assert busy["contended"] == busy["runs"] > 0
    # The first run is made three times; the load persists, so the others once each.
    assert meter.runs == busy["runs"] + RETIMES
    timed = [m for m in profile.measurements if m.chunk_len < profile.n]
    assert timed and all(m.contended == m.repeats for m in timed)
    assert any("other processes held" in doubt for doubt in profile.doubts)
    assert "caution: other processes held" in result.table()
    assert "runs contended" in result.table()  # the kept points are marked
    assert Profile.load(profile.save(tmp_path / "busy.yaml")) == profile


def test_a_search_on_a_quiet_machine_records_it_and_raises_no_doubt():
    meter = ScriptedMeter([0.0], cpus=1)
    profile = search(
        small_workload(), budget=1.0, workers=[1], backends=("processes",), meter=meter
    ).profile
    assert profile.contention is not None
    assert profile.contention["others"] == 0.0 and profile.contention["contended"] == 0
    assert all(m.contended == 0 for m in profile.measurements)
    assert not any("other processes" in doubt for doubt in profile.doubts)


# -- the profile and the evaluator ----------------------------------------------------------
def profile_with(workers=1, throughput=1e6, serial=5e5, contention=None):
    """A threads profile for this CPU (threads: nothing to start) with one point."""
    base = heuristic_profile(probe(), "knn", 16)
    best = Measurement(workers, 3000, 3000 * 16, throughput, repeats=3, spread=0.02)
    return dataclasses.replace(
        base,
        source="measured",
        best=best,
        serial_throughput=serial,
        measurements=(best,),
        backend="threads",
        python=python_build(),
        n=100_000,
        contention=contention,
    )


BUSY = {"others": 0.97, "cpus": 2, "runs": 40, "contended": 12}
QUIET = {"others": 0.01, "cpus": 2, "runs": 40, "contended": 0}


def test_doubts_name_a_busy_machine_and_a_best_slower_than_serial():
    assert profile_with(contention=QUIET).doubts == []
    assert profile_with().doubts == []  # an old file: nothing recorded, nothing said
    (busy,) = profile_with(contention=BUSY).doubts
    assert busy == (
        "other processes held 0.97 of its 2 CPUs on average while it was measured; "
        "12 of its 40 runs were still contended after re-timing"
    )
    # Held more than a tenth of the CPUs although every run came out clean on re-timing.
    (held,) = profile_with(contention={**QUIET, "others": 0.5}).doubts
    assert held.endswith("while it was measured")
    (slow,) = profile_with(throughput=4e5).doubts
    assert slow == "its best (1 x 3000, threads) ran 0.80x serial: no point beat one process"


@pytest.mark.parametrize(
    ("profile", "fragment"),
    [
        (profile_with(contention=BUSY), "other processes held 0.97 of its 2 CPUs"),
        (profile_with(throughput=4e5), "ran 0.80x serial"),
    ],
)
def test_the_evaluator_warns_before_adopting_a_doubtful_one_worker_verdict(profile, fragment):
    with pytest.warns(ProfileWarning, match="says 1 worker, but") as record:
        ev = Evaluator(profile=profile)
    with ev:
        assert ev.workers == 1  # warned, and adopted
    assert fragment in str(record[0].message)
    assert record[0].filename == __file__  # pointed at the line that made the Evaluator


def test_no_warning_for_a_sound_verdict_or_workers_given():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for profile, workers in [
            (profile_with(contention=QUIET), None),  # measured on a quiet machine
            (profile_with(workers=2, contention=BUSY), None),  # not a 1-worker verdict
            (profile_with(contention=BUSY), 1),  # the user's own choice
        ]:
            with Evaluator(workers, profile=profile) as ev:
                assert ev.workers == profile.workers


def test_a_doubtful_file_is_named_in_the_warning(tmp_path):
    path = profile_with(contention=BUSY).save(tmp_path / "knn.yaml")
    with pytest.warns(ProfileWarning, match="knn.yaml"):
        Evaluator(profile=str(path)).close()


def test_show_prints_the_doubts_of_a_saved_profile(tmp_path, capsys):
    from autotune.cli import main

    path = profile_with(contention=BUSY).save(tmp_path / "knn.yaml")
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "caution: other processes held 0.97 of its 2 CPUs" in out
