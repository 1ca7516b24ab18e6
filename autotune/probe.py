"""What this CPU is: cores, hardware threads, caches and usable CPUs.

:func:`probe` asks small readers, each reading one source, and merges their
answers in one place (:func:`_merge`), recording in ``CpuInfo.sources``
where every figure came from and in ``CpuInfo.notes`` why a figure is
missing, which assumption was made, and where two sources disagreed.

The readers, in the order they are trusted:

- Linux sysfs (``_probe_linux``): online CPUs, cores, packages, caches;
- the cgroup CPU quota and the affinity mask (``_probe_cgroup``);
- ``/proc/cpuinfo`` for the brand;
- macOS ``sysctl`` (``_probe_sysctl``), on Darwin only;
- py-cpuinfo (``_probe_pycpuinfo``), slow and faulty in known ways, asked
  only for what the others lack.

A figure nobody can give is ``None`` with a reason, never a guess.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune._probe_cgroup import cgroup_dirs_live, read_affinity, read_cgroup_limit
from autotune._probe_common import CacheSpec, Found, Topology, format_bytes, format_cpu_list
from autotune._probe_linux import read_caches, read_cpuinfo_brand, read_topology
from autotune._probe_pycpuinfo import (
    brand_from_pycpuinfo,
    caches_from_pycpuinfo,
    cross_check,
    load_pycpuinfo,
)
from autotune._probe_sysctl import read_sysctl

__all__ = ["CacheLevel", "CpuInfo", "format_table", "probe"]


@dataclass(frozen=True)
class CacheLevel:
    """One kind of cache: a (level, type, size, shared_cpus) group.

    Attributes
    ----------
    level : int
        1, 2, 3 ...
    type : str
        ``"data"``, ``"instruction"`` or ``"unified"``.
    size_bytes : int
        Size of one instance.
    shared_cpus : int
        Logical CPUs sharing one instance.
    instances : int
        How many instances of this kind there are.
    line_bytes : int or None
        Coherency line size, where known.
    """

    level: int
    type: str
    size_bytes: int
    shared_cpus: int
    instances: int
    line_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON/YAML form; ``line_bytes`` only where known."""
        d: dict[str, Any] = {
            "level": self.level,
            "type": self.type,
            "size_bytes": self.size_bytes,
            "shared_cpus": self.shared_cpus,
            "instances": self.instances,
        }
        if self.line_bytes is not None:
            d["line_bytes"] = self.line_bytes
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheLevel:
        """Inverse of :meth:`to_dict`."""
        return cls(
            level=int(d["level"]),
            type=str(d["type"]),
            size_bytes=int(d["size_bytes"]),
            shared_cpus=int(d["shared_cpus"]),
            instances=int(d["instances"]),
            line_bytes=None if d.get("line_bytes") is None else int(d["line_bytes"]),
        )


