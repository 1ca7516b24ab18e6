"""The probe's internal vocabulary: what a reader returns, and small text helpers.

Every reader of :mod:`autotune.cpu` (sysfs, cgroup, py-cpuinfo, macOS
``sysctl``) reads one source and answers with a :class:`Found`: the value, or
``None`` with the reason in ``notes``.  The one merge in :mod:`autotune.cpu.detect`
picks among them and records where each figure came from.  Readers describe
caches as :class:`CacheSpec` tuples, not as the public ``CacheLevel``, so that
they do not import the module that imports them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

__all__ = [
    "CACHE_TYPES",
    "CacheSpec",
    "Found",
    "Topology",
    "format_cpu_list",
    "merge_specs",
    "parse_int",
    "read_text",
    "shorten",
]

T = TypeVar("T")

#: sysfs spells cache types ``Data``, ``Instruction``, ``Unified``; we use lower case.
CACHE_TYPES = ("data", "instruction", "unified")

_INT = re.compile(r"[+-]?\d+", re.ASCII)


@dataclass(frozen=True)
class Found(Generic[T]):
    """What one source found.

    Attributes
    ----------
    value : object or None
        The figure, or ``None`` when the source had nothing usable.
    source : str
        Short name of the source (``"sysfs"``, ``"cgroup v2"`` ...).
    notes : tuple of str
        Why ``value`` is ``None``, assumptions made, disagreements seen.
    """

    value: T | None
    source: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Topology:
    """Logical CPUs and how they group into cores and packages.

    Attributes
    ----------
    online : tuple of int
        Online logical CPU ids, sorted.
    physical_cores : int or None
        Number of physical cores that have an online CPU.
    cores : tuple of tuple of int, or None
        The online CPU ids of each physical core, where the source names them
        (sysfs does, ``sysctl`` does not).  Sorted by first id.
    packages : int or None
        Number of CPU packages (sockets).
    """

    online: tuple[int, ...]
    physical_cores: int | None
    cores: tuple[tuple[int, ...], ...] | None = None
    packages: int | None = None


class CacheSpec(NamedTuple):
    """One kind of cache as a reader saw it (becomes a public ``CacheLevel``)."""

    level: int
    type: str
    size_bytes: int
    shared_cpus: int
    instances: int
    line_bytes: int | None = None


def merge_specs(specs: Iterable[CacheSpec]) -> tuple[CacheSpec, ...]:
    """Add up the instances of identical kinds and sort.

    Kinds are identical when (level, type, size, shared CPUs) agree; a line
    size survives only where all of them agree on it.
    """
    total: dict[tuple[int, str, int, int], int] = {}
    lines: dict[tuple[int, str, int, int], set[int | None]] = {}
    for s in specs:
        key = (s.level, s.type, s.size_bytes, s.shared_cpus)
        total[key] = total.get(key, 0) + s.instances
        lines.setdefault(key, set()).add(s.line_bytes)
    out = []
    for key, n in total.items():
        line = lines[key].pop() if len(lines[key]) == 1 else None
        out.append(CacheSpec(*key, instances=n, line_bytes=line))
    out.sort(key=lambda s: (s.level, CACHE_TYPES.index(s.type), s.size_bytes, s.shared_cpus))
    return tuple(out)


def parse_int(text: str, what: str) -> int:
    """Parse one decimal integer (ASCII digits only), or raise ValueError naming ``what``."""
    stripped = text.strip()
    if not _INT.fullmatch(stripped):
        raise ValueError(f"{what}: {shorten(stripped)!r} is not an integer")
    return int(stripped)


def read_text(path: Path) -> tuple[str | None, str | None]:
    """Read a small text file: ``(text, None)`` or ``(None, reason)``; never raises."""
    try:
        return path.read_text(encoding="utf-8", errors="strict"), None
    except FileNotFoundError:
        return None, "missing"
    except UnicodeDecodeError:
        return None, "not text"
    except OSError as exc:
        # IsADirectoryError, PermissionError, EIO from a half-removed CPU ...
        return None, f"unreadable ({exc.strerror or type(exc).__name__})"


def format_cpu_list(ids: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"`` (the kernel's list format)."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(ids)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [i]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def shorten(text: str, limit: int = 40) -> str:
    """Quote at most ``limit`` characters of ``text`` in a note."""
    # Garbage files can be large; a note quotes only their start.
    return text if len(text) <= limit else text[:limit] + "..."
