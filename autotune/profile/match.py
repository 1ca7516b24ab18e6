"""Which profile fits which CPU (pure): CPU sections, mismatches, picking."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autotune._util import LOCAL_BACKENDS, format_bytes
from autotune.cpu import CpuInfo
from autotune.profile.model import Measurement, Profile, gil_enabled
from autotune.profile.validate import SOURCES

__all__ = [
    "ClusterInfo",
    "cluster_mismatch",
    "cluster_section",
    "cpu_mismatch",
    "cpu_section",
    "is_unchunked",
    "pick_profile",
    "same_brand",
    "size_text",
    "unusable_reason",
]


def cpu_section(cpu: CpuInfo) -> dict[str, Any]:
    """The ``cpu:`` section of a profile made on ``cpu``."""
    return {
        "brand": cpu.brand,
        "fingerprint": cpu.fingerprint,
        "logical_cpus": cpu.logical_cpus,
        "physical_cores": cpu.physical_cores,
        "caches": {"l1d": cpu.l1d, "l2": cpu.l2, "l3": cpu.l3},
    }


def size_text(b: int | None) -> str:
    return "?" if b is None else format_bytes(b)


def _describe(logical: Any, physical: Any, l1d: Any, l2: Any, l3: Any) -> str:
    return (
        f"{logical if logical is not None else '?'} logical / "
        f"{physical if physical is not None else '?'} physical, "
        f"L1d {size_text(l1d)}, L2 {size_text(l2)}, L3 {size_text(l3)}"
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


def same_brand(section: Mapping[str, Any], cpu: CpuInfo) -> bool:
    theirs = _norm_brand(section.get("brand"))
    return theirs is not None and theirs == _norm_brand(cpu.brand)


def unusable_reason(
    profile: Profile, cpu: CpuInfo | None, backend: str, any_cpu: bool
) -> str | None:
    """Why ``profile`` must not be handed out for ``cpu``; ``None`` if it may.

    ``cpu`` may be None only with ``any_cpu``: then only the backend is checked.
    """
    allowed = LOCAL_BACKENDS if backend == "local" else (backend,)
    if profile.backend not in allowed:
        wanted = "a local one (processes or threads)" if backend == "local" else repr(backend)
        return f"measured with backend {profile.backend!r}, not {wanted}"
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
    # backend (autotune.backends.dask.runner.load_cluster_profile).
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
        (not same_brand(p.cpu, cpu), _SOURCE_RANK.get(p.source, len(SOURCES)), i, p)
        for i, p in enumerate(candidates)
        if unusable_reason(p, cpu, backend, any_cpu=False) is None
    ]
    return min(fitting, key=lambda t: t[:3])[3] if fitting else None


def is_unchunked(m: Measurement, n: int | None) -> bool:
    """Whether ``m`` ran without chunking: no worker got more than one chunk.

    That is how a profile encodes the seed's "unlimited" column: the serial
    point is ``workers: 1, chunk_len: n``.  Unknown ``n``: ``False``.
    """
    return n is not None and m.chunk_len * m.workers >= n


# -- Dask clusters -------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterInfo:
    """What :func:`describe_cluster` found.

    Attributes
    ----------
    section : dict
        The profile's ``cpu`` section for this cluster (see :func:`cluster_section`).
    cpus : tuple of CpuInfo
        Each worker's probe, in the order of ``section["worker_probes"]``.
    threads : int
        Worker threads in all.
    """

    section: dict[str, Any]
    cpus: tuple[CpuInfo, ...]
    threads: int

    @property
    def cpu(self) -> CpuInfo:
        """The first worker's CPU: what chunk sizes and profile matching go by."""
        return self.cpus[0]


def cluster_section(workers: list[tuple[str, int]], cpus: tuple[CpuInfo, ...]) -> dict[str, Any]:
    """A profile's ``cpu`` section for a Dask cluster.

    The usual keys (brand, topology, caches) describe the first worker's
    machine, so a profile is matched like a local one; ``dask_workers``,
    ``threads``, ``threads_per_worker`` (null when workers differ) and
    ``worker_probes`` (each worker's address, threads and CPU) describe the
    cluster.
    """
    probes: list[dict[str, Any]] = []
    for (address, threads), cpu in zip(workers, cpus, strict=True):
        probes.append(
            {
                "address": address,
                "nthreads": threads,
                "brand": cpu.brand,
                "fingerprint": cpu.fingerprint,
                "logical_cpus": cpu.logical_cpus,
                "physical_cores": cpu.physical_cores,
                "usable_cpus": cpu.usable_cpus,
                "caches": {"l1d": cpu.l1d, "l2": cpu.l2, "l3": cpu.l3},
            }
        )
    per_worker = {t for _, t in workers}
    first = probes[0]
    return {
        "brand": first["brand"],
        "fingerprint": _cluster_fingerprint(probes),
        "logical_cpus": first["logical_cpus"],
        "physical_cores": first["physical_cores"],
        "caches": dict(first["caches"]),
        "dask_workers": len(probes),
        "threads": sum(t for _, t in workers),
        "threads_per_worker": per_worker.pop() if len(per_worker) == 1 else None,
        "worker_probes": probes,
    }


def _shape(section: Mapping[str, Any]) -> list[Any]:
    """What must be equal for two clusters to count as the same (addresses are not)."""
    probes = section.get("worker_probes") or []
    return sorted([p.get("nthreads"), p.get("fingerprint")] for p in probes)


def _cluster_fingerprint(probes: list[dict[str, Any]]) -> str:
    key = json.dumps(_shape({"worker_probes": probes}), sort_keys=True)
    return "dask-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def cluster_mismatch(section: Mapping[str, Any], info: ClusterInfo) -> str | None:
    """Why a profile's cluster is not the connected one (``None``: same shape)."""
    if _shape(section) == _shape(info.section):
        return None

    def describe(s: Mapping[str, Any]) -> str:
        per = s.get("threads_per_worker")
        return f"{s.get('dask_workers', '?')} workers x {per if per else 'mixed'} threads"

    return (
        f"measured on a Dask cluster of {describe(section)} ({section.get('fingerprint')}), "
        f"this one has {describe(info.section)} ({info.section['fingerprint']})"
    )
