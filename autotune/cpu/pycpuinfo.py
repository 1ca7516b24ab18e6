"""py-cpuinfo as a source: the brand, and caches where sysfs has none.

py-cpuinfo merges several sources (``/proc/cpuinfo``, ``lscpu``, CPUID, ...)
and its cache figures carry their faults, which must not leak into a probe:

- ``l2_cache_size`` and the L1 sizes come from ``lscpu``, which since
  util-linux 2.37 prints the *total* over all instances (``"4 MiB (2
  instances)"``); py-cpuinfo drops the instance count.  Older ``lscpu`` prints
  the size of one instance.  Which one a figure is cannot be known for sure.
- ``l2_cache_line_size`` comes from CPUID leaf 0x80000006 with two fields
  swapped: it holds the L2 size *per core in KiB* (2048 on a 2 MiB L2), and
  ``l2_cache_size`` from that leaf is the line size times 1024.
- ``l3_cache_size`` comes first from ``/proc/cpuinfo``'s ``cache size``,
  which on AMD parts is the L2 per core.

So where sysfs has caches, sysfs wins and :func:`cross_check` only notes the
disagreements.  Where it has none, :func:`caches_from_pycpuinfo` reads the
figures under stated assumptions, each recorded in the notes.

Calling py-cpuinfo takes about a second (it runs CPUID in a subprocess), so
the probe calls :func:`load_pycpuinfo` only when a figure is missing.
"""

from __future__ import annotations

from typing import Any

from autotune._util import format_bytes
from autotune.cpu.common import CacheSpec, Found, merge_specs

__all__ = ["brand_from_pycpuinfo", "caches_from_pycpuinfo", "cross_check", "load_pycpuinfo"]

#: Smallest per-core size a figure divided by the core count may give and
#: still be taken as a total over cores.  Below it, the figure is more likely
#: one core's cache as older lscpu prints it (i3-3227U: "L2 cache: 256K" with
#: 2 cores would give 128 KiB, smaller than any L2 per core in years).
_MIN_PER_CORE = {1: 32 << 10, 2: 256 << 10}

#: Real cache lines are 32 to 256 bytes; a larger "line size" is py-cpuinfo's
#: swapped CPUID field, i.e. the L2 size per core in KiB.
_MAX_LINE = 256


def load_pycpuinfo() -> Found[dict[str, Any]]:
    """Run ``cpuinfo.get_cpu_info()`` (slow: about a second); never raises."""
    try:
        import cpuinfo
    except ImportError:
        return Found(None, "py-cpuinfo", ("py-cpuinfo is not installed",))
    try:
        info = cpuinfo.get_cpu_info()
    except Exception as exc:  # it shells out and runs CPUID: any failure means "no answer"
        return Found(None, "py-cpuinfo", (f"py-cpuinfo failed: {exc!r}",))
    if not isinstance(info, dict):
        return Found(None, "py-cpuinfo", ("py-cpuinfo returned no information",))
    return Found(info, "py-cpuinfo")


def brand_from_pycpuinfo(info: dict[str, Any]) -> Found[str]:
    """The ``brand_raw`` of a py-cpuinfo result."""
    brand = info.get("brand_raw")
    if isinstance(brand, str) and brand.strip():
        return Found(" ".join(brand.split()), "py-cpuinfo")
    return Found(None, "py-cpuinfo", ("brand unknown: py-cpuinfo has no brand_raw",))


def _size(info: dict[str, Any], key: str) -> int | None:
    value = info.get(key)
    # bool is an int; py-cpuinfo never means one here.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _per_core(value: int, level: int, cores: int, key: str, notes: list[str]) -> int:
    if cores > 1 and value % cores == 0 and value // cores >= _MIN_PER_CORE[level]:
        notes.append(
            f"py-cpuinfo's {key} ({format_bytes(value)}) taken as the total over {cores} "
            f"cores (lscpu >= 2.37 prints totals): {format_bytes(value // cores)} per core"
        )
        return value // cores
    notes.append(f"py-cpuinfo's {key} ({format_bytes(value)}) taken as one core's cache")
    return value


