"""Zero configuration against the best fixed setting: what users get without a search.

For each workload (the built-in spline, stream and ndimage, and two kernels
of our own that a fixed rule gets wrong: a Horner polynomial whose best
chunk is longer than the rule's, and a multi-pass kernel over wide rows whose
bytes per item a 16-byte assumption gets wrong by 64x):

1. a grid of fixed settings (workers x chunk bytes from 16 KiB to 16 MiB and
   unchunked), each timed 3 times with ``adapt=False``: the best one is the
   reference.  The worker counts are the search's (``candidate_workers``):
   every count up to 4 usable CPUs, then powers of two, the physical cores
   and every usable CPU, so the grid stays bounded on 64 cores (7 counts);
2. ``Evaluator(shared=...)`` and nothing else, in a fresh profile directory,
   called 30 times; every call is followed by one call of the best fixed
   setting, so each ratio (best fixed seconds / zero-config seconds) is
   measured under the same machine load;
3. a new process with the same kernel and the same profile directory: its
   first call against the best fixed setting, alternated the same way.

Every "first call" includes making the evaluator (an adapting one starts its
workers at its first call that needs them); the first call's column is the
median of 3 pairs, each zero-config evaluator in a profile directory of its
own.  What the first pool of any process pays (Python's resource tracker and
autotune's segment guardian starting, the first fork: about 15 ms here) and
what a kernel's first run pays (an import inside it) are paid before timing,
so that they land on neither contender.

Then the per-call time of a warmed-up zero-config evaluator against the
kernel run inline in this process, for n from 1e3 to 1e7 (stream kernel);
100 maps of 100000 values against the same loop run serially; and the
regret of the first 100 calls (Horner): time spent over 100 calls of the
best fixed setting.

    python scripts/bench_adapt.py            # a few minutes
    python scripts/bench_adapt.py --quick    # smaller sizes, for CI's smoke run
    python scripts/bench_adapt.py --keep-profiles    # keep the profiles learned (printed)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _bench_common import KEEP_PROFILES_HELP, CpuWitness, contention_note, fresh_profile_dir

import autotune
from autotune.backends.shared import SharedNamespace
from autotune.cpu import CpuInfo
from autotune.engine import candidate_workers
from autotune.workloads import ndimage_kernel, spline_data, spline_kernel, stream_kernel

HERE = Path(__file__).resolve()
CHUNK_BYTES = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]


# -- our two kernels ----------------------------------------------------------
COEFFS = np.linspace(-1.0, 1.0, 24)


def horner_kernel(shared, start, stop):
    """A degree-23 polynomial by Horner: 23 passes over the chunk, one temporary."""
    x = shared.x[start:stop]
    y = np.full_like(x, COEFFS[0])
    for c in COEFFS[1:]:
        y *= x
        y += c
    return y


def rows_kernel(shared, start, stop):
    """Four passes over rows of 128 float64 (1 KiB per item), then a sum per row."""
    y = shared.rows[start:stop] * 1.0
    for _ in range(4):
        np.multiply(y, y, out=y)
        y += 1.0
        np.sqrt(y, out=y)
        y -= 0.5
    return y.sum(axis=1)


def workloads(quick: bool) -> dict[str, tuple[Callable[..., Any], dict[str, Any], int, str]]:
    """name -> (kernel, shared, n, mode); the same data in every process (fixed seeds)."""
    rng = np.random.default_rng(0)
    scale = 8 if quick else 1
    n_stream = (1 << 22) // scale
    n_rows = 40_000 // scale
    points = 100_000 // scale
    rows = 4096 // scale
    return {
        "spline": (spline_kernel, spline_data(points, 50 if not quick else 10), points, "reduce"),
        "stream": (stream_kernel, {"x": rng.random(n_stream)}, n_stream, "map"),
        "ndimage": (ndimage_kernel, {"image": rng.random((rows, 1024))}, rows, "map"),
        "horner": (horner_kernel, {"x": rng.random(n_stream)}, n_stream, "map"),
        "rows": (rows_kernel, {"rows": rng.random((n_rows, 128))}, n_rows, "map"),
    }


def call(ev: autotune.Evaluator, kernel: Callable[..., Any], n: int, mode: str) -> float:
    t0 = time.perf_counter()
    result = ev.map(kernel, n) if mode == "map" else ev.reduce(kernel, n)
    elapsed = time.perf_counter() - t0
    del result
    return elapsed


# -- the grid -----------------------------------------------------------------
def grid_points(cpu: CpuInfo, n: int, item_bytes: int) -> list[tuple[int, int]]:
    """The grid's (workers, chunk_len): the search's worker counts for ``cpu`` x chunk
    bytes from CHUNK_BYTES, and unchunked.  No length is longer than unchunked (fewer
    chunks than workers would only time fewer workers again)."""
    points = []
    for workers in candidate_workers(cpu):
        unchunked = -(-n // workers)
        lengths = sorted({max(1, min(unchunked, b // item_bytes)) for b in CHUNK_BYTES})
        lengths.append(unchunked)
        points += [(workers, chunk_len) for chunk_len in dict.fromkeys(lengths)]
    return points


def grid_best(kernel, shared, n, mode, item_bytes, repeats) -> tuple[tuple[int, int], float]:
    """The fastest fixed (workers, chunk_len), and its median seconds."""
    best: tuple[tuple[int, int], float] | None = None
    for workers, chunk_len in grid_points(autotune.probe(), n, item_bytes):
        with autotune.Evaluator(workers, chunk_len, shared=shared, adapt=False) as ev:
            call(ev, kernel, n, mode)  # warm-up
            med = statistics.median(call(ev, kernel, n, mode) for _ in range(repeats))
        if best is None or med < best[1]:
            best = ((workers, chunk_len), med)
    assert best is not None
    return best


def fixed(shared, setting: tuple[int, int]) -> autotune.Evaluator:
    workers, chunk_len = setting
    return autotune.Evaluator(workers, chunk_len, shared=shared, adapt=False)


def first_call(kernel, shared, n, mode, make) -> float:
    """Seconds to make an evaluator and run its first call (what a user waits for)."""
    t0 = time.perf_counter()
    with make() as ev:
        call(ev, kernel, n, mode)
        elapsed = time.perf_counter() - t0
    return elapsed


def zero_config(name, kernel, shared, n, mode, best, calls):
    """Ratios best-fixed / zero-config, call by call, alternated; and the settings used.

    The first ratio compares an evaluator made and called once, for both (an
    adapting evaluator starts its workers at the first call that needs them):
    the median of :data:`FIRST_CALLS` pairs, each zero-config evaluator in a
    profile directory of its own (the kernel never seen), then the one kept
    for the calls after.
    """
    ratios, trace, spent, ideal = [], [], 0.0, 0.0
    firsts = []
    for _ in range(FIRST_CALLS - 1):
        r = first_call(kernel, shared, n, mode, lambda: fixed(shared, best))
        with tempfile.TemporaryDirectory() as own, profile_dir_set(own):
            firsts.append(
                r / first_call(kernel, shared, n, mode, lambda: autotune.Evaluator(shared=shared))
            )
    r = first_call(kernel, shared, n, mode, lambda: fixed(shared, best))
    t0 = time.perf_counter()
    ev = autotune.Evaluator(shared=shared)
    call(ev, kernel, n, mode)
    t = time.perf_counter() - t0  # made and called once
    firsts.append(r / t)
    with ev, fixed(shared, best) as ref:
        stats = ev.stats
        trace.append((stats.workers, stats.chunk_len, stats.inline) if stats else None)
        ratios.append(statistics.median(firsts))
        spent += t
        ideal += r
        call(ref, kernel, n, mode)  # warm
        for _ in range(calls - 1):
            t = call(ev, kernel, n, mode)
            stats = ev.stats
            trace.append((stats.workers, stats.chunk_len, stats.inline) if stats else None)
            r = call(ref, kernel, n, mode)
            ratios.append(r / t)
            spent += t
            ideal += r
    return ratios, trace, spent / ideal - 1


def new_process(name: str, quick: bool, best: tuple[int, int]) -> float:
    """The first call of a new process (same profile directory) against the best fixed."""
    done = subprocess.run(
        [sys.executable, str(HERE), "--child", name, "--best", f"{best[0]},{best[1]}"]
        + (["--quick"] if quick else []),
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child for {name} failed:\n{done.stderr}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["ratio"])


#: First calls timed per workload (the median is printed): one is too noisy.
FIRST_CALLS = 3


@contextlib.contextmanager
def profile_dir_set(path: str) -> Iterator[None]:
    """``AUTOTUNE_PROFILE_DIR`` is ``path`` inside the block."""
    before = os.environ["AUTOTUNE_PROFILE_DIR"]
    os.environ["AUTOTUNE_PROFILE_DIR"] = path
    try:
        yield
    finally:
        os.environ["AUTOTUNE_PROFILE_DIR"] = before


def warm_kernel(kernel, shared, n: int, mode: str) -> None:
    """Run the kernel once on a few items in this process: what its first run pays
    (``ndimage_kernel`` imports scipy.ndimage: 128 ms here) lands on neither contender
    (a zero-config first call runs its probe here, a fixed setting's workers are forked
    from here)."""
    kernel(SharedNamespace(shared), 0, min(n, 64))


def warm_process() -> None:
    """Pay what the first pool of any process pays (Python's resource tracker and our
    segment guardian start, the first fork), so that it lands on neither contender."""
    with autotune.Evaluator(1, 1, adapt=False) as ev:
        ev.reduce(lambda shared, start, stop: 0, 1)


def child(name: str, quick: bool, best: tuple[int, int]) -> None:
    kernel, shared, n, mode = workloads(quick)[name]
    warm_process()
    warm_kernel(kernel, shared, n, mode)
    ratios = []
    for _ in range(3):  # made and called once, alternated
        t = first_call(kernel, shared, n, mode, lambda: autotune.Evaluator(shared=shared))
        r = first_call(kernel, shared, n, mode, lambda: fixed(shared, best))
        ratios.append(r / t)
    print(json.dumps({"ratio": statistics.median(ratios)}))


# -- per call against inline ----------------------------------------------------
def per_call_vs_inline(sizes: list[int], rounds: int) -> list[tuple[int, float, float, int]]:
    x = np.random.default_rng(1).random(max(sizes))
    shared = {"x": x}
    ns = autotune.backends.shared.SharedNamespace(shared)
    rows = []
    with autotune.Evaluator(shared=shared) as ev:
        for n in sizes:
            for _ in range(20):  # warm up: learn this size
                ev.map(stream_kernel, n)
            t_ev, t_in, inline = [], [], 0
            for _ in range(rounds):
                t0 = time.perf_counter()
                ev.map(stream_kernel, n)
                t_ev.append(time.perf_counter() - t0)
                inline += bool(ev.stats and ev.stats.inline)
                t0 = time.perf_counter()
                stream_kernel(ns, 0, n)
                t_in.append(time.perf_counter() - t0)
            rows.append((n, statistics.median(t_ev), statistics.median(t_in), inline))
    return rows


def loop_case(rounds: int, maps: int, n: int) -> tuple[float, float]:
    """Median seconds of `maps` zero-config maps (start included) and of the serial loop."""
    x = np.random.default_rng(2).random(n)
    ns = autotune.backends.shared.SharedNamespace({"x": x})
    t_ev, t_serial = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with autotune.Evaluator(shared={"x": x}) as ev:
            for _ in range(maps):
                ev.map(stream_kernel, n)
        t_ev.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(maps):
            stream_kernel(ns, 0, n)
        t_serial.append(time.perf_counter() - t0)
    return statistics.median(t_ev), statistics.median(t_serial)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (CI's smoke run)")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--only", help="comma-separated workloads")
    p.add_argument("--keep-profiles", action="store_true", help=KEEP_PROFILES_HELP)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--best", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        w, c = (int(v) for v in args.best.split(","))
        child(args.child, args.quick, (w, c))
        return 0

    calls = min(args.calls, 12) if args.quick else args.calls
    profile_dir = fresh_profile_dir("bench-adapt-", args.keep_profiles)
    os.environ["AUTOTUNE_PROFILE_DIR"] = profile_dir  # fresh: no profile for any kernel
    os.environ.pop("AUTOTUNE_PROFILE", None)
    witness = CpuWitness()
    warm_process()
    cpu = autotune.probe()
    print(f"CPU: {cpu.brand}, {cpu.usable_cpus} usable CPUs, L2 {cpu.l2} B per core")
    if args.keep_profiles:
        print(f"profiles written to {profile_dir} (fresh, kept)\n")
    else:
        print("profiles written to a fresh directory, removed at exit (--keep-profiles)\n")
    chosen = workloads(args.quick)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    print(
        f"{'workload':9} {'best fixed (workers x chunk)':>28} {'call 1':>7} "
        f"{'calls 21-30':>11} {'new process':>11}   (best fixed s / zero-config s)"
    )
    traces = {}
    regret = {}
    for name, (kernel, shared, n, mode) in chosen.items():
        item_bytes = max(
            8,
            sum(
                v.nbytes // n
                for v in shared.values()
                if isinstance(v, np.ndarray) and v.shape[0] == n
            ),
        )
        best, _ = grid_best(kernel, shared, n, mode, item_bytes, 1 if args.quick else 3)
        warm_kernel(kernel, shared, n, mode)
        ratios, trace, reg = zero_config(name, kernel, shared, n, mode, best, calls)
        traces[name], regret[name] = trace, reg
        late = ratios[20:30] if len(ratios) >= 30 else ratios[len(ratios) // 2 :]
        fresh = new_process(name, args.quick, best)
        print(
            f"{name:9} {f'{best[0]} x {best[1]}':>28} {ratios[0]:7.2f} "
            f"{statistics.median(late):11.2f} {fresh:11.2f}"
        )
    print("\nsettings per call (workers, chunk_len, inline), first 12 calls:")
    for name, trace in traces.items():
        print(
            f"  {name:9} "
            + " ".join("inline" if t and t[2] else f"{t[0]}x{t[1]}" for t in trace[:12] if t)
        )
    print("\nexploration cost: zero-config time over the best fixed setting's, same calls")
    for name, reg in regret.items():
        print(f"  {name:9} {reg:+.1%} over the first {calls} calls")
    if "horner" in chosen and not args.quick:
        kernel, shared, n, mode = chosen["horner"]
        item_bytes = 8
        best, _ = grid_best(kernel, shared, n, mode, item_bytes, 3)
        _, _, reg = zero_config("horner", kernel, shared, n, mode, best, 100)
        print(f"  horner    {reg:+.1%} over the first 100 calls (regret)")

    sizes = [1000, 10_000, 100_000, 1_000_000] + ([] if args.quick else [10_000_000])
    print("\nper call, warmed up: zero-config map vs the kernel inline (stream)")
    print(f"{'n':>10} {'evaluator ms':>13} {'inline ms':>10} {'ratio':>6} {'inline calls':>13}")
    rounds = 5 if args.quick else 15
    for n, t_ev, t_in, inline in per_call_vs_inline(sizes, rounds):
        print(
            f"{n:>10} {t_ev * 1e3:13.3f} {t_in * 1e3:10.3f} {t_ev / t_in:6.2f} {inline:>7}/{rounds}"
        )
    maps = 20 if args.quick else 100
    t_ev, t_serial = loop_case(3 if args.quick else 5, maps, 100_000)
    print(
        f"\nloop: {maps} maps of 100000 values, evaluator start included: "
        f"{t_ev:.3f} s vs serial {t_serial:.3f} s = {t_ev / t_serial:.2f}x"
    )
    print("\n" + contention_note(witness.others()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
