"""autotune against what users would pick instead: joblib, mpire, ProcessPoolExecutor, Pool.

One run on this machine, the same number of workers for every peer (every
usable CPU by default, ``--workers`` to change; autotune's own come from its
profile or heuristic: the physical cores, capped by the usable CPUs), four workloads,
each solved the way a competent user of each peer would after reading its
documentation, and every result checked against the serial one:

1. ``spline``: the seed's workload (reduce; compute-bound);
2. ``stream``: a memory-bound multi-pass numpy expression (map; chunk-sensitive);
3. ``wide``: a map whose output is 32 times its input (results come back
   through shared memory for autotune, through pickling for most peers);
4. ``loop``: 100 maps of a small array in a loop, pool start-up included
   (start-up and per-call cost).

How each peer is used:

- joblib ``Parallel`` (loky): the whole arrays are passed to every task with
  an index range; arrays over ``max_nbytes`` (1 MB) are memory-mapped once
  instead of pickled, and a large output is written into an ``np.memmap`` the
  workers share (joblib's "writing parallel computation results in shared
  memory" recipe); ``batch_size="auto"``;
- mpire ``WorkerPool``: ``shared_objects`` with ``start_method="fork"``
  (copy-on-write), ``keep_alive=True``, map over index ranges, numpy output
  concatenated by mpire;
- ``concurrent.futures.ProcessPoolExecutor`` (fork): the data handed to an
  ``initializer``, a chunked ``map`` over index ranges;
- ``multiprocessing.Pool`` (fork): the data in a module global set before the
  pool is created, ``imap`` over index ranges with a ``chunksize``.

Peers split the items two ways: 4 tasks per worker (``Pool.map``'s default
split) and autotune's chunk length (what they would reach with autotune's
advice).  autotune uses ``Evaluator(profile=...)``: the profile from
``--profile`` (a file per workload), else ``autotune.load_profile(name)``,
else the heuristic; which one is printed.  Times are medians over
``--repeats`` runs after one warm-up, the contenders interleaved within each
round; ratios are peer seconds / autotune seconds (above 1: autotune faster).
Each workload says how much CPU other processes took while it ran (psutil),
and flags it above 10%.

    python scripts/bench_peers.py                 # default sizes (a few minutes)
    python scripts/bench_peers.py --quick         # small sizes (under a minute)
    python scripts/bench_peers.py --json          # machine-readable
    autotune search --workload spline --out spline.yaml
    autotune search --workload stream --out stream.yaml
    python scripts/bench_peers.py --profile spline.yaml --profile stream.yaml

Peers that are not installed (``pip install -e '.[bench]'``) are reported as
skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from _bench_common import (  # this folder is sys.path[0]
    CpuWitness,
    contention_note,
    workers_for_all,
)

import autotune
from autotune import Evaluator
from autotune.workloads import spline_data, spline_kernel, stream_kernel

CTX = mp.get_context("fork")
#: Relative difference from the serial result below which a contender agrees.
AGREE_REL = 1e-9
#: Tasks per worker in the peers' default split: what ``Pool.map`` picks for a
#: sequence (``chunksize = ceil(len / (4 * processes))``).
TASKS_PER_WORKER = 4


# -- kernels: autotune's convention, kernel(shared, start, stop) ---------------------
def wide_kernel(shared, start, stop):
    """Each value becomes a row of cosines: the output is 32x the input."""
    return np.cos(np.multiply.outer(shared.x[start:stop], shared.freqs))


def loop_kernel(shared, start, stop, p=1.0):
    """A cheap polynomial with a per-call parameter: the kind of map run in a loop."""
    x = shared.x[start:stop]
    return ((x * p + 1.0) * x - p) * x


# -- workloads ------------------------------------------------------------------------
@dataclass
class Case:
    """One workload: the kernel, its data, and how it is run and checked."""

    key: str
    title: str
    n: int
    mode: str  # "map" or "reduce"
    kernel: Callable[..., Any]
    data: dict[str, Any]
    item_bytes: int
    #: Calls per timed run, each with its own kernel parameter ``p``; > 1 is the
    #: loop case, whose timed run includes starting and stopping the pool.
    calls: int = 1
    splits: tuple[str, ...] = ("per_worker", "chunk")
    serial_chunked: bool = False
    shared: Any = field(init=False)

    def __post_init__(self) -> None:
        self.shared = types.SimpleNamespace(**self.data)

    @property
    def loop(self) -> bool:
        return self.calls > 1

    def kwargs(self, call: int) -> dict[str, Any]:
        return {"p": 1.0 + call / self.calls} if self.loop else {}


def make_cases(args: argparse.Namespace) -> list[Case]:
    rng = np.random.default_rng(args.seed)
    cases = []
    wanted = set(args.workloads.split(","))
    if "spline" in wanted:
        cases.append(
            Case(
                "spline",
                f"spline: {args.splines} linear RectBivariateSplines, {args.points} points, "
                "sum of exp (reduce)",
                args.points,
                "reduce",
                spline_kernel,
                spline_data(args.points, args.splines, args.seed),
                item_bytes=16,
            )
        )
    if "stream" in wanted:
        cases.append(
            Case(
                "stream",
                f"stream: multi-pass numpy expression over {args.stream_items} float64 (map, "
                "memory-bound)",
                args.stream_items,
                "map",
                stream_kernel,
                {"x": rng.random(args.stream_items)},
                item_bytes=32,
                serial_chunked=True,
            )
        )
    if "wide" in wanted:
        cases.append(
            Case(
                "wide",
                f"wide: {args.wide_items} values -> rows of 32 cosines, "
                f"{args.wide_items * 256 / 2**20:.0f} MiB out (map, large output)",
                args.wide_items,
                "map",
                wide_kernel,
                {"x": rng.random(args.wide_items), "freqs": np.arange(1.0, 33.0)},
                # input, output row, and the outer product's temporary row
                item_bytes=8 + 2 * 256,
            )
        )
    if "loop" in wanted:
        cases.append(
            Case(
                "loop",
                f"loop: {args.calls} maps of {args.loop_items} float64 in a loop, pool start-up "
                "included",
                args.loop_items,
                "map",
                loop_kernel,
                {"x": rng.random(args.loop_items)},
                item_bytes=32,
                calls=args.calls,
                splits=("per_worker",),
            )
        )
    return cases


def ranges_for(n: int, split: str, workers: int, chunk_len: int) -> list[tuple[int, int]]:
    if split == "per_worker":
        step = max(1, math.ceil(n / (TASKS_PER_WORKER * workers)))
    else:
        step = chunk_len
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def combine(case: Case, parts: list[Any]) -> Any:
    if case.mode == "reduce":
        return sum(parts)
    return np.concatenate(parts)


# -- contenders -------------------------------------------------------------------------
class Skipped(Exception):
    """A peer that cannot run here (not installed)."""


class Contender:
    """Something that runs a case: ``start``, ``call`` (one map/reduce), ``stop``."""

    name = ""

    def __init__(self, case: Case) -> None:
        self.case = case

    def start(self) -> None:
        pass

    def call(self, kw: dict[str, Any]) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        pass

    def run(self) -> Any:
        """One timed run: a single call, or the whole loop with start-up."""
        case = self.case
        if not case.loop:
            return self.call({})
        self.start()
        try:
            sums = [float(np.sum(self.call(case.kwargs(i)))) for i in range(case.calls)]
        finally:
            self.stop()
        return np.array(sums)


class Serial(Contender):
    def __init__(self, case: Case, chunk_len: int | None = None) -> None:
        super().__init__(case)
        self.chunk_len = chunk_len
        self.name = (
            "serial (one process, one chunk)"
            if chunk_len is None
            else f"serial, autotune's chunk ({chunk_len} items)"
        )

    def call(self, kw: dict[str, Any]) -> Any:
        c = self.case
        if self.chunk_len is None:
            return c.kernel(c.shared, 0, c.n, **kw)
        parts = [
            c.kernel(c.shared, s, min(s + self.chunk_len, c.n), **kw)
            for s in range(0, c.n, self.chunk_len)
        ]
        return combine(c, parts)


class Autotune(Contender):
    def __init__(self, case: Case, profile: Any) -> None:
        super().__init__(case)
        self.profile = profile
        self.ev: Evaluator | None = None
        backend = getattr(profile, "backend", "processes")
        # A tuned profile may pick the threads backend, which Evaluator(profile=...) starts.
        extra = "" if backend == "processes" else f", {backend}"
        self.name = f"autotune Evaluator(profile=...), chunk {profile.chunk_len}{extra}"

    def start(self) -> None:
        self.ev = Evaluator(profile=self.profile, shared=self.case.data)

    def call(self, kw: dict[str, Any]) -> Any:
        assert self.ev is not None
        c = self.case
        kernel = functools.partial(c.kernel, **kw) if kw else c.kernel
        if c.mode == "reduce":
            return self.ev.reduce(kernel, c.n)
        return self.ev.map(kernel, c.n)

    def stop(self) -> None:
        if self.ev is not None:
            self.ev.close()
            self.ev = None


class Peer(Contender):
    label = ""

    def __init__(self, case: Case, split: str, workers: int, chunk_len: int) -> None:
        super().__init__(case)
        self.workers = workers
        self.ranges = ranges_for(case.n, split, workers, chunk_len)
        how = (
            f"{TASKS_PER_WORKER} tasks/worker"
            if split == "per_worker"
            else f"autotune's chunk, {len(self.ranges)} tasks"
        )
        self.name = f"{self.label}, {how}"
        # The batching a user would pick for many small tasks: Pool.map's own rule.
        self.batch = max(1, math.ceil(len(self.ranges) / (4 * workers)))


# joblib: data passed as arguments (large arrays memory-mapped by joblib), a large
# output written into a shared np.memmap.
def _joblib_task(kernel, data, start, stop, kw, out):
    r = kernel(types.SimpleNamespace(**data), start, stop, **kw)
    if out is None:
        return r
    out[start:stop] = r
    return None


class Joblib(Peer):
    label = "joblib Parallel (memmapping)"

    def start(self) -> None:
        try:
            from joblib import Parallel, delayed
        except ImportError as exc:
            raise Skipped("joblib not installed") from exc
        self.delayed = delayed
        self.par = Parallel(n_jobs=self.workers)
        self.par.__enter__()  # reuse the workers across calls
        self.folder: str | None = None
        self.out = None
        c = self.case
        if c.mode == "map":
            first = c.kernel(c.shared, 0, 1, **c.kwargs(0))
            shape = (c.n, *first.shape[1:])
            if math.prod(shape) * first.dtype.itemsize > 2**20:  # joblib's max_nbytes
                base = "/dev/shm" if os.path.isdir("/dev/shm") else None
                self.folder = tempfile.mkdtemp(prefix="bench-joblib-", dir=base)
                path = os.path.join(self.folder, "out.mmap")
                self.out = np.memmap(path, dtype=first.dtype, shape=shape, mode="w+")

    def call(self, kw: dict[str, Any]) -> Any:
        c = self.case
        parts = self.par(
            self.delayed(_joblib_task)(c.kernel, c.data, s, e, kw, self.out) for s, e in self.ranges
        )
        if self.out is not None:
            return np.asarray(self.out)
        return combine(c, parts)

    def stop(self) -> None:
        if getattr(self, "par", None) is not None:
            self.par.__exit__(None, None, None)
            self.par = None
        self.out = None
        if getattr(self, "folder", None):
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


# mpire: shared_objects inherited by fork, index ranges as tasks.
def _mpire_task(kernel, shared, start, stop, kw):
    return kernel(shared, start, stop, **kw)


class Mpire(Peer):
    label = "mpire WorkerPool (shared_objects)"

    def start(self) -> None:
        try:
            from mpire import WorkerPool
        except ImportError as exc:
            raise Skipped("mpire not installed") from exc
        self.pool = WorkerPool(
            n_jobs=self.workers,
            shared_objects=self.case.shared,
            start_method="fork",
            keep_alive=True,
        )
        # keep_alive reuses the workers only while the function is the same object.
        self.func = functools.partial(_mpire_task, self.case.kernel)

    def call(self, kw: dict[str, Any]) -> Any:
        out = self.pool.map(self.func, [(s, e, kw) for s, e in self.ranges], progress_bar=False)
        return sum(out) if self.case.mode == "reduce" else out  # mpire concatenates arrays

    def stop(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.terminate()
            self.pool = None


# ProcessPoolExecutor: the data handed to an initializer (inherited under fork).
_PPE_SHARED: Any = None


def _ppe_init(shared):
    global _PPE_SHARED
    _PPE_SHARED = shared


def _ppe_task(kernel, start, stop, kw):
    return kernel(_PPE_SHARED, start, stop, **kw)


class Executor(Peer):
    label = "ProcessPoolExecutor (initializer, map)"

    def start(self) -> None:
        self.ex = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=CTX, initializer=_ppe_init, initargs=(self.case.shared,)
        )

    def call(self, kw: dict[str, Any]) -> Any:
        starts, stops = zip(*self.ranges, strict=True)
        func = functools.partial(_ppe_task, self.case.kernel, kw=kw)
        return combine(self.case, list(self.ex.map(func, starts, stops, chunksize=self.batch)))

    def stop(self) -> None:
        if getattr(self, "ex", None) is not None:
            self.ex.shutdown()
            self.ex = None


# multiprocessing.Pool: the data in a module global before the pool forks.
_POOL_SHARED: Any = None


def _pool_task(args):
    kernel, start, stop, kw = args
    return kernel(_POOL_SHARED, start, stop, **kw)


class PoolPeer(Peer):
    label = "Pool (fork globals, imap)"

    def start(self) -> None:
        global _POOL_SHARED
        _POOL_SHARED = self.case.shared
        self.pool = CTX.Pool(self.workers)

    def call(self, kw: dict[str, Any]) -> Any:
        c = self.case
        tasks = [(c.kernel, s, e, kw) for s, e in self.ranges]
        return combine(c, list(self.pool.imap(_pool_task, tasks, chunksize=self.batch)))

    def stop(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


PEERS = (Joblib, Mpire, Executor, PoolPeer)


# -- autotune's profile --------------------------------------------------------------------
def load_profile_files(paths: list[str]) -> dict[str, tuple[Any, str]]:
    from autotune.profile import Profile

    found = {}
    for path in paths:
        p = Profile.load(path)
        found[p.workload] = (p, f"profile file {path} ({p.source})")
    return found


def autotune_profile(case: Case, files: dict[str, tuple[Any, str]]) -> tuple[Any, str]:
    """The profile for ``case`` and where it came from: file, load_profile, heuristic."""
    from autotune.profile import heuristic_profile

    if case.key in files:
        return files[case.key]
    load = getattr(autotune, "load_profile", None)
    if load is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = load(case.key, item_bytes=case.item_bytes)
        if p.source != "heuristic" or p.path is not None:
            return p, f"{p.source} profile {p.path} (autotune.load_profile)"
        return p, "heuristic (autotune.load_profile found no profile for this CPU)"
    return heuristic_profile(autotune.probe(), case.key, case.item_bytes), "heuristic"


# -- measuring --------------------------------------------------------------------------------
def agreement(result: Any, reference: Any) -> float:
    a = np.asarray(result, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    diff = float(np.max(np.abs(a - b), initial=0.0))
    scale = float(np.max(np.abs(b), initial=0.0))
    return diff / scale if scale else diff


def bench_case(case: Case, args: argparse.Namespace, files: dict) -> dict[str, Any]:
    witness = CpuWitness()
    profile, source = autotune_profile(case, files)
    serial = Serial(case)
    auto = Autotune(case, profile)
    contenders: list[Contender] = [serial, auto]
    if case.serial_chunked:
        contenders.insert(1, Serial(case, profile.chunk_len))
    for split in case.splits:
        contenders += [cls(case, split, args.workers, profile.chunk_len) for cls in PEERS]
    rows: dict[Contender, dict[str, Any]] = {c: {"name": c.name, "times": []} for c in contenders}

    live = []
    for c in contenders:
        row = rows[c]
        if args.progress:
            print(f"  {case.key}: warm-up {c.name}", file=sys.stderr, flush=True)
        try:
            if not case.loop:
                c.start()
            result = c.run()  # warm-up; its result is the one checked
        except Skipped as exc:
            row["skipped"] = str(exc)
            c.stop()
            continue
        except Exception as exc:  # reported, not hidden
            row["failed"] = f"{type(exc).__name__}: {exc}"
            c.stop()
            continue
        row["result"] = result
        live.append(c)
    reference = rows[serial]["result"]
    for c in live:
        row = rows[c]
        row["rel_diff"] = agreement(row.pop("result"), reference)
        row["agrees"] = bool(row["rel_diff"] < AGREE_REL)

    try:
        for r in range(args.repeats):
            k = r % len(live)
            for c in live[k:] + live[:k]:  # rotate: no contender always runs first
                if args.progress:
                    print(f"  {case.key}: round {r + 1} {c.name}", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                c.run()
                rows[c]["times"].append(time.perf_counter() - t0)
    finally:
        for c in live:
            if not case.loop:
                c.stop()

    auto_s = statistics.median(rows[auto]["times"]) if auto in live else None
    for c in live:
        row = rows[c]
        row["seconds"] = statistics.median(row["times"])
        row["spread"] = (max(row["times"]) - min(row["times"])) / row["seconds"]
        row["vs_autotune"] = row["seconds"] / auto_s if auto_s else None
    return {
        "title": case.title,
        "cpu_taken_by_others": witness.others(),
        "n": case.n,
        "autotune": {
            "source": source,
            "workers": profile.workers,
            "backend": getattr(profile, "backend", "processes"),
            "chunk_len": profile.chunk_len,
            "chunk_bytes": profile.chunk_len * case.item_bytes,
        },
        "results": [rows[c] for c in contenders],
        "peer_names": [rows[c]["name"] for c in contenders if isinstance(c, Peer)],
        "serial_name": serial.name,
        "autotune_name": auto.name,
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked against this run's numbers."""
    out = []
    wl = report["workloads"]

    def seconds(case: dict, name: str) -> float | None:
        return next((r.get("seconds") for r in case["results"] if r["name"] == name), None)

    if "spline" in wl:
        c = wl["spline"]
        auto = seconds(c, c["autotune_name"])
        serial = seconds(c, c["serial_name"])
        peers = [s for s in (seconds(c, n) for n in c["peer_names"]) if s is not None]
        if auto and serial:
            out.append(
                {"target": "spline: autotune >= 2.0x serial", "value": serial / auto, "goal": 2.0}
            )
        if auto and peers:
            out.append(
                {
                    "target": "spline: autotune >= 1.05x the best peer",
                    "value": min(peers) / auto,
                    "goal": 1.05,
                }
            )
    if "stream" in wl:
        c = wl["stream"]
        auto = seconds(c, c["autotune_name"])
        serial = seconds(c, c["serial_name"])
        if auto and serial:
            out.append(
                {
                    "target": "stream: autotune >= 15x unchunked serial",
                    "value": serial / auto,
                    "goal": 15.0,
                }
            )
    for t in out:
        t["met"] = bool(t["value"] >= t["goal"])
    return out


