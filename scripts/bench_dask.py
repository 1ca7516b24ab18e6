"""autotune's dask backend against the Dask code a user would write, on a local Dask cluster.

One ``LocalCluster(processes=True, n_workers=W, threads_per_worker=1)`` (``W``:
every usable CPU unless ``--workers`` says otherwise; printed), two
workloads (stream: a memory-bound numpy map; spline: the seed's
RectBivariateSpline sum, a reduce), timed in one run (interleaved repeats,
medians; every result checked against the serial one):

* serial: the kernel over the whole range in this process;
* ``dask.array``: ``da.from_array`` of the inputs and ``map_blocks`` with
  the kernel, 4 blocks per worker, and with Dask's default ``"auto"``
  chunks; the inputs travel with the graph on every call, as in such code;
* ``client.map`` over ``(start, stop)`` ranges of data scattered once (what
  the Dask docs recommend for big inputs), 4 tasks per worker;
* autotune's dask backend with the heuristic chunk, and tuned by
  ``search(..., backends=("dask",), client=client)``; its data is scattered
  once per evaluator (the setup time is printed apart).

Ratios are autotune (tuned) over each alternative: above 1 is faster.

    python scripts/bench_dask.py            # a few minutes
    python scripts/bench_dask.py --quick    # about half a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings

import numpy as np
from _bench_common import time_interleaved, workers_for_all  # this folder is sys.path[0]

from autotune import Evaluator, search
from autotune.backends.shared import SharedNamespace
from autotune.workloads import spline, spline_kernel, stream, stream_kernel

BLOCKS_PER_WORKER = 4  # what a user picks


def sizes(quick: bool) -> dict:
    if quick:
        return {"stream": lambda: stream(1 << 21), "spline": lambda: spline(points=50_000)}
    return {"stream": lambda: stream(1 << 24), "spline": lambda: spline(points=1_000_000)}


# -- what a Dask user writes (module level: cloudpickle sends them by value) ---------
def stream_block(xb):
    return stream_kernel(SharedNamespace({"x": xb}), 0, len(xb))


def spline_block(xb, yb, splines):
    ns = SharedNamespace({"x": xb, "y": yb, "splines": splines})
    return np.array([spline_kernel(ns, 0, len(xb))])


def ranges(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def dask_array_runner(client, workload, chunks):
    import dask.array as da

    shared = workload.shared
    if workload.name == "stream":

        def run():
            dx = da.from_array(shared["x"], chunks=chunks)
            return client.compute(dx.map_blocks(stream_block, dtype=float)).result()

    else:

        def run():
            dx = da.from_array(shared["x"], chunks=chunks)
            dy = da.from_array(shared["y"], chunks=chunks)
            parts = da.map_blocks(
                spline_block, dx, dy, splines=shared["splines"], dtype=float, chunks=(1,)
            )
            return float(client.compute(parts).result().sum())

    return run


def range_task(kernel, shared, start, stop):
    return kernel(SharedNamespace(shared), start, stop)


def client_map_runner(client, workload, data, blocks):
    starts, stops = zip(*ranges(workload.n, blocks), strict=True)
    kernels = [workload.kernel] * len(starts)

    def run():
        futures = client.map(range_task, kernels, [data] * len(starts), starts, stops, pure=False)
        parts = client.gather(futures)
        return np.concatenate(parts) if workload.mode == "map" else sum(parts)

    return run


def bench(client, workload, budget: float, repeats: int, blocks: int) -> dict:
    n = workload.n
    ns = SharedNamespace(dict(workload.shared))
    expected = workload.kernel(ns, 0, n)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # budget notes; heuristic notes
        t0 = time.perf_counter()
        # Runs sized by the search from the budget (a prefix of the items).
        found = search(workload, budget=budget, backends=("dask",), client=client)
        search_s = time.perf_counter() - t0
        tuned_point = (found.profile.workers, found.profile.chunk_len)
        t0 = time.perf_counter()
        tuned = Evaluator(*tuned_point, shared=workload.shared, backend="dask", client=client)
        setup_s = time.perf_counter() - t0
        plain = Evaluator(shared=workload.shared, backend="dask", client=client)
    [scattered] = client.scatter([dict(workload.shared)], broadcast=True, hash=False)

    def autotune_runner(ev):
        call = ev.map if workload.mode == "map" else ev.reduce
        return lambda: call(workload.kernel, n)

    block = -(-n // blocks)
    runners = {
        "serial (this process)": lambda: workload.kernel(ns, 0, n),
        f"dask.array, {blocks} blocks": dask_array_runner(client, workload, block),
        "dask.array, chunks='auto'": dask_array_runner(client, workload, "auto"),
        f"client.map, scattered, {blocks} tasks": client_map_runner(
            client, workload, scattered, blocks
        ),
        f"autotune dask, heuristic ({plain.chunk_len})": autotune_runner(plain),
        "autotune dask, tuned": autotune_runner(tuned),
    }
    try:
        times, ok = time_interleaved(runners, expected, repeats)
    finally:
        tuned.close()
        plain.close()
        del scattered
    return {
        "workload": workload.name,
        "n": n,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "agrees": ok,
        "tuned": {"tasks_in_flight": tuned_point[0], "chunk_len": tuned_point[1]},
        "search_seconds": search_s,
        "setup_seconds": setup_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, short searches")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--budget", type=float, default=None, help="seconds per search")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="Dask workers (the usable CPUs)")
    args = parser.parse_args()
    workers, workers_from = workers_for_all(args.workers)
    if workers < 1:
        parser.error("--workers must be >= 1")
    try:
        import distributed
    except ImportError:
        print("bench_dask.py needs dask.distributed: pip install 'autotune[dask]'", file=sys.stderr)
        return 2
    budget = args.budget or (4.0 if args.quick else 20.0)
    repeats = args.repeats or (3 if args.quick else 5)

    cluster = distributed.LocalCluster(
        processes=True,
        n_workers=workers,
        threads_per_worker=1,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    results = []
    try:
        with distributed.Client(cluster, set_as_default=False) as client:
            for make in sizes(args.quick).values():
                blocks = BLOCKS_PER_WORKER * workers
                results.append(bench(client, make(), budget, repeats, blocks))
    finally:
        cluster.close()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"LocalCluster(processes=True, n_workers={workers}, threads_per_worker=1) "
        f"({workers_from})\n"
    )
    for r in results:
        sec = r["seconds"]
        serial = sec["serial (this process)"]
        ours = sec["autotune dask, tuned"]
        print(f"{r['workload']} (n={r['n']}): median seconds, speedup over serial, ")
        print("  autotune tuned over this (>1: autotune faster), agreement with serial")
        for name, s in sec.items():
            mark = "OK" if r["agrees"][name] else "DIFFERS"
            print(f"  {name:40s} {s:9.4f} s  {serial / s:6.2f}x  {s / ours:6.2f}x  {mark}")
        t = r["tuned"]
        print(
            f"  tuned: {t['tasks_in_flight']} tasks in flight x {t['chunk_len']} items per chunk"
            f" (search {r['search_seconds']:.1f} s; evaluator setup, data scattered once: "
            f"{r['setup_seconds']:.3f} s)\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
