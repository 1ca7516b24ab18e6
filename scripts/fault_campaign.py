"""Fault campaign: kill, crash and starve workers, interrupt and terminate the parent, in the
middle of a map over a shared 64 MiB array, and count what is left behind.

    python scripts/fault_campaign.py              # 100 runs per start method (a few minutes)
    python scripts/fault_campaign.py --quick      # 10 runs per start method, 16 MiB
    python scripts/fault_campaign.py --runs 30 --json
    python scripts/fault_campaign.py --soak       # 1000 map calls on one evaluator, sampled

Each run maps ``2 * x`` over the array with a fresh ``Evaluator`` and injects one fault from
inside the run, at a chunk drawn at random (each fault also gets the first and the last chunk
once): the kernel kills its own worker (SIGKILL), crashes it (SIGSEGV, by reading address 0
through ctypes), fails an allocation (numpy's ``MemoryError``), or signals the parent (SIGINT,
SIGTERM).  Parent faults run in a child Python process, the *driver*, because they end it.
A fault injected from inside the run cannot miss it, however fast the evaluator gets.

What each fault must do (README, "What happens when things go wrong"):

- SIGKILL, SIGSEGV: the worker is replaced and its chunks re-run; the map returns a result
  equal to the serial one (the fault fires once, so one re-run, within ``retries``).
- MemoryError: re-raised in the parent with its type; the evaluator stays usable.
- SIGINT: ``KeyboardInterrupt`` in the parent; the evaluator closes itself: workers ended,
  segments unlinked, no file descriptor left.
- SIGTERM: autotune installs no handler, so Python's default action kills the parent outright.
  The workers must see their pipe close and exit, and autotune's segment guardian must unlink
  the parent's segments; the campaign measures how long both take.

Counted per run: results equal to serial, the documented error, hangs (a 30 s watchdog), zombie
processes, orphaned processes, ``/dev/shm/autotune_<pid>_*`` entries and file descriptors left,
and, for the parent faults, lines on the driver's stderr (which its workers, the resource tracker
and the guardian share): there must be none, the documented outcome says it all (a "leaked
shared_memory objects" warning from the tracker would say the cleanup failed when it worked).
The campaign makes itself a child subreaper (Linux), so processes orphaned by a killed driver
are re-parented to it, watched, and reaped.  Exit status 0 when every target holds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import gc
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from autotune import Evaluator
from autotune.backends.shm import list_segments

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
WORKER_FAULTS = ("sigkill", "sigsegv", "memoryerror")
PARENT_FAULTS = ("sigint", "sigterm")
FAULTS = WORKER_FAULTS + PARENT_FAULTS
#: How long leftovers (a zombie the forkserver has not reaped yet, a segment the resource
#: tracker has not unlinked yet) may take to go before they count.
SETTLE_S = 10.0
PR_SET_CHILD_SUBREAPER = 36


# -- kernels (module level: spawn and forkserver workers import them) -----------------
def fault_kernel(shared, start, stop):
    """``2 * x`` over items [start, stop); injects ``shared.fault`` at item ``shared.at``."""
    if start <= shared.at < stop:
        inject(shared.fault, shared.flag, shared.parent)
    return shared.x[start:stop] * 2.0


def double(shared, start, stop):
    return shared.x[start:stop] * 2.0


def index_kernel(shared, start, stop):
    """(items, sum of item numbers, sum of their hashes) of [start, stop), from the item
    numbers alone (an array slice would hide a range past n); the same fault as
    :func:`fault_kernel`, once more, at item ``shared.at``.  Exact for any chunks: a
    chunk run twice or never after a lost worker changes the total."""
    if start <= shared.at < stop:
        inject(shared.fault, shared.flag + ".index", shared.parent)
    return index_moments(start, stop)


def index_moments(start: int, stop: int) -> tuple[int, int, int]:
    i = np.arange(start, stop, dtype=np.uint64)
    hashes = (i * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(34)  # < 2^30 each
    return stop - start, int(i.sum()), int(hashes.sum())


def inject(kind: str, flag: str, parent: int) -> None:
    if kind == "memoryerror":
        # A real failed allocation (numpy raises a MemoryError subclass), every time.
        np.empty(1 << 60, dtype=np.uint8)
    # The other faults fire once per run: the re-run of the chunk must pass.  O_EXCL makes
    # "first" atomic between workers.
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "sigsegv":
        faulthandler.disable()  # the crash is the point: keep the log quiet
        with contextlib.suppress(ValueError, OSError):
            hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
            resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    elif kind == "sigint":
        os.kill(parent, signal.SIGINT)
    elif kind == "sigterm":
        os.kill(parent, signal.SIGTERM)


# -- processes, descriptors, memory ------------------------------------------------------
def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(root: int, table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    """pid -> state of every process below ``root``."""
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = table[pid][1]
            todo.extend(children.get(pid, []))
    return found


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def helper_pids() -> set[int]:
    """This process's own multiprocessing helpers and children: not orphans of a driver."""
    from multiprocessing import forkserver, resource_tracker

    from autotune.backends import guardian as _guardian

    pids = {p.pid for p in mp.active_children() if p.pid}
    for pid in (
        getattr(resource_tracker._resource_tracker, "_pid", None),
        getattr(forkserver._forkserver, "_forkserver_pid", None),
        _guardian.pid,
    ):
        if pid:
            pids.add(pid)
    return pids


