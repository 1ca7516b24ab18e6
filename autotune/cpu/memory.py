"""Memory this process can still use: ``MemAvailable``, narrowed by a cgroup limit.

``/proc/meminfo``'s ``MemAvailable`` is the kernel's estimate of what can be
allocated without swapping; a container may be allowed far less, which only
its cgroup says: v2 ``memory.max`` (``max`` = none) minus ``memory.current``,
v1 ``memory.limit_in_bytes`` (a huge number = none) minus
``memory.usage_in_bytes``.  Each reader returns bytes or ``None``; the
smallest known figure wins.  The evaluator warns when a call's chunks would
not fit (see ``Evaluator(item_bytes=...)``).
"""

from __future__ import annotations

from pathlib import Path

from autotune.cpu.cgroup import own_cgroup_paths, up_to
from autotune.cpu.common import read_text

__all__ = ["available_memory", "parse_meminfo_available", "read_cgroup_memory"]

# cgroup v1 spells "no limit" as the largest page-aligned signed 64-bit value.
_V1_UNLIMITED = 1 << 62


def parse_meminfo_available(text: str) -> int | None:
    """Bytes of ``MemAvailable:`` in the text of ``/proc/meminfo`` (``None`` if absent)."""
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "MemAvailable":
            fields = rest.split()
            if not fields or not fields[0].isdigit():
                return None
            unit = fields[1].lower() if len(fields) > 1 else ""
            return int(fields[0]) * (1024 if unit == "kb" else 1)
    return None


def _number(path: Path) -> int | None:
    text, _ = read_text(path)
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def read_cgroup_memory(v2_dirs: list[Path], v1_dirs: list[Path]) -> int | None:
    """The least headroom (limit minus usage, bytes) of the given cgroup directories.

    ``None`` where no directory sets a limit.
    """
    room: list[int] = []
    for d in v2_dirs:
        limit = _number(d / "memory.max")  # "max" is not a number: no limit
        if limit is not None:
            room.append(max(0, limit - (_number(d / "memory.current") or 0)))
    for d in v1_dirs:
        limit = _number(d / "memory.limit_in_bytes")
        if limit is not None and limit < _V1_UNLIMITED:
            room.append(max(0, limit - (_number(d / "memory.usage_in_bytes") or 0)))
    return min(room, default=None)


def available_memory(root: str | Path = "/") -> int | None:
    """Bytes this process may still allocate, or ``None`` if nothing could be read.

    Parameters
    ----------
    root : str or path-like
        Where ``proc/`` and ``sys/fs/cgroup`` are (a fixture tree in tests).
    """
    root = Path(root)
    text, _ = read_text(root / "proc" / "meminfo")
    figures = [parse_meminfo_available(text or "")]
    own, _ = read_text(root / "proc" / "self" / "cgroup")
    v2_path, _ = own_cgroup_paths(own or "")
    v1_path = None
    for line in (own or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            v1_path = parts[2]
    mount = root / "sys" / "fs" / "cgroup"
    v2_mount = mount if (mount / "cgroup.controllers").exists() else mount / "unified"
    v2 = up_to(v2_mount, v2_path) if v2_path is not None else []
    v1 = up_to(mount / "memory", v1_path) if v1_path is not None else []
    figures.append(read_cgroup_memory(v2, v1))
    known = [f for f in figures if f is not None]
    return min(known) if known else None
