"""Profiles the evaluator learned while it worked (``source: online``).

An evaluator that tunes itself (:mod:`autotune.adapt`) saves what it
measured here, so that the next process with the same kernel on the same
CPU goes on from it: settled, it starts settled; still exploring
(``exploring: true``), it continues the exploration where the last one
stopped.  A script that makes one evaluator and a few calls, run again and
again, converges over its runs.  The file is a schema-1 profile like any
other, found by the same lookup (``$AUTOTUNE_PROFILE_DIR`` first, then the
user's config directory), matched to the CPU the same way; each
measurement lists its latest :data:`STORED_RUNS` runs (``runs``, items per
second), and ``repeats``, ``throughput`` and ``spread`` describe those.

Saving merges (:func:`save_learned`): under a lock on the directory, the
file is read again and each point's runs made by this evaluator since it
last saved are appended to the file's, the oldest dropped past
:data:`STORED_RUNS` (so a machine that changed is followed); two processes
that finish together both count.  Writing follows :meth:`Profile.save`:
atomic (a temporary file renamed over the old one), never a torn file; a
directory that cannot be written (a read-only home) is a warning, once per
process and directory, never an error.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune._errors import ProfileError, ProfileWarning
from autotune._util import utc_timestamp
from autotune._version import __version__
from autotune.cpu import CpuInfo
from autotune.profile import lookup
from autotune.profile.match import cpu_mismatch, cpu_section
from autotune.profile.model import Measurement, Profile, python_build

__all__ = [
    "MAX_POINTS",
    "STORED_RUNS",
    "Learned",
    "file_slug",
    "kernel_name",
    "load_online",
    "online_dir",
    "online_path",
    "online_profile",
    "save_learned",
    "save_online",
]

#: Runs kept per point: the latest, so that older ones drop out as the
#: machine or the data change.
STORED_RUNS = 16
#: Points kept per file (the fastest, the best always among them).
MAX_POINTS = 48

_WARNED: set[str] = set()


def kernel_name(kernel: Any) -> str:
    """``module:qualname`` of a kernel: the name its online profile is saved under."""
    module = getattr(kernel, "__module__", None) or "?"
    qualname = getattr(kernel, "__qualname__", None) or type(kernel).__qualname__
    return f"{module}:{qualname}"


def file_slug(name: str) -> str:
    """``name`` as a safe file-name part (``mymod:kernel`` -> ``mymod-kernel``)."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-.")
    return slug[:80] or "kernel"


def online_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where online profiles are written: the first directory the lookup searches
    (``$AUTOTUNE_PROFILE_DIR``, else the user's).  The shipped directory, last
    in the lookup, is not looked up (finding package data imports ``zipfile``:
    1.7 ms of a new process's first call)."""
    return next(lookup.own_profile_dirs(env))[1]


def online_path(
    slug: str, cpu: CpuInfo, directory: Path | None = None, backend: str = "processes"
) -> Path:
    """``<dir>/online-<slug>-<cpu fingerprint>.yaml``: one file per kernel, CPU and backend
    (``online-<slug>-threads-<fingerprint>.yaml`` for the threads backend), so that
    evaluators of one kernel on two backends do not replace each other's file."""
    tag = "" if backend == "processes" else f"-{backend}"
    return (directory or online_dir()) / f"online-{slug}{tag}-{cpu.fingerprint}.yaml"


def online_profile(
    workload: str,
    cpu: CpuInfo,
    best: Measurement,
    measurements: Sequence[Measurement],
    *,
    backend: str,
    item_bytes: int,
    n: int,
    exploring: bool = False,
    sessions: int | None = None,
) -> Profile:
    """The profile of what an evaluator measured (``repeats``: calls per point)."""
    return Profile(
        workload=workload,
        source="online",
        cpu=cpu_section(cpu),
        best=best,
        serial_throughput=None,
        measurements=tuple(measurements),
        created=utc_timestamp(),
        autotune_version=__version__,
        item_bytes=item_bytes,
        n=n,
        backend=backend,
        python=python_build(),
        exploring=exploring,
        sessions=sessions,
    )


def load_online(
    name: str, cpu: CpuInfo, backend: str, item_bytes: int | None = None
) -> Profile | None:
    """The online profile saved for ``name`` on this CPU and backend, if one fits
    (and measured with ``item_bytes`` bytes per item, when given: the same chunk
    length of other items is another point).

    A file that cannot be read, or is not a valid profile, is a
    ``ProfileWarning`` (tune afresh), never an error.
    """
    path = online_path(file_slug(name), cpu, backend=backend)
    if not path.is_file():
        return None
    try:
        found = Profile.load(path)
    except ProfileError as exc:
        warnings.warn(
            f"online profile not used, tuning afresh: {exc}", ProfileWarning, stacklevel=6
        )
        return None
    if (
        found.source != "online"
        or found.workload != name
        or found.backend != backend
        or (item_bytes is not None and found.item_bytes not in (None, item_bytes))
        or cpu_mismatch(found.cpu, cpu) is not None
    ):
        return None
    return found


def save_online(profile: Profile, path: Path) -> bool:
    """Write ``profile`` to ``path`` atomically; warn (once per directory) when it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        profile.save(path)
        return True
    except (OSError, ProfileError) as exc:
        return _warn_unsaved(profile.workload, path, exc)


def _warn_unsaved(workload: str, path: Path, exc: Exception) -> bool:
    where = str(path.parent)
    if where not in _WARNED:
        _WARNED.add(where)
        warnings.warn(
            f"autotune could not save what it learned about {workload!r} to "
            f"{path}: {exc}; the next process will tune it again (set "
            f"AUTOTUNE_PROFILE_DIR to a writable directory to keep it)",
            ProfileWarning,
            stacklevel=4,
        )
    return False


#: A point of an online profile: ``(workers, chunk_len)``.
Key = tuple[int, int]


@dataclass(frozen=True)
class Learned:
    """What an evaluator learned of one kernel, to be saved with :func:`save_learned`.

    ``fresh``: the throughput (items per second) of each run this evaluator
    made since it last saved, per point, oldest first; ``known``: every run
    it knows of per point (those it started from included), written when
    there is no file to merge with.  ``best`` is the point it settled on, or
    its leader while ``exploring``; ``first``: this evaluator's first save
    (it counts once in ``sessions``); ``restart``: the kernel's cost changed
    since the file's runs were made (the refinement saw it drift and
    explores again), so ``known`` replaces them instead of being merged.
    """

    workload: str
    backend: str
    item_bytes: int
    n: int
    best: Key
    exploring: bool
    fresh: Mapping[Key, Sequence[float]]
    known: Mapping[Key, Sequence[float]]
    first: bool
    restart: bool = False


def save_learned(learned: Learned, cpu: CpuInfo, path: Path) -> bool:
    """Merge ``learned`` into the online profile at ``path`` (or start one); False
    when it could not be written (a warning says so, once per directory).

    Never raises: what an evaluator learned is worth keeping, never worth a
    user's result.  A valid file of another kernel (two names cut to one
    file name) is left as it is.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent):
            saved = _mergeable(path, learned, cpu)
            if saved is _FOREIGN:
                return False
            if saved is None or learned.restart:
                runs = {k: list(v) for k, v in learned.known.items()}
                sessions = 1 if saved is None else (saved.sessions or 1) + int(learned.first)
            else:
                runs = {
                    (m.workers, m.chunk_len): list(m.runs or (m.throughput,))
                    for m in saved.measurements
                    if m.throughput
                }
                for key, fresh in learned.fresh.items():
                    runs.setdefault(key, []).extend(fresh)
                sessions = (saved.sessions or 1) + int(learned.first)
            if not any(runs.values()):
                return True  # nothing measured: nothing to keep
            # Written before the lock is let go: the next save reads this one.
            return save_online(_profile_of(learned, cpu, runs, sessions), path)
    except Exception as exc:  # an OSError, or a bug of ours: a warning, not the user's error
        return _warn_unsaved(learned.workload, path, exc)