def adopted() -> tuple[list[int], int]:
    """Processes re-parented to us (we are a subreaper): live pids, and zombies reaped now."""
    me, ours = os.getpid(), helper_pids()
    live, reaped = [], 0
    for pid, (ppid, state) in proc_table().items():
        if ppid != me or pid in ours:
            continue
        if state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
                reaped += 1
        else:
            live.append(pid)
    return live, reaped


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Hang(Exception):
    """Raised by the watchdog timer in the middle of a run."""


def _on_alarm(signum, frame):
    raise Hang


# -- one run -------------------------------------------------------------------------------
@dataclass
class Config:
    runs: int
    mib: int
    workers: int
    chunk_len: int
    retries: int
    watchdog: float
    seed: int
    methods: list[str]

    @property
    def n(self) -> int:
        return self.mib * (1 << 20) // 8


@dataclass
class Run:
    method: str
    index: int
    fault: str
    at: int
    outcome: str = "?"  # completed | documented | wrong | undocumented | hang
    detail: str = ""
    seconds: float = 0.0
    deaths: int = 0  # workers that died and were replaced
    usable_after: bool | None = None
    zombies: int = 0
    orphans: int = 0
    shm_left: int = 0
    stderr_lines: int = 0  # parent faults: what the driver and its helpers wrote to stderr
    fds_left: int | None = 0
    reaped: int = 0  # processes orphaned by a killed driver and reaped by the campaign
    workers_exit_s: float | None = None  # SIGTERM: parent death -> last worker gone
    shm_unlinked_s: float | None = None  # SIGTERM: parent death -> segments unlinked
    extra: dict[str, Any] = field(default_factory=dict)


def worker_fault_run(cfg: Config, ctx: dict[str, Any], run: Run) -> None:
    """SIGKILL, SIGSEGV or MemoryError in a worker of an evaluator in this process."""
    me = os.getpid()
    flag = os.path.join(ctx["tmp"], f"{run.method}-{run.index}.flag")
    fds0, seg0 = open_fds(), set(list_segments(me))
    seen: set[int] = set()
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, cfg.watchdog)
    try:
        _map_with_fault(cfg, ctx, run, flag, seen)
    except Hang:
        run.outcome, run.detail = "hang", f"no answer in {cfg.watchdog} s"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    run.seconds = time.monotonic() - t0
    if run.fault != "memoryerror" and not os.path.exists(flag) and run.outcome != "hang":
        run.outcome, run.detail = "undocumented", "the fault was not injected"
    # The evaluator is dropped.  A kernel error leaves a reference cycle (the exception's
    # traceback holds the call that holds the exception) that keeps the evaluator and the
    # map output mapped until the collector runs: count those descriptors apart.
    run.extra["fds_before_gc"] = open_fds() - fds0
    gc.collect()

    def leftovers() -> tuple[int, int, int, int]:
        tree = descendants(me)
        return (
            sum(state == "Z" for state in tree.values()),
            sum(not gone(p) for p in seen),
            len(set(list_segments(me)) - seg0),
            open_fds() - fds0,
        )

    deadline = time.monotonic() + SETTLE_S
    left = leftovers()
    while any(left) and time.monotonic() < deadline:
        time.sleep(0.05)
        left = leftovers()
    run.zombies, run.orphans, run.shm_left, run.fds_left = left