@dataclass(frozen=True)
class CpuInfo:
    """What :func:`probe` found.  Figures it could not find are ``None``.

    ``sources`` maps a figure's name to where it came from (``"sysfs"``,
    ``"cgroup v2"``, ``"py-cpuinfo"`` ...); ``notes`` says why a figure is
    missing and where sources disagreed.

    Attributes
    ----------
    brand : str or None
        The model name, e.g. ``"Intel(R) Core(TM) i3-3227U CPU @ 1.90GHz"``.
    logical_cpus : int or None
        Online logical CPUs (hardware threads).
    physical_cores : int or None
        Physical cores with at least one online CPU.
    threads_per_core : int or None
        Hardware threads per core; the largest where cores differ (hybrid
        CPUs, a core with an offline sibling), with a note.
    usable_cpus : int or None
        CPUs this process can keep busy: online, narrowed by the affinity
        mask, then by ``ceil(cpu_quota)``.
    cpu_quota : float or None
        The cgroup CPU quota in CPUs (1.5 = one and a half CPUs' time), or
        ``None`` where no quota is set.
    caches : tuple of CacheLevel
        One entry per distinct (level, type, size, shared_cpus).
    pin_order : tuple of int
        Usable logical CPU ids in the order workers should be pinned: one
        hardware thread of each physical core first, then their siblings.
    sources : dict of str to str
        Where each figure came from.
    notes : tuple of str
        Why figures are missing, assumptions made, disagreements seen.
    packages : int or None
        CPU packages (sockets).
    """

    brand: str | None
    logical_cpus: int | None
    physical_cores: int | None
    threads_per_core: int | None
    usable_cpus: int | None
    cpu_quota: float | None
    caches: tuple[CacheLevel, ...] = ()
    #: usable logical CPU ids, in the order workers should be pinned: one
    #: hardware thread of each physical core first, then their siblings.
    pin_order: tuple[int, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    packages: int | None = None

    # -- cache figures the tuner and the heuristic use --------------------
    def cache_bytes(self, level: int) -> int | None:
        """Size of one instance of the level's data (or unified) cache.

        With several entries at a level (hybrid CPUs), the largest, which
        belongs to the performance cores.
        """
        sizes = [
            c.size_bytes for c in self.caches if c.level == level and c.type in ("data", "unified")
        ]
        return max(sizes) if sizes else None

    @property
    def l1d(self) -> int | None:
        """Bytes of one L1 data cache, or ``None``."""
        return self.cache_bytes(1)

    @property
    def l2(self) -> int | None:
        """Bytes of one L2 cache, or ``None``."""
        return self.cache_bytes(2)

    @property
    def l3(self) -> int | None:
        """Bytes of one L3 cache, or ``None``."""
        return self.cache_bytes(3)

    @property
    def fingerprint(self) -> str:
        """A short stable hash of the topology and cache sizes (not the brand)."""
        key = json.dumps(
            [self.logical_cpus, self.physical_cores, self.l1d, self.l2, self.l3], sort_keys=True
        )
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        """What ``autotune probe --json`` prints."""
        return {
            "brand": self.brand,
            "logical_cpus": self.logical_cpus,
            "physical_cores": self.physical_cores,
            "threads_per_core": self.threads_per_core,
            "packages": self.packages,
            "usable_cpus": self.usable_cpus,
            "cpu_quota": self.cpu_quota,
            "caches": [c.to_dict() for c in self.caches],
            "pin_order": list(self.pin_order),
            "fingerprint": self.fingerprint,
            "sources": dict(self.sources),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CpuInfo:
        """Inverse of :meth:`to_dict` (``fingerprint`` is recomputed, not read)."""
        return cls(
            brand=d.get("brand"),
            logical_cpus=d.get("logical_cpus"),
            physical_cores=d.get("physical_cores"),
            threads_per_core=d.get("threads_per_core"),
            usable_cpus=d.get("usable_cpus"),
            cpu_quota=d.get("cpu_quota"),
            caches=tuple(CacheLevel.from_dict(c) for c in d.get("caches", ())),
            pin_order=tuple(d.get("pin_order", ())),
            sources=dict(d.get("sources", {})),
            notes=tuple(d.get("notes", ())),
            packages=d.get("packages"),
        )


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
    affinity: Found[frozenset[int]] | None
    if platform == "darwin":
        topology, caches, brand = read_sysctl()
        brands = [brand]
        limit: Found[float] = Found(math.inf, "no cgroups on macOS")
        affinity = None  # macOS cannot pin threads to CPUs
    elif Path("/sys/devices/system/cpu").is_dir():
        cpu_dir = Path("/sys/devices/system/cpu")
        topology = read_topology(cpu_dir)
        caches = _sysfs_caches(cpu_dir, topology)
        brands = [read_cpuinfo_brand(Path("/proc/cpuinfo"))]
        limit = read_cgroup_limit(*cgroup_dirs_live())
        affinity = read_affinity()
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
        limit = Found(math.inf, "no cgroups on this system")
        affinity = read_affinity()
    # py-cpuinfo costs about a second: ask it only for what is missing.
    needed = caches.value is None or all(b.value is None for b in brands)
    return _merge(
        topology=topology,
        caches=caches,
        brands=brands,
        limit=limit,
        affinity=affinity,
        pycpuinfo=load_pycpuinfo() if needed else None,
    )


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
    pyc = pycpuinfo.value if pycpuinfo is not None else None

    # -- brand --
    candidates = list(brands)
    if pyc is not None:
        candidates.append(brand_from_pycpuinfo(pyc))
    elif pycpuinfo is not None:
        candidates.append(Found(None, pycpuinfo.source, pycpuinfo.notes))
    brand = next((b for b in candidates if b.value is not None), None)
    if brand is not None:
        sources["brand"] = brand.source
    else:
        notes.extend(n for b in candidates for n in b.notes)
        if not candidates:
            notes.append("brand unknown: no source for it on this system")

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

    # -- caches --
    specs: tuple[CacheSpec, ...] = ()
    if caches.value is not None:
        specs = caches.value
        sources["caches"] = caches.source
        notes.extend(caches.notes)
        if pyc is not None:
            notes.extend(cross_check(pyc, specs, caches.source))
    else:
        notes.extend(caches.notes)
        fallback = (
            caches_from_pycpuinfo(pyc, physical, tpc, logical)
            if pyc is not None
            else Found(None, "py-cpuinfo", pycpuinfo.notes if pycpuinfo is not None else ())
        )
        notes.extend(fallback.notes)
        if fallback.value is not None:
            specs = fallback.value
            sources["caches"] = fallback.source
        else:
            notes.append("cache sizes unknown")

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

    usable: int | None = None
    if topo is not None:
        usable = len(allowed)
        if quota is not None:
            usable = min(usable, math.ceil(quota))
        sources["usable_cpus"] = "; ".join(why)
    else:
        notes.append("usable CPUs unknown: no online CPU list")

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
    return usable, quota, pin_order


# -- the table `autotune probe` prints --------------------------------------


def format_table(info: CpuInfo) -> str:
    """The readable summary ``autotune probe`` prints (like ``lscpu``).

    Parameters
    ----------
    info : CpuInfo

    Returns
    -------
    str
        Model, cores and threads, usable CPUs and why, one row per cache kind
        (size of one instance, instances, CPUs sharing one), sources and notes.
    """

    def known(value: object, unit: str = "") -> str:
        return "unknown" if value is None else f"{value}{unit}"

    def plural(n: int | None, word: str) -> str:
        return f"{known(n)} {word}{'' if n == 1 else 's'}"

    topo = ", ".join(
        [
            plural(info.logical_cpus, "logical CPU"),
            plural(info.physical_cores, "physical core"),
            f"{plural(info.threads_per_core, 'thread')} per core",
            plural(info.packages, "socket"),
        ]
    )
    usable = known(info.usable_cpus)
    if "usable_cpus" in info.sources:
        usable += f" ({info.sources['usable_cpus']})"
    if info.cpu_quota is not None:
        quota = f"{info.cpu_quota:g} CPUs"
    else:
        quota = "none" if "cpu_quota" in info.sources else "unknown (see notes)"
    lines = [
        f"Model:        {known(info.brand)}",
        f"Topology:     {topo}",
        f"Usable CPUs:  {usable}",
        f"CPU quota:    {quota}",
        f"Pin order:    {' '.join(map(str, info.pin_order)) or 'none'}",
        f"Fingerprint:  {info.fingerprint}",
        "",
    ]
    if info.caches:
        rows = [("Cache", "Type", "Size/instance", "Instances", "CPUs sharing one", "Line")]
        for c in info.caches:
            line = "" if c.line_bytes is None else f"{c.line_bytes} B"
            rows.append(
                (
                    f"L{c.level}",
                    c.type,
                    format_bytes(c.size_bytes),
                    str(c.instances),
                    str(c.shared_cpus),
                    line,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            cells = [
                r[i].ljust(widths[i]) if i < 2 else r[i].rjust(widths[i]) for i in range(len(r))
            ]
            lines.append("  ".join(cells).rstrip())
    else:
        lines.append("Caches:       unknown (see notes)")
    lines.append("")
    shown = (("brand", "brand"), ("topology", "physical_cores"), ("caches", "caches"))
    lines.append(
        "Sources:      "
        + "; ".join(f"{label} from {info.sources[k]}" for label, k in shown if k in info.sources)
    )
    if info.notes:
        lines.append("Notes:")
        lines.extend(f"  - {n}" for n in info.notes)
    return "\n".join(lines)
