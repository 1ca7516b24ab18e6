"""What one call cost: the meter runners fill, the ``CallStats`` users read, and advice.

A runner is handed a :class:`Meter` with each call and records into it what
only the runner sees: how long each worker spent in kernels (measured by the
workers themselves, around each batch's kernel loop, and sent back with the
results), batches re-run after a worker died, and chunks completed (which
advances a progress bar).  The evaluator adds the wall time and publishes a
:class:`CallStats`; :func:`advice` says, in one line, what low efficiency
suggests.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["CallStats", "Meter", "advice", "EFFICIENCY_FLOOR", "LONG_CALL_S"]

#: A call at least this long (seconds) whose efficiency is below the floor
#: is worth a warning; shorter ones are dominated by start-up costs.
LONG_CALL_S = 1.0
EFFICIENCY_FLOOR = 0.8


class Meter:
    """Filled by a runner during one call.

    Parameters
    ----------
    workers : int
        How many kernels can run at once (the runner may correct it: a Dask
        cluster's worker threads).
    advance : callable, optional
        Called with the number of items each time chunks complete (a
        progress bar's ``update``).
    """

    __slots__ = ("workers", "slots", "busy", "retries", "_advance")

    def __init__(self, workers: int, advance: Callable[[int], Any] | None = None) -> None:
        self.workers = workers
        #: Worker names in report order (indices for local runners); a
        #: worker that ran nothing still reports 0.
        self.slots: list[Hashable] = list(range(workers))
        self.busy: dict[Hashable, float] = {}
        self.retries = 0
        self._advance = advance

    def taking_part(self, workers: int) -> None:
        """The call runs on local workers ``0 .. workers - 1`` (a runner says so
        as it starts the call; the last of several runs of a call is reported)."""
        self.workers = workers
        self.slots = list(range(workers))

    def add_busy(self, worker: Hashable, seconds: float) -> None:
        self.busy[worker] = self.busy.get(worker, 0.0) + seconds

    def advance(self, items: int) -> None:
        if self._advance is not None:
            self._advance(items)

    def busy_per_worker(self) -> tuple[float, ...]:
        extra = [k for k in self.busy if k not in self.slots]  # joined during the call
        return tuple(self.busy.get(k, 0.0) for k in [*self.slots, *extra])


@dataclass(frozen=True, repr=False)
class CallStats:
    """What the last ``map``/``reduce`` call of an evaluator cost (``ev.stats``).

    Attributes
    ----------
    n : int
        Items of the call.
    mode : {"map", "reduce"}
    workers : int
        Kernels that could run at once: worker processes or threads; on Dask
        the cluster's worker threads.
    chunk_len : int
        Items per chunk.
    chunks : int
        Chunks of the call (``ceil(n / chunk_len)``).
    backend : str
        ``"processes"``, ``"threads"`` or ``"dask"``.
    inline : bool
        The call ran in the calling process, not on the workers.
    wall_s : float
        Seconds the call took, as the caller saw it.
    busy_s : tuple of float
        Seconds each worker spent in the kernel during the call (on Dask, one
        figure per Dask worker).  On the threads backend it is the thread's
        CPU time, so that time spent waiting for the GIL is not counted.
    efficiency : float
        ``sum(busy_s) / (workers * wall_s)``: 1.0 means every worker ran
        kernels for the whole call.
    retries : int
        Batches re-run because the worker running them died.  On Dask: tasks
        resent because their worker lacked the shared data (Dask re-runs the
        tasks of a dead worker itself, unseen by the client).
    exploring : bool
        The call ran while an adapting evaluator was still exploring settings
        for its kernel (its settings were autotune's trial, not a choice).
    """

    n: int
    mode: str
    workers: int
    chunk_len: int
    chunks: int
    backend: str
    inline: bool
    wall_s: float
    busy_s: tuple[float, ...]
    efficiency: float
    retries: int
    exploring: bool = False

    @classmethod
    def of(
        cls,
        meter: Meter,
        *,
        n: int,
        mode: str,
        chunk_len: int,
        chunks: int,
        backend: str,
        wall_s: float,
        inline: bool = False,
        exploring: bool = False,
    ) -> CallStats:
        busy = meter.busy_per_worker()
        capacity = max(1, meter.workers) * wall_s
        return cls(
            n=n,
            mode=mode,
            workers=meter.workers,
            chunk_len=chunk_len,
            chunks=chunks,
            backend=backend,
            inline=inline,
            wall_s=wall_s,
            busy_s=busy,
            efficiency=sum(busy) / capacity if capacity > 0 else 0.0,
            retries=meter.retries,
            exploring=exploring,
        )

    def __repr__(self) -> str:
        busy = ", ".join(f"{b:.3g}" for b in self.busy_s)
        return (
            f"CallStats(n={self.n}, mode={self.mode!r}, workers={self.workers}, "
            f"chunk_len={self.chunk_len}, chunks={self.chunks}, backend={self.backend!r}, "
            f"inline={self.inline}, wall_s={self.wall_s:.3g}, busy_s=({busy}), "
            f"efficiency={self.efficiency:.2f}, retries={self.retries}, "
            f"exploring={self.exploring})"
        )


def advice(stats: CallStats) -> str | None:
    """One line on why a long call used its workers poorly, or None if it did not.

    A call that lost a worker is not judged (its wall time holds the
    replacement's start).  The first cause that the figures show, in this order: too few chunks to
    share, one worker held back by slow chunks, a kernel holding the GIL on
    threads; else the workers waited between chunks with nothing standing
    out, which is what a memory-bound kernel saturating the bandwidth looks
    like.
    """
    if stats.inline or stats.wall_s < LONG_CALL_S or stats.efficiency >= EFFICIENCY_FLOOR:
        return None
    if stats.retries:
        return None  # a lost worker and its replacement's start: not the settings' doing
    w, busy = stats.workers, stats.busy_s
    head = (
        f"autotune: this {stats.mode} of {stats.n} items kept its {w} workers busy "
        f"{stats.efficiency:.0%} of {stats.wall_s:.2g} s (efficiency {stats.efficiency:.2f}); "
    )
    tail = " (ev.stats has the figures; said once per evaluator)"
    mean = sum(busy) / len(busy) if busy else 0.0
    if stats.chunks < 4 * w:
        why = (
            f"too few chunks: {stats.chunks} chunk(s) of {stats.chunk_len} items for {w} "
            f"workers leave some idle; a chunk_len of at most {max(1, stats.n // (4 * w))} "
            f"gives each worker 4"
        )
    elif w > 1 and busy and max(busy) > 1.5 * mean:
        why = (
            f"one worker was busy {max(busy):.2g} s against a mean of {mean:.2g} s: a few slow "
            f"chunks held the call back; a shorter chunk_len spreads them over the workers"
        )
    elif stats.backend == "threads" and w > 1 and sum(busy) <= 1.25 * stats.wall_s:
        why = (
            f"the threads ran kernels {sum(busy):.2g} s in all over {stats.wall_s:.2g} s, about "
            f"one at a time: the kernel seems to hold the GIL; use backend='processes'"
        )
    else:
        why = (
            "no chunk stood out, yet the workers waited: a memory-bound kernel saturating the "
            "memory bandwidth (fewer workers would do as well), or time lost between chunks "
            "(a longer chunk_len)"
        )
    return head + why + tail