def _map_with_fault(cfg: Config, ctx: dict[str, Any], run: Run, flag: str, seen: set[int]) -> None:
    shared = {"x": ctx["x"], "fault": run.fault, "at": run.at, "flag": flag, "parent": os.getpid()}
    with Evaluator(
        cfg.workers, cfg.chunk_len, shared=shared, start_method=run.method, retries=cfg.retries
    ) as ev:
        seen |= set(ev.pids)
        try:
            out = ev.map(fault_kernel, cfg.n)
        except MemoryError as exc:
            documented = run.fault == "memoryerror" and "Unable to allocate" in str(exc)
            run.outcome = "documented" if documented else "undocumented"
            run.detail = type(exc).__name__
        except Hang:
            raise
        except Exception as exc:
            run.outcome, run.detail = "undocumented", f"{type(exc).__name__}: {exc}"[:300]
        else:
            equal = np.array_equal(out, ctx["expected"])
            run.outcome = "completed" if equal else "wrong"
            if run.fault == "memoryerror":
                run.outcome, run.detail = "undocumented", "no MemoryError raised"
            del out
        seen |= set(ev.pids)
        run.deaths = len(seen) - cfg.workers
        if run.outcome == "completed":
            _index_reduce_with_fault(cfg, ctx, run, ev, flag)
            run.extra["index_deaths"] = len(seen | set(ev.pids)) - cfg.workers - run.deaths
        # The pool must still serve calls after the fault.
        small = ev.map(double, 10_000)
        run.usable_after = bool(np.array_equal(small, ctx["expected"][:10_000]))


def _index_reduce_with_fault(
    cfg: Config, ctx: dict[str, Any], run: Run, ev: Evaluator, flag: str
) -> None:
    """The same fault in a reduce of :func:`index_kernel`: the exact total, or "wrong"."""
    try:
        total = ev.reduce(index_kernel, cfg.n)
    except Hang:
        raise
    except Exception as exc:
        run.outcome, run.detail = "undocumented", f"index reduce: {type(exc).__name__}: {exc}"[:300]
        return
    if total != ctx["index_total"]:
        run.outcome, run.detail = "wrong", f"index reduce gave {total}, serial {ctx['index_total']}"
    elif not os.path.exists(flag + ".index"):
        run.outcome, run.detail = "undocumented", "the fault was not injected in the index reduce"


