"""Calls that finish together: a chunk count that is not a multiple of the workers.

A call of ``2k + 1`` equal chunks on ``2`` workers (``w`` in general: ``wk + 1``)
leaves one worker alone with the last chunk.  autotune's planner shortens a
measured chunk length until the chunks are a multiple of the workers; this
prints, alternated in one run, on the same data:

- ``exact wk+1``: ``Evaluator(w, chunk_len)`` with the length that gives
  ``wk + 1`` chunks (an explicit ``chunk_len`` is honoured exactly, as a
  Pool over such ranges would run it);
- ``planned``: the same length from a measured profile, cut by the planner;
- ``exact wk``: the length that gives ``wk`` chunks of the same items.

Target: ``planned`` no slower than 1.05x ``exact wk``.

    python scripts/bench_tail.py                  # k = 4, 8M items, 7 rounds
    python scripts/bench_tail.py --k 2 --repeats 11
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys

import numpy as np
from _bench_common import CpuWitness, contention_note, time_interleaved

from autotune import Evaluator
from autotune.cpu import probe
from autotune.profile import heuristic_profile


def kernel(shared, start, stop):
    """CPU-bound, the same work for every item."""
    x = shared.x[start:stop]
    return float(np.sin(np.sqrt(x * x + 1.0)).sum())


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
    cases = {
        f"exact {w * k + 1}": {"workers": w, "chunk_len": odd},
        "planned": {"profile": measured(odd, w)},
        f"exact {w * k}": {"workers": w, "chunk_len": math.ceil(n / (w * k))},
    }
    evs = {name: Evaluator(shared={"x": x}, **kw) for name, kw in cases.items()}
    try:
        expected = kernel(type("NS", (), {"x": x})(), 0, n)
        witness = CpuWitness()
        runners = {name: (lambda ev=ev: ev.reduce(kernel, n)) for name, ev in evs.items()}
        times, ok = time_interleaved(runners, expected, args.repeats)
        busy = witness.others()
        base = statistics.median(times[f"exact {w * k}"])
        print(f"{n} items, {w} workers, {args.repeats} alternated rounds (median seconds)")
        for name, ev in evs.items():
            med = statistics.median(times[name])
            print(
                f"  {name:10} {ev.stats.chunks:4} chunks of {ev.stats.chunk_len:8}  "
                f"{med:.4f} s  x{med / base:.3f} of exact {w * k}"
                + ("" if ok[name] else "  WRONG RESULT")
            )
        print(contention_note(busy))
    finally:
        for ev in evs.values():
            ev.close()
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