#: What :func:`_mergeable` says of a valid online profile of another kernel.
_FOREIGN = object()


def _mergeable(path: Path, learned: Learned, cpu: CpuInfo) -> Any:
    """The profile at ``path`` if it is this kernel's on this CPU and backend;
    ``_FOREIGN`` if it is another kernel's; else None (no file, a file refused
    when it was loaded, or one of another CPU or backend: replaced)."""
    if not path.is_file():
        return None
    try:
        found = Profile.load(path)
    except ProfileError:
        return None  # refused with a warning when it was loaded; replaced now
    if found.source == "online" and found.workload != learned.workload:
        return _FOREIGN
    if (
        found.source != "online"
        or found.backend != learned.backend
        or found.item_bytes not in (None, learned.item_bytes)
        or cpu_mismatch(found.cpu, cpu) is not None
    ):
        return None
    return found


def _profile_of(
    learned: Learned, cpu: CpuInfo, runs: Mapping[Key, list[float]], sessions: int
) -> Profile:
    """The online profile of ``runs`` (each point's latest :data:`STORED_RUNS` kept)."""
    points = {key: _measurement(key, r[-STORED_RUNS:], learned) for key, r in runs.items() if r}
    best = points.get(learned.best) or max(points.values(), key=lambda m: m.throughput or 0.0)
    kept = sorted(points.values(), key=lambda m: -(m.throughput or 0.0))[:MAX_POINTS]
    if best not in kept:
        kept[-1] = best
    return online_profile(
        learned.workload,
        cpu,
        best,
        sorted(kept, key=lambda m: (m.workers, m.chunk_len)),
        backend=learned.backend,
        item_bytes=learned.item_bytes,
        n=learned.n,
        exploring=learned.exploring,
        sessions=sessions,
    )


def _measurement(key: Key, runs: Sequence[float], learned: Learned) -> Measurement:
    """A point's measurement from its runs: the median and spread of their seconds per item."""
    seconds = [1.0 / t for t in runs]
    med = statistics.median(seconds)
    workers, chunk_len = key
    return Measurement(
        workers=workers,
        chunk_len=chunk_len,
        chunk_bytes=chunk_len * learned.item_bytes,
        throughput=1.0 / med,
        repeats=len(runs),
        spread=(max(seconds) - min(seconds)) / med if len(runs) > 1 else 0.0,
        backend=learned.backend,
        runs=tuple(runs),
    )


#: A save waits this long for another's lock, then saves without it (still
#: atomic; a merge may then lose the other's runs): a lock held by a stopped
#: process, or by a child forked while a save held it, must not hang a program.
LOCK_WAIT_S = 2.0


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (where the platform has ``flock``):
    the read, merge and replace of one save are not interleaved with another's.
    Waits at most :data:`LOCK_WAIT_S`; a file system without locks is not waited for."""
    try:
        import fcntl
    except ImportError:  # not POSIX: saves are still atomic, merges may race
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break  # held too long by someone else: save without it
                time.sleep(0.005)
            except OSError:
                break  # no locks here (some network and FUSE file systems)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
