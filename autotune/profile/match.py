"""Which profile fits which CPU (pure): CPU sections, mismatches, picking."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from autotune.cpu import CpuInfo
from autotune.profile.model import LOCAL_BACKENDS, SOURCES, Measurement, Profile, gil_enabled


def cpu_section(cpu: CpuInfo) -> dict[str, Any]:
    """The ``cpu:`` section of a profile made on ``cpu``."""
    return {
        "brand": cpu.brand,
        "fingerprint": cpu.fingerprint,
        "logical_cpus": cpu.logical_cpus,
        "physical_cores": cpu.physical_cores,
        "caches": {"l1d": cpu.l1d, "l2": cpu.l2, "l3": cpu.l3},
    }


def _size(b: int | None) -> str:
    if b is None:
        return "?"
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale and b % scale == 0:
            return f"{b // scale} {unit}"
    return f"{b} B"


def _describe(logical: Any, physical: Any, l1d: Any, l2: Any, l3: Any) -> str:
    return (
        f"{logical if logical is not None else '?'} logical / "
        f"{physical if physical is not None else '?'} physical, "
        f"L1d {_size(l1d)}, L2 {_size(l2)}, L3 {_size(l3)}"
    )


def cpu_mismatch(section: Mapping[str, Any], cpu: CpuInfo) -> str | None:
    """Why a profile's ``cpu`` section does not fit ``cpu``; ``None`` if it does.

    Topology (logical CPUs, physical cores) and cache sizes (L1d, L2, L3 of
    one instance) must be equal; the brand is not compared here (it only
    breaks ties, see :func:`pick_profile`).  Unknown topology or L2 on
    either side never matches: a profile is only worth using where we know
    it is the same machine shape.
    """
    caches = section.get("caches") or {}
    theirs = (
        section.get("logical_cpus"),
        section.get("physical_cores"),
        caches.get("l1d"),
        caches.get("l2"),
        caches.get("l3"),
    )
    ours = (cpu.logical_cpus, cpu.physical_cores, cpu.l1d, cpu.l2, cpu.l3)
    known = all(x is not None for x in (*theirs[:2], theirs[3], *ours[:2], ours[3]))
    if known and theirs == ours:
        return None
    return f"made on another CPU ({_describe(*theirs)}; this CPU: {_describe(*ours)})"


def _norm_brand(brand: object) -> str | None:
    return " ".join(brand.split()).casefold() if isinstance(brand, str) and brand.strip() else None


def _same_brand(section: Mapping[str, Any], cpu: CpuInfo) -> bool:
    theirs = _norm_brand(section.get("brand"))
    return theirs is not None and theirs == _norm_brand(cpu.brand)


def _unusable(profile: Profile, cpu: CpuInfo | None, backend: str, any_cpu: bool) -> str | None:
    """Why ``profile`` must not be handed out for ``cpu``; ``None`` if it may.

    ``cpu`` may be None only with ``any_cpu``: then only the backend is checked.
    """
    allowed = LOCAL_BACKENDS if backend == "local" else (backend,)
    if profile.backend not in allowed:
        return f"measured with backend {profile.backend!r}, not {backend!r}"
    build = profile.python
    if profile.backend == "threads" and build is not None and build.get("gil") != gil_enabled():

        def state(on: object) -> str:
            return "enabled" if on else "disabled"

        return (
            f"a threads profile measured with the GIL {state(build.get('gil'))}; "
            f"this Python build has it {state(gil_enabled())}"
        )
    if cpu is None:
        return None
    if not any_cpu:
        mismatch = cpu_mismatch(profile.cpu, cpu)
        if mismatch:
            return mismatch
    # A dask profile's workers are tasks in flight on a cluster, not local
    # CPUs; the cluster's shape is checked against the live one by the dask
    # backend (autotune._dask.load_cluster_profile).
    if (
        profile.backend != "dask"
        and cpu.usable_cpus is not None
        and profile.workers > cpu.usable_cpus
    ):
        # Same machine shape, but this process may use fewer CPUs (affinity,
        # a container quota): the profile's best point cannot run here.
        return f"wants {profile.workers} workers, only {cpu.usable_cpus} CPUs are usable here"
    return None


_SOURCE_RANK = {s: i for i, s in enumerate(SOURCES)}


def pick_profile(
    candidates: Sequence[Profile], cpu: CpuInfo, backend: str = "processes"
) -> Profile | None:
    """The candidate to use on ``cpu``, or ``None`` if none fits.

    Candidates that do not fit (another CPU shape, another backend, more
    workers than usable CPUs) are dropped.  Among the rest, one whose brand
    equals this CPU's wins; then measured beats published beats heuristic;
    then the earlier candidate (callers pass them in lookup order).
    """
    fitting = [
        (not _same_brand(p.cpu, cpu), _SOURCE_RANK.get(p.source, len(SOURCES)), i, p)
        for i, p in enumerate(candidates)
        if _unusable(p, cpu, backend, any_cpu=False) is None
    ]
    return min(fitting, key=lambda t: t[:3])[3] if fitting else None


def is_unchunked(m: Measurement, n: int | None) -> bool:
    """Whether ``m`` ran without chunking: no worker got more than one chunk.

    That is how a profile encodes the seed's "unlimited" column: the serial
    point is ``workers: 1, chunk_len: n``.  Unknown ``n``: ``False``.
    """
    return n is not None and m.chunk_len * m.workers >= n
