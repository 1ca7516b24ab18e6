"""Where an evaluator's settings come from: arguments, a profile, the heuristic.

An explicit ``workers``/``chunk_len`` wins; else a profile (a ``Profile``, a
file, or a name looked up with :func:`autotune.load_profile`, or a Dask
cluster's); else the heuristic from the probe.  Whether the evaluator adapts
follows from where they came from (:func:`resolve_adapt`; docs/design.md,
"Where an evaluator's settings come from").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import warnings
from dataclasses import dataclass
from typing import Any

from autotune._errors import ProfileWarning
from autotune._util import BACKENDS, check_int, positive_int
from autotune.backends.dask.cluster import load_cluster_profile
from autotune.backends.schedule import EXACT, GUESSED, MEASURED, ChunkPlan
from autotune.cpu import CpuInfo, probe
from autotune.cpu.memory import available_memory
from autotune.profile import Profile, heuristic_profile, load_profile

__all__ = [
    "Settings",
    "check_memory",
    "checked_start_method",
    "default_start_method",
    "heuristic_settings",
    "looks_like_path",
    "resolve_adapt",
    "resolve_profile",
    "resolve_settings",
    "settings_from",
]


@dataclass(frozen=True)
class Settings:
    """An evaluator's settings, resolved once (``ev.settings``), and where they came from.

    Attributes
    ----------
    backend : str
    workers : int or None
        The pool's workers (None: a Dask cluster's, known once connected).
    chunk_len : int
        The chunk length asked of each call (see ``chunk_source``).
    chunk_source : str
        Where it came from, which decides how a call may change it:
        ``"exact"`` (given), ``"measured"`` (a profile) or ``"guessed"``
        (the heuristic); see :func:`autotune.backends.schedule.plan_chunks`.
    adapt : bool
        Whether the evaluator refines its settings with its calls.
    profile : Profile or None
        The profile used, if any (the heuristic's stand-in included).
    profile_name : str or None
        The name online profiles are saved under (``profile="name"``).
    cpu : CpuInfo or None
        The probe, when the heuristic or the refinement needed it.
    start_method : str
        Of the processes backend.
    blas_threads : int or None
    pin : bool
    retries : int
    item_bytes : int or None
        As given (else inferred per kernel while adapting).
    """

    backend: str
    workers: int | None
    chunk_len: int
    chunk_source: str
    adapt: bool
    profile: Profile | None
    profile_name: str | None
    cpu: CpuInfo | None
    start_method: str
    blas_threads: int | None
    pin: bool
    retries: int
    item_bytes: int | None


def default_start_method() -> str:
    """``"fork"`` where the platform has it, else ``"spawn"``.

    Chosen explicitly, never Python's default: that is forkserver on Linux
    from 3.14 and spawn on macOS.  fork is the cheapest way to share data
    read-only, and the workers are started before any thread of ours.
    """
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def checked_start_method(start_method: str | None) -> str:
    method = start_method or default_start_method()
    if method not in mp.get_all_start_methods():
        raise ValueError(
            f"start_method must be one of {', '.join(mp.get_all_start_methods())}; "
            f"got {start_method!r}"
        )
    return method


def settings_from(
    profile: Profile, workers: int | None, chunk_len: int | None, backend: str | None
) -> tuple[int | None, int | None, str | None, bool]:
    """Workers, chunk length and backend from a profile where not given, and whether
    the profile is only the heuristic (then the evaluator chunks as with no profile).

    Taking 1 worker from a profile whose verdict is in doubt
    (:attr:`~autotune.profile.Profile.doubts`: measured while other processes
    held CPUs, or its best slower than serial) gives a ``ProfileWarning``.
    """
    if profile.source == "heuristic" and profile.backend != "dask":
        return workers, chunk_len, backend, True
    if workers is None and profile.workers == 1 and profile.doubts:
        # One worker is the verdict most easily faked by a busy machine (the
        # other workers' CPUs were taken) and the costliest to adopt: say why
        # it is in doubt before running every call at serial speed.
        warnings.warn(
            f"profile {profile.path or profile.workload!r} says 1 worker, but "
            f"{'; and '.join(profile.doubts)}; more workers may be faster on a quiet "
            f"machine: search again there (autotune search), or pass workers=",
            ProfileWarning,
            stacklevel=4,  # the user's line that made the Evaluator
        )
    return (
        workers or profile.workers,
        chunk_len or profile.chunk_len,
        backend or profile.backend,  # run what was measured fastest
        False,
    )


def heuristic_settings(
    cpu: CpuInfo,
    workers: int | None,
    chunk_len: int | None,
    backend: str,
    item_bytes: int | None,
) -> tuple[int | None, int]:
    """The heuristic's workers and chunk length where not given (dask: tasks in
    flight come from the cluster)."""
    guess = heuristic_profile(cpu, "default", item_bytes)
    if backend != "dask":
        workers = workers or guess.workers
    return workers, chunk_len or guess.chunk_len


def resolve_adapt(
    adapt: bool | None, backend: str, explicit: bool, profile: Profile | None
) -> bool:
    """Whether an evaluator refines its settings online (see ``Evaluator(adapt=...)``)."""
    if backend == "dask":
        if adapt:
            raise ValueError(
                "adapt=True is not supported with backend='dask': tune a cluster with "
                "`autotune search --backend dask --scheduler ADDRESS` and pass its profile"
            )
        return False
    if adapt is not None:
        return adapt
    measured = profile is not None and profile.source in ("measured", "published")
    return not explicit and not measured


def looks_like_path(text: str) -> bool:
    """A profile argument naming a file rather than a workload."""
    return os.sep in text or "/" in text or text.endswith((".yaml", ".yml"))


def resolve_profile(
    profile: Any, backend: str | None = None, cluster: Any = None, item_bytes: int | None = None
) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, os.PathLike) or (isinstance(profile, str) and looks_like_path(profile)):
        # A file named explicitly: used as it is, or a ProfileError says why not
        # (another CPU, another backend); never replaced by the heuristic.
        workload = Profile.load(profile).workload
        return load_profile(workload, profile, backend=backend or "local")
    if isinstance(profile, str):
        if backend == "dask" and cluster is not None:
            # Matched to the cluster's workers, never to a local profile.
            return load_cluster_profile(profile, cluster)
        return load_profile(profile, item_bytes=item_bytes, backend=backend or "local")
    raise TypeError(
        f"profile must be a Profile, a path to a profile file or a workload name, "
        f"got {type(profile).__name__}"
    )


def check_memory(plan: ChunkPlan, item_bytes: int, stacklevel: int = 4) -> None:
    """Warn when the chunks of ``plan`` in progress at once would not fit the memory left.

    ``stacklevel`` (as ``warnings.warn`` counts it from here) points the
    warning at the user's line that made the call.
    """
    chunk_len = min(plan.chunk_len, plan.n)
    workers = min(plan.workers, plan.chunks)
    need = chunk_len * item_bytes * workers
    room = available_memory()
    if room is not None and need > room:
        warnings.warn(
            f"chunk_len {chunk_len} x item_bytes {item_bytes} x {workers} workers = "
            f"{need} bytes in flight, more than the {room} bytes of memory available "
            f"(MemAvailable, cgroup memory.max); pass a smaller chunk_len or fewer workers",
            RuntimeWarning,  # shown by default, unlike ResourceWarning
            stacklevel=stacklevel,
        )


def resolve_settings(
    workers: Any,
    chunk_len: Any,
    *,
    profile: Any,
    start_method: str | None,
    blas_threads: Any,
    pin: bool,
    retries: Any,
    backend: str | None,
    cluster: Any,
    adapt: Any,
    item_bytes: Any,
) -> Settings:
    """``Evaluator``'s arguments checked (one-line errors naming the argument) and
    resolved: explicit values first, then the profile's, then the heuristic's."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if adapt not in (None, True, False):
        raise TypeError(f"adapt must be None, True or False, got {adapt!r}")
    workers = positive_int("workers", workers)
    chunk_len = explicit_chunk_len = positive_int("chunk_len", chunk_len)
    explicit = workers is not None or chunk_len is not None
    blas_threads = positive_int("blas_threads", blas_threads)
    item_bytes = positive_int("item_bytes", item_bytes)
    retries = check_int("retries", retries, minimum=0)
    method = checked_start_method(start_method)

    found = None
    from_heuristic = False  # the chunk comes from the probe's rule, not a measurement
    if profile is not None and (workers is None or chunk_len is None or backend is None):
        found = resolve_profile(profile, backend, cluster, item_bytes)
        workers, chunk_len, backend, from_heuristic = settings_from(
            found, workers, chunk_len, backend
        )
    backend = backend or "processes"
    if pin and backend != "processes":
        raise ValueError("pin=True needs backend='processes'")
    if backend != "dask" and cluster is not None:
        raise ValueError("client= and address= are for backend='dask'")
    adapting = resolve_adapt(adapt, backend, explicit, found)
    source = (
        EXACT
        if explicit_chunk_len is not None
        else GUESSED
        if chunk_len is None or from_heuristic
        else MEASURED
    )
    cpu = probe() if workers is None or chunk_len is None or adapting else None
    if workers is None or chunk_len is None:
        assert cpu is not None
        workers, chunk_len = heuristic_settings(cpu, workers, chunk_len, backend, item_bytes)
    return Settings(
        backend=backend,
        workers=workers,
        chunk_len=chunk_len,
        chunk_source=source,
        adapt=adapting,
        profile=found,
        # Online profiles are saved under the name given (else the kernel's).
        profile_name=profile if isinstance(profile, str) and not looks_like_path(profile) else None,
        cpu=cpu,
        start_method=method,
        blas_threads=blas_threads,
        pin=bool(pin),
        retries=retries,
        item_bytes=item_bytes,
    )