def parent_fault_run(cfg: Config, ctx: dict[str, Any], run: Run) -> None:
    """SIGINT or SIGTERM to the parent, which is a driver process started for this run."""
    tmp = ctx["tmp"]
    flag = os.path.join(tmp, f"{run.method}-{run.index}.flag")
    spec = {
        "method": run.method,
        "fault": run.fault,
        "at": run.at,
        "flag": flag,
        "n": cfg.n,
        "workers": cfg.workers,
        "chunk_len": cfg.chunk_len,
        "retries": cfg.retries,
        "watchdog": cfg.watchdog,
        "seed": cfg.seed,
    }
    out_path = os.path.join(tmp, f"driver-{run.method}-{run.index}.out")
    err_path = os.path.join(tmp, f"driver-{run.method}-{run.index}.err")
    # Files, not pipes: the workers inherit the driver's stdout and stderr, and a pipe read
    # to its end would wait for them too.
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--driver", json.dumps(spec)],
            stdout=out,
            stderr=err,
        )
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=cfg.watchdog + 30)  # + the driver's own start-up
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
        run.outcome, run.detail = "hang", f"the driver did not end in {cfg.watchdog + 30} s"
    died = time.monotonic()
    run.seconds = died - t0
    with open(out_path) as fh:
        lines = [json.loads(line) for line in fh if line[:1] == "{"]
    start = lines[0] if lines else {}
    report = lines[1] if len(lines) > 1 else {}
    workers = start.get("workers", [])
    run.extra = {"exit": code, **{k: v for k, v in report.items() if k != "workers"}}

    # The driver is gone: its workers must follow, and its segments must be unlinked (by
    # the driver itself after SIGINT, by its segment guardian after SIGTERM).
    deadline = died + (cfg.watchdog if run.fault == "sigterm" else SETTLE_S)
    while time.monotonic() < deadline:
        now = time.monotonic()
        if run.workers_exit_s is None and all(gone(p) for p in workers):
            run.workers_exit_s = now - died
        if run.shm_unlinked_s is None and not list_segments(proc.pid):
            run.shm_unlinked_s = now - died
        live, reaped = adopted()
        run.reaped += reaped
        if run.workers_exit_s is not None and run.shm_unlinked_s is not None and not live:
            break
        time.sleep(0.02)
    live, reaped = adopted()
    run.reaped += reaped
    run.orphans = len(live) + sum(not gone(p) for p in workers if p not in live)
    run.shm_left = len(list_segments(proc.pid))
    for pid in live:  # leave nothing running for the next run, but count it
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    # Everything that shared the driver's stderr is gone (or was just killed): it is whole.
    with open(err_path, errors="replace") as fh:
        stderr = fh.read()
    run.stderr_lines = len(stderr.splitlines())
    if run.outcome == "hang":
        pass
    elif not os.path.exists(flag):
        run.outcome, run.detail = "undocumented", "the fault was not injected"
    elif run.fault == "sigint":
        run.zombies = report.get("zombies", 0)
        run.fds_left = report.get("fds_left")
        run.extra["fds_before_gc"] = report.get("fds_before_gc")
        if report.get("outcome") == "interrupted":
            ok = report.get("workers_gone") and not report.get("segments")
            run.outcome = "documented" if ok and code == 0 else "undocumented"
            run.detail = "" if ok else json.dumps(report)[:300]
        elif report.get("outcome") == "completed":
            run.outcome = "completed" if report.get("equal") else "wrong"
        elif report.get("outcome") == "hang":
            run.outcome, run.detail = "hang", "the driver's watchdog fired"
        else:
            run.outcome, run.detail = "undocumented", f"exit {code}: {json.dumps(report)[:300]}"
    else:
        run.fds_left = None  # the process is gone; nothing to count
        killed = code == -signal.SIGTERM
        cleaned = run.workers_exit_s is not None and run.shm_unlinked_s is not None
        run.outcome = "documented" if killed and cleaned else "undocumented"
        if not killed:
            run.detail = f"the driver ended with exit status {code}, not SIGTERM"
        elif not cleaned:
            run.detail = f"workers or segments still there {cfg.watchdog} s after SIGTERM"
    if run.outcome not in ("completed", "documented") or run.stderr_lines:
        run.detail += " | driver stderr: " + " ".join(stderr.split())[-300:]