def machine() -> dict[str, Any]:
    cpu = autotune.probe()
    versions = {}
    for dist in ("numpy", "scipy", "joblib", "mpire"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "brand": cpu.brand,
        "usable_cpus": cpu.usable_cpus,
        "physical_cores": cpu.physical_cores,
        "l2_bytes": cpu.l2,
        "python": sys.version.split()[0],
        **versions,
    }


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    l2 = f"{m['l2_bytes'] // 1024} KiB L2" if m["l2_bytes"] else "L2 unknown"
    print(
        f"Machine: {m['brand']}, {m['usable_cpus']} usable CPUs ({m['physical_cores']} physical "
        f"cores), {l2}; Python {m['python']}, numpy {m['numpy']}, joblib {m['joblib']}, "
        f"mpire {m['mpire']}"
    )
    print(
        f"{report['workers']} workers for every peer ({report['workers_from']}); median of "
        f"{report['repeats']} runs after a warm-up, contenders interleaved; ratio = seconds / "
        "autotune's seconds (> 1: autotune faster); spread = (max - min) / median"
    )
    for i, (key, case) in enumerate(report["workloads"].items(), 1):
        a = case["autotune"]
        print(f"\n{i}. {case['title']}")
        print(f"   {contention_note(case['cpu_taken_by_others'])}")
        print(
            f"   autotune: {a['workers']} workers ({a['backend']}), chunk_len {a['chunk_len']} "
            f"({a['chunk_bytes']} B), from {a['source']}"
        )
        w = max(len(r["name"]) for r in case["results"])
        print(
            f"   {'contender':{w}s} {'seconds':>8s} {'ratio':>7s} {'spread':>6s}  "
            "agrees with serial"
        )
        best = min(
            (r for r in case["results"] if "seconds" in r and not r["name"].startswith("serial")),
            key=lambda r: r["seconds"],
            default=None,
        )
        for r in case["results"]:
            if "skipped" in r:
                print(f"   {r['name']:{w}s} skipped ({r['skipped']})")
                continue
            if "failed" in r:
                print(f"   {r['name']:{w}s} FAILED ({r['failed']})")
                continue
            agree = "OK" if r["agrees"] else f"MISMATCH (relative difference {r['rel_diff']:.1e})"
            ratio = f"{r['vs_autotune']:6.2f}x" if r["vs_autotune"] is not None else "     -"
            mark = " <- fastest parallel" if r is best else ""
            print(
                f"   {r['name']:{w}s} {r['seconds']:8.4f} {ratio} {r['spread']:6.0%}  {agree}{mark}"
            )
        if key == "loop":
            print(
                "   (joblib's loky workers outlive a Parallel context and are reused, so its "
                "start-up was paid in the warm-up)"
            )
    if report["targets"]:
        print("\nTargets (from the issue), this run:")
        for t in report["targets"]:
            state = "met" if t["met"] else "NOT met"
            print(f"   {t['target']:48s} {t['value']:6.2f}x  {state}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--profile",
        metavar="PATH",
        action="append",
        default=[],
        help="a profile file for autotune; matched to a workload by its 'workload' field "
        "(repeat for several)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="workers for the peers (the usable CPUs)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (5; quick 3)")
    parser.add_argument(
        "--workloads", default="spline,stream,wide,loop", help="comma list (default: all four)"
    )
    parser.add_argument("--points", type=int, default=None, help="spline points (1e6; quick 1e5)")
    parser.add_argument("--splines", type=int, default=50, help="splines (50)")
    parser.add_argument(
        "--stream-items", type=int, default=None, help="stream n (2^24; quick 2^21)"
    )
    parser.add_argument("--wide-items", type=int, default=None, help="wide n (2^19; quick 2^16)")
    parser.add_argument("--loop-items", type=int, default=None, help="loop array (1e5; quick 2e4)")
    parser.add_argument("--calls", type=int, default=100, help="maps in the loop (100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the data")
    parser.add_argument("--progress", action="store_true", help="name each run on stderr")
    args = parser.parse_args()
    q = args.quick
    args.points = args.points or (100_000 if q else 1_000_000)
    args.stream_items = args.stream_items or (1 << 21 if q else 1 << 24)
    args.wide_items = args.wide_items or (1 << 16 if q else 1 << 19)
    args.loop_items = args.loop_items or (20_000 if q else 100_000)
    args.repeats = args.repeats or (3 if q else 5)
    unknown = set(args.workloads.split(",")) - {"spline", "stream", "wide", "loop"}
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if min(args.points, args.splines, args.stream_items, args.wide_items, args.loop_items) < 1:
        parser.error("sizes must be >= 1")
    args.workers, workers_from = workers_for_all(args.workers)
    if args.workers < 1 or args.repeats < 1 or args.calls < 2:
        parser.error("--workers and --repeats must be >= 1, --calls >= 2")
    try:
        files = load_profile_files(args.profile)
    except autotune.ProfileError as exc:
        print(f"bench_peers: {exc}", file=sys.stderr)
        return 2

    report: dict[str, Any] = {
        "machine": machine(),
        "workers": args.workers,
        "workers_from": workers_from,
        "repeats": args.repeats,
        "workloads": {},
    }
    for case in make_cases(args):
        report["workloads"][case.key] = bench_case(case, args, files)
    report["targets"] = targets(report)
    ok = all(
        r.get("agrees", True) and "failed" not in r
        for case in report["workloads"].values()
        for r in case["results"]
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
