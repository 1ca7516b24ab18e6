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

from autotune.adapt import Learner, SliceRun
from autotune.backends.fold import OrderedFold
from autotune.backends.rows import check_row_like
from autotune.backends.runners import LazyRunner
from autotune.backends.schedule import MEASURED, ChunkPlan, Cursor, plan_chunks
from autotune.backends.shared import SharedNamespace
from autotune.backends.stats import Meter
from autotune.backends.structure import Structure, split_map_result
from autotune.backends.threads import Outputs, run_inline
from autotune.breakeven import PoolCost
from autotune.cpu import CpuInfo
from autotune.cpu.contention import CpuMeter, CpuSampler, contention_between
from autotune.engine import RETIMES, Point, chunk_ladder
from autotune.profile import heuristic_profile, item_bytes_of
from autotune.profile.online import file_slug, kernel_name, load_online, online_path, save_learned
from autotune.settings import check_memory

__all__ = ["PROBE_ITEMS", "PROBE_S", "OnlineCall", "OnlineTuning", "Slices"]

#: The first call of a kernel is timed in this process on at least this many
#: items (all of them when the call has fewer).
PROBE_ITEMS = 64
#: ... and for about this long (the probe doubles until it has taken this
#: long): enough for an item's cost to outweigh the probe's own (a call of
#: run_inline costs a few microseconds), short against a pool's start (about
#: 10 ms for two forked workers on the 2-core development VM), since the
#: workers idle while it runs.
PROBE_S = 0.002
#: A settled run is metered (so that the drift watch leaves out a run slowed
#: by other processes, not by the kernel) when it is expected to take this
#: long: a sample of the meter took 70 us with 2 workers on the 2-core
#: development VM, two per run (more with more workers): at most 0.3% here.
METER_SETTLED_S = 0.05
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
        load is then measured as it is, until a run comes out clean.  Once
        settled, runs expected to last :data:`METER_SETTLED_S` or more are
        metered too, and the drift watch leaves out the contended ones the
        same way (a busy neighbour is not a kernel that got slower).

    Every item of a call is run exactly once, by one of its slices: a first
    call's timed probe is part of the result (a map's probe rows are copied
    into the output the pool wrote the rest of the call into: :class:`Slices`).
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
        # In this process a reduce runs the pool's ranges (the same bits); a
        # map, whose result does not depend on them, is one call of the
        # kernel: its own arrays, no copy, no bookkeeping.
        whole = plan_chunks(n, leader.workers, leader.chunk_len, MEASURED)
        chunk_len = whole.chunk_len if mode == "reduce" else n
        # Every slice of the call is cut here, checked: consecutive, within
        # [0, n), and all of it in the end (RangeError before a kernel runs).
        cut = Cursor(n)
        slices = Slices(n, mode, combine)

        def here(items: int) -> float:
            """Run the call's next ``items`` items in this process; the seconds they took."""
            start, _ = cut.take(items)
            if start == 0 and items == n and mode == "reduce":
                plan = whole
            else:
                plan = ChunkPlan(items, 1, min(items, chunk_len), start=start)
            began = self._clock()
            part = self._inline(kernel, plan, mode, combine, meter)
            seconds = self._clock() - began
            if mode == "map" and cut.left:
                # More slices follow: keep these rows, which a kernel that reuses
                # its output array would overwrite in the next slice.
                structure, arrays = split_map_result(part, plan.start, plan.stop)
                part = structure.build([a.copy() for a in arrays])
            slices.add(plan, part)
            return seconds

        if not learner.breakeven.known:
            self._probe(learner, n, whole.chunk_len, cut, here)
            if not cut.left:
                return OnlineCall(slices.result(), chunk_len, True, exploring)
        if learner.inline(cut.left, self.pool_cost.per_call()):
            items = cut.left
            learner.breakeven.kernel_time(items, here(items), inline=True)
            cut.check_complete()
            return OnlineCall(slices.result(), chunk_len, True, exploring)

        def run(items: int, point: Point, measured: bool) -> SliceRun:
            nonlocal chunk_len
            start, _ = cut.take(items)
            plan = plan_chunks(items, point.workers, point.chunk_len, MEASURED).at(start)
            if self.item_bytes is not None and self.backend != "dask":
                check_memory(plan, self.item_bytes, stacklevel=7)  # the user's map/reduce line
            chunk_len = plan.chunk_len
            refiner = learner.refiner
            judged = (
                measured
                and not refiner.warming_up
                and (refiner.exploring or self._worth_metering(learner, items, plan.workers))
            )
            before = self._meter.sample(self._runner.pids) if judged else None
            part, wall, busy = self._on_pool(kernel, plan, mode, combine, meter)
            slices.add(plan, part, framed=True)
            if judged and self._busy_machine(learner.name, before, plan.workers):
                # The machine did not give the run its CPUs: ask for the point again.
                return SliceRun(point, items, wall, busy, measured=False, contended=True)
            return SliceRun(point, items, wall, busy, measured)

        learner.run_call(cut.left, mode, run)
        cut.check_complete()
        self._remember(learner)
        # The call that settles runs at the settled point: not exploring.
        exploring = learner.refiner.exploring
        return OnlineCall(slices.result(), chunk_len, False, exploring)

    def _probe(
        self,
        learner: Learner,
        n: int,
        chunk_len: int,
        cut: Cursor,
        here: Callable[[int], float],
    ) -> None:
        """Time a kernel never seen on the first items of its first call, in this process.

        Slices of :data:`PROBE_ITEMS` items, then as many as were run before
        (the probe doubles; a last slice takes what is left rather than leave
        less than it), until it took :data:`PROBE_S` or reached a sixteenth of
        the call or a chunk (the whole call when it is tiny).  The break-even
        counts the last slice, the longest: the first ones pay for a cold start
        (imports, first touches) that the calls after them do not.  A first
        slice that alone took :data:`PROBE_S` is all there is: it counts, and a
        cold start then can only make the pool look worth it sooner.
        """
        cap = n if n <= PROBE_ITEMS else max(PROBE_ITEMS, min(chunk_len, n // 16))
        items, spent = min(PROBE_ITEMS, cap), 0.0
        while True:
            seconds = here(items)
            spent += seconds
            if cut.done >= cap or spent >= PROBE_S:
                learner.breakeven.kernel_time(items, seconds, inline=True)
                return
            left = cap - cut.done
            items = left if left < 2 * cut.done else cut.done

    def _inline(
        self,
        kernel: Callable[..., Any],
        plan: ChunkPlan,
        mode: str,
        combine: Any,
        meter: Meter,
    ) -> Any:
        """The items of ``plan`` in this process (a map: the rows of those items)."""
        return run_inline(kernel, self._namespace(), plan, mode, combine, meter, self._outputs)

    def _on_pool(
        self,
        kernel: Callable[..., Any],
        plan: ChunkPlan,
        mode: str,
        combine: Any,
        meter: Meter,
    ) -> tuple[Any, float, float]:
        """The items of ``plan`` on the pool: the result (a map: rows up to
        ``plan.stop``), the wall seconds and the kernel seconds summed over the
        workers."""
        if not self._runner.started:
            began = self._clock()
            self._runner.start()
            self.pool_cost.started(self._clock() - began)
        busy = sum(meter.busy.values())
        began = self._clock()
        part = self._runner.run(kernel, plan, mode, combine, meter)
        wall = self._clock() - began
        busy = sum(meter.busy.values()) - busy
        self.pool_cost.pool_call(wall, busy, plan.workers)
        return part, wall, busy

    @staticmethod
    def _worth_metering(learner: Learner, items: int, workers: int) -> bool:
        """Whether a settled run of ``items`` on ``workers`` is expected to last
        :data:`METER_SETTLED_S` (the kernel's time per item, spread over the workers)."""
        return learner.breakeven.per_item() * items / workers >= METER_SETTLED_S

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


class Slices:
    """The results of a call run in consecutive slices, and the call's result from them.

    A reduce's partials are folded in order.  A map's slices are rows: the
    ones run in this process hold their own items, a pool run's
    (``framed``) has rows for every item up to its plan's stop
    (:meth:`~autotune.backends.schedule.ChunkPlan.at`).  When the last slice
    is a pool run of the whole call's rows, the earlier slices' rows are
    copied into it, so a first call copies its probe's rows, not the call's;
    otherwise the rows are joined (a call run in this process).
    """

    def __init__(self, n: int, mode: str, combine: Any) -> None:
        self.n = n
        self.mode = mode
        self.combine = combine
        self.parts: list[tuple[ChunkPlan, Any, bool]] = []

    def add(self, plan: ChunkPlan, result: Any, framed: bool = False) -> None:
        self.parts.append((plan, result, framed))

    def result(self) -> Any:
        first_plan, first, framed = self.parts[0]
        if len(self.parts) == 1 and (not framed or first_plan.start == 0):
            return first  # the whole call in one run
        if self.mode != "map":
            fold = OrderedFold(self.combine)
            for i, (_, part, _) in enumerate(self.parts):
                fold.add(i, part)
            return fold.result()
        last_plan, last, framed = self.parts[-1]
        if framed and last_plan.stop == self.n:
            return self._fill(last)
        return self._join()

    def _fill(self, frame_result: Any) -> Any:
        """The last slice's output, the earlier slices' rows copied into it."""
        structure, frame = split_map_result(frame_result, 0, self.n)
        for plan, part, framed in self.parts[:-1]:
            _, arrays = _rows(plan, part, framed, structure)
            for i, (rows, out) in enumerate(zip(arrays, frame, strict=True)):
                check_row_like(rows, out, plan.start, plan.stop, structure.label(i))
                out[plan.start : plan.stop] = rows
        return frame_result

    def _join(self) -> Any:
        """The slices' rows joined into new arrays."""
        structure: Structure | None = None
        pieces: list[list[np.ndarray]] = []
        for plan, part, framed in self.parts:
            structure, arrays = _rows(plan, part, framed, structure)
            first = pieces[0] if pieces else arrays
            for i, (rows, row_like) in enumerate(zip(arrays, first, strict=True)):
                check_row_like(rows, row_like, plan.start, plan.stop, structure.label(i))
            pieces.append(arrays)
        assert structure is not None
        return structure.build([np.concatenate(rows) for rows in zip(*pieces, strict=True)])


def _rows(
    plan: ChunkPlan, part: Any, framed: bool, structure: Structure | None
) -> tuple[Structure, list[np.ndarray]]:
    """A slice's rows, one array per output, checked against the call's ``structure``."""
    if framed:
        structure, arrays = split_map_result(part, 0, plan.stop, structure)
        return structure, [a[plan.start :] for a in arrays]
    return split_map_result(part, plan.start, plan.stop, structure)
