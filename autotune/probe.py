"""What this CPU is: cores, hardware threads, caches and usable CPUs.

(The readers are being written; this file currently holds the data types
that the rest of the package codes against.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CacheLevel", "CpuInfo", "probe"]


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
        return self.cache_bytes(1)

    @property
    def l2(self) -> int | None:
        return self.cache_bytes(2)

    @property
    def l3(self) -> int | None:
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
        )


def probe(sysfs_root: str | None = None) -> CpuInfo:
    """Probe this CPU (or the sysfs tree under ``sysfs_root``)."""
    raise NotImplementedError("being written")
