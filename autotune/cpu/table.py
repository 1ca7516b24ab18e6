"""The table ``autotune probe`` prints (like ``lscpu``)."""

from __future__ import annotations

from autotune._util import format_bytes
from autotune.cpu.model import CpuInfo

__all__ = ["format_table"]


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
    lines.extend(_cache_rows(info) if info.caches else ["Caches:       unknown (see notes)"])
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


def _cache_rows(info: CpuInfo) -> list[str]:
    """One aligned row per cache kind, under a header."""
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
    return [
        "  ".join(
            r[i].ljust(widths[i]) if i < 2 else r[i].rjust(widths[i]) for i in range(len(r))
        ).rstrip()
        for r in rows
    ]
