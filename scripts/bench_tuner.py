"""Tuner benchmark: does ``strategy="auto"`` find the grid's answer for much less time?

In one run, on one workload and the same items per timed run: the exhaustive
grid, then the auto search; then the grid's best, auto's pick and the
heuristic's point timed head to head (alternating runs, medians).  Prints

* auto's pick / grid's best (target >= 0.95), from the head-to-head runs and
  from the grid's own table;
* auto's time / grid's time (target <= 0.30);
* the heuristic's throughput as a fraction of the tuned best.

    python scripts/bench_tuner.py                      # stream, then spline
    python scripts/bench_tuner.py --workload stream --quick
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings

from autotune import Evaluator, probe
from autotune.profile import heuristic_profile
from autotune.tuner import search
from autotune.workloads import get_workload


def head_to_head(workload, n, points, repeats):
    """Median throughput of each (backend, workers, chunk_len), runs interleaved."""
    lanes = {(b, w) for b, w, _ in points}
    pools = {(b, w): Evaluator(w, 1, shared=workload.shared, backend=b) for b, w in lanes}
    times = {p: [] for p in points}
    try:
        for ev in pools.values():  # warm every pool once
            ev.chunk_len = max(1, n // 8)
            (ev.map if workload.mode == "map" else ev.reduce)(workload.kernel, n)
        for _ in range(repeats):
            for b, w, c in points:
                ev = pools[(b, w)]
                ev.chunk_len = c
                call = ev.map if workload.mode == "map" else ev.reduce
                t0 = time.perf_counter()
                result = call(workload.kernel, n)
                times[(b, w, c)].append(time.perf_counter() - t0)
                del result
    finally:
        for ev in pools.values():
            ev.close()
    return {p: n / statistics.median(t) for p, t in times.items()}


def key(m):
    return (m.backend or "processes", m.workers, m.chunk_len)


def bench(name: str, budget: float, items: int | None, repeats: int) -> dict:
    workload = get_workload(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        grid = search(workload, budget=budget, strategy="grid", items=items, progress=False)
        grid_s = time.perf_counter() - t0
        n = grid.profile.n
        t0 = time.perf_counter()
        auto = search(workload, budget=budget, strategy="auto", items=n, progress=False)
        auto_s = time.perf_counter() - t0
    cpu = probe()
    heur = heuristic_profile(cpu, name, workload.item_bytes)
    g, a = grid.profile.best, auto.profile.best
    h = ("processes", heur.workers, min(heur.chunk_len, n))
    points = list(dict.fromkeys([key(g), key(a), h]))
    speed = head_to_head(workload, n, points, repeats)
    table = {key(m): m.throughput for m in grid.profile.measurements}
    return {
        "workload": name,
        "items_per_run": n,
        "grid": {"seconds": grid_s, "runs": grid.runs, "best": list(key(g))},
        "auto": {"seconds": auto_s, "runs": auto.runs, "pick": list(key(a))},
        "heuristic": {"point": list(h)},
        "auto_vs_grid_head_to_head": speed[key(a)] / speed[key(g)],
        "auto_vs_grid_in_grid_table": (table.get(key(a)) or float("nan")) / g.throughput,
        "time_ratio": auto_s / grid_s,
        "heuristic_vs_best": speed[h] / max(speed.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="append", help="stream, spline or MODULE:CALLABLE")
    parser.add_argument("--budget", type=float, default=120.0, help="per search (default 120)")
    parser.add_argument("--items", type=int, help="items per timed run (default: from budget)")
    parser.add_argument("--quick", action="store_true", help="small runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = args.workload or ["stream", "spline"]
    repeats = 3 if args.quick else 7
    results = []
    for name in names:
        items = args.items
        if items is None and args.quick:
            items = 1 << 20 if name == "stream" else 20_000
        elif items is None and name == "spline":
            items = 100_000  # the seed's kernel runs at ~0.25 M points/s per core here
        results.append(bench(name, args.budget, items, repeats))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"{r['workload']}: {r['items_per_run']} items per timed run")
        for name, label in (("grid", "best"), ("auto", "pick")):
            b, w, c = r[name]["best" if name == "grid" else "pick"]
            print(
                f"  {name}  {r[name]['seconds']:6.1f} s  {r[name]['runs']:4d} runs  "
                f"{label} {w} workers ({b}) x {c} items"
            )
        ratio = r["auto_vs_grid_in_grid_table"]
        # Both searches walk the same ladder: auto's pick is missing from the grid's
        # table only when the grid's budget ran out before it got there.
        in_table = (
            f"{ratio:.3f} in the grid's table"
            if math.isfinite(ratio)
            else "not timed by the grid (its budget ran out first)"
        )
        print(
            f"  auto pick / grid best: {r['auto_vs_grid_head_to_head']:.3f} head to head, "
            f"{in_table}   (target >= 0.95)"
        )
        print(f"  auto time / grid time: {r['time_ratio']:.3f}   (target <= 0.30)")
        _, hw, hc = r["heuristic"]["point"]
        print(f"  heuristic ({hw} workers x {hc} items) / best: {r['heuristic_vs_best']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
