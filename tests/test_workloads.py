"""The built-in workloads are sized for the machine, and a search says when its runs were
too short for every worker to get several chunks of the longest length it screens."""

from __future__ import annotations

import pytest
from replay import many_cores

from autotune.cpu import CpuInfo, probe
from autotune.engine import Request, Tally, auto_requests, chunk_ladder
from autotune.tuner import search
from autotune.workloads import (
    CHUNKS_PER_WORKER,
    ITEM_BYTES,
    machine_sized,
    run_items,
    short_runs,
    spline,
    stream,
)

#: The built-in workloads' sizes before they were sized for the machine.
DEFAULTS = {"spline": 1_000_000, "stream": 1 << 24, "ndimage": 8192}


def longest_screened(cpu: CpuInfo, item_bytes: int, n: int, workers: int) -> int:
    """The longer of the two lengths the search's strategy screens a lane at first."""
    plan = {("processes", workers): chunk_ladder(cpu, item_bytes, n, workers)}
    steps = auto_requests(Tally(n, item_bytes, False), plan, (cpu.l2 or 0) // 8)
    first, second = next(steps), next(steps)
    assert isinstance(first, Request) and first.warmup and isinstance(second, Request)
    return second.point.chunk_len


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_two_cores_keep_the_sizes_they_always_had(name):
    for l2 in (1 << 20, 5 << 18, 2 << 20):  # the 2-core development VMs' L2s
        assert machine_sized(DEFAULTS[name], ITEM_BYTES[name], many_cores(2, l2)) == DEFAULTS[name]


@pytest.mark.parametrize("name", sorted(DEFAULTS))
@pytest.mark.parametrize("cores", [16, 64])
def test_many_cores_give_each_worker_several_of_the_longest_chunks(name, cores):
    cpu = many_cores(cores)
    n = machine_sized(DEFAULTS[name], ITEM_BYTES[name], cpu)
    assert n >= DEFAULTS[name]
    longest = longest_screened(cpu, ITEM_BYTES[name], n, cores)
    assert longest < n // cores  # a chunked length, not "one chunk each"
    assert n >= cores * CHUNKS_PER_WORKER * longest


def test_the_seeds_workload_grows_on_sixteen_cores():
    # 2 MiB of 16-byte points is 131072 of them; 3 chunks each for 16 workers.
    assert run_items(many_cores(16), ITEM_BYTES["spline"], 16) == 16 * 3 * 131072
    assert machine_sized(DEFAULTS["spline"], ITEM_BYTES["spline"], many_cores(16)) == 6_291_456


def test_default_sizes_come_from_this_machines_probe():
    here = probe()
    assert spline(splines=1).n == machine_sized(DEFAULTS["spline"], 16, here)
    assert stream().n == machine_sized(DEFAULTS["stream"], 32, here)
    assert spline(points=100, splines=1).n == 100  # a size given is kept


def test_short_runs_are_a_note_that_says_what_would_measure_them():
    cpu = many_cores(16)
    needed = run_items(cpu, 16, 16)
    assert short_runs(cpu, 16, 16, needed, needed) == ()
    [note] = short_runs(cpu, 16, 16, 38_240, 10 * needed)
    assert note.startswith("runs of 38240 items gave 16 workers fewer than 3 chunks each")
    assert "(131072 items)" in note and f"--items {needed} and a larger --budget" in note
    [note] = short_runs(cpu, 16, 16, 38_240, 1_000_000)
    assert note.endswith("the workload has only 1000000 items: a larger one would measure them")


def test_a_search_with_short_runs_ends_its_table_with_the_note():
    workload = stream(n=20_000)  # fewer items than any worker count needs here
    result = search(workload, budget=1.0, workers=[1], backends=("processes",), progress=False)
    assert result.notes == short_runs(probe(), 32, 1, result.profile.n or 0, 20_000)
    assert len(result.notes) == 1
    assert result.table().endswith(f"\nnote: {result.notes[0]}")
