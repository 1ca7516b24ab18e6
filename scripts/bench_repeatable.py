"""Is the tuner repeatable?  Five searches of one workload, their picks timed head to head.

For each workload: ``--searches`` (5) runs of ``autotune.search(budget=...)``,
each profile saved to a file and loaded back the production way
(``Evaluator(profile=PATH)``); then the picks are timed alternately, round
after round (A B C D E, then B C D E A, ...), each call over the workload's
full ``n``, and each pick's median throughput is printed as a ratio to the
best of them (the target: every pick >= 0.9).  Ratios are measured within
one run; this machine's absolute speed varies +-40% from run to run.

Workloads: ``horner`` (a degree-12 polynomial by Horner's rule, map) and
``erfexp`` (an erf/exp mix, map), defined here, and any built-in name.

    python scripts/bench_repeatable.py                        # horner, erfexp; budget 20
    python scripts/bench_repeatable.py --quick                # smaller, budget 3
    python scripts/bench_repeatable.py --workload stream --budget 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from autotune import Evaluator, Workload
from autotune.tuner import search
from autotune.workloads import get_workload

COEFFS = np.linspace(-1.0, 1.0, 13)


def horner_kernel(shared, start, stop):
    """A degree-12 polynomial of x[start:stop], Horner's rule (a temporary per step)."""
    x = shared.x[start:stop]
    r = np.full_like(x, COEFFS[0])
    for c in COEFFS[1:]:
        r = r * x + c
    return r


def erfexp_kernel(shared, start, stop):
    """An erf/exp mix: transcendental functions, two temporaries."""
    from scipy.special import erf

    x = shared.x[start:stop]
    return np.exp(-x * x) * erf(x) + 0.5 * np.exp(-0.5 * x)


def horner(n: int) -> Workload:
    x = np.random.default_rng(0).random(n)
    # input, output and two temporaries (r * x, then + c), float64 each
    return Workload("horner", n, horner_kernel, {"x": x}, "map", item_bytes=32)


def erfexp(n: int) -> Workload:
    x = np.random.default_rng(1).random(n)
    return Workload("erfexp", n, erfexp_kernel, {"x": x}, "map", item_bytes=40)


OWN = {"horner": horner, "erfexp": erfexp}


def label(ev: Evaluator) -> str:
    return f"{ev.backend} x{ev.workers} chunk {ev.chunk_len}"


def time_alternately(workload: Workload, evs: list[Evaluator], rounds: int) -> list[float]:
    """Median items/s of each evaluator over ``rounds`` rounds, the order rotated each round."""
    call = "map" if workload.mode == "map" else "reduce"
    times: list[list[float]] = [[] for _ in evs]
    for ev in evs:  # warm each pool (and its output segment) once
        getattr(ev, call)(workload.kernel, workload.n)
    for r in range(rounds):
        order = list(range(len(evs)))
        order = order[r % len(evs) :] + order[: r % len(evs)]
        for i in order:
            t0 = time.perf_counter()
            result = getattr(evs[i], call)(workload.kernel, workload.n)
            times[i].append(time.perf_counter() - t0)
            del result
    return [workload.n / statistics.median(t) for t in times]


def one_workload(workload: Workload, args: argparse.Namespace, folder: Path) -> list[float]:
    print(f"{workload.name}: n={workload.n}, {args.searches} searches of --budget {args.budget:g}")
    paths = []
    for i in range(args.searches):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = search(workload, budget=args.budget, progress=False)
        p = result.profile
        path = p.save(folder / f"{workload.name}-{i}.yaml")
        paths.append(path)
        tied = sum(1 for m in p.measurements if m.repeats >= 3)
        print(
            f"  search {chr(65 + i)}: {result.elapsed:5.1f} s, {result.runs:3d} runs, "
            f"{tied} points timed >= 3 times; pick {p.backend} x{p.workers} "
            f"chunk {p.chunk_len} (spread {p.best.spread:.0%}, {p.best.repeats} runs)",
            flush=True,
        )
    evs = [Evaluator(profile=str(path), shared=workload.shared) for path in paths]
    try:
        rates = time_alternately(workload, evs, args.rounds)
        top = max(rates)
        ratios = [r / top for r in rates]
        print(f"  picks timed alternately, {args.rounds} rounds, full n:")
        for i, (ev, rate, ratio) in enumerate(zip(evs, rates, ratios, strict=True)):
            print(f"    {chr(65 + i)}  {label(ev):38s} {rate:12.4g} items/s  {ratio:5.3f}")
        print(
            f"  worst {min(ratios):.3f}; {sum(r >= 0.9 for r in ratios)} of {len(ratios)} >= 0.9, "
            f"{sum(r >= 0.95 for r in ratios)} >= 0.95; "
            f"{len({label(ev) for ev in evs})} different settings picked"
        )
    finally:
        for ev in evs:
            ev.close()
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="horner,erfexp", help="comma-separated names")
    parser.add_argument("--budget", type=float, default=None, help="seconds per search (20)")
    parser.add_argument("--searches", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (9)")
    parser.add_argument("--n", type=int, default=None, help="items of horner/erfexp (4M)")
    parser.add_argument("--quick", action="store_true", help="budget 3, 3 rounds, n 1M")
    args = parser.parse_args(argv)
    args.budget = args.budget or (3.0 if args.quick else 20.0)
    args.rounds = args.rounds or (3 if args.quick else 9)
    n = args.n or (1 << 20 if args.quick else 1 << 22)
    worst = []
    with tempfile.TemporaryDirectory(prefix="bench_repeatable_") as tmp:
        for name in args.workload.split(","):
            workload = OWN[name](n) if name in OWN else get_workload(name)
            worst.append(min(one_workload(workload, args, Path(tmp))))
    print(f"worst pick over all workloads: {min(worst):.3f} of the best (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
