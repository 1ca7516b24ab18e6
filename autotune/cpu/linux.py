"""Linux readers: CPU topology and caches from sysfs, the brand from ``/proc/cpuinfo``.

``cpu_dir`` is ``/sys/devices/system/cpu`` on a live system, or
``DIR/devices/system/cpu`` under a fixture tree.  Each reader returns a
:class:`~autotune.cpu.common.Found`; parsing the kernel's text is done by
pure functions (``parse_*``, :func:`group_caches`) that the tests call
directly.

What the kernel's files mean, and the traps in them:

- ``online`` lists the CPUs that run; offline CPUs may keep stale ``cpuN``
  directories, so nothing is read from them and they are removed from every
  sibling and sharing list.
- ``cache/indexM`` numbering is per CPU and not a level: ``index2`` is L2 on
  most x86 parts but not everywhere, so ``level`` and ``type`` are read.
- One cache instance shows up once per CPU that shares it; instances are told
  apart by ``(level, type, id, shared CPUs)``, which counts an L3 per CCX as
  several instances and an E-core cluster's L2 once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from autotune.cpu.common import (
    CACHE_TYPES,
    CacheSpec,
    Found,
    Topology,
    format_cpu_list,
    merge_specs,
    parse_int,
    read_text,
    shorten,
)

__all__ = [
    "CacheRecord",
    "group_caches",
    "parse_cache_size",
    "parse_cpu_list",
    "parse_cpuinfo_brand",
    "read_cache_records",
    "read_caches",
    "read_cpuinfo_brand",
    "read_topology",
]

T = TypeVar("T")

_RANGE = re.compile(r"(\d+)(?:-(\d+))?", re.ASCII)
_SIZE = re.compile(r"(\d+)\s*([KMG]?)(?:i?B)?", re.ASCII | re.IGNORECASE)
_CPU_DIR = re.compile(r"cpu(\d+)", re.ASCII)
_INDEX_DIR = re.compile(r"index(\d+)", re.ASCII)
# Far above any kernel's NR_CPUS (8192): a list naming more is garbage, and
# refusing it keeps "0-4294967295" from allocating a huge tuple.
_MAX_CPU_ID = 1 << 16


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """Parse the kernel's CPU list format.

    Parameters
    ----------
    text : str
        E.g. ``"0-3,8,10-11\\n"``; an empty string is an empty list.

    Returns
    -------
    tuple of int
        The CPU ids, sorted, without duplicates.

    Raises
    ------
    ValueError
        On anything that is not such a list.
    """
    stripped = text.strip()
    if not stripped:
        return ()
    ids: set[int] = set()
    for part in stripped.split(","):
        m = _RANGE.fullmatch(part.strip())
        if m is None:
            raise ValueError(f"{shorten(stripped)!r} is not a CPU list")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo or hi >= _MAX_CPU_ID:
            raise ValueError(f"{shorten(stripped)!r} is not a CPU list")
        ids.update(range(lo, hi + 1))
    return tuple(sorted(ids))


def parse_cache_size(text: str) -> int:
    """Parse a sysfs cache ``size`` (``"32K"``, ``"491520K"``, ``"2M"``) into bytes.

    Raises
    ------
    ValueError
        On garbage or a zero size (no cache has zero bytes: the file is wrong).
    """
    stripped = text.strip()
    m = _SIZE.fullmatch(stripped)
    if m is None:
        raise ValueError(f"{shorten(stripped)!r} is not a size")
    n = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]
    if n == 0:
        raise ValueError(f"{shorten(stripped)!r} is a zero size")
    return n


def parse_cpuinfo_brand(text: str) -> str | None:
    """The first ``model name`` in ``/proc/cpuinfo`` text, or ``None``.

    ARM kernels usually have no ``model name`` line (only ``CPU part``
    numbers); the caller then asks py-cpuinfo, which knows the part names.
    """
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "model name" and value.strip():
            return " ".join(value.split())
    return None


def read_cpuinfo_brand(path: Path) -> Found[str]:
    """Read the brand from a ``/proc/cpuinfo``-style file."""
    text, why = read_text(path)
    if text is None:
        return Found(None, str(path), (f"brand unknown: {path} is {why}",))
    brand = parse_cpuinfo_brand(text)
    if brand is None:
        return Found(None, str(path), (f"brand unknown: {path} has no 'model name' line",))
    return Found(brand, str(path))


# -- topology -------------------------------------------------------------


def _online_cpus(cpu_dir: Path) -> tuple[tuple[int, ...], list[str]]:
    text, why = read_text(cpu_dir / "online")
    notes: list[str] = []
    if text is not None:
        try:
            ids = parse_cpu_list(text)
        except ValueError as exc:
            notes.append(f"online: {exc}")
        else:
            if ids:
                return ids, notes
            notes.append("online: empty")
    else:
        notes.append(f"online: {why}")
    # Without the list, every cpuN directory counts unless its own `online`
    # file says 0 (cpu0 usually has no such file: it cannot go offline).
    found = []
    for d in cpu_dir.iterdir() if cpu_dir.is_dir() else ():
        m = _CPU_DIR.fullmatch(d.name)
        if m is None or not d.is_dir():
            continue
        flag, _ = read_text(d / "online")
        if flag is None or flag.strip() != "0":
            found.append(int(m.group(1)))
    if found:
        notes[-1] += "; online CPUs taken from the cpuN directories"
    return tuple(sorted(found)), notes


def read_topology(cpu_dir: Path) -> Found[Topology]:
    """Read online CPUs, their physical cores and packages from sysfs.

    Parameters
    ----------
    cpu_dir : pathlib.Path
        ``/sys/devices/system/cpu`` or the same directory in a fixture tree.

    Returns
    -------
    Found of Topology
        ``value`` is ``None`` when no online CPU can be found.  Cores come
        from ``core_cpus_list`` (``thread_siblings_list`` on kernels before
        5.7), else from ``(physical_package_id, core_id)``: ``core_id`` alone
        repeats across packages.
    """
    online, notes = _online_cpus(cpu_dir)
    if not online:
        notes.append("no online CPU found")
        return Found(None, "sysfs", tuple(notes))
    online_set = frozenset(online)
    by_siblings: dict[int, frozenset[int]] = {}
    package: dict[int, int] = {}
    for cpu in online:
        top = cpu_dir / f"cpu{cpu}" / "topology"
        siblings = _siblings(top, cpu, notes)
        if siblings is not None:
            # Offline siblings are dropped: they run nothing.
            by_siblings[cpu] = frozenset((set(siblings) & online_set) | {cpu})
        pkg = _topology_int(top / "physical_package_id", f"cpu{cpu}", notes)
        if pkg is not None:
            package[cpu] = pkg

    # One way of naming cores for all CPUs: mixing sibling sets and ids would
    # count one core twice.
    core_key: dict[int, object] = dict(by_siblings)
    if len(by_siblings) < len(online):
        by_id: dict[int, object] = {}
        for cpu in online:
            top = cpu_dir / f"cpu{cpu}" / "topology"
            core_id = _topology_int(top / "core_id", f"cpu{cpu}", notes)
            if core_id is not None and cpu in package:
                by_id[cpu] = (package[cpu], core_id)
        core_key = by_id
        lacking = [c for c in online if c not in by_siblings]
        if len(by_id) == len(online):
            notes.append(
                f"no sibling list for CPUs {_ids(lacking)}: cores told apart by "
                "(physical_package_id, core_id)"
            )

    cores: tuple[tuple[int, ...], ...] | None = None
    physical: int | None = None
    if len(core_key) < len(online):
        lacking = [c for c in online if c not in core_key]
        notes.append(f"physical cores unknown: no sibling list or core id for CPUs {_ids(lacking)}")
    else:
        groups: dict[object, list[int]] = {}
        for cpu in online:
            groups.setdefault(core_key[cpu], []).append(cpu)
        cores = tuple(sorted(tuple(g) for g in groups.values()))
        physical = len(cores)
    unknown_package = [c for c in online if c not in package]
    packages: int | None = None
    if unknown_package:
        notes.append(f"packages unknown: no physical_package_id for CPUs {_ids(unknown_package)}")
    else:
        packages = len(set(package.values()))
    return Found(Topology(online, physical, cores, packages), "sysfs", tuple(notes))


def _siblings(top: Path, cpu: int, notes: list[str]) -> tuple[int, ...] | None:
    for name in ("core_cpus_list", "thread_siblings_list"):
        text, why = read_text(top / name)
        if text is None:
            if why != "missing":
                notes.append(f"cpu{cpu}/topology/{name}: {why}")
            continue
        try:
            return parse_cpu_list(text)
        except ValueError as exc:
            notes.append(f"cpu{cpu}/topology/{name}: {exc}")
    return None


def _topology_int(path: Path, cpu: str, notes: list[str]) -> int | None:
    text, why = read_text(path)
    if text is None:
        if why != "missing":
            notes.append(f"{cpu}/topology/{path.name}: {why}")
        return None
    try:
        value = parse_int(text, f"{cpu}/topology/{path.name}")
    except ValueError as exc:
        notes.append(str(exc))
        return None
    # Some ARM firmware leaves the package id at -1: unknown, not a package.
    return value if value >= 0 else None


def _ids(cpus: list[int]) -> str:
    return format_cpu_list(cpus)


# -- caches ---------------------------------------------------------------


@dataclass(frozen=True)
class CacheRecord:
    """One ``cpuN/cache/indexM`` directory as read, before grouping.

    Fields that could not be read are ``None``; ``problems`` says why for the
    required ones (level, type, size, shared_cpu_list), ``minor`` for the
    optional ones (coherency_line_size, id).
    """

    where: str
    index: str
    cpu: int
    level: int | None
    type: str | None
    size_bytes: int | None
    shared: frozenset[int] | None
    line_bytes: int | None = None
    id: int | None = None
    problems: tuple[str, ...] = ()
    minor: tuple[str, ...] = ()


def read_cache_records(
    cpu_dir: Path, online: tuple[int, ...]
) -> tuple[list[CacheRecord], list[int]]:
    """Read every cache index directory of the online CPUs.

    Returns
    -------
    records : list of CacheRecord
    without_cache : list of int
        Online CPUs that have no ``cache`` directory with an ``index*`` in it.
    """
    online_set = frozenset(online)
    records: list[CacheRecord] = []
    without: list[int] = []
    for cpu in online:
        cache = cpu_dir / f"cpu{cpu}" / "cache"
        try:
            entries = sorted(
                (int(m.group(1)), d)
                for d in cache.iterdir()
                if (m := _INDEX_DIR.fullmatch(d.name)) is not None
            )
        except OSError:
            entries = []
        if not entries:
            without.append(cpu)
        for _, d in entries:
            records.append(_read_index(d, f"cpu{cpu}/cache/{d.name}", cpu, online_set))
    return records, without


def _field(
    d: Path, where: str, name: str, parse: Callable[[str], T], problems: list[str], required: bool
) -> T | None:
    text, why = read_text(d / name)
    if text is None:
        # An optional file may be absent; present and unreadable is worth a note.
        if required or why != "missing":
            problems.append(f"{where}/{name}: {why}")
        return None
    try:
        return parse(text)
    except ValueError as exc:
        problems.append(f"{where}/{name}: {exc}")
        return None


def _parse_level(text: str) -> int:
    n = parse_int(text, "level")
    if not 1 <= n <= 9:
        raise ValueError(f"level {n} is out of range")
    return n


def _parse_type(text: str) -> str:
    t = text.strip().lower()
    if t not in CACHE_TYPES:
        raise ValueError(f"type {shorten(text.strip())!r} is not Data, Instruction or Unified")
    return t


def _parse_positive(text: str) -> int:
    n = parse_int(text, "value")
    if n <= 0:
        raise ValueError(f"{n} is not positive")
    return n


def _read_index(d: Path, where: str, cpu: int, online: frozenset[int]) -> CacheRecord:
    problems: list[str] = []
    minor: list[str] = []

    def shared(text: str) -> frozenset[int]:
        # A CPU always shares its own cache; offline CPUs share nothing.
        return frozenset((set(parse_cpu_list(text)) & online) | {cpu})

    level = _field(d, where, "level", _parse_level, problems, True)
    type_ = _field(d, where, "type", _parse_type, problems, True)
    size = _field(d, where, "size", parse_cache_size, problems, True)
    shr = _field(d, where, "shared_cpu_list", shared, problems, True)
    line = _field(d, where, "coherency_line_size", _parse_positive, minor, False)
    cid = _field(d, where, "id", lambda t: parse_int(t, "id"), minor, False)
    return CacheRecord(
        where, d.name, cpu, level, type_, size, shr, line, cid, tuple(problems), tuple(minor)
    )


def _kind_name(level: int, type_: str) -> str:
    return f"L{level} {type_}"


def group_caches(records: list[CacheRecord]) -> tuple[tuple[CacheSpec, ...], list[str]]:
    """Group per-CPU cache records into instances, and instances into kinds.

    A kind (level, type) with any unreadable size or sharing list is left out
    whole, with a note: counting only the readable instances would give a
    wrong ``instances`` figure.  A record whose level or type is unreadable
    spoils the kinds that the same ``indexM`` has on the other CPUs.

    Returns
    -------
    specs : tuple of CacheSpec
        One per distinct (level, type, size, shared CPUs), ``instances``
        counted.
    notes : list of str
    """
    notes: list[str] = []
    bad: dict[tuple[int, str], str] = {}
    by_index: dict[str, set[tuple[int, str]]] = {}
    for r in records:
        if r.level is not None and r.type is not None:
            by_index.setdefault(r.index, set()).add((r.level, r.type))
    for r in records:
        if r.level is None or r.type is None:
            spoiled = by_index.get(r.index, set())
            for k in spoiled:
                bad.setdefault(k, r.problems[0])
            if not spoiled:
                notes.append(f"{'; '.join(r.problems)}; this cache is not counted")
        elif r.size_bytes is None or r.shared is None:
            bad.setdefault((r.level, r.type), r.problems[0])
    for r in records:
        notes.extend(r.minor)

    instances: dict[tuple[int, str, int | None, frozenset[int]], CacheRecord] = {}
    for r in records:
        if r.level is None or r.type is None or (r.level, r.type) in bad:
            continue
        assert r.size_bytes is not None and r.shared is not None
        key = (r.level, r.type, r.id, r.shared)
        seen = instances.setdefault(key, r)
        if seen.size_bytes != r.size_bytes:
            bad.setdefault(
                (r.level, r.type),
                f"{seen.where} and {r.where} give one instance two sizes "
                f"({seen.size_bytes} and {r.size_bytes} bytes)",
            )
    for (level, type_), why in sorted(bad.items()):
        notes.append(f"{_kind_name(level, type_)} cache left out: {why}")

    specs = [
        CacheSpec(lvl, typ, r.size_bytes or 0, len(shr), 1, r.line_bytes)
        for (lvl, typ, _, shr), r in instances.items()
        if (lvl, typ) not in bad
    ]
    return merge_specs(specs), notes


def read_caches(cpu_dir: Path, online: tuple[int, ...]) -> Found[tuple[CacheSpec, ...]]:
    """Read the caches of the online CPUs from ``cpuN/cache/indexM``.

    Returns
    -------
    Found of tuple of CacheSpec
        ``value`` is ``None`` when there are no cache directories at all
        (common in VMs) or nothing in them could be used.
    """
    records, without = read_cache_records(cpu_dir, online)
    if not records:
        return Found(None, "sysfs", ("sysfs has no cache directories (cpuN/cache/indexM)",))
    specs, notes = group_caches(records)
    if without:
        notes.append(
            f"online CPUs without a cache directory ({_ids(without)}): caches only they "
            "use are not counted"
        )
    return Found(specs or None, "sysfs", tuple(notes))
