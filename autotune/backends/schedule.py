"""Pure scheduling: how a call is cut and which chunks go out in which batch.

Nothing here touches processes, so the policy is tested on numbers alone and
any backend can reuse it.

How a call is cut is decided in one place, :func:`plan_chunks`: given ``n``,
the workers of the call and the chunk length asked for (and where that
length came from), the :class:`ChunkPlan` whose ranges the runner executes.
The evaluator, the online refinement and the search all plan through it.
A plan's ranges are chunks of one length, except a last round that would
leave workers idle, which is cut into equal pieces for all of them
(:func:`guided_tail`): calls that finish together.

The plan numbers its ranges (its *chunks*), so a *batch* is just a range of
chunk indices ``[c0, c1)``; :meth:`ChunkPlan.ranges` gives the items they
cover.  Batches shrink as the work runs out (guided self-scheduling, as in
OpenMP's ``guided``): big batches early keep the parent out of the per-chunk
loop, small batches at the end keep every worker busy until the last chunk.

The invariant every call keeps: the ranges handed to kernels are disjoint and
cover exactly ``[0, n)``.  It is checked where ranges are made, so that a bad
one raises :class:`~autotune._errors.RangeError` before a kernel runs on it
(never a silent clip): :func:`count_chunks` checks a call's ``n`` and chunk
length, a :class:`ChunkPlan` is refused unless its ranges cover the call and
turns only chunk indices of the call into items (:meth:`ChunkPlan.bounds`),
:class:`Batches` hands out and takes back only chunks of the call,
:class:`Coverage` refuses a chunk accepted twice and a call that ends with one
missing, and :class:`Cursor` cuts a call into consecutive slices (the online
refinement's) that must end exactly at ``n``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from autotune._errors import RangeError

__all__ = [
    "EXACT",
    "GUESSED",
    "MEASURED",
    "MIN_PIECE",
    "Batches",
    "ChunkPlan",
    "Coverage",
    "Cursor",
    "balanced_chunk_len",
    "count_chunks",
    "guided_tail",
    "n_chunks",
    "plan_chunks",
]

#: Each batch takes 1/(GUIDE * workers) of the chunks not yet handed out: a
#: slow worker can hold back at most about that share of the work.
GUIDE = 8


def n_chunks(n: int, chunk_len: int) -> int:
    """Number of chunks covering ``n`` items."""
    return -(-n // chunk_len)


def count_chunks(n: int, chunk_len: int) -> int:
    """Chunks of a call of ``n`` items, once ``n >= 0`` and ``chunk_len >= 1`` are whole numbers.

    Every runner starts a call here: a float or a zero chunk length would
    hand kernels ranges that are not item numbers.
    """
    try:
        n, chunk_len = operator.index(n), operator.index(chunk_len)
    except TypeError:
        raise RangeError(
            f"a call of n={n!r} items in chunks of {chunk_len!r}: not integers"
        ) from None
    if n < 0 or chunk_len < 1:
        raise RangeError(f"a call of n={n} items in chunks of {chunk_len}")
    return n_chunks(n, chunk_len)


#: Up to this many chunks per worker, a short last chunk is worth evening out.
EQUAL_UP_TO = 8


def balanced_chunk_len(n: int, chunk_len: int, workers: int) -> int:
    """``chunk_len``, shortened just enough that the chunks are a multiple of ``workers``.

    With 7.6 chunks for 2 workers, one worker does 4 and the other 3.6: the
    call takes 5% longer than it needs.  The chunks are made just short
    enough to be a multiple of ``workers`` in number (8 chunks of 125000
    items instead of 7.6 of 131072), so every worker's last chunk ends at
    about the same time; up to :data:`EQUAL_UP_TO` chunks per worker they
    are also made equal (8 of 7324 rather than 7 of 7812 and a half one).
    With 16 workers the tail is worth more: on a 16-core Xeon, 62 chunks of
    a memory-bound map ran at 0.87 of 64.
    The length shrinks by a factor ``ceil(total / workers) * workers /
    total``: at most 2 for one chunk per worker, at most 9/8 from eight
    chunks per worker on.  Only very short chunks (fewer items than the
    rounding needs) may miss the multiple.
    """
    total = n_chunks(n, chunk_len)
    if workers <= 1 or (total % workers == 0 and total > EQUAL_UP_TO * workers):
        return chunk_len
    even = -(-total // workers) * workers
    return max(1, min(chunk_len, -(-n // even)))


#: Where a chunk length came from, which decides how a call may change it.
#: The user's ``chunk_len``: honoured to the item.
EXACT = "exact"
#: Measured (a profile, a search's point, a point the online refinement is
#: timing), perhaps at another ``n``: cut to at most one chunk per worker, and
#: a multiple of the workers in number.  The refinement times exactly the cut
#: a profile of that point runs, one chunk per worker included: when it kept
#: two per worker, replays of a 16-core Xeon's recorded landscape never ran
#: the best point of a row filter (16 x 512 of 8192 rows) and settled at 0.90
#: of it (tests/test_landscapes.py).
MEASURED = "measured"
#: The heuristic's rule, measured nowhere: at least
#: :data:`GUESSED_CHUNKS_PER_WORKER` chunks per worker.
GUESSED = "guessed"
#: A guessed length may be longer than a small call deserves: four chunks per
#: worker keep every worker busy and let a slow chunk be made up for.
GUESSED_CHUNKS_PER_WORKER = 4
_MIN_PER_WORKER = {
    EXACT: 0,
    MEASURED: 0,
    GUESSED: GUESSED_CHUNKS_PER_WORKER,
}


@dataclass(frozen=True)
class ChunkPlan:
    """How one call of ``n`` items is cut, and the only description of its ranges.

    ``head`` chunks of ``chunk_len`` items cover ``[0, head * chunk_len)``;
    the rest of the call is cut into pieces of ``piece_len`` items, the last
    one shorter.  Without a tail ``piece_len == chunk_len`` and ``head`` is 0:
    chunks of ``chunk_len``, the last one shorter.  ``workers`` take part.

    Items are numbered from ``start`` (0 but for the slices of a call the
    online refinement runs one after another, :meth:`at`): the plan covers
    ``[start, start + n)``, cut as ``[0, n)`` would be, and a map run on it
    fills the rows ``[start, stop)`` of an output of :attr:`stop` rows, the
    rows before ``start`` being the caller's (its earlier slices').

    Six integers say it all, so a runner hands the plan to its workers once
    per call and then sends chunk indices only; :meth:`bounds` and
    :meth:`ranges` turn indices into items, checked.  The ranges are
    disjoint and cover exactly ``[start, start + n)``; a plan that could
    not keep that is refused (``RangeError``) when it is made.
    """

    n: int
    workers: int
    chunk_len: int
    head: int = 0
    piece_len: int = 0  # 0: chunk_len (no tail)
    start: int = 0

    def __post_init__(self) -> None:
        count_chunks(self.n, self.chunk_len)  # whole numbers, or RangeError
        piece = self.piece_len or self.chunk_len
        if piece == self.chunk_len:
            object.__setattr__(self, "head", 0)  # one way to say "no tail"
        object.__setattr__(self, "piece_len", piece)
        if self.start:
            count_chunks(self.start, 1)  # a whole number, not negative
        if (
            self.workers < 1
            or not 1 <= piece <= self.chunk_len
            or not 0 <= self.head * self.chunk_len <= self.n
        ):
            raise RangeError(
                f"a plan of {self.n} items: {self.head} chunks of {self.chunk_len}, then pieces "
                f"of {piece}, on {self.workers} workers"
            )

    @property
    def stop(self) -> int:
        """One past the plan's last item (``n`` when it starts at 0)."""
        return self.start + self.n

    def at(self, start: int) -> ChunkPlan:
        """The same cut of the items ``[start, start + n)``: a slice of a longer call."""
        return self if start == self.start else dataclasses.replace(self, start=start)

    @property
    def split(self) -> int:
        """The first item of the pieces: the head's chunks end here."""
        return self.head * self.chunk_len

    @property
    def chunks(self) -> int:
        return self.head + n_chunks(self.n - self.split, self.piece_len)

    def bounds(self, c0: int, c1: int) -> tuple[int, int]:
        """Item range ``[start, stop)`` covered by chunks ``[c0, c1)`` of the plan.

        ``RangeError`` unless ``0 <= c0 < c1 <= chunks``: a batch of no
        chunk, or of chunks past the call's end.
        """
        if not 0 <= c0 < c1 <= self.chunks:
            raise RangeError(
                f"chunks [{c0}, {c1}) are not chunks of a call of {self.n} items "
                f"in {self.chunks} chunks"
            )
        return self.start + self._first(c0), self.start + min(self.n, self._first(c1))

    def _first(self, c: int) -> int:
        """Chunk ``c``'s first item, counted from the plan's start."""
        if c <= self.head:
            return c * self.chunk_len
        return self.split + (c - self.head) * self.piece_len

    def ranges(self, c0: int = 0, c1: int | None = None) -> Iterator[tuple[int, int]]:
        """The ``(start, stop)`` of chunks ``c0 .. c1 - 1`` (all by default), checked first.

        What every runner hands its kernel.  Built from ``range`` objects
        zipped in C, not a Python loop: the processes worker's per-chunk cost
        is about a microsecond, and a generator's step added about 0.1 us to it.
        """
        if c1 is None:
            c1 = self.chunks
            if c1 == 0:
                return iter(())  # a call of no item
        self.bounds(c0, c1)  # chunks of this call, or RangeError
        length, head, piece, at = self.chunk_len, self.head, self.piece_len, self.start
        split = at + self.split
        parts: list[Iterator[tuple[int, int]]] = []
        if c0 < head:  # the head's chunks: all whole
            end = at + min(c1, head) * length
            parts.append(
                zip(
                    range(at + c0 * length, end, length),
                    range(at + (c0 + 1) * length, end + 1, length),
                    strict=True,
                )
            )
        if c1 > head:  # then the pieces (all the chunks, without a tail): the last may be short
            first = split + (max(c0, head) - head) * piece
            last = split + (c1 - 1 - head) * piece  # start of the last one
            parts.append(
                zip(range(first, last, piece), range(first + piece, last + 1, piece), strict=True)
            )
            parts.append(iter(((last, min(self.stop, last + piece)),)))
        return itertools.chain.from_iterable(parts)


