"""When a call is cheaper in the calling process than on the pool: the break-even.

An adapting evaluator (:mod:`autotune.online`) asks, before each call, whether
the pool pays for it: :class:`PoolCost` is what a pool call costs beyond the
kernel's own work (measured on every pool call, a prior before the first),
:class:`BreakEven` what an item of one kernel costs, and from both the
number of items below which a call runs inline, over the same chunks.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

__all__ = ["INLINE_RECHECK", "TINY_S", "BreakEven", "PoolCost"]

#: A call whose kernel work is below this many seconds always runs inline:
#: the fastest pool round trip measured on the 2-core development VM took
#: 0.25 ms, and a round trip is no faster with more workers.
TINY_S = 50e-6
#: Inline calls near the break-even between two that go to the pool instead
#: (so that a pool slowed down for a while is measured again).
INLINE_RECHECK = 32


class PoolCost:
    """What a call on the pool costs beyond the kernel's own work, for one evaluator.

    Measured from every pool call, whatever the kernel: the call's wall time
    less the kernel time spread over the workers (round trips, the output,
    the tail).  Before the first pool call a prior stands in: while the pool
    is not even started (an adapting evaluator starts its workers at the
    first call that pays for them), its start spread over
    :data:`START_SPREAD_CALLS` calls plus :data:`CALL_PRIOR_S`, the start
    taken as :data:`START_PER_WORKER_S` per worker until it was timed
    (:meth:`started`); once started, :data:`CALL_PRIOR_S` alone.

    Parameters
    ----------
    workers : int
        Workers the pool will start.
    """

    #: Starting the workers, per worker, until the pool's own start was timed:
    #: two forked workers started in about 7 ms on the 2-core development VM
    #: (an AMD EPYC and a Xeon, Python 3.11); the cost grows with the workers.
    START_PER_WORKER_S = 0.0035
    #: A pool call beyond the kernel before one was measured: 0.3-1.5 ms on
    #: the 2-core development VM.
    CALL_PRIOR_S = 0.001
    #: The start counts as this many calls' worth of overhead, spread.
    START_SPREAD_CALLS = 10

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.start_s: float | None = None  # the pool's start, once timed
        self._overhead: deque[float] = deque(maxlen=16)
        self._pool_started = False

    def started(self, seconds: float) -> None:
        """The pool started and it took ``seconds``."""
        self._pool_started = True
        self.start_s = seconds

    def pool_call(self, wall: float, busy: float, workers: int) -> None:
        self._overhead.append(max(0.0, wall - busy / max(workers, 1)))

    def per_call(self) -> float:
        if self._overhead:
            return statistics.median(self._overhead)
        if self._pool_started:
            return self.CALL_PRIOR_S
        start = self.START_PER_WORKER_S * self.workers
        return start / self.START_SPREAD_CALLS + self.CALL_PRIOR_S


class BreakEven:
    """When a call of one kernel is cheaper in the calling process than on the pool.

    The kernel costs ``c`` seconds per item (its own time: the workers' busy
    time, or an inline call's wall time, over the items); a pool call costs
    ``overhead + c * n / workers``; running the same chunks inline costs
    ``c * n``.  Inline wins below ``n* = overhead / (c * (1 - 1 / workers))``.
    """

    def __init__(self) -> None:
        self._per_item: deque[float] = deque(maxlen=8)  # seconds per item, kernel only
        self._inline_since = 0  # inline calls since the last pool call

    def kernel_time(self, items: int, seconds: float, *, inline: bool) -> None:
        """``seconds`` of kernel work over ``items`` items, inline or on the pool."""
        self._inline_since = self._inline_since + 1 if inline else 0
        if items > 0 and seconds > 0:
            self._per_item.append(seconds / items)

    @property
    def known(self) -> bool:
        return bool(self._per_item)

    def per_item(self) -> float:
        """The kernel's seconds per item (0 while unknown)."""
        return statistics.median(self._per_item) if self._per_item else 0.0

    def items(self, workers: int, overhead: float) -> float:
        """The break-even number of items (``inf``: always inline; 0: unknown, never)."""
        if not self.known:
            return 0.0
        c = self.per_item()
        if workers <= 1 or c <= 0:
            return math.inf
        return overhead / (c * (1 - 1 / workers))

    def inline(self, n: int, workers: int, overhead: float) -> bool:
        """Whether to run ``n`` items inline; every :data:`INLINE_RECHECK` inline calls of a
        size near the break-even, one goes to the pool instead, so that a pool
        slowed down for a while (a busy machine) is measured again."""
        if self.known and n * self.per_item() < TINY_S:
            return True  # less work than any pool round trip measured anywhere
        n_star = self.items(workers, overhead)
        below = n < n_star
        if below and self._inline_since >= INLINE_RECHECK and n >= n_star / 8:
            return False
        return below
