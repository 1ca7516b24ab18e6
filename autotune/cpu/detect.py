"""What this CPU is: cores, hardware threads, caches and usable CPUs.

:func:`probe` asks small readers, each reading one source, and merges their
answers in one place (:func:`_merge`), recording in ``CpuInfo.sources``
where every figure came from and in ``CpuInfo.notes`` why a figure is
missing, which assumption was made, and where two sources disagreed.

The readers, in the order they are trusted:

- Linux sysfs (``linux``): online CPUs, cores, packages, caches;
- the cgroup CPU quota and the affinity mask (``cgroup``);
- ``/proc/cpuinfo`` for the brand;
- macOS ``sysctl`` (``sysctl``), on Darwin only;
- py-cpuinfo (``pycpuinfo``), slow and faulty in known ways, asked
  only for what the others lack.

A figure nobody can give is ``None`` with a reason, never a guess.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from autotune.cpu.cgroup import cgroup_dirs_live, read_affinity, read_cgroup_limit
from autotune.cpu.common import CacheSpec, Found, Topology, format_cpu_list, read_text
from autotune.cpu.linux import read_caches, read_cpuinfo_brand, read_topology
from autotune.cpu.model import CacheLevel, CpuInfo
from autotune.cpu.pycpuinfo import (
    brand_from_pycpuinfo,
    caches_from_pycpuinfo,
    cross_check,
    load_pycpuinfo,
)
from autotune.cpu.sysctl import read_sysctl

__all__ = ["probe"]


def probe(sysfs_root: str | os.PathLike[str] | None = None) -> CpuInfo:
    """Probe this CPU, or the sysfs tree under ``sysfs_root``.

    Parameters
    ----------
    sysfs_root : str or path-like, optional
        A directory that mirrors ``/sys``: ``DIR/devices/system/cpu/...``,
        the cgroup limit at ``DIR/fs/cgroup/cpu.max`` (v2) or
        ``DIR/fs/cgroup/cpu/cpu.cfs_{quota,period}_us`` (v1), and optionally
        ``DIR/cpuinfo`` read like ``/proc/cpuinfo`` for the brand.  With a
        root everything comes from the tree: this process's affinity, py-cpuinfo
        and ``sysctl`` describe the live machine and are not used.

    Returns
    -------
    CpuInfo
        Missing figures are ``None``, with the reason in ``notes``.

    Raises
    ------
    ValueError
        When ``sysfs_root`` does not exist or has no ``devices/system/cpu``.
        Nothing else raises: unreadable or garbled files become notes.

    Examples
    --------
    >>> info = probe()
    >>> info.logical_cpus >= 1
    True
    """
    if sysfs_root is not None:
        return _probe_tree(Path(sysfs_root))
    return _probe_live(sys.platform)


def _probe_tree(root: Path) -> CpuInfo:
    cpu_dir = root / "devices" / "system" / "cpu"
    if not cpu_dir.is_dir():
        why = "does not exist" if not root.exists() else "has no devices/system/cpu"
        raise ValueError(f"sysfs root {str(root)!r} {why}")
    topology = read_topology(cpu_dir)
    caches = _sysfs_caches(cpu_dir, topology)
    cgroup = root / "fs" / "cgroup"
    return _merge(
        topology=topology,
        caches=caches,
        brands=[read_cpuinfo_brand(root / "cpuinfo")],
        limit=read_cgroup_limit([cgroup], [cgroup / "cpu"]),
        affinity=None,
        pycpuinfo=None,
    )


def _sysfs_caches(cpu_dir: Path, topology: Found[Topology]) -> Found[tuple[CacheSpec, ...]]:
    if topology.value is None:
        return Found(None, "sysfs", ("caches unknown: no online CPU found",))
    return read_caches(cpu_dir, topology.value.online)


def _probe_live(platform: str) -> CpuInfo:
    """This machine: its hardware as read once per process, what this process may use
    (the cgroup quota, the affinity mask) as it is now."""
    kind = _kind(platform)
    hardware = _hardware(kind)
    affinity: Found[frozenset[int]] | None
    if kind == "darwin":
        limit: Found[float] = Found(math.inf, "no cgroups on macOS")
        affinity = None  # macOS cannot pin threads to CPUs
    elif kind == "sysfs":
        limit = read_cgroup_limit(*cgroup_dirs_live())
        affinity = read_affinity()
    else:
        limit = Found(math.inf, "no cgroups on this system")
        affinity = read_affinity()
    return _merge(limit=limit, affinity=affinity, **hardware._asdict())


class _Hardware(NamedTuple):
    topology: Found[Topology]
    caches: Found[tuple[CacheSpec, ...]]
    brands: Sequence[Found[str]]
    pycpuinfo: Found[dict[str, Any]] | None


#: The hardware as read, by the platform's key: an Evaluator probes at every
#: construction, and reading every CPU's caches costs about half a millisecond
#: per CPU in sysfs (1.1 ms of a 1.4 ms probe on the 2-core development VM), a
#: second where py-cpuinfo must be asked.  The key on Linux is the online CPU
#: list, read each time: a CPU taken off- or online is read again.
_HARDWARE: dict[tuple[str, str | None], _Hardware] = {}


_SYSFS_CPU = Path("/sys/devices/system/cpu")


def _kind(platform: str) -> str:
    """Where this machine is read from: ``darwin`` (sysctl), ``sysfs`` (Linux) or ``other``."""
    if platform == "darwin":
        return "darwin"
    return "sysfs" if _SYSFS_CPU.is_dir() else "other"


def _hardware(kind: str) -> _Hardware:
    """Topology, caches and brand of this machine (cached: see :data:`_HARDWARE`)."""
    cpu_dir = _SYSFS_CPU
    key = (kind, read_text(cpu_dir / "online")[0] if kind == "sysfs" else None)
    known = _HARDWARE.get(key)
    if known is not None:
        return known
    if kind == "darwin":
        topology, caches, brand = read_sysctl()
        brands = [brand]
    elif kind == "sysfs":
        topology = read_topology(cpu_dir)
        caches = _sysfs_caches(cpu_dir, topology)
        brands = [read_cpuinfo_brand(Path("/proc/cpuinfo"))]
    else:
        # Windows, the BSDs: only the count of logical CPUs is certain.
        n = os.cpu_count()
        why = "no sysfs or sysctl on this system"
        topology = (
            Found(
                Topology(tuple(range(n)), None), "os.cpu_count", (f"physical cores unknown: {why}",)
            )
            if n
            else Found(None, "os.cpu_count", (f"CPU count unknown: {why}",))
        )
        caches = Found(None, "none", (f"caches: {why}",))
        brands = []
    # py-cpuinfo costs about a second: ask it only for what is missing.
    needed = caches.value is None or all(b.value is None for b in brands)
    hardware = _Hardware(topology, caches, tuple(brands), load_pycpuinfo() if needed else None)
    _HARDWARE.clear()
    _HARDWARE[key] = hardware
    return hardware


def _merge(
    *,
    topology: Found[Topology],
    caches: Found[tuple[CacheSpec, ...]],
    brands: Sequence[Found[str]],
    limit: Found[float],
    affinity: Found[frozenset[int]] | None,
    pycpuinfo: Found[dict[str, Any]] | None,
) -> CpuInfo:
    """Combine the readers' answers into a :class:`CpuInfo` (pure).

    Parameters
    ----------
    topology, caches : Found
        From sysfs or sysctl (the primary sources).
    brands : sequence of Found of str
        Brand sources in the order they are trusted.
    limit : Found of float
        The cgroup quota in CPUs (``inf``: none).
    affinity : Found of frozenset of int, or None
        This process's affinity mask; ``None`` where it does not apply (a
        sysfs root, macOS).
    pycpuinfo : Found of dict, or None
        A py-cpuinfo result, where one was fetched: it then supplies what the
        primary sources lack and is cross-checked against what they have.
    """
    notes: list[str] = []
    sources: dict[str, str] = {}

    brand = _pick_brand(brands, pycpuinfo, notes, sources)

    # -- topology --
    notes.extend(topology.notes)
    topo = topology.value
    logical = physical = tpc = packages = None
    if topo is not None:
        logical = len(topo.online)
        physical = topo.physical_cores
        packages = topo.packages
        for name in ("logical_cpus", "physical_cores", "packages"):
            sources[name] = topology.source
        tpc = _threads_per_core(topo, notes)
        if tpc is not None:
            sources["threads_per_core"] = topology.source

    # -- usable CPUs, quota, pin order --
    usable, quota, pin_order = _usable(topology, affinity, limit, notes, sources)

    specs = _pick_caches(caches, pycpuinfo, (physical, tpc, logical), notes, sources)

    return CpuInfo(
        brand=brand.value if brand is not None else None,
        logical_cpus=logical,
        physical_cores=physical,
        threads_per_core=tpc,
        usable_cpus=usable,
        cpu_quota=quota,
        caches=tuple(CacheLevel(*s) for s in specs),
        pin_order=pin_order,
        sources=sources,
        notes=tuple(dict.fromkeys(notes)),  # drop repeats, keep order
        packages=packages,
    )


def _pick_brand(
    brands: Sequence[Found[str]],
    pycpuinfo: Found[dict[str, Any]] | None,
    notes: list[str],
    sources: dict[str, str],
) -> Found[str] | None:
    """The first brand a source knows (py-cpuinfo last), or None with the reasons noted."""
    candidates = list(brands)
    if pycpuinfo is not None and pycpuinfo.value is not None:
        candidates.append(brand_from_pycpuinfo(pycpuinfo.value))
    elif pycpuinfo is not None:
        candidates.append(Found(None, pycpuinfo.source, pycpuinfo.notes))
    brand = next((b for b in candidates if b.value is not None), None)
    if brand is not None:
        sources["brand"] = brand.source
    else:
        notes.extend(n for b in candidates for n in b.notes)
        if not candidates:
            notes.append("brand unknown: no source for it on this system")
    return brand


def _pick_caches(
    caches: Found[tuple[CacheSpec, ...]],
    pycpuinfo: Found[dict[str, Any]] | None,
    shape: tuple[int | None, int | None, int | None],
    notes: list[str],
    sources: dict[str, str],
) -> tuple[CacheSpec, ...]:
    """The primary source's caches (cross-checked with py-cpuinfo), else py-cpuinfo's.

    ``shape`` is (physical cores, threads per core, logical CPUs), which
    py-cpuinfo's totals are divided by.
    """
    pyc = pycpuinfo.value if pycpuinfo is not None else None
    notes.extend(caches.notes)
    if caches.value is not None:
        sources["caches"] = caches.source
        if pyc is not None:
            notes.extend(cross_check(pyc, caches.value, caches.source))
        return caches.value
    fallback = (
        caches_from_pycpuinfo(pyc, *shape)
        if pyc is not None
        else Found(None, "py-cpuinfo", pycpuinfo.notes if pycpuinfo is not None else ())
    )
    notes.extend(fallback.notes)
    if fallback.value is None:
        notes.append("cache sizes unknown")
        return ()
    sources["caches"] = fallback.source
    return fallback.value


def _threads_per_core(topo: Topology, notes: list[str]) -> int | None:
    if topo.cores is not None:
        counts = {len(c) for c in topo.cores}
        if len(counts) > 1:
            notes.append(
                f"threads per core differ between cores ({min(counts)} to {max(counts)}: "
                "hybrid cores or offline siblings); threads_per_core is the largest"
            )
        return max(counts)
    if topo.physical_cores and len(topo.online) % topo.physical_cores == 0:
        return len(topo.online) // topo.physical_cores
    notes.append("threads per core unknown: the number of physical cores is unknown or uneven")
    return None


def _usable(
    topology: Found[Topology],
    affinity: Found[frozenset[int]] | None,
    limit: Found[float],
    notes: list[str],
    sources: dict[str, str],
) -> tuple[int | None, float | None, tuple[int, ...]]:
    topo = topology.value
    why: list[str] = []
    allowed = _allowed_cpus(topology, affinity, notes, why)
    quota = _quota(limit, notes, sources, why)

    usable: int | None = None
    if topo is not None:
        usable = len(allowed)
        if quota is not None:
            usable = min(usable, math.ceil(quota))
        sources["usable_cpus"] = "; ".join(why)
    else:
        notes.append("usable CPUs unknown: no online CPU list")
    return usable, quota, _pin_order(topology, allowed, notes, sources)


def _allowed_cpus(
    topology: Found[Topology],
    affinity: Found[frozenset[int]] | None,
    notes: list[str],
    why: list[str],
) -> tuple[int, ...]:
    """The online CPUs, narrowed by the affinity mask where there is one."""
    topo = topology.value
    allowed: tuple[int, ...] = ()
    if topo is not None:
        allowed = topo.online
        why.append(f"online in {topology.source}: {len(topo.online)}")
    if affinity is not None:
        if affinity.value is None:
            notes.extend(affinity.notes)
        elif topo is not None:
            narrowed = tuple(c for c in topo.online if c in affinity.value)
            if not narrowed:
                notes.append("the affinity mask names no online CPU; it is ignored")
            elif narrowed == topo.online:
                why.append("allowed by sched_getaffinity: all")
            else:
                allowed = narrowed
                why.append(
                    f"allowed by sched_getaffinity: {len(narrowed)} ({format_cpu_list(narrowed)})"
                )
    return allowed


def _quota(
    limit: Found[float], notes: list[str], sources: dict[str, str], why: list[str]
) -> float | None:
    """The cgroup CPU quota in CPUs, None where there is none or it is unknown."""
    quota: float | None = None
    notes.extend(limit.notes)
    if limit.value is None:
        notes.append("cgroup CPU quota unknown: usable CPUs are not narrowed by it")
        why.append("cgroup quota unreadable")
    elif math.isinf(limit.value):
        sources["cpu_quota"] = limit.source
        # "cgroup v1: no CPU quota", or the reader's "no cgroup CPU limit file".
        why.append(
            limit.source if limit.source.startswith("no ") else f"{limit.source}: no CPU quota"
        )
    else:
        quota = limit.value
        sources["cpu_quota"] = limit.source
        # A 1.5-CPU quota keeps 2 workers busy 75% of the time each; rounding
        # down would waste half a CPU, and a 0.5 quota would round to none.
        why.append(f"{limit.source}: quota {quota:g} CPUs -> at most {math.ceil(quota)}")
    return quota


def _pin_order(
    topology: Found[Topology], allowed: tuple[int, ...], notes: list[str], sources: dict[str, str]
) -> tuple[int, ...]:
    """The first thread of every core, then every second thread, ... (allowed CPUs only)."""
    topo = topology.value
    pin_order: tuple[int, ...] = ()
    if topo is not None and topo.cores is not None:
        allowed_set = set(allowed)
        cores = [[c for c in core if c in allowed_set] for core in topo.cores]
        cores = sorted((c for c in cores if c), key=lambda c: c[0])
        depth = max((len(c) for c in cores), default=0)
        # First thread of every core, then every second thread, ...
        pin_order = tuple(c[i] for i in range(depth) for c in cores if i < len(c))
        sources["pin_order"] = f"{topology.source} cores"
    elif topo is not None:
        pin_order = allowed
        sources["pin_order"] = "CPU ids (core layout unknown)"
        notes.append("pin order is plain CPU id order: which CPUs share a core is unknown")
    return pin_order
