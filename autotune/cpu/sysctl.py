"""macOS reader: topology, caches and brand from ``sysctl``.

macOS has no sysfs; ``sysctl`` knows the counts (``hw.physicalcpu``,
``hw.logicalcpu``), the brand (``machdep.cpu.brand_string``) and the caches.
Apple silicon describes each performance level on its own
(``hw.perflevel0.*`` for P cores, ``hw.perflevel1.*`` for E cores) with the
CPUs sharing one L2 (``cpusperl2``); the top-level ``hw.l1dcachesize`` /
``hw.l2cachesize`` there describe the *efficiency* cores, so per-level keys
win wherever they exist.  Intel Macs give the top-level sizes and
``hw.cacheconfig``, the number of CPUs sharing one cache of each level.

:func:`parse_sysctl` and :func:`facts_from_sysctl` are pure and tested on
captured ``sysctl -a`` text; :func:`read_sysctl` runs the command and is
called only on Darwin.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from autotune.cpu.common import CacheSpec, Found, Topology, merge_specs, parse_int

__all__ = ["facts_from_sysctl", "parse_sysctl", "read_sysctl"]

_LINE = re.compile(r"([A-Za-z0-9_.]+)\s*(?::|=)\s?(.*)", re.ASCII)


def parse_sysctl(text: str) -> dict[str, str]:
    """Parse ``sysctl -a`` output (``name: value``, or BSD's ``name = value``).

    Continuation lines of multi-line values are ignored.
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE.fullmatch(line.strip())
        if m is not None:
            values.setdefault(m.group(1), m.group(2).strip())
    return values


def _int(values: dict[str, str], key: str, notes: list[str]) -> int | None:
    text = values.get(key)
    if text is None:
        return None
    try:
        n = parse_int(text, key)
    except ValueError as exc:
        notes.append(str(exc))
        return None
    return n if n > 0 else None


def facts_from_sysctl(
    values: dict[str, str],
) -> tuple[Found[Topology], Found[tuple[CacheSpec, ...]], Found[str]]:
    """Topology, caches and brand from parsed ``sysctl`` values.

    Returns
    -------
    topology : Found of Topology
        macOS numbers CPUs ``0 .. n-1`` and has no hotplug, so ``online`` is
        that range; which CPUs form a core is not exposed (``cores`` is None).
    caches : Found of tuple of CacheSpec
    brand : Found of str
    """
    notes: list[str] = []
    logical = _int(values, "hw.logicalcpu", notes) or _int(values, "hw.ncpu", notes)
    physical = _int(values, "hw.physicalcpu", notes)
    packages = _int(values, "hw.packages", notes)
    if logical is None:
        topology: Found[Topology] = Found(
            None, "sysctl", (*notes, "no hw.logicalcpu or hw.ncpu in sysctl")
        )
    else:
        if physical is None:
            notes.append("physical cores unknown: no hw.physicalcpu in sysctl")
        topology = Found(
            Topology(tuple(range(logical)), physical, None, packages), "sysctl", tuple(notes)
        )

    brand_text = values.get("machdep.cpu.brand_string", "").strip()
    brand: Found[str] = (
        Found(brand_text, "sysctl")
        if brand_text
        else Found(None, "sysctl", ("brand unknown: no machdep.cpu.brand_string in sysctl",))
    )

    cache_notes: list[str] = []
    line = _int(values, "hw.cachelinesize", cache_notes)
    levels = _int(values, "hw.nperflevels", cache_notes) or 0
    if levels and all(f"hw.perflevel{i}.logicalcpu" in values for i in range(levels)):
        specs = _perflevel_caches(values, levels, line, cache_notes)
    else:
        specs = _flat_caches(values, logical, physical, line, cache_notes)
    if not specs:
        cache_notes.append("sysctl reports no cache sizes")
        caches: Found[tuple[CacheSpec, ...]] = Found(None, "sysctl", tuple(cache_notes))
    else:
        caches = Found(merge_specs(specs), "sysctl", tuple(cache_notes))
    return topology, caches, brand


def _perflevel_caches(
    values: dict[str, str], levels: int, line: int | None, notes: list[str]
) -> list[CacheSpec]:
    specs: list[CacheSpec] = []
    # (level, size, cpus per instance) -> logical CPUs of the perflevels that
    # report it: one cache may span perflevels, so instances are counted after.
    shared: dict[tuple[int, int, int], int] = {}
    for i in range(levels):
        p = f"hw.perflevel{i}."
        physical = _int(values, p + "physicalcpu", notes)
        logical = _int(values, p + "logicalcpu", notes)
        if physical is None or logical is None or logical % physical:
            notes.append(f"{p}*: core counts unusable; its caches are left out")
            continue
        for key, type_ in (("l1dcachesize", "data"), ("l1icachesize", "instruction")):
            size = _int(values, p + key, notes)
            if size is not None:
                specs.append(CacheSpec(1, type_, size, logical // physical, physical, line))
        for level in (2, 3):
            size = _int(values, f"{p}l{level}cachesize", notes)
            per = _int(values, f"{p}cpusperl{level}", notes)
            if size is None:
                continue
            if per is None:
                notes.append(f"{p}l{level}cachesize left out: no {p}cpusperl{level}")
                continue
            shared[(level, size, per)] = shared.get((level, size, per), 0) + logical
    for (level, size, per), logical in shared.items():
        if logical % per:
            notes.append(f"L{level} of {size} bytes shared by {per} CPUs does not divide {logical}")
            continue
        specs.append(CacheSpec(level, "unified", size, per, logical // per, line))
    return specs


def _flat_caches(
    values: dict[str, str],
    logical: int | None,
    physical: int | None,
    line: int | None,
    notes: list[str],
) -> list[CacheSpec]:
    # hw.cacheconfig: CPUs sharing one instance of [memory, L1, L2, L3, ...].
    config: list[int] = []
    for field in values.get("hw.cacheconfig", "").split():
        try:
            config.append(parse_int(field, "hw.cacheconfig"))
        except ValueError as exc:
            notes.append(str(exc))
            config = []
            break
    specs: list[CacheSpec] = []
    for key, level, type_ in (
        ("hw.l1dcachesize", 1, "data"),
        ("hw.l1icachesize", 1, "instruction"),
        ("hw.l2cachesize", 2, "unified"),
        ("hw.l3cachesize", 3, "unified"),
    ):
        size = _int(values, key, notes)
        if size is None:
            continue
        per = config[level] if len(config) > level and config[level] > 0 else None
        if per is None and level == 1 and logical and physical and logical % physical == 0:
            # Every L1 Apple has shipped is private to a core.
            per = logical // physical
        if per is None or logical is None or logical % per:
            notes.append(f"{key} left out: how many CPUs share it is unknown")
            continue
        specs.append(CacheSpec(level, type_, size, per, logical // per, line))
    return specs


def read_sysctl() -> tuple[Found[Topology], Found[tuple[CacheSpec, ...]], Found[str]]:
    """Run ``sysctl hw machdep.cpu`` and read its facts (macOS only)."""
    exe = shutil.which("sysctl") or "/usr/sbin/sysctl"
    try:
        done = subprocess.run(
            [exe, "hw", "machdep.cpu"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        why = (f"sysctl failed: {exc}",)
        return Found(None, "sysctl", why), Found(None, "sysctl", why), Found(None, "sysctl", why)
    # sysctl exits 1 when one of the names is unknown but still prints the others.
    return facts_from_sysctl(parse_sysctl(done.stdout))
