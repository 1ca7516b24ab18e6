"""Threads or processes? Each backend tuned, against ThreadPoolExecutor, in one run.

For each workload (stream: numpy ufuncs, release the GIL; spline:
``RectBivariateSpline.ev``, holds it; ndimage: scipy.ndimage row filters):

* serial: the kernel over the whole range in this process;
* ``ThreadPoolExecutor(W)`` with the chunking a user would pick (four chunks
  per thread), results joined; ``W`` is every usable CPU;
* autotune, each backend tuned on its own (``search(..., backends=(b,))``),
  then timed head to head with the others (interleaved runs, medians);
* what ``autotune search`` picks when it searches both.

    python scripts/bench_backends.py            # about 3 minutes
    python scripts/bench_backends.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from _bench_common import time_interleaved, usable_cpus  # this folder is sys.path[0]

from autotune import Evaluator
from autotune.backends.shared import SharedNamespace
from autotune.tuner import search
from autotune.workloads import ndimage, spline, stream


def sizes(quick: bool):
    if quick:
        return {
            "stream": lambda: stream(1 << 21),
            "spline": lambda: spline(points=20_000, splines=10),
            "ndimage": lambda: ndimage(rows=1024),
        }
    return {
        "stream": lambda: stream(1 << 24),
        "spline": lambda: spline(points=200_000),
        "ndimage": lambda: ndimage(rows=8192),
    }


def combine(workload, parts):
    if workload.mode == "map":
        return np.concatenate(parts)
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def bench(workload, budget: float, repeats: int) -> dict:
    ns = SharedNamespace(dict(workload.shared))
    n = workload.n
    expected = workload.kernel(ns, 0, n)

    def serial():
        return workload.kernel(ns, 0, n)

    threads = usable_cpus()
    step = -(-n // (4 * threads))
    executor = ThreadPoolExecutor(threads)

    def tpe():
        futures = [
            executor.submit(workload.kernel, ns, s, min(n, s + step)) for s in range(0, n, step)
        ]
        return combine(workload, [f.result() for f in futures])

    tuned = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in ("processes", "threads"):
            r = search(workload, budget=budget, backends=(backend,), items=n, progress=False)
            tuned[backend] = (r.profile.workers, r.profile.chunk_len)
        both = search(workload, budget=budget, items=n, progress=False).profile
    pools = {b: Evaluator(w, c, shared=workload.shared, backend=b) for b, (w, c) in tuned.items()}
    runners = {"serial": serial, f"ThreadPoolExecutor({threads}), {4 * threads} chunks": tpe}
    for b, ev in pools.items():
        call = ev.map if workload.mode == "map" else ev.reduce
        runners[f"autotune {b} (tuned)"] = lambda call=call: call(workload.kernel, n)
    try:
        times, ok = time_interleaved(runners, expected, repeats)
    finally:
        for ev in pools.values():
            ev.close()
        executor.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "workload": workload.name,
        "n": n,
        "seconds": med,
        "agrees": ok,
        "tuned": {b: list(p) for b, p in tuned.items()},
        "search_picks": {
            "backend": both.backend,
            "workers": both.workers,
            "chunk_len": both.chunk_len,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--budget", type=float, default=None, help="per search")
    args = parser.parse_args()
    budget = args.budget or (5.0 if args.quick else 20.0)
    repeats = 3 if args.quick else 7
    results = [bench(make(), budget, repeats) for make in sizes(args.quick).values()]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        serial = r["seconds"]["serial"]
        print(f"{r['workload']} (n={r['n']}): seconds, speedup over serial, agreement")
        for name, sec in r["seconds"].items():
            mark = "OK" if r["agrees"][name] else "DIFFERS"
            print(f"  {name:36s} {sec:9.4f} s  {serial / sec:6.2f}x  {mark}")
        for b, (w, c) in r["tuned"].items():
            print(f"  tuned {b}: {w} workers x {c} items")
        p = r["search_picks"]
        print(
            f"  autotune search over both picks: {p['backend']}, {p['workers']} workers x "
            f"{p['chunk_len']} items\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