def driver(spec: dict[str, Any]) -> int:
    """The parent of a parent-fault run: print worker pids, map, report what is left."""
    from multiprocessing import forkserver, resource_tracker

    from autotune.backends import guardian as _guardian

    me = os.getpid()
    # A shell starts background jobs with SIGINT ignored, and Python then never installs
    # its KeyboardInterrupt handler: the SIGINT runs would test nothing.  Ctrl-C is what
    # this driver stands in for, so it gets Python's usual handler whatever started it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Start the helpers first, so that their descriptors are not counted as leaks.
    resource_tracker.ensure_running()
    _guardian.ensure_running()
    if spec["method"] == "forkserver":
        forkserver.ensure_running()
    x = np.random.default_rng(spec["seed"]).random(spec["n"])
    fds0 = open_fds()
    signal.signal(signal.SIGALRM, _on_alarm)
    pids: list[int] = []
    signal.setitimer(signal.ITIMER_REAL, spec["watchdog"])
    try:
        report = _driver_map(spec, x, pids)
    except KeyboardInterrupt:
        report = {"outcome": "interrupted"}
    except Hang:
        report = {"outcome": "hang"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    # After KeyboardInterrupt the evaluator has closed itself: nothing may be left.
    report["workers_gone"] = all(gone(p) for p in pids)
    report["segments"] = list_segments(me)
    report["zombies"] = sum(state == "Z" for state in descendants(me).values())
    report["fds_before_gc"] = open_fds() - fds0
    gc.collect()
    report["fds_left"] = open_fds() - fds0
    print(json.dumps(report), flush=True)
    return 0


def _driver_map(spec: dict[str, Any], x: np.ndarray, pids: list[int]) -> dict[str, Any]:
    shared = {
        "x": x,
        "fault": spec["fault"],
        "at": spec["at"],
        "flag": spec["flag"],
        "parent": os.getpid(),
    }
    with Evaluator(
        spec["workers"],
        spec["chunk_len"],
        shared=shared,
        start_method=spec["method"],
        retries=spec["retries"],
    ) as ev:
        pids.extend(ev.pids)
        print(json.dumps({"pid": os.getpid(), "workers": pids}), flush=True)
        out = ev.map(fault_kernel, spec["n"])
        return {"outcome": "completed", "equal": bool(np.array_equal(out, x * 2.0))}


# -- the campaign ----------------------------------------------------------------------------
def plan(cfg: Config, method: str, rng: random.Random) -> list[Run]:
    """Faults balanced over the runs, in random order; each fault gets chunk 0 and the last."""
    chunks = -(-cfg.n // cfg.chunk_len)
    faults = [FAULTS[i % len(FAULTS)] for i in range(cfg.runs)]
    rng.shuffle(faults)
    runs, count = [], {f: 0 for f in FAULTS}
    for i, fault in enumerate(faults):
        k = {0: 0, 1: chunks - 1}.get(count[fault], rng.randrange(chunks))
        count[fault] += 1
        at = min(cfg.n - 1, k * cfg.chunk_len + rng.randrange(cfg.chunk_len))
        runs.append(Run(method, i, fault, at))
    return runs


def campaign(cfg: Config) -> dict[str, Any]:
    subreaper = become_subreaper()
    signal.signal(signal.SIGALRM, _on_alarm)
    rng = random.Random(cfg.seed)
    x = np.random.default_rng(cfg.seed).random(cfg.n)
    ctx: dict[str, Any] = {"x": x, "expected": x * 2.0, "index_total": index_moments(0, cfg.n)}
    records: list[Run] = []
    elapsed: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="autotune-faults-") as tmp:
        ctx["tmp"] = tmp
        for method in cfg.methods:
            # Start the resource tracker (and forkserver) before counting descriptors.
            with Evaluator(1, 1000, shared={"x": x[:1000]}, start_method=method) as ev:
                ev.map(double, 1000)
            t0 = time.monotonic()
            for run in plan(cfg, method, rng):
                if run.fault in WORKER_FAULTS:
                    worker_fault_run(cfg, ctx, run)
                else:
                    parent_fault_run(cfg, ctx, run)
                records.append(run)
            elapsed[method] = time.monotonic() - t0
    return {
        "config": {**asdict(cfg), "n": cfg.n, "subreaper": subreaper, "python": sys.version},
        "elapsed_s": elapsed,
        "summary": summarize(cfg, records),
        "runs": [asdict(r) for r in records],
    }


COUNTS = ("runs", "completed", "documented", "wrong", "undocumented", "hangs")
LEAKS = ("zombies", "orphans", "shm_left", "fds_left", "stderr_lines")


def _tally(runs: list[Run]) -> dict[str, int]:
    return {
        "runs": len(runs),
        "completed": sum(r.outcome == "completed" for r in runs),
        "documented": sum(r.outcome == "documented" for r in runs),
        "wrong": sum(r.outcome == "wrong" for r in runs),
        "undocumented": sum(r.outcome == "undocumented" for r in runs),
        "hangs": sum(r.outcome == "hang" for r in runs),
        "zombies": sum(r.zombies for r in runs),
        "orphans": sum(r.orphans for r in runs),
        "shm_left": sum(r.shm_left for r in runs),
        "fds_left": sum(abs(r.fds_left or 0) for r in runs),
        "stderr_lines": sum(r.stderr_lines for r in runs),
        "not_usable_after": sum(r.usable_after is False for r in runs),
    }


def summarize(cfg: Config, records: list[Run]) -> dict[str, Any]:
    by_method = {m: _tally([r for r in records if r.method == m]) for m in cfg.methods}
    by_fault = {f: _tally([r for r in records if r.fault == f]) for f in FAULTS}
    total = _tally(records)
    killed = [r for r in records if r.fault in ("sigkill", "sigsegv")]
    term = [r for r in records if r.fault == "sigterm" and r.outcome == "documented"]
    extra = {
        "killed_runs": len(killed),
        "killed_completed_equal": sum(r.outcome == "completed" for r in killed),
        "max_deaths_per_killed_run": max((r.deaths for r in killed), default=0),
        # The second call of a killed run: an index-only reduce, killed again.
        "index_reduce_deaths": sum(r.extra.get("index_deaths", 0) for r in killed),
        "max_sigterm_workers_exit_s": max((r.workers_exit_s or 0 for r in term), default=None),
        "max_sigterm_shm_unlinked_s": max((r.shm_unlinked_s or 0 for r in term), default=None),
        "reaped_after_parent_death": sum(r.reaped for r in records),
        "fds_before_gc": {
            f: sum(r.extra.get("fds_before_gc") or 0 for r in records if r.fault == f)
            for f in FAULTS
            if f != "sigterm"
        },
    }
    passed = (
        total["wrong"] == total["undocumented"] == total["hangs"] == 0
        and all(total[k] == 0 for k in LEAKS)
        and total["not_usable_after"] == 0
        and extra["killed_completed_equal"] == extra["killed_runs"]
        and extra["max_deaths_per_killed_run"] <= cfg.retries
        and extra["index_reduce_deaths"] >= extra["killed_runs"]
    )
    failures = [asdict(r) for r in records if _failed(r)]
    return {
        "total": total,
        "by_method": by_method,
        "by_fault": by_fault,
        **extra,
        "pass": passed,
        "failures": failures,
    }


def _failed(r: Run) -> bool:
    bad_outcome = r.outcome not in ("completed", "documented")
    leaks = (
        r.zombies
        or r.orphans
        or r.shm_left
        or (r.fds_left or 0)
        or r.stderr_lines
        or r.usable_after is False
    )
    return bool(bad_outcome or leaks)


def print_campaign(result: dict[str, Any]) -> None:
    cfg, s = result["config"], result["summary"]
    print(
        f"fault campaign: {cfg['runs']} runs per start method, {cfg['mib']} MiB shared array "
        f"({cfg['n']} float64), {cfg['workers']} workers, chunk_len {cfg['chunk_len']}, "
        f"retries {cfg['retries']}, watchdog {cfg['watchdog']:g} s, seed {cfg['seed']}"
    )
    print(f"python {cfg['python'].split()[0]}, subreaper {'on' if cfg['subreaper'] else 'off'}")
    cols = (*COUNTS, *LEAKS)
    head = f"{'':12}" + "".join(f"{c:>13}" for c in cols) + f"{'seconds':>10}"
    print("\n" + head)
    for method, t in s["by_method"].items():
        row = "".join(f"{t[c]:>13}" for c in cols)
        print(f"{method:12}{row}{result['elapsed_s'][method]:>10.1f}")
    print(f"{'total':12}" + "".join(f"{s['total'][c]:>13}" for c in cols))
    print(f"\n{'by fault':12}" + "".join(f"{c:>13}" for c in cols))
    for fault, t in s["by_fault"].items():
        print(f"{fault:12}" + "".join(f"{t[c]:>13}" for c in cols))
    print()
    print(
        f"killed workers (SIGKILL, SIGSEGV): {s['killed_completed_equal']} of {s['killed_runs']} "
        f"runs completed with a result equal to serial; at most {s['max_deaths_per_killed_run']} "
        f"worker death(s) per run (retries {cfg['retries']}); then an index-only reduce, "
        f"{s['index_reduce_deaths']} worker(s) killed in it, equal to serial (no item run "
        f"twice or never)"
    )
    print(
        f"MemoryError: {s['by_fault']['memoryerror']['documented']} of "
        f"{s['by_fault']['memoryerror']['runs']} runs raised it in the parent; evaluator usable "
        f"afterwards in every run: {s['total']['not_usable_after'] == 0}"
    )
    print(
        f"SIGINT: {s['by_fault']['sigint']['documented']} of {s['by_fault']['sigint']['runs']} "
        f"runs raised KeyboardInterrupt with the workers ended and the segments unlinked"
    )
    if s["max_sigterm_workers_exit_s"] is not None:
        print(
            f"SIGTERM: no handler, the parent is killed; {s['by_fault']['sigterm']['documented']} "
            f"of {s['by_fault']['sigterm']['runs']} runs: workers exited on pipe EOF within "
            f"{s['max_sigterm_workers_exit_s']:.2f} s, the segment guardian unlinked the "
            f"segments within {s['max_sigterm_shm_unlinked_s']:.2f} s (max over runs)"
        )
    print(
        f"processes orphaned by a killed parent, reaped by the campaign: "
        f"{s['reaped_after_parent_death']}"
    )
    print(
        "descriptors open after the run until gc.collect() (a reference cycle keeps the "
        "evaluator's mappings alive): "
        + ", ".join(f"{f} {n}" for f, n in s["fds_before_gc"].items())
    )
    for f in s["failures"][:20]:
        print(
            f"FAILED {f['method']} run {f['index']} {f['fault']} at {f['at']}: {f['outcome']} "
            f"{f['detail']} zombies={f['zombies']} orphans={f['orphans']} "
            f"shm_left={f['shm_left']} fds_left={f['fds_left']} "
            f"stderr_lines={f['stderr_lines']}"
        )
    print(
        f"\nverdict: {'PASS' if s['pass'] else 'FAIL'} (targets: 0 hangs, 0 zombies, "
        f"0 leaked segments, 0 wrong results, 0 orphans, 0 fds, 0 stderr lines after a parent "
        f"fault; killed runs all complete)"
    )


# -- the soak ------------------------------------------------------------------------------
def soak(args: argparse.Namespace) -> dict[str, Any]:
    """One evaluator per start method, ``calls`` maps; fds, processes, RSS sampled."""
    me = os.getpid()
    n = args.soak_mib * (1 << 20) // 8
    x = np.random.default_rng(args.seed).random(n)
    expected = x * 2.0
    results = {}
    for method in args.methods:
        samples = []
        with Evaluator(args.workers, args.chunk_len, shared={"x": x}, start_method=method) as ev:
            for i in range(1, args.calls + 1):
                out = ev.map(double, n)
                if i % args.every:
                    del out
                    continue
                equal = bool(np.array_equal(out, expected))
                del out
                table = proc_table()
                tree = descendants(me, table)
                samples.append(
                    {
                        "call": i,
                        "fds": open_fds(),
                        "children": sum(
                            1 for p, st in tree.items() if table[p][0] == me and st != "Z"
                        ),
                        "processes": sum(st != "Z" for st in tree.values()),
                        "workers_alive": sum(not gone(p) for p in ev.pids),
                        "zombies": sum(st == "Z" for st in tree.values()),
                        "rss_kib": rss_kib(),
                        "shm": len(list_segments(me)),
                        "equal": equal,
                    }
                )
        first = samples[1] if len(samples) > 1 else samples[0]
        growth = samples[-1]["rss_kib"] - first["rss_kib"]
        flat = all(
            len({s[k] for s in samples}) == 1
            for k in ("fds", "children", "processes", "workers_alive", "shm")
        )
        ok = (
            flat
            and all(s["zombies"] == 0 and s["equal"] for s in samples)
            and growth < args.rss_noise_kib
        )
        results[method] = {"samples": samples, "rss_growth_kib": growth, "flat": ok}
    return {
        "config": {
            "calls": args.calls,
            "every": args.every,
            "mib": args.soak_mib,
            "n": n,
            "workers": args.workers,
            "chunk_len": args.chunk_len,
            "rss_noise_kib": args.rss_noise_kib,
        },
        "methods": results,
        "pass": all(r["flat"] for r in results.values()),
    }


def print_soak(result: dict[str, Any]) -> None:
    c = result["config"]
    print(
        f"soak: {c['calls']} map calls of {c['mib']} MiB ({c['n']} float64) on one evaluator "
        f"per start method, {c['workers']} workers, chunk_len {c['chunk_len']}; "
        f"sampled every {c['every']} calls"
    )
    keys = ("call", "fds", "children", "processes", "workers_alive", "zombies", "rss_kib", "shm")
    for method, r in result["methods"].items():
        print(f"\n{method}")
        print("".join(f"{k:>14}" for k in keys) + f"{'equal':>8}")
        for s in r["samples"]:
            print("".join(f"{s[k]:>14}" for k in keys) + f"{s['equal']!s:>8}")
        print(
            f"RSS growth from call {r['samples'][min(1, len(r['samples']) - 1)]['call']} to the "
            f"end: {r['rss_growth_kib']} KiB (noise allowance {c['rss_noise_kib']} KiB); "
            f"flat: {r['flat']}"
        )
    print(
        f"\nverdict: {'PASS' if result['pass'] else 'FAIL'} (fds, children, processes, workers "
        f"and segments constant; no zombies; results equal to serial; RSS flat)"
    )


# -- command line ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="runs per start method")
    parser.add_argument("--quick", action="store_true", help="10 runs per method, 16 MiB")
    parser.add_argument("--mib", type=int, default=64, help="size of the shared array")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-len", type=int, default=65536, help="items per chunk")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--watchdog", type=float, default=30.0, help="seconds before a hang")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(START_METHODS))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--soak", action="store_true", help="run the soak instead")
    parser.add_argument("--calls", type=int, default=1000, help="soak: map calls")
    parser.add_argument("--every", type=int, default=100, help="soak: sample interval")
    parser.add_argument("--soak-mib", type=int, default=8, help="soak: size of the array")
    parser.add_argument("--rss-noise-kib", type=int, default=8192, help="soak: RSS allowance")
    parser.add_argument("--driver", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver:
        return driver(json.loads(args.driver))
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(START_METHODS)
    if unknown:
        parser.error(f"--methods: unknown or unavailable {sorted(unknown)}")
    if args.soak:
        result = soak(args)
        print(json.dumps(result, indent=1)) if args.json else print_soak(result)
        return 0 if result["pass"] else 1
    if args.quick:
        args.runs, args.mib = 10, 16
    cfg = Config(
        runs=args.runs,
        mib=args.mib,
        workers=args.workers,
        chunk_len=args.chunk_len,
        retries=args.retries,
        watchdog=args.watchdog,
        seed=args.seed,
        methods=args.methods,
    )
    result = campaign(cfg)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_campaign(result)
    return 0 if result["summary"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
