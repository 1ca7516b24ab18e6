"""Calls that finish together: a chunk count that is not a multiple of the workers.

A call of ``2k + 1`` equal chunks on ``2`` workers (``w`` in general: ``wk + 1``)
leaves one worker alone with the last chunk.  autotune's planner cuts that
last round into pieces for the idle workers (the guided tail, an explicit
``chunk_len`` included) and shortens a measured chunk length until the chunks
are a multiple of the workers.  This prints, alternated in one run, on the
same data, each contender's median and its ratio to ``exact wk``:

- ``exact wk+1``: ``Evaluator(w, chunk_len)`` with the length that gives
  ``wk + 1`` chunks: ``wk`` of that length, then the guided tail;
- ``no tail wk+1``: the same chunks without the tail (what a Pool over such
  ranges runs), on the same kind of process pool, run through the runner
  interface (``open_runner`` and a ``ChunkPlan`` of chunks only);
- ``planned``: the same length from a measured profile, cut by the planner;
- ``exact wk``: the length that gives ``wk`` chunks of the same items.

Target: ``exact wk+1`` and ``planned`` no slower than 1.05x ``exact wk``.

    python scripts/bench_tail.py                  # k = 4, 8M items, 7 rounds
    python scripts/bench_tail.py --k 2 --repeats 11
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import operator
import os
import statistics
import sys

import numpy as np
from _bench_common import CpuWitness, contention_note, time_interleaved

from autotune import Evaluator
from autotune.backends.runners import open_runner
from autotune.backends.schedule import EXACT, ChunkPlan, plan_chunks
from autotune.cpu import probe
from autotune.profile import heuristic_profile
from autotune.settings import default_start_method

#: The kernel works through its range in blocks of this many items, so that an
#: item costs the same in a chunk of any length.  Over whole chunks, numpy's
#: temporaries grew with the chunk and so did the cost of an item: serially on
#: the 2-core AMD EPYC VM, 8M items in chunks of 1000000 took 0.105 s, in
#: chunks of 800000 0.083 s; in blocks of 32768, 0.084 s both.
BLOCK = 1 << 15


def kernel(shared, start, stop):
    """CPU-bound, the same work for every item whatever the chunk length."""
    total = 0.0
    for s in range(start, stop, BLOCK):
        x = shared.x[s : min(stop, s + BLOCK)]
        total += float(np.sin(np.sqrt(x * x + 1.0)).sum())
    return total


def measured(chunk_len: int, workers: int):
    """A measured profile of one point: what ``autotune search`` would have saved."""
    guess = heuristic_profile(probe(), "tail", 8)
    best = dataclasses.replace(
        guess.best, workers=workers, chunk_len=chunk_len, chunk_bytes=chunk_len * 8
    )
    return dataclasses.replace(guess, source="measured", best=best, measurements=(best,))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8_000_000, help="items per call")
    parser.add_argument("--k", type=int, default=4, help="chunks per worker")
    parser.add_argument("--workers", type=int, default=None, help="default: usable CPUs")
    parser.add_argument("--repeats", type=int, default=7, help="alternated rounds")
    args = parser.parse_args(argv)
    w = args.workers or len(os.sched_getaffinity(0))
    n, k = args.n, args.k
    x = np.random.default_rng(0).random(n)
    odd = math.ceil(n / (w * k + 1))
    even = f"exact {w * k}"
    cases = {
        f"exact {w * k + 1}": {"workers": w, "chunk_len": odd},
        "planned": {"profile": measured(odd, w)},
        even: {"workers": w, "chunk_len": math.ceil(n / (w * k))},
    }
    evs = {name: Evaluator(shared={"x": x}, **kw) for name, kw in cases.items()}
    # The odd count's chunks as they are, no tail: the plan a Pool over them runs.
    untailed = ChunkPlan(n, w, odd)
    pool = open_runner("processes", w, {"x": x}, start_method=default_start_method())
    try:
        expected = kernel(type("NS", (), {"x": x})(), 0, n)
        witness = CpuWitness()
        runners = {name: (lambda ev=ev: ev.reduce(kernel, n)) for name, ev in evs.items()}
        no_tail = f"no tail {w * k + 1}"
        runners[no_tail] = lambda: pool.run(kernel, untailed, "reduce", operator.add)
        times, ok = time_interleaved(runners, expected, args.repeats)
        busy = witness.others()
        base = statistics.median(times[even])
        print(f"{n} items, {w} workers, {args.repeats} alternated rounds (median seconds)")
        shapes = {name: (ev.stats.chunks, ev.stats.chunk_len) for name, ev in evs.items()}
        shapes[no_tail] = (untailed.chunks, untailed.chunk_len)
        for name in runners:
            chunks, chunk_len = shapes[name]
            med = statistics.median(times[name])
            print(
                f"  {name:13} {chunks:4} chunks of {chunk_len:8}  {med:.4f} s  "
                f"x{med / base:.3f} of {even}" + ("" if ok[name] else "  WRONG RESULT")
            )
        tail = plan_chunks(n, w, odd, EXACT)
        if tail.piece_len < tail.chunk_len:
            print(
                f"  (exact {w * k + 1}'s plan: {tail.head} chunks of {tail.chunk_len}, then "
                f"{tail.chunks - tail.head} pieces of {tail.piece_len}: the guided tail)"
            )
        print(contention_note(busy))
    finally:
        pool.close()
        for ev in evs.values():
            ev.close()
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
