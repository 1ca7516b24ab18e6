"""``CpuInfo`` and ``CacheLevel``: what the probe found, as plain frozen dataclasses.

``to_dict``/``from_dict`` are the JSON/YAML edge (``autotune probe --json``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CacheLevel", "CpuInfo", "FALLBACK_L1D_BYTES", "FALLBACK_L2_BYTES"]

#: Cache sizes assumed where the probe could not read them: the smallest
#: per-core L1d and L2 of current x86 cores (the i3-3227U's included).
FALLBACK_L1D_BYTES = 32 * 1024
FALLBACK_L2_BYTES = 256 * 1024


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
