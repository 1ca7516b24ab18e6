"""The online state of an adapting evaluator, and how one of its calls runs.

:class:`OnlineTuning` owns what an evaluator that tunes itself knows (a
:class:`~autotune.adapt.Learner` per kernel, the pool's cost per call, the
memory of inline map outputs) and decides, call by call, whether the call
runs in this process or on the pool, at which point of the engine, in one
run or in slices (see :mod:`autotune.adapt` for the why).  The evaluator
hands it the call and its runner (started at the first call that runs on it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from autotune._errors import RangeError, add_note
from autotune.adapt import Learner, SliceRun
from autotune.backends.fold import OrderedFold
from autotune.backends.runners import LazyRunner
from autotune.backends.schedule import MEASURED, ChunkPlan, Cursor, plan_chunks
from autotune.backends.shared import SharedNamespace
from autotune.backends.stats import Meter
from autotune.backends.threads import Outputs, run_inline
from autotune.breakeven import PoolCost
from autotune.cpu import CpuInfo
from autotune.cpu.contention import CpuMeter, CpuSampler, contention_between
from autotune.engine import RETIMES, Point, chunk_ladder
from autotune.profile import heuristic_profile, item_bytes_of
from autotune.profile.online import file_slug, kernel_name, load_online, online_path, save_learned
from autotune.settings import check_memory

__all__ = ["OnlineCall", "OnlineTuning", "Shifted", "join_parts"]

#: The first call of a kernel is timed in this process on at least this many
#: items (all of them when the call has fewer).
PROBE_ITEMS = 64
#: The heuristic's floor for an adapting evaluator, in items per chunk.
ONLINE_MIN_ITEMS = 1024


class OnlineCall(NamedTuple):
    """One call of an adapting evaluator: its result and how it ran."""

    result: Any
    chunk_len: int  # of its last run
    inline: bool  # ran in the calling process
    exploring: bool  # its kernel's settings were still being explored


class OnlineTuning:
    """What an adapting evaluator has learned, and the runs of its calls.

    Parameters
    ----------
    cpu : CpuInfo
        This machine: the heuristic's chunk, the ladder, the profile's CPU.
    backend : str
    workers : int
        Workers of the pool (the most a call may use).
    shared : mapping
        The evaluator's shared data (inline calls read it in this process).
    item_bytes : int, optional
        Given by the user; else inferred per kernel from ``shared``.
    profile_name : str, optional
        The name online profiles are saved under; else each kernel's.
    runner : LazyRunner
        The evaluator's runner: its workers start at the first call that runs
        on it (that start is timed apart from the call).
    clock : callable, optional
        Seconds, for timing runs (``time.perf_counter``; tests script it).
    meter : CpuSampler, optional
        How much CPU other processes took during a run
        (:class:`~autotune.cpu.contention.CpuMeter`; tests script it).  While
        a kernel is explored, a run during which others took more than a
        tenth of the CPUs it needed is not counted (its point is asked for
        again), up to :data:`~autotune.engine.RETIMES` runs in a row: a steady
        load is then measured as it is, until a run comes out clean.

    Every item of a call is run exactly once, by one of its slices: a first
    call's timed probe is part of the result (a map's probe rows are joined
    to the pool's, one copy of the output on a kernel's first call).
    """

    def __init__(
        self,
        cpu: CpuInfo,
        backend: str,
        workers: int,
        shared: Mapping[str, Any],
        item_bytes: int | None,
        profile_name: str | None,
        runner: LazyRunner,
        clock: Callable[[], float] = time.perf_counter,
        meter: CpuSampler | None = None,
    ) -> None:
        self.cpu = cpu
        self.backend = backend
        self.workers = workers
        self.item_bytes = item_bytes
        self.profile_name = profile_name
        self._shared = shared
        self._runner = runner
        self._clock = clock
        self._meter = CpuMeter() if meter is None else meter
        self._contended: dict[str, int] = {}  # runs in a row not counted, per kernel
        self.learners: dict[str, Learner] = {}
        self._pid = os.getpid()
        self.pool_cost = PoolCost(workers)
        self._outputs = Outputs()  # the last inline map output, reused when let go
        self._inline_shared: SharedNamespace | None = None

    def close(self) -> None:
        """Save what was measured and not saved yet; let the data and the kept
        inline output go.  Only the process that made the evaluator saves."""
        if os.getpid() == self._pid:
            for learner in self.learners.values():
                self._remember(learner, closing=True)
        self.learners = {}
        self._outputs.close()
        self._shared, self._inline_shared = {}, None

    def call(
        self, kernel: Callable[..., Any], n: int, mode: str, combine: Any, meter: Meter
    ) -> OnlineCall:
        """One call while adapting."""
        learner = self._learner(kernel, n)
        exploring = learner.refiner.exploring
        leader = learner.leader()
        workers, nominal = leader.workers, leader.chunk_len
        # In this process a reduce runs the pool's ranges (the same bits); a
        # map, whose result does not depend on them, is one call of the
        # kernel: its own arrays, no copy, no bookkeeping.
        whole = plan_chunks(n, workers, nominal, MEASURED)
        chunk_len = whole.chunk_len if mode == "reduce" else n

        def here(items: int) -> ChunkPlan:
            """The plan of a slice of ``items`` items run in this process."""
            if items == n and mode == "reduce":
                return whole
            return ChunkPlan(items, 1, min(items, chunk_len))

        parts: list[Any] = []
        # Every slice of the call is cut here, checked: consecutive, within
        # [0, n), and all of it in the end (RangeError before a kernel runs).
        cut = Cursor(n)
        if not learner.breakeven.known:
            # A kernel never seen: a first slice runs here, timed, which says
            # what an item costs before anything is sent (the whole call when
            # it is tiny, else a sixteenth of it, at most a chunk: a probe of a
            # few items would time mostly its own overhead).
            probe = n if n <= PROBE_ITEMS else max(PROBE_ITEMS, min(whole.chunk_len, n // 16))
            start, stop = cut.take(probe)
            parts.append(self._inline(kernel, learner, start, here(probe), mode, combine, meter))
            if not cut.left:
                return OnlineCall(parts[0], chunk_len, True, exploring)
        overhead = self.pool_cost.per_call()
        if learner.inline(cut.left, overhead):
            start, stop = cut.take(cut.left)
            parts.append(
                self._inline(kernel, learner, start, here(stop - start), mode, combine, meter)
            )
            cut.check_complete()
            return OnlineCall(_join(parts, mode, combine), chunk_len, True, exploring)

        def run(items: int, point: Point, measured: bool) -> SliceRun:
            nonlocal chunk_len
            start, stop = cut.take(items)
            plan = plan_chunks(items, point.workers, point.chunk_len, MEASURED)
            if self.item_bytes is not None and self.backend != "dask":
                check_memory(plan, self.item_bytes, stacklevel=7)  # the user's map/reduce line
            chunk_len = plan.chunk_len
            refiner = learner.refiner
            judged = measured and refiner.exploring and not refiner.warming_up
            before = self._meter.sample(self._runner.pids) if judged else None
            part, wall, busy = self._on_pool(kernel, start, stop, plan, mode, combine, meter)
            parts.append(part)
            if judged and self._busy_machine(learner.name, before, plan.workers):
                # The machine did not give the run its CPUs: ask for the point again.
                return SliceRun(point, items, wall, busy, measured=False, contended=True)
            return SliceRun(point, items, wall, busy, measured)

        learner.run_call(cut.left, mode, run)
        cut.check_complete()
        self._remember(learner)
        # The call that settles runs at the settled point: not exploring.
        exploring = learner.refiner.exploring
        return OnlineCall(_join(parts, mode, combine), chunk_len, False, exploring)

    def _inline(
        self,
        kernel: Callable[..., Any],
        learner: Learner,
        start: int,
        plan: ChunkPlan,
        mode: str,
        combine: Any,
        meter: Meter,
    ) -> Any:
        """Items ``[start, start + plan.n)`` in this process as ``plan`` cuts them,
        timed for the break-even."""
        items = plan.n
        began = self._clock()
        result = run_inline(
            kernel if start == 0 else Shifted(kernel, start, start + items),
            self._namespace(),
            plan,
            mode,
            combine,
            meter,
            self._outputs,
        )
        learner.breakeven.kernel_time(items, self._clock() - began, inline=True)
        return result

    def _on_pool(
        self,
        kernel: Callable[..., Any],
        start: int,
        stop: int,
        plan: ChunkPlan,
        mode: str,
        combine: Any,
        meter: Meter,
    ) -> tuple[Any, float, float]:
        """Items ``[start, stop)`` on the pool as ``plan`` cuts them: the result, the
        wall seconds and the kernel seconds summed over the workers."""
        if not self._runner.started:
            began = self._clock()
            self._runner.start()
            self.pool_cost.started(self._clock() - began)
        busy = sum(meter.busy.values())
        began = self._clock()
        try:
            part = self._runner.run(
                kernel if start == 0 else Shifted(kernel, start, stop), plan, mode, combine, meter
            )
        except Exception as exc:
            if start:
                add_note(
                    exc,
                    f"[autotune was timing this call in slices: item numbers above count "
                    f"from {start}, where the slice began]",
                )
            raise
        wall = self._clock() - began
        busy = sum(meter.busy.values()) - busy
        self.pool_cost.pool_call(wall, busy, plan.workers)
        return part, wall, busy

    def _busy_machine(self, name: str, before: Any, workers: int) -> bool:
        """Whether to leave out the run just made: others took the CPUs it needed,
        and fewer than :data:`~autotune.engine.RETIMES` runs in a row were left out.
        After that the load is steady: its runs count until one comes out clean."""
        found = contention_between(before, self._meter.sample(self._runner.pids))
        if found is None or not found.contended(workers):
            self._contended[name] = 0
            return False
        left_out = self._contended.get(name, 0)
        if left_out >= RETIMES:
            return False  # a steady load: measured as it is
        self._contended[name] = left_out + 1
        return True

    def _learner(self, kernel: Callable[..., Any], n: int) -> Learner:
        """What is known of this kernel; on its first call, from an online profile or afresh."""
        name = self.profile_name or kernel_name(kernel)
        learner = self.learners.get(name)
        if learner is not None:
            return learner
        item_bytes = item_bytes_of(self._shared, n, self.item_bytes)
        mid = heuristic_profile(self.cpu, name, item_bytes, min_items=ONLINE_MIN_ITEMS).chunk_len
        # The ladder spans what any call may use; each call clamps the chunk to its n.
        ladder = chunk_ladder(self.cpu, item_bytes, max(n, 64 * self.workers * mid), self.workers)
        learner = Learner(
            name,
            (self.backend, self.workers),
            mid,
            ladder,
            item_bytes,
            known=load_online(name, self.cpu, self.backend, item_bytes),
        )
        self.learners[name] = learner
        return learner

    def _remember(self, learner: Learner, closing: bool = False) -> None:
        """Save what was learned once settled (and again when it moves or ages), and
        when the evaluator closes whatever was measured since."""
        if learner.save_due(closing):
            path = online_path(file_slug(learner.name), self.cpu, backend=self.backend)
            learned = learner.learned()
            if not save_learned(learned, self.cpu, path):
                learner.unsaved(learned)  # kept for the next save

    def _namespace(self) -> SharedNamespace:
        if self._inline_shared is None:
            self._inline_shared = SharedNamespace(self._shared)
        return self._inline_shared


class Shifted:
    """``kernel`` over the items of the slice ``[offset, end)`` of a long call.

    The runner numbers the slice's items from 0; the kernel is given them
    as items of the whole call.  A range that would reach past ``end`` is
    ``RangeError`` before the kernel runs: the slice's own runner cut it.
    """

    def __init__(self, kernel: Any, offset: int, end: int) -> None:
        self.kernel = kernel
        self.offset = offset
        self.end = end

    def __call__(self, shared: Any, start: int, stop: int) -> Any:
        start, stop = start + self.offset, stop + self.offset
        if not self.offset <= start < stop <= self.end:
            raise RangeError(
                f"items [{start}, {stop}) asked of the slice [{self.offset}, {self.end})"
            )
        return self.kernel(shared, start, stop)


def join_parts(parts: list[Any]) -> Any:
    """The map results of consecutive slices as one result of the same structure."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, tuple):
        joined = [np.concatenate([p[i] for p in parts]) for i in range(len(first))]
        return type(first)(*joined) if hasattr(first, "_fields") else tuple(joined)
    if isinstance(first, dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in first}
    return np.concatenate(parts)


def _join(parts: list[Any], mode: str, combine: Any) -> Any:
    """The result of a call run in slices: maps joined, partials folded in order."""
    if mode == "map":
        return join_parts(parts)
    fold = OrderedFold(combine)
    for i, part in enumerate(parts):
        fold.add(i, part)
    return fold.result()
