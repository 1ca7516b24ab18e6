"""Short scripts, run again and again: does each run go on from where the last one stopped?

Most programs that would use autotune are scripts that start, make an evaluator, run a few
calls and exit.  For each workload (those of ``bench_adapt.py``: the built-in spline, stream
and ndimage, and its Horner and wide-rows kernels), this runs such a script ``--runs`` times
as separate processes, one profile directory for all of them (fresh at the start), each run
of the zero-config script (``Evaluator(shared=...)``, nothing else) paired with one run of the
same script with the best fixed setting of a grid (found first, in this process, as
``bench_adapt.py`` finds it), the zero-config run first in runs 1, 3, 5, ... and second in the
others, after one untimed run of the fixed script (the first child process after the grid
pays a cold start that would land on one contender).  A script makes its data, the
evaluator, ``--calls`` calls, and closes it.

Printed per run, best fixed / zero-config (above 1: zero-config was faster):

- ``process``: the whole process's wall time, as the shell would time it (Python's start,
  imports and the data included, the same for both);
- ``calls``: from the evaluator's constructor to the end of its last call (the pool's start
  included), what differs between the two.

and, after each zero-config run, what its online profile says (``e``: still exploring, ``s``:
settled).

    python scripts/bench_runs.py                    # 6 runs of 2 calls per workload
    python scripts/bench_runs.py --runs 10 --only horner,rows
    python scripts/bench_runs.py --keep-profiles    # keep the profile directory (printed)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _bench_common import KEEP_PROFILES_HELP, CpuWitness, contention_note, fresh_profile_dir
from bench_adapt import call, grid_best, workloads

import autotune
from autotune.cpu import probe
from autotune.profile import Profile, item_bytes_of
from autotune.profile.online import file_slug, kernel_name, online_path

HERE = Path(__file__).resolve()


def child(name: str, setting: str, calls: int, quick: bool) -> None:
    """One run of the script: data, evaluator, calls, close; prints the calls' seconds."""
    kernel, shared, n, mode = workloads(quick)[name]
    t0 = time.perf_counter()
    if setting == "auto":
        ev = autotune.Evaluator(shared=shared)
    else:
        workers, chunk_len = map(int, setting.split(","))
        ev = autotune.Evaluator(workers, chunk_len, shared=shared, adapt=False)
    with ev:
        for _ in range(calls):
            call(ev, kernel, n, mode)
    print(json.dumps({"calls_s": time.perf_counter() - t0}))


def run_script(name: str, setting: str, calls: int, quick: bool) -> tuple[float, float]:
    """The process's wall seconds and its calls' seconds."""
    args = [sys.executable, str(HERE), "--child", name, "--setting", setting]
    args += ["--calls", str(calls)] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{name} ({setting}) failed:\n{done.stderr}")
    return wall, float(json.loads(done.stdout.strip().splitlines()[-1])["calls_s"])


def state(name: str, quick: bool) -> str:
    """What the online profile of ``name``'s kernel says: exploring, settled or absent."""
    kernel = workloads(quick)[name][0]
    path = online_path(file_slug(kernel_name(kernel)), probe())
    if not path.is_file():
        return "-"
    return "e" if Profile.load(path).exploring else "s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--calls", type=int, default=2, help="calls per script run")
    p.add_argument("--only", help="comma-separated workloads")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--keep-profiles", action="store_true", help=KEEP_PROFILES_HELP)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.setting, args.calls, args.quick)
        return 0
    profile_dir = fresh_profile_dir("bench-runs-", args.keep_profiles)
    os.environ["AUTOTUNE_PROFILE_DIR"] = profile_dir
    cpu = probe()
    where = f"{profile_dir} (kept)" if args.keep_profiles else "a directory removed at exit"
    print(f"CPU: {cpu.brand}, {cpu.usable_cpus} usable CPUs; {args.runs} runs of a script of")
    print(f"{args.calls} calls per workload; profiles in {where}")
    print("(best fixed s / zero-config s, run by run, alternated; e = profile still exploring)")
    names = args.only.split(",") if args.only else list(workloads(args.quick))
    witness = CpuWitness()
    for name in names:
        kernel, shared, n, mode = workloads(args.quick)[name]
        # The grid in bytes, by the evaluator's own rule for bytes per item.
        best, _ = grid_best(kernel, shared, n, mode, item_bytes_of(shared, n, None), repeats=3)
        setting = f"{best[0]},{best[1]}"
        # One run of the fixed script first, not timed: the first child process
        # after the grid pays a cold start.  Run 1's zero-config script paid it
        # alone: spline's process ratio of run 1 was 0.50-0.77 in five runs of
        # this script on the 2-core development VM while its calls' was
        # 0.84-1.08 (its imports and data: 1.7 s where they took 0.5 s).
        run_script(name, setting, args.calls, args.quick)
        process, calls, marks = [], [], []
        for run in range(args.runs):
            # Which goes first alternates: a process that follows another finds
            # its files in the page cache and the CPU's clock where the other
            # left it.  The fixed setting writes no profile, so the order
            # changes nothing the zero-config runs learn.
            if run % 2:
                fixed = run_script(name, setting, args.calls, args.quick)
            zero = run_script(name, "auto", args.calls, args.quick)
            marks.append(state(name, args.quick))
            if not run % 2:
                fixed = run_script(name, setting, args.calls, args.quick)
            process.append(fixed[0] / zero[0])
            calls.append(fixed[1] / zero[1])
        print(f"\n{name}: best fixed {best[0]} x {best[1]}")
        print("  run      " + " ".join(f"{i + 1:>6}" for i in range(args.runs)))
        print("  process  " + " ".join(f"{r:6.2f}" for r in process))
        print("  calls    " + " ".join(f"{r:6.2f}" for r in calls))
        print("  profile  " + " ".join(f"{m:>6}" for m in marks))
        later = calls[3:] or calls
        print(
            f"  calls: run 1 {calls[0]:.2f}, runs 4+ median {statistics.median(later):.2f}; "
            f"process: run 1 {process[0]:.2f}, runs 4+ median "
            f"{statistics.median(process[3:] or process):.2f}"
        )
    print()
    print(contention_note(witness.others()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
