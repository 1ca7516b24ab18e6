"""The search's bench: timing points of a workload with one runner per lane.

:class:`SearchBench` is the :class:`~autotune.bench.Bench` that ``autotune
search`` (:mod:`autotune.tuner`) drives: it opens one runner per (backend,
workers), cuts each run as an evaluator given that point in a profile would
cut it, and re-times runs the machine did not give their CPUs.  The serial
figures and the size of a timed run (so that a search fits its budget) are
measured here too.
"""

from __future__ import annotations

import operator
import statistics
import time
from typing import Any

from autotune.backends.runners import Runner, open_runner
from autotune.backends.schedule import MEASURED, plan_chunks
from autotune.backends.shared import SharedNamespace, check_names
from autotune.bench import Bench
from autotune.cpu.contention import CpuSampler
from autotune.engine import Lane, Point
from autotune.settings import default_start_method
from autotune.workload import Workload

__all__ = ["SearchBench", "items_per_second", "measured_items", "serial_seconds"]


class SearchBench(Bench):
    """Times points with one runner per (backend, workers); a Tally of every run."""

    def __init__(
        self,
        workload: Workload,
        n: int,
        item_bytes: int,
        progress: Any,
        label: bool,
        client: Any = None,
        start_method: str | None = None,
        meter: CpuSampler | None = None,
    ) -> None:
        super().__init__(n, item_bytes, label, meter)
        self.workload = workload
        self.client = client  # the Dask cluster of the "dask" lanes
        self.start_method = start_method  # of the "processes" lanes
        self.progress = progress
        self.pools: dict[Lane, Runner] = {}
        self.runs = 0

    def pool(self, lane: Lane) -> Runner:
        runner = self.pools.get(lane)
        if runner is None:
            backend, workers = lane
            runner = open_runner(
                backend,
                workers,
                check_names(self.workload.shared),
                start_method=self.start_method or default_start_method(),
                client=self.client if backend == "dask" else None,
            )
            self.pools[lane] = runner
        return runner

    def run(self, point: Point, repeats: int, warmup: bool = False) -> None:
        runner = self.pool(point.lane)
        kernel, mode = self.workload.kernel, self.workload.mode
        combine = operator.add if mode == "reduce" else None
        # Cut as an evaluator given this point in a profile would cut it.
        plan = plan_chunks(self.n, point.workers, point.chunk_len, MEASURED)

        def once() -> float:
            t0 = time.perf_counter()
            result = runner.run(kernel, plan, mode, combine)
            elapsed = time.perf_counter() - t0
            del result  # lets the evaluator reuse its output memory
            self.runs += 1
            return elapsed

        if warmup:
            once()
            self._advance()
        for _ in range(repeats):
            self.timed(point, once)  # re-timed while other processes held its CPUs
            self._advance()

    def _advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def pids(self) -> list[int]:
        # Every pool's workers, not only this lane's: the readings that span the
        # whole search must count all of them as ours.
        return [pid for runner in self.pools.values() for pid in getattr(runner, "pids", ())]

    def close(self) -> None:
        for runner in self.pools.values():
            runner.close()
        self.pools.clear()


def serial_seconds(workload: Workload, n: int, repeats: int) -> tuple[float, float]:
    """(median seconds, spread) of the kernel over [0, n) in this process, unchunked."""
    shared = SharedNamespace(dict(workload.shared or {}))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        workload.kernel(shared, 0, n)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med if len(times) > 1 else 0.0


def items_per_second(workload: Workload) -> float:
    """A quick serial estimate on growing prefixes, about 0.1 s in all."""
    shared = SharedNamespace(dict(workload.shared or {}))
    m = min(workload.n, 1024)
    # Untimed: a first call pays for imports and caches (scipy.special, say,
    # 0.2 s), and an estimate that counted them would size every run a
    # hundred times too short.
    workload.kernel(shared, 0, m)
    while True:
        t0 = time.perf_counter()
        workload.kernel(shared, 0, m)
        elapsed = time.perf_counter() - t0
        if elapsed > 0.03 or m >= workload.n:
            return m / max(elapsed, 1e-9)
        m = min(workload.n, m * 4)


def measured_items(workload: Workload, budget: float, planned_runs: int, rate: float) -> int:
    """How many items one timed run covers so that the search fits ``budget``."""
    # A run on W workers is about W times faster than serial; assume 1.5x on
    # average over the points, and keep a third of the budget in reserve.
    per_run = (budget * 0.66) / max(planned_runs, 1)
    m = int(rate * 1.5 * per_run)
    return max(min(workload.n, m), min(workload.n, 1000))