def plan_chunks(n: int, workers: int, chunk_len: int, source: str = EXACT) -> ChunkPlan:
    """The plan of a call of ``n`` items on ``workers`` workers, ``chunk_len`` asked.

    The chunk length, by where ``chunk_len`` came from (``source``):

    - :data:`EXACT` (the user's): kept as it is.
    - :data:`MEASURED` (a profile, a search, the refinement): at most ``ceil(n / workers)``
      (one chunk per worker), and shortened just enough that all chunks are
      equal and their number a multiple of ``workers``
      (:func:`balanced_chunk_len`): the workers finish together.
    - :data:`GUESSED` (the heuristic's): at least
      :data:`GUESSED_CHUNKS_PER_WORKER` chunks per worker, then balanced.

    Then, for every source, the *guided tail* (:func:`guided_tail`): when the
    last round of chunks would leave workers idle (fewer chunks than workers,
    or a short last chunk), its items are cut into up to ``workers`` equal
    pieces, so that all workers finish at about the same time.  A balanced
    length leaves at most a last chunk a few items short, so it is mostly
    the user's exact ``chunk_len`` that gets a tail; every chunk before the
    tail keeps ``chunk_len`` items, and no range is longer.

    What decides the cut: ``(n, workers, chunk_len, source)`` and nothing
    else, never a timing, so a map's result never depends on the plan and a
    reduce's bits are the same on every call with the same
    ``(n, workers, chunk_len, source)``; an explicit ``chunk_len`` gives
    bit-identical repeats.  (With a tail, a reduce's bits depend on
    ``workers`` too: the pieces are cut for them.)
    """
    count_chunks(n, chunk_len)  # whole numbers, or RangeError
    if source not in _MIN_PER_WORKER:
        raise ValueError(f"unknown chunk length source {source!r}")
    workers = max(1, workers)
    if source != EXACT:
        per_worker = _MIN_PER_WORKER[source]
        if per_worker:
            chunk_len = max(1, min(chunk_len, -(-n // (per_worker * workers))))
        chunk_len = balanced_chunk_len(n, chunk_len, workers)
    return guided_tail(n, workers, chunk_len)


#: A piece of the tail holds at least this many items (or half a chunk,
#: rounded down, if less).  The cheapest numpy kernels cost about 1 ns an
#: item (``x * 2.0`` over 1024 float64 took 0.8 us, most of it numpy's fixed
#: cost per call, on the 2-core AMD EPYC VM, 2026-12-04), so a shorter piece
#: computes about what it costs to run: a chunk costs 0.47 us in the workers'
#: loop with 2 workers (README, "The evaluator") and 1.64 us on a 16-core
#: Xeon (issue 19), plus the kernel's own call.  Items that cost more (a row
#: of an image) make the floor generous; half a chunk is always allowed (see
#: :func:`guided_tail`).  Measurements of cheap kernels on more cores would
#: move it.
MIN_PIECE = 1024


def guided_tail(n: int, workers: int, chunk_len: int) -> ChunkPlan:
    """Chunks of ``chunk_len``, the last round cut so that the workers finish together.

    The *last round* is what is left once every worker has had as many
    chunks as the others: ``chunks % workers`` chunks, while the other
    workers idle (a call of ``2k + 1`` equal chunks on 2 workers ends with
    one worker running the last chunk alone: ``k + 1`` chunks' time for
    ``k + 1/2`` chunks of work each), or ``workers`` chunks of which the last
    is short.  Its items are cut into up to ``workers`` equal pieces, each at
    least ``min(MIN_PIECE, chunk_len // 2)`` items (the last one may be
    shorter by the rounding):

    - The pieces go out last, one per idle worker (the dispatcher hands
      the last chunks to idle workers, never into a queue), so each worker
      runs at most one chunk more than without the tail: its per-chunk cost
      is one chunk's, a microsecond or two, under 1% of any call that runs
      on a pool (a round trip to the workers costs a quarter of a
      millisecond or more: docs/design.md, section 6).
    - The floor keeps a piece worth its cost (:data:`MIN_PIECE`); half a
      chunk is always allowed, as TBB's partitioners never cut a range below
      half its grain size: 2 pieces of half a chunk are what makes ``2k + 1``
      chunks on 2 workers as fast as ``2k`` longer ones.
    - Equal pieces, not the shrinking ones of OpenMP's ``guided``: the
      workers reach the last round together (they ran the same number of
      equal chunks), so the pieces they take should be equal too.

    No tail on one worker, or when the pieces would not be shorter than the
    longest chunk of the last round (it is all full chunks, one per worker).
    """
    total = n_chunks(n, chunk_len)
    if workers <= 1 or total <= 1:
        return ChunkPlan(n, workers, chunk_len)
    last = total % workers or workers
    head = total - last
    items = n - head * chunk_len
    pieces = min(workers, items // max(1, min(MIN_PIECE, chunk_len // 2)))
    if pieces < 2 or -(-items // pieces) >= min(chunk_len, items):
        return ChunkPlan(n, workers, chunk_len)  # no shorter last round to be had
    return ChunkPlan(n, workers, chunk_len, head, -(-items // pieces))


class Batches:
    """Hands out chunk-index batches ``(c0, c1)``; lost batches are re-queued first.

    Parameters
    ----------
    total : int
        Number of chunks.
    workers : int
        Workers sharing them (sets how fast batches shrink).
    max_batch : int, optional
        Upper bound on chunks per batch (1 while a ``map`` output does not
        exist yet, so early results come back small).
    """

    def __init__(self, total: int, workers: int) -> None:
        if total < 0:
            raise RangeError(f"a call of {total} chunks")
        self.total = total
        self.workers = max(1, workers)
        self._next = 0
        self._requeued: deque[tuple[int, int]] = deque()

    def __bool__(self) -> bool:
        return bool(self._requeued) or self._next < self.total

    @property
    def remaining(self) -> int:
        """Chunks not handed out yet (re-queued ones included)."""
        return self.total - self._next + sum(c1 - c0 for c0, c1 in self._requeued)

    def take(self, max_batch: int | None = None) -> tuple[int, int]:
        """The next batch; call only while ``bool(self)``."""
        if self._requeued:
            return self._requeued.popleft()
        remaining = self.total - self._next
        size = max(1, math.ceil(remaining / (GUIDE * self.workers)))
        if max_batch is not None:
            size = min(size, max_batch)
        c0 = self._next
        self._next = c0 + size
        return c0, self._next

    def requeue(self, batch: tuple[int, int]) -> None:
        """Put back a batch whose worker died; it goes out before new work.

        Only chunks already handed out can come back (``RangeError`` else).
        """
        c0, c1 = batch
        if not 0 <= c0 < c1 <= self._next:
            raise RangeError(
                f"chunks [{c0}, {c1}) put back, but only chunks [0, {self._next}) "
                f"of {self.total} were handed out"
            )
        self._requeued.append(batch)


class Coverage:
    """The chunks of one call accepted so far: each exactly once, and in the end all.

    A chunk whose result is accepted twice would make a call look complete
    with another chunk missing (a map's rows never written): :meth:`accept`
    refuses it, and :meth:`check_complete` refuses a call that ends with a
    chunk missing, both with ``RangeError``.  One byte per chunk.
    """

    __slots__ = ("total", "accepted", "_seen")

    def __init__(self, total: int) -> None:
        self.total = total
        self.accepted = 0
        self._seen = bytearray(total)

    def __bool__(self) -> bool:
        """True while chunks are missing."""
        return self.accepted < self.total

    def accept(self, c0: int, c1: int) -> None:
        if not 0 <= c0 < c1 <= self.total:
            raise RangeError(f"chunks [{c0}, {c1}) accepted in a call of {self.total} chunks")
        again = self._seen.find(1, c0, c1)
        if again != -1:
            raise RangeError(f"chunk {again} of {self.total} accepted twice")
        self._seen[c0:c1] = b"\x01" * (c1 - c0)
        self.accepted += c1 - c0

    def check_complete(self) -> None:
        if self.accepted != self.total:
            missing = self._seen.find(0)
            raise RangeError(
                f"a call ended with {self.total - self.accepted} of its {self.total} chunks "
                f"missing (the first: chunk {missing})"
            )


class Cursor:
    """Consecutive slices ``[start, stop)`` of a call of ``n`` items, checked as they are cut.

    Each slice starts where the last one ended, holds at least one item and
    ends at ``n`` at the latest (``RangeError`` before any kernel runs on it);
    :meth:`check_complete` says the slices reached ``n``.  The online
    refinement cuts its calls with it: a first slice timed inline, probing
    slices at other points, the rest at the best one.
    """

    __slots__ = ("n", "done")

    def __init__(self, n: int) -> None:
        self.n = n
        self.done = 0

    @property
    def left(self) -> int:
        return self.n - self.done

    def take(self, items: int) -> tuple[int, int]:
        """The next ``items`` items."""
        if not 0 < items <= self.n - self.done:
            raise RangeError(
                f"a slice of {items} items asked after {self.done} of a call of {self.n}"
            )
        start = self.done
        self.done += items
        return start, self.done

    def check_complete(self) -> None:
        if self.done != self.n:
            raise RangeError(f"a call of {self.n} items ended after {self.done}")
