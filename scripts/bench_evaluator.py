"""Evaluator benchmark: per-chunk overhead, memory with a big shared array, start-up time.

Everything is measured in one run on this machine and printed as ratios
against what a user would use instead, so that machine noise cancels out.
Every contender gets the same workers: every usable CPU unless ``--workers``
says otherwise (the count and where it came from are printed).

    python scripts/bench_evaluator.py            # full run (about a minute)
    python scripts/bench_evaluator.py --quick    # smaller sizes
    python scripts/bench_evaluator.py --json     # machine-readable
    python scripts/bench_evaluator.py --quick --mib 8 --tasks 200 --repeats 1   # a smoke run

Peers that are not installed (joblib, mpire: ``pip install -e '.[bench]'``)
are reported as skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from _bench_common import workers_for_all  # this folder is sys.path[0]

from autotune import Evaluator

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]


# -- kernels and tasks (module level: spawn workers import them) ------------------
def empty_kernel(shared, start, stop):
    return 0


def empty_task(i):
    return 0


def touch_all(shared, start, stop):
    return float(shared.x[start:stop].sum())


# -- 1. per-chunk overhead --------------------------------------------------------
def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_task_overhead(tasks: int, repeats: int, workers: int) -> dict[str, float | None]:
    """Seconds per task (or chunk) of an empty kernel, each pool started beforehand."""
    out: dict[str, float | None] = {}
    with Evaluator(workers, 1, start_method="fork") as ev:
        ev.reduce(empty_kernel, 100)  # warm
        out["autotune Evaluator.reduce(chunk_len=1)"] = (
            _median_time(lambda: ev.reduce(empty_kernel, tasks), repeats) / tasks
        )
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        list(pool.imap(empty_task, range(100)))
        out["Pool.imap(chunksize=1)"] = (
            _median_time(lambda: list(pool.imap(empty_task, range(tasks), chunksize=1)), repeats)
            / tasks
        )
        out["Pool.apply_async"] = (
            _median_time(
                lambda: [
                    r.get() for r in [pool.apply_async(empty_task, (i,)) for i in range(tasks)]
                ],
                repeats,
            )
            / tasks
        )
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        list(ex.map(empty_task, range(100)))
        out["ProcessPoolExecutor.map"] = (
            _median_time(lambda: list(ex.map(empty_task, range(tasks))), repeats) / tasks
        )
    try:
        from joblib import Parallel, delayed

        for batch in (1, "auto"):
            with Parallel(n_jobs=workers, batch_size=batch) as par:
                par(delayed(empty_task)(i) for i in range(100))
                out[f"joblib(batch_size={batch})"] = (
                    _median_time(lambda: par(delayed(empty_task)(i) for i in range(tasks)), repeats)
                    / tasks
                )
    except ImportError:
        out["joblib(batch_size=1)"] = out["joblib(batch_size=auto)"] = None
    try:
        from mpire import WorkerPool

        with WorkerPool(n_jobs=workers, start_method="fork", keep_alive=True) as wp:
            wp.map(empty_task, range(100), chunk_size=1, progress_bar=False)
            out["mpire(chunk_size=1)"] = (
                _median_time(
                    lambda: wp.map(empty_task, range(tasks), chunk_size=1, progress_bar=False),
                    repeats,
                )
                / tasks
            )
    except ImportError:
        out["mpire(chunk_size=1)"] = None
    return out


# -- 2. memory with a big shared array -------------------------------------------------
def pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss line")


def pss_one(method: str, mib: int, allocator: bool, workers: int) -> dict[str, float]:
    """Run in a fresh interpreter: PSS growth of parent + workers sharing one array."""
    import autotune

    nbytes = mib * 2**20
    base = pss_bytes(os.getpid())
    if allocator:
        x = autotune.shared_array((nbytes // 8,), np.float64)
        x[:] = 1.0
    else:
        x = np.ones(nbytes // 8)
    with Evaluator(workers, 2**18, shared={"x": x}, start_method=method) as ev:
        t0 = time.perf_counter()
        total = ev.reduce(touch_all, len(x))  # every worker reads its share of the array
        elapsed = time.perf_counter() - t0
        assert total == float(len(x))
        pids = [os.getpid(), *ev.pids]
        after = sum(pss_bytes(p) for p in pids)
    return {"growth_ratio": (after - base) / nbytes, "reduce_s": elapsed}


def memory(mib: int, workers: int) -> dict[str, dict[str, float]]:
    results = {}
    for method in START_METHODS:
        for allocator in (False, True):
            label = f"{method}{' + autotune.shared_array' if allocator else ''}"
            cmd = [sys.executable, __file__, "--pss-one", method, "--mib", str(mib)]
            cmd += ["--workers", str(workers)]
            if allocator:
                cmd.append("--allocator")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"{label}: {proc.stderr.strip()}")
            results[label] = json.loads(proc.stdout)
    return results


# -- 3. time to first result -----------------------------------------------------------
def first_result(repeats: int, workers: int) -> dict[str, float]:
    out = {}
    for method in START_METHODS:

        def once(method=method):
            with Evaluator(workers, 10, start_method=method) as ev:
                ev.reduce(empty_kernel, 20)

        out[f"autotune {method}"] = _median_time(once, repeats)

        def pool(method=method):
            with mp.get_context(method).Pool(workers) as p:
                p.map(empty_task, range(20))

        out[f"Pool {method}"] = _median_time(pool, repeats)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--mib", type=int, default=None, help="shared array size in MiB")
    parser.add_argument("--tasks", type=int, default=None, help="empty tasks per overhead run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender")
    parser.add_argument(
        "--workers", type=int, default=None, help="workers for everyone (the usable CPUs)"
    )
    parser.add_argument("--pss-one", metavar="METHOD", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workers, workers_from = workers_for_all(args.workers)
    if workers < 1:
        parser.error("--workers must be >= 1")
    if args.pss_one:
        print(json.dumps(pss_one(args.pss_one, args.mib, args.allocator, workers)))
        return 0

    tasks, repeats = (2_000, 3) if args.quick else (20_000, 5)
    tasks = args.tasks or tasks
    repeats = args.repeats or repeats
    mib = args.mib or (64 if args.quick else 512)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "workers": workers,
        "workers_from": workers_from,
        "overhead_s_per_task": per_task_overhead(tasks, repeats, workers),
        "memory": memory(mib, workers),
        "first_result_s": first_result(repeats, workers),
        "array_mib": mib,
        "tasks": tasks,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    over = report["overhead_s_per_task"]
    ref = over["Pool.imap(chunksize=1)"]
    print(f"{workers} workers for every contender ({workers_from})\n")
    print(
        f"1. Per-chunk overhead, empty kernel, {workers} workers, {tasks} tasks "
        f"(median of {repeats})"
    )
    print(f"   {'':40s} {'us/task':>9s} {'vs Pool.imap':>13s}")
    for name, sec in over.items():
        if sec is None:
            print(f"   {name:40s} {'skipped (not installed)':>23s}")
        else:
            print(f"   {name:40s} {sec * 1e6:9.2f} {sec / ref:12.3f}x")
    print(
        f"\n2. Memory: {workers} workers share a {mib} MiB float64 array (PSS of parent + workers)"
    )
    print(f"   {'start method':40s} {'growth / array':>15s}")
    for name, m in report["memory"].items():
        print(f"   {name:40s} {m['growth_ratio']:14.2f}x")
    print(f"\n3. Time from Evaluator(...) / Pool(...) to the first result, {workers} workers")
    for name, sec in report["first_result_s"].items():
        print(f"   {name:40s} {sec * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
