"""Online refinement: the evaluator tunes itself with the user's own calls.

Most users never run ``autotune search`` on the machine where their code
runs, so an evaluator whose settings came from the heuristic keeps tuning
them while it works (``Evaluator(adapt=...)``):

- **Which setting next** comes from the same engine as the search
  (:func:`autotune.engine.auto_requests` over a :class:`~autotune.engine.Tally`):
  screen, coarse pass, refinement, successive halving.  Each call, or each
  slice of a long call, is one run of the point the engine asked for.  When
  the engine has nothing more to ask, the best point is *settled*.
- **Which workers.**  All of the pool's, half of them from four workers on
  and a quarter from eight on (:data:`FEWER_WORKERS`), screened most first:
  a memory-bound kernel that saturates before the last core is as fast on
  fewer.  No whole call is spent on a point the tally predicts slower than
  :data:`~autotune.engine.PREDICTED_SLOW` times the best so far: a lane the
  two above it bound below that is not run, and a lane of fewer workers is
  screened on a slice of a call where one can be cut (a quarter of a call
  too short for slices of two chunks per worker, :data:`PROBE_SHORT`).
- **Bounded exploration.**  The ladder is the search's, cut to chunks between
  a quarter of the heuristic's and eight times it: far-off rungs cost whole
  calls at a fraction of the speed and are almost never best (L2/16 to L2/4
  per chunk came within 0.92 of the best on five kernels: docs/design.md,
  "Evidence behind the heuristic"; the worst miss 2.5 times the rule), and
  walked past one rung at a time while its end is the best point so far (the
  rule can be further off: ``reach`` of :func:`~autotune.engine.auto_requests`).  After
  settling, one call in :data:`~autotune.refiner.RECHECK` (doubling up to
  :data:`~autotune.refiner.RECHECK_MAX`) re-times the runner-up; three
  settled calls in a row slower than the settled median by more than
  :data:`~autotune.refiner.DRIFT` start a new exploration (the kernel's cost
  changed: other data, same code).
- **Inline below break-even** (:class:`~autotune.breakeven.BreakEven`): from
  the pool calls of a kernel, the kernel's time per item and the pool's time
  per call are known; a call with fewer items than the pool's time per call
  buys runs in the calling process, over the same chunks.
- **Remembered across processes**: what was measured is saved as a profile
  with ``source: online`` (:func:`~autotune.profile.online.save_learned`:
  on settling, every :data:`SAVE_EVERY` calls and when the evaluator
  closes, unless it only confirmed the verdict on file), each point with its
  latest runs.  The next process with the same
  kernel on the same CPU starts settled where the last one settled, or, if
  it had not, *replays* the saved runs: each run the engine asks for at a
  point is taken from the saved ones while they last, so the exploration
  goes on where it stopped and a short script converges over its runs.
  A file that did not measure this pool's worker count (or settled on
  more workers than it has) is replayed, not settled on; the first run of
  a process that goes on from a file is left out when slower than its
  point's saved runs (cold workers); after drift the next save replaces
  the file's runs (:attr:`~autotune.profile.online.Learned.restart`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from autotune.breakeven import BreakEven
from autotune.engine import Lane, Point
from autotune.profile import Profile
from autotune.profile.online import Learned
from autotune.refiner import Refiner

__all__ = [
    "PROBE_SLICES",
    "Learner",
    "SliceRun",
    "online_ladder",
]

#: Lanes of fewer workers the refinement may screen: (a share of the
#: workers, from how many workers on).  Fewer workers can match all of them on
#: a memory-bound kernel that saturates before the last core; on two cores one
#: worker never came close (0.59 of the best at most: docs/design.md,
#: "Evidence behind the heuristic"), hence none below four.  A quarter from
#: eight on, for a knee below half the cores (a replayed 64-core machine that
#: saturates at 16 workers); on the 16-core Xeon's recorded workloads (all
#: scale to 16 workers) the engine predicts it slow from the two lanes above
#: it and never runs it (:func:`autotune.engine.auto_requests`, ``online``).
FEWER_WORKERS = ((2, 4), (4, 8))
#: A long call while exploring is cut into this many slices (at most half
#: of them probe other points, the rest runs at the best one found).
PROBE_SLICES = 16
#: A point the engine asks to probe (:attr:`Refiner.probing`) in a call too
#: short for slices of two chunks per worker is timed on this fraction of it,
#: one chunk per worker (shorter chunks than the point's: a lane of fewer
#: workers is screened by its throughput, not its chunk length).
PROBE_SHORT = 4
#: Probing inside a call is worth it when what is left takes longer than this.
PROBE_WORTH_S = 0.2
#: A map is cut into slices only when its kernel takes this long per item.
SLICE_MAP_MIN_S = 50e-9
#: Save an online profile again after this many more calls.
SAVE_EVERY = 100


def online_ladder(full: list[int], mid_len: int) -> list[int]:
    """The search's chunk ladder cut to [mid/4, 8 x mid] (the unchunked end kept if inside)."""
    lo, hi = mid_len / 4, mid_len * 8
    kept = [c for c in full if lo <= c <= hi]
    return kept or [min(full, key=lambda c: abs(c - mid_len))]