def caches_from_pycpuinfo(
    info: dict[str, Any],
    physical_cores: int | None,
    threads_per_core: int | None,
    logical_cpus: int | None,
) -> Found[tuple[CacheSpec, ...]]:
    """Caches from a py-cpuinfo result, for systems where sysfs has none.

    Assumptions, each recorded in the notes: L1 and L2 are private to a core
    (shared by its hardware threads); an L1/L2 figure divisible by the core
    count with at least 32 KiB (L1) or 256 KiB (L2) per core is a total over
    cores, anything else one core's cache; ``l2_cache_line_size`` above 256 is
    the CPUID L2 size per core in KiB and preferred to ``l2_cache_size``; the
    L3 is one cache shared by all logical CPUs (a CPU with one L3 per CCX has
    several, which py-cpuinfo cannot tell).

    Parameters
    ----------
    info : dict
        What ``cpuinfo.get_cpu_info()`` returned.
    physical_cores, threads_per_core, logical_cpus : int or None
        From the topology source; without them no per-core cache can be
        counted and L1/L2 are left out.
    """
    notes: list[str] = []
    specs: list[CacheSpec] = []
    per_core_known = physical_cores is not None and threads_per_core is not None
    l2_per_core: int | None = None
    if per_core_known:
        assert physical_cores is not None and threads_per_core is not None
        for key, type_ in (
            ("l1_data_cache_size", "data"),
            ("l1_instruction_cache_size", "instruction"),
        ):
            value = _size(info, key)
            if value is not None:
                size = _per_core(value, 1, physical_cores, key, notes)
                specs.append(CacheSpec(1, type_, size, threads_per_core, physical_cores))
        l2_per_core = _l2_per_core(info, physical_cores, notes)
        if l2_per_core is not None:
            line = _size(info, "l2_cache_line_size")
            line = line if line is not None and line <= _MAX_LINE else None
            specs.append(
                CacheSpec(2, "unified", l2_per_core, threads_per_core, physical_cores, line)
            )
    elif any(_size(info, k) for k in ("l1_data_cache_size", "l2_cache_size")):
        notes.append("py-cpuinfo's L1/L2 sizes left out: the number of cores is unknown")

    l3 = _size(info, "l3_cache_size")
    if l3 is not None:
        if l2_per_core is not None and l3 <= l2_per_core:
            # AMD's /proc/cpuinfo "cache size" is the L2, and py-cpuinfo files it as L3.
            notes.append(
                f"py-cpuinfo's l3_cache_size ({format_bytes(l3)}) is not larger than the L2 "
                "per core: it is an L2 figure, left out"
            )
        elif logical_cpus is None:
            notes.append("py-cpuinfo's l3_cache_size left out: the number of CPUs is unknown")
        else:
            notes.append(
                f"py-cpuinfo's l3_cache_size ({format_bytes(l3)}) taken as one L3 shared by all "
                f"{logical_cpus} CPUs"
            )
            specs.append(CacheSpec(3, "unified", l3, logical_cpus, 1))
    if not specs:
        notes.append("py-cpuinfo reports no cache sizes")
        return Found(None, "py-cpuinfo", tuple(notes))
    return Found(merge_specs(specs), "py-cpuinfo", tuple(notes))


def _l2_per_core(info: dict[str, Any], cores: int, notes: list[str]) -> int | None:
    size = _size(info, "l2_cache_size")
    swapped = _size(info, "l2_cache_line_size")
    if swapped is not None and swapped > _MAX_LINE:
        per_core = swapped << 10
        notes.append(
            f"py-cpuinfo's l2_cache_line_size ({swapped}) is CPUID's L2 size per core in KiB "
            f"(py-cpuinfo swaps the fields): {format_bytes(per_core)} per core"
        )
        if size is not None and size not in (per_core, per_core * cores) and size > _MAX_LINE << 10:
            notes.append(
                f"py-cpuinfo's l2_cache_size ({format_bytes(size)}) disagrees with CPUID; "
                "CPUID used"
            )
        return per_core
    if size is None:
        return None
    return _per_core(size, 2, cores, "l2_cache_size", notes)


def cross_check(info: dict[str, Any], caches: tuple[CacheSpec, ...], source: str) -> list[str]:
    """Note where py-cpuinfo disagrees with the caches another source found.

    Nothing is changed: the other source (sysfs, sysctl) wins.  A py-cpuinfo
    size that equals the total over all instances is named as such.
    """
    notes: list[str] = []
    checks = (
        ("l1_data_cache_size", 1, ("data", "unified")),
        ("l1_instruction_cache_size", 1, ("instruction", "unified")),
        ("l2_cache_size", 2, ("data", "unified")),
        ("l3_cache_size", 3, ("data", "unified")),
    )
    for key, level, types in checks:
        value = _size(info, key)
        if value is None:
            continue
        kinds = [c for c in caches if c.level == level and c.type in types]
        if not kinds:
            notes.append(
                f"py-cpuinfo reports {key} {format_bytes(value)}, {source} shows no such cache; "
                "not used"
            )
            continue
        sizes = {c.size_bytes for c in kinds}
        if value in sizes:
            continue
        total = sum(c.size_bytes * c.instances for c in kinds)
        ours = " or ".join(format_bytes(s) for s in sorted(sizes))
        if value == total:
            notes.append(
                f"py-cpuinfo's {key} ({format_bytes(value)}) is the total over "
                f"{sum(c.instances for c in kinds)} instances; {source} gives {ours} per "
                "instance (used)"
            )
        else:
            notes.append(
                f"py-cpuinfo's {key} ({format_bytes(value)}) disagrees with {source} "
                f"({ours} per instance); {source} used"
            )
    line = _size(info, "l2_cache_line_size")
    ours_lines = {c.line_bytes for c in caches if c.level == 2 and c.line_bytes is not None}
    if line is not None and ours_lines and line not in ours_lines:
        notes.append(
            f"py-cpuinfo's l2_cache_line_size ({line}) disagrees with {source} "
            f"({', '.join(str(n) for n in sorted(ours_lines))} bytes); {source} used"
        )
    return notes
