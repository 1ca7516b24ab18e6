"""Many cores: one prepared run that says how autotune does with every usable core.

Everything is sized from the usable CPUs and ``--budget`` (seconds; by default 30 per usable
CPU, at least 180 and at most 480: 8 minutes on 16 cores, 3 on 2), from a quick serial
estimate of each kernel's cost per item, for an idle machine (a busy one takes longer; each
part prints how long it took against its share, and how much CPU others took meanwhile).
Three parts, each a share of the budget (15% is kept for pools and evaluators starting):

1. **Per-chunk overhead** at all cores: an empty kernel, autotune's ``reduce(chunk_len=1)``
   against ``Pool.imap(chunksize=1)`` and the other pools (``bench_evaluator``'s measurement).
2. **The seed's workload** (50 linear ``RectBivariateSpline`` x N points, reduce, ``fork``),
   N sized so that the part fits its share.  Contenders, all with every usable CPU: serial;
   ``Pool`` and mpire over index ranges of 7812 points (the seed's 125 KB of 16-byte points;
   ``bench_peers``' runners); ``Pool``, joblib and mpire with one task per spline; autotune
   zero-config (``Evaluator(shared=...)`` and nothing else, fresh profile directory) after
   its calls one by one; autotune with its own search's pick (``autotune.search``, a tenth
   of the part).  First the zero-config calls one by one, each followed by a call of the
   Pool over ranges of 7812 (the ratios call by call, and which setting each call ran);
   then rounds of every contender, alternated, ratios taken round by round.
3. **Held-out kernels** (kernels the project did not tune for, imported from the other
   scripts: ``bench_tail``'s sin/sqrt reduce, ``bench_peers``' loop polynomial and its
   wide map of 32 cosines per value): a grid of fixed settings (``bench_adapt``'s grid:
   the search's worker counts x chunk bytes from 16 KiB to 16 MiB and unchunked), each
   point a fresh ``Evaluator(w, c, adapt=False)``, a warm-up call and 3 timed calls; then
   a zero-config evaluator called 30 times, each call followed by one of the grid's best
   (``bench_adapt.zero_config``).  The grid is written as a landscape file in the format of
   ``tests/data/landscapes/README.md`` (``--landscape``), which ``tests/replay.py`` reads.

    python scripts/bench_manycore.py                    # the prepared run (3-8 minutes)
    python scripts/bench_manycore.py --quick            # about a minute: fewer calls, rounds
    python scripts/bench_manycore.py --budget 900 --landscape xeon.json
    python scripts/bench_manycore.py --keep-profiles    # keep the profiles learned (printed)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import bench_adapt
import bench_evaluator
import bench_peers
import bench_tail
import numpy as np
from _bench_common import (
    KEEP_PROFILES_HELP,
    CpuWitness,
    contention_note,
    fresh_profile_dir,
    time_interleaved,
    usable_cpus,
)

import autotune
from autotune.backends.shared import SharedNamespace
from autotune.workloads import ITEM_BYTES, spline_data, spline_kernel

#: The seed's chunk: 125 KB of 16-byte points.
SEED_CHUNK = 7812
#: Shares of the budget: overhead, the seed's workload, the held-out kernels; the rest is
#: kept for what the sizing does not count (pools and evaluators starting, imports).
SHARES = {"overhead": 0.05, "seed": 0.47, "held": 0.33}
#: The part of the seed's share its search may spend.
SEARCH_SHARE = 0.10
#: What a parallel call is assumed to reach of perfect scaling, to size the runs.
SCALING = 0.8


# -- sizing -----------------------------------------------------------------------------------
def per_item(kernel: Callable[..., Any], shared: dict[str, Any], n: int) -> float:
    """Serial seconds per item of ``kernel`` over a growing prefix (about 0.05 s)."""
    ns = SharedNamespace(shared)
    m = min(n, 256)
    kernel(ns, 0, m)  # imports, caches
    while True:
        t0 = time.perf_counter()
        kernel(ns, 0, m)
        elapsed = time.perf_counter() - t0
        if elapsed > 0.05 or m >= n:
            return elapsed / m
        m = min(n, m * 4)


def parallel_s(items_s: float, workers: int) -> float:
    """Seconds of a call of ``items_s`` serial seconds on ``workers`` workers, about."""
    return items_s / (SCALING * workers)


def part_done(began: float, share: float, witness: CpuWitness) -> None:
    """How long the part took against its share of the budget, and how busy the machine
    was meanwhile (psutil)."""
    took = time.perf_counter() - began
    print(f"   (this part: {took:.0f} s of its {share:.0f} s share)")
    print(f"   {contention_note(witness.others())}")


def default_budget(workers: int) -> float:
    return float(min(480, max(180, 30 * workers)))


# -- 1. overhead --------------------------------------------------------------------------------
def overhead(workers: int, share: float, quick: bool) -> None:
    repeats = 2 if quick else 5
    # Pool.imap costs about 30 us a task on 16 cores (issue 19), joblib(batch_size=1) more:
    # 7 contenders x (repeats + warm-up) runs of `tasks` tasks at about 100 us each.
    tasks = int(max(200, min(20_000, share / (7 * (repeats + 1) * 1e-4))))
    print(
        f"1. Per-chunk overhead, empty kernel, {workers} workers, {tasks} tasks (median of "
        f"{repeats})"
    )
    over = bench_evaluator.per_task_overhead(tasks, repeats, workers)
    ref = over["Pool.imap(chunksize=1)"]
    for name, sec in over.items():
        shown = (
            "skipped (not installed)" if sec is None else f"{sec * 1e6:9.2f} us  {sec / ref:7.3f}x"
        )
        print(f"   {name:40s} {shown}")


# -- 2. the seed's workload ------------------------------------------------------------------------
_SEED: dict[str, Any] = {}


def _one_spline(k: int) -> float:
    s = _SEED["splines"][k]
    return float(np.exp(s.ev(_SEED["x"], _SEED["y"])).sum())


def _spline_sum(spline: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.exp(spline.ev(x, y)).sum())


class PerSpline:
    """One task per spline over all the points: Pool (fork global), joblib or mpire."""

    def __init__(self, how: str, data: dict[str, Any], workers: int) -> None:
        self.how, self.data, self.workers = how, data, workers
        self.name = f"{how}, one task per spline"
        self.pool: Any = None

    def start(self) -> None:
        d = self.data
        if self.how == "Pool":
            _SEED.update(d)  # before the pool forks
            self.pool = bench_peers.CTX.Pool(self.workers)
        elif self.how == "joblib":
            from joblib import Parallel

            self.pool = Parallel(n_jobs=self.workers)
            self.pool.__enter__()  # the workers serve every call
        else:
            from mpire import WorkerPool

            self.pool = WorkerPool(
                self.workers, shared_objects=(d["x"], d["y"]), start_method="fork", keep_alive=True
            )

    def run(self) -> float:
        splines = self.data["splines"]
        if self.how == "Pool":
            return sum(self.pool.map(_one_spline, range(len(splines)), chunksize=1))
        if self.how == "joblib":
            from joblib import delayed

            x, y = self.data["x"], self.data["y"]
            return sum(self.pool(delayed(_spline_sum)(s, x, y) for s in splines))
        tasks = [(s,) for s in splines]
        return sum(self.pool.map(_mpire_spline, tasks, chunk_size=1, progress_bar=False))

    def stop(self) -> None:
        if self.how == "joblib":
            self.pool.__exit__(None, None, None)
        elif self.how == "Pool":
            self.pool.terminate()
            self.pool.join()
        else:
            self.pool.terminate()


def _mpire_spline(shared: tuple[np.ndarray, np.ndarray], spline: Any) -> float:
    return _spline_sum(spline, *shared)


def seed_points(cost: float, workers: int, share: float, rounds: int, calls: int) -> int:
    """Points that fit the part: rounds of serial + 7 parallel contenders (and a warm-up
    round), the zero-config calls each with a Pool call, and the search."""
    per_point = cost * (rounds + 1) + parallel_s(cost, workers) * (7 * (rounds + 1) + 2 * calls)
    points = int(share * (1 - SEARCH_SHARE) / per_point)
    return max(points, 4 * workers * SEED_CHUNK)  # four ranges of 7812 per worker at least


def seed_calls(data: dict[str, Any], n: int, pool: Any, calls: int) -> autotune.Evaluator:
    """Zero config, call by call, each call followed by the Pool over ranges of 7812."""
    print(
        f"   zero-config call by call: Pool x {SEED_CHUNK} seconds / autotune seconds "
        "(> 1: autotune faster), and the setting each call ran"
    )
    ev = autotune.Evaluator(shared=data)
    ratios, ran = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        ev.reduce(spline_kernel, n)
        t = time.perf_counter() - t0
        t0 = time.perf_counter()
        pool.run()
        ratios.append((time.perf_counter() - t0) / t)
        st = ev.stats
        ran.append(
            "inline"
            if st.inline
            else f"{st.workers}x{st.chunk_len}" + ("*" if st.exploring else "")
        )
    print("   " + " ".join(f"{r:.2f}" for r in ratios))
    print("   " + " ".join(ran) + "   (* exploring)")
    return ev


def seed(workers: int, share: float, quick: bool, splines: int) -> None:
    rounds, calls = (2, 8) if quick else (5, 20)
    probe_data = spline_data(20_000, splines)
    cost = per_item(spline_kernel, probe_data, 20_000)
    n = seed_points(cost, workers, share, rounds, calls)
    data = spline_data(n, splines)
    print(
        f"\n2. The seed's workload: {splines} linear splines x {n} points (reduce), serial "
        f"about {cost * n:.1f} s; {workers} workers for every contender"
    )
    case = bench_peers.Case(
        "spline", "seed", n, "reduce", spline_kernel, data, ITEM_BYTES["spline"]
    )
    pool = bench_peers.PoolPeer(case, "chunk", workers, SEED_CHUNK)
    pool.name = f"Pool over ranges of {SEED_CHUNK}"
    pool.start()
    live: list[Any] = [pool]
    try:
        zero = seed_calls(data, n, pool, calls)
        live.append(zero)
        found = autotune.search(
            autotune.Workload(
                "spline", n, spline_kernel, data, "reduce", item_bytes=ITEM_BYTES["spline"]
            ),
            budget=share * SEARCH_SHARE,
            progress=False,
        )
        for note in found.notes:
            print(f"   search note: {note}")
        picked = autotune.Evaluator(profile=found.profile, shared=data)
        live.append(picked)
        runners = seed_runners(data, n, workers, pool, zero, picked, live)
        seed_rounds(runners, data, n, rounds, found.profile)
    finally:
        for c in live:
            c.close() if isinstance(c, autotune.Evaluator) else c.stop()


def seed_runners(data, n, workers, pool, zero, picked, live) -> dict[str, Callable[[], Any]]:
    ns = SharedNamespace(data)
    runners: dict[str, Callable[[], Any]] = {"serial": lambda: spline_kernel(ns, 0, n)}
    runners[pool.name] = pool.run
    mp_ranges = bench_peers.Mpire(pool.case, "chunk", workers, SEED_CHUNK)
    mp_ranges.name = f"mpire over ranges of {SEED_CHUNK}"
    for c in [mp_ranges] + [PerSpline(how, data, workers) for how in ("Pool", "joblib", "mpire")]:
        try:
            c.start()
        except (ImportError, bench_peers.Skipped) as exc:
            print(f"   {c.name}: skipped ({exc})")
            continue
        live.append(c)
        runners[c.name] = c.run
    runners["autotune zero-config, after its calls"] = lambda: zero.reduce(spline_kernel, n)
    runners["autotune, its search's pick"] = lambda: picked.reduce(spline_kernel, n)
    return runners


def seed_rounds(runners, data, n, rounds: int, profile: Any) -> None:
    expected = spline_kernel(SharedNamespace(data), 0, n)
    times, ok = time_interleaved(runners, expected, rounds)
    ref = next(k for k in runners if k.startswith("Pool over"))
    serial = statistics.median(times["serial"])
    print(
        f"   {rounds} rounds, contenders alternated; ratio to {ref} taken round by round "
        "(its seconds / the contender's: > 1 faster)"
    )
    for name, secs in times.items():
        ratio = statistics.median(r / s for r, s in zip(times[ref], secs, strict=True))
        med = statistics.median(secs)
        print(
            f"   {name:40s} {med:8.3f} s  {serial / med:6.2f}x serial  {ratio:5.2f} vs Pool"
            + ("" if ok[name] else "  MISMATCH")
        )
    print(f"   search's pick: {profile.workers} workers x {profile.chunk_len} ({profile.backend})")


# -- 3. held-out kernels ---------------------------------------------------------------------------
def held_out_kernels(rng: np.random.Generator) -> dict[str, tuple[Any, str, int, int, Callable]]:
    """name -> (kernel, mode, item_bytes, most items, data for n items)."""
    freqs = np.arange(1.0, 33.0)
    return {
        "tail": (bench_tail.kernel, "reduce", 8, 1 << 26, lambda n: {"x": rng.random(n)}),
        "loop": (bench_peers.loop_kernel, "map", 16, 1 << 25, lambda n: {"x": rng.random(n)}),
        # 256 output bytes per value: at most 256 MiB of output
        "wide": (
            bench_peers.wide_kernel,
            "map",
            264,
            1 << 20,
            lambda n: {"x": rng.random(n), "freqs": freqs},
        ),
    }


def held_out_items(
    cost: float, points: list[tuple[int, int]], calls: int, share: float, workers: int
) -> int:
    """Items such that the grid (a warm-up and 3 calls a point) and the zero-config calls
    (each with a call of the best) fit ``share``."""
    per_item_s = sum(4 * parallel_s(cost, min(w, workers)) for w, _ in points)
    per_item_s += 2 * calls * parallel_s(cost, workers)
    return int(max(0.0, share - 0.05 * len(points)) / per_item_s)


def grid(kernel, shared, n, mode, item_bytes, cpu) -> tuple[list[dict[str, Any]], float]:
    """Every grid point's 3 timed calls, after a warm-up, each a fresh evaluator."""
    t0 = time.perf_counter()
    recorded = []
    for w, c in bench_adapt.grid_points(cpu, n, item_bytes):
        with autotune.Evaluator(w, c, shared=shared, adapt=False, start_method="fork") as ev:
            bench_adapt.call(ev, kernel, n, mode)
            secs = [bench_adapt.call(ev, kernel, n, mode) for _ in range(3)]
        recorded.append({"workers": w, "chunk_len": c, "seconds": secs})
    return recorded, time.perf_counter() - t0