@dataclass(frozen=True)
class SliceRun:
    """What one run of a call on the pool took.

    ``items`` items at ``point``: ``wall`` seconds, ``busy`` seconds of
    kernel work summed over the workers; ``measured``: whether the refiner
    counts it (the rest of a probing call is not); ``contended``: it was
    meant to count, but other processes held the CPUs it needed.
    """

    point: Point
    items: int
    wall: float
    busy: float
    measured: bool = True
    contended: bool = False


class Learner:
    """What an evaluator knows of one kernel (by name): its refiner and its break-even.

    Parameters
    ----------
    name : str
        The kernel's ``module:qualname``, or the ``profile=`` name given.
    lane : Lane
        ``(backend, workers)`` of the pool.
    mid_len : int
        The heuristic's chunk length for this kernel.
    ladder : list of int
        The search's chunk ladder for the first call's ``n``.
    item_bytes : int
    known : Profile, optional
        This kernel's online profile on this CPU: settled, start settled on
        its best; exploring, replay its runs (see :class:`Refiner`).
    """

    def __init__(
        self,
        name: str,
        lane: Lane,
        mid_len: int,
        ladder: list[int],
        item_bytes: int,
        known: Profile | None = None,
    ) -> None:
        self.name = name
        self.lane = lane
        self.item_bytes = item_bytes
        backend, workers = lane
        plan = {lane: online_ladder(ladder, mid_len)}
        for share, least in FEWER_WORKERS:
            if workers >= least:
                plan[(backend, workers // share)] = plan[lane]
        reach = dict.fromkeys(plan, ladder)
        start, stored = None, {}
        if known is not None:
            for m in known.measurements:
                if m.throughput and m.workers <= workers and m.backend in (None, backend):
                    stored[Point(backend, m.workers, m.chunk_len)] = m.runs or (m.throughput,)
            # Settled on this pool only if it measured this many workers: a file of
            # a smaller pool never tried them, one of a larger pool settled on
            # workers this one does not have.  Else its runs are replayed.
            if (
                not known.exploring
                and known.workers <= workers
                and any(m.workers == workers for m in known.measurements)
            ):
                start = Point(backend, known.workers, known.chunk_len)
        self.refiner = Refiner(plan, mid_len, item_bytes, settled=start, stored=stored, reach=reach)
        self.breakeven = BreakEven()
        if known is not None and known.best.throughput:
            # What an item cost at the best point, as if every worker were
            # busy the whole call (an upper bound, corrected by the first pool
            # call): enough to decide the first call without a probe.
            per_item = known.best.workers / known.best.throughput
            self.breakeven.kernel_time(1, per_item, inline=False)
        self.n = 0  # items of the latest call, for the profile
        # (calls, best) at the last save; a kernel settled from its file is as
        # good as saved: its file already says what its runs would confirm.
        self._saved_at: tuple[int, Point] | None = None if start is None else (0, start)
        # The last save failed: its runs were handed back (:meth:`unsaved`), to
        # be tried again at close or after SAVE_EVERY calls, not at every call.
        self._retry = False
        self._saves = 0

    # -- one call -------------------------------------------------------------
    def inline(self, n: int, overhead: float) -> bool:
        """Whether a call of ``n`` items is cheaper in the calling process, given
        what a pool call costs beyond the kernel (``overhead`` seconds)."""
        return self.breakeven.inline(n, self.refiner.best.workers, overhead)

    def run_call(self, n: int, mode: str, run: Callable[[int, Point, bool], SliceRun]) -> None:
        """Run a call of ``n`` items on the pool as consecutive runs, and learn from them.

        ``run(items, point, measured)`` runs the call's next ``items`` items
        at ``point`` and says what that took; the items of the runs add up to
        ``n`` exactly.  A call too short to cut is one run at the point the
        engine asks for, except a point to probe (:attr:`Refiner.probing`: a
        lane of fewer workers), timed on a :data:`PROBE_SHORT`-th of it.  A
        long one, while exploring, probes one slice per point (each long
        enough for two chunks per worker) within its first half, while what
        is left is worth it, and runs the rest at the best point so far; that
        rest is not a measurement (a run of another size is not comparable).
        A map is cut only when its kernel is slow per item: the rows of the
        slices before the last are copied into the last one's output
        (:class:`~autotune.online.Slices`), up to half the call's rows, a
        copy that a memory-bound map would pay as much for as for their work.
        """
        self.n = max(self.n, n)
        point = self.refiner.next()
        cuttable = mode == "reduce" or self.breakeven.per_item() >= SLICE_MAP_MIN_S
        size = self._first_slice(n, point) if self.refiner.exploring and cuttable else None
        if size is None:
            self._learn(run(n, point, True))
            return
        done = 0
        while True:
            probe = run(size, point, True)
            self._learn(probe)
            done += probe.items
            if self._probing(n, done, probe):
                # Each point probes with a slice of its own length: the next
                # one must fit in the first half of the call too.
                following = self.refiner.next()
                size = self._slice(n, following)
                if n - done - size >= n // 2:
                    point = following
                    continue
            self._learn(run(n - done, self.leader(), False))
            return

    def _first_slice(self, n: int, point: Point) -> int | None:
        """The items of a call's first slice at ``point``; None: the call is run whole.

        Two chunks per worker within the first half of the call; else, for a
        point to probe (:attr:`Refiner.probing`), a :data:`PROBE_SHORT`-th of
        the call, whose chunks the plan shortens to one per worker.
        """
        size = self._slice(n, point)
        if size <= n // 2:
            return size
        if self.refiner.probing and n // PROBE_SHORT >= point.workers:
            return n // PROBE_SHORT
        return None

    @staticmethod
    def _slice(n: int, point: Point) -> int:
        return max(n // PROBE_SLICES, 2 * point.workers * point.chunk_len)

    def _probing(self, n: int, done: int, last: SliceRun) -> bool:
        """Whether the call may probe again after ``done`` of its ``n`` items: still
        exploring, more than half of it left, and what is left worth it at the
        rate of the ``last`` run."""
        remaining = n - done
        return (
            self.refiner.exploring
            and remaining > n // 2
            and last.wall > 0
            and remaining * last.wall / last.items > PROBE_WORTH_S
        )

    def _learn(self, run: SliceRun) -> None:
        if run.measured:
            self.refiner.record(run.point, run.wall, run.items)
        elif run.contended:
            self.refiner.keep_if_alone(run.point, run.wall, run.items)
        self.breakeven.kernel_time(run.items, run.busy, inline=False)

    def leader(self) -> Point:
        """The fastest point measured so far (the settled one once settled)."""
        if self.refiner.settled:
            return self.refiner.best
        leaders = self.refiner.tally.leaders(1)
        return leaders[0][0] if leaders else self.refiner.best

    # -- what to remember ---------------------------------------------------------
    def save_due(self, closing: bool = False) -> bool:
        """Whether what was learned should be saved now: newly settled, moved or
        aged by :data:`SAVE_EVERY` calls; and on ``closing``, any run not saved
        yet, unless the kernel is settled where its last save (or its file) says
        it is.  A save that failed is tried again at close, or after
        :data:`SAVE_EVERY` more calls.

        Runs that only confirm a saved verdict are not written at every close:
        a script that starts settled would otherwise rewrite its file on every
        run (a read, a merge and an atomic replace: 6.6-8.5 ms on the 2-core
        development VM, against 31-37 ms for a whole first call of the
        ``rows`` benchmark), and its first run, made by cold workers, would be
        among them.
        """
        refiner = self.refiner
        if closing:
            if self._retry:
                return True
            if refiner.settled and self._saved_at is not None and not refiner.restarted:
                return self._saved_at[1] != refiner.best
            return bool(refiner.fresh) or refiner.kept_if_alone
        if not refiner.settled or refiner.best not in refiner.tally.times:
            return False
        if self._saved_at is None or self._saved_at[1] != refiner.best:
            return True
        if refiner.restarted and not self._retry:
            # A drift, even where the new exploration settled where it was: the
            # file's runs are another kernel's.
            return True
        return refiner.calls - self._saved_at[0] >= SAVE_EVERY

    def unsaved(self, learned: Learned) -> None:
        """``learned`` (from :meth:`learned`) could not be saved: keep its runs for the
        next save, and this evaluator's first save still to come."""
        n = self.refiner.tally.n
        backend = self.lane[0]
        for (workers, chunk_len), runs in learned.fresh.items():
            point = Point(backend, workers, chunk_len)
            kept = self.refiner.fresh.setdefault(point, [])
            kept[:0] = [n / t for t in runs]
        self._retry = True
        if learned.first:
            self._saves -= 1
        if learned.restart:
            self.refiner.restarted = True

    def learned(self) -> Learned:
        """What to save (and remember that it was handed over)."""
        refiner = self.refiner
        best = refiner.best if refiner.settled else self.leader()
        n = refiner.tally.n

        def throughputs(runs: Mapping[Point, list[float]]) -> dict[tuple[int, int], list[float]]:
            return {
                (p.workers, p.chunk_len): [n / s for s in r if s > 0]
                for p, r in runs.items()
                if any(s > 0 for s in r)
            }

        self._saved_at, self._retry = (refiner.calls, refiner.best), False
        self._saves += 1
        restart, refiner.restarted = refiner.restarted, False
        fresh = throughputs(refiner.take_fresh())
        known = throughputs(refiner.tally.times)
        return Learned(
            workload=self.name,
            backend=self.lane[0],
            item_bytes=self.item_bytes,
            n=max(self.n, 1),
            best=(best.workers, best.chunk_len),
            exploring=refiner.exploring,
            fresh=fresh,
            known={**fresh, **known},  # a saved warm-up is in fresh only
            first=self._saves == 1,
            restart=restart,
        )