def held_out(workers: int, share: float, quick: bool) -> dict[str, Any]:
    calls = 10 if quick else 30
    cpu = autotune.probe()
    kernels = held_out_kernels(np.random.default_rng(0))
    print(
        f"\n3. Held-out kernels: zero-config against the grid's best fixed setting, {calls} "
        "calls alternated (best seconds / zero-config seconds: > 1 zero-config faster)"
    )
    print(
        f"   {'kernel':6} {'n':>9} {'grid best':>14} {'points':>6} {'call 1':>7} "
        f"{'settled':>7} {'extra time':>10}"
    )
    workloads = {}
    for name, (kernel, mode, item_bytes, most, make) in kernels.items():
        cost = per_item(kernel, make(1 << 16), 1 << 16)
        points = bench_adapt.grid_points(cpu, 1 << 22, item_bytes)
        n = held_out_items(cost, points, calls, share / len(kernels), workers)
        n = max(min(n, most), 4096 * workers)
        shared = make(n)
        recorded, took = grid(kernel, shared, n, mode, item_bytes, cpu)
        best = min(recorded, key=lambda p: statistics.median(p["seconds"]))
        setting = (best["workers"], best["chunk_len"])
        ratios, _, extra = bench_adapt.zero_config(name, kernel, shared, n, mode, setting, calls)
        settled = statistics.median(ratios[len(ratios) * 2 // 3 :])
        print(
            f"   {name:6} {n:9d} {f'{setting[0]} x {setting[1]}':>14} {len(recorded):6d} "
            f"{ratios[0]:7.2f} {settled:7.2f} {extra:+10.1%}"
        )
        workloads[name] = {
            "n": n,
            "mode": mode,
            "item_bytes": item_bytes,
            "record_s": round(took, 1),
            "points": recorded,
        }
    print(
        "   (settled: the median ratio of the last third of the calls; extra time: "
        "zero-config's over the best's, same calls)"
    )
    return workloads


def landscape(workloads: dict[str, Any]) -> dict[str, Any]:
    cpu = autotune.probe()
    return {
        "cpu": {
            "brand": cpu.brand,
            "logical": cpu.logical_cpus,
            "cores": cpu.physical_cores,
            "caches": [[c.level, c.type, c.size_bytes, c.shared_cpus] for c in cpu.caches],
        },
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "repeats": 3,
        "recorded": f"{datetime.date.today().isoformat()}, scripts/bench_manycore.py, fork, "
        "Evaluator(w, c, adapt=False): one warm-up call, then the timed calls",
        "workloads": workloads,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run (30 per usable CPU, 180-480)",
    )
    p.add_argument("--quick", action="store_true", help="fewer calls and rounds (60 s budget)")
    p.add_argument("--splines", type=int, default=50, help="splines of the seed's workload (50)")
    p.add_argument(
        "--landscape", default=None, help="where to write the held-out grid (landscape-<N>cpu.json)"
    )
    p.add_argument("--keep-profiles", action="store_true", help=KEEP_PROFILES_HELP)
    args = p.parse_args()
    workers = usable_cpus()
    budget = args.budget or (60.0 if args.quick else default_budget(workers))
    if budget <= 0 or args.splines < 1:
        p.error("--budget must be > 0 and --splines >= 1")
    out = args.landscape or f"landscape-{workers}cpu.json"
    profile_dir = fresh_profile_dir("bench-manycore-", args.keep_profiles)
    os.environ["AUTOTUNE_PROFILE_DIR"] = profile_dir
    os.environ.pop("AUTOTUNE_PROFILE", None)  # fresh: zero config learns from nothing
    cpu = autotune.probe()
    print(
        f"CPU: {cpu.brand}, {workers} usable CPUs ({cpu.physical_cores} physical cores), "
        f"L2 {cpu.l2} B; Python {sys.version.split()[0]}, numpy {np.__version__}; "
        f"budget {budget:.0f} s\n"
    )
    if args.keep_profiles:
        print(f"profiles written to {profile_dir} (fresh, kept)\n")
    started = time.perf_counter()
    bench_adapt.warm_process()
    parts: dict[str, Callable[[float], Any]] = {
        "overhead": lambda share: overhead(workers, share, args.quick),
        "seed": lambda share: seed(workers, share, args.quick, args.splines),
        "held": lambda share: held_out(workers, share, args.quick),
    }
    results = {}
    for key, part in parts.items():
        witness, began = CpuWitness(), time.perf_counter()
        results[key] = part(budget * SHARES[key])
        part_done(began, budget * SHARES[key], witness)
    workloads = results["held"]
    with open(out, "w") as fh:
        json.dump(landscape(workloads), fh, indent=1)
    print(f"\nlandscape written to {out}; the whole run took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
