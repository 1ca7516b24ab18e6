"""Linux CPU limits: the cgroup CPU quota, and this process's affinity mask.

A container limited to 1.5 CPUs still sees every online CPU in sysfs and in
its affinity mask; only the cgroup quota tells.  cgroup v2 keeps it in
``cpu.max`` (``"<quota> <period>"``, quota ``max`` = none); v1 in
``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (quota ``-1`` = none).  Every
level of the hierarchy can set one, and the smallest wins.

The quota is returned in CPUs (quota / period), ``math.inf`` for none.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from autotune.cpu.common import Found, parse_int, read_text, shorten

__all__ = [
    "cgroup_dirs_live",
    "own_cgroup_paths",
    "parse_cfs",
    "parse_cpu_max",
    "read_affinity",
    "read_cgroup_limit",
]


def parse_cpu_max(text: str) -> float:
    """Parse cgroup v2 ``cpu.max``: CPUs allowed, ``math.inf`` for ``"max ..."``.

    Raises
    ------
    ValueError
        Unless the text is two fields, ``max`` or a positive quota, and a
        positive period.
    """
    fields = text.split()
    if len(fields) != 2:
        raise ValueError(f"expected '<quota> <period>', got {shorten(text.strip())!r}")
    period = parse_int(fields[1], "period")
    if period <= 0:
        raise ValueError(f"period {period} is not positive")
    if fields[0] == "max":
        return math.inf
    quota = parse_int(fields[0], "quota")
    if quota <= 0:
        raise ValueError(f"quota {quota} is neither 'max' nor positive")
    return quota / period


def parse_cfs(quota_text: str, period_text: str) -> float:
    """Parse cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``.

    Returns
    -------
    float
        CPUs allowed; ``math.inf`` when the quota is negative (``-1``: none).

    Raises
    ------
    ValueError
        On garbage, a zero quota or a period that is not positive.
    """
    quota = parse_int(quota_text, "cpu.cfs_quota_us")
    if quota < 0:
        return math.inf
    period = parse_int(period_text, "cpu.cfs_period_us")
    if period <= 0:
        raise ValueError(f"cpu.cfs_period_us {period} is not positive")
    if quota == 0:
        raise ValueError("cpu.cfs_quota_us is 0")
    return quota / period


def _read_v2(d: Path) -> tuple[float | None, str | None]:
    text, why = read_text(d / "cpu.max")
    if text is None:
        return None, None if why == "missing" else f"{d / 'cpu.max'}: {why}"
    try:
        return parse_cpu_max(text), None
    except ValueError as exc:
        return None, f"{d / 'cpu.max'}: {exc}"


def _read_v1(d: Path) -> tuple[float | None, str | None]:
    quota, why = read_text(d / "cpu.cfs_quota_us")
    if quota is None:
        return None, None if why == "missing" else f"{d / 'cpu.cfs_quota_us'}: {why}"
    period, why = read_text(d / "cpu.cfs_period_us")
    if period is None and quota.strip().startswith("-"):
        period = ""  # no limit: the period does not matter
    if period is None:
        return None, f"{d / 'cpu.cfs_period_us'}: {why}"
    try:
        return parse_cfs(quota, period), None
    except ValueError as exc:
        return None, f"{d}: {exc}"


def read_cgroup_limit(v2_dirs: list[Path], v1_dirs: list[Path]) -> Found[float]:
    """The smallest CPU quota set in any of the given cgroup directories.

    Parameters
    ----------
    v2_dirs, v1_dirs : list of pathlib.Path
        cgroup v2 directories (holding ``cpu.max``) and v1 ``cpu`` controller
        directories (holding ``cpu.cfs_*``), from this process's cgroup up
        to the root.

    Returns
    -------
    Found of float
        The quota in CPUs, ``math.inf`` where no file sets one; ``None`` when
        a file that exists cannot be read and no other file sets a limit.
    """
    found: list[tuple[float, str]] = []
    notes: list[str] = []
    for version, dirs, read in (("cgroup v2", v2_dirs, _read_v2), ("cgroup v1", v1_dirs, _read_v1)):
        for d in dirs:
            value, why = read(d)
            if why is not None:
                notes.append(why)
            if value is not None:
                found.append((value, version))
    if not found:
        if notes:
            return Found(None, "cgroup", tuple(notes))
        return Found(math.inf, "no cgroup CPU limit file")
    value, version = min(found)
    if notes:
        # A limit we could not read might be tighter than the one we did.
        notes.append("the cgroup limit used is the smallest of the files that could be read")
    return Found(value, version, tuple(notes))


def own_cgroup_paths(text: str) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and v1 ``cpu`` controller path.

    Parameters
    ----------
    text : str
        The contents of ``/proc/self/cgroup``: ``"0::/user.slice/..."`` (v2),
        ``"4:cpu,cpuacct:/docker/..."`` (v1).
    """
    v2 = v1 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def up_to(mount: Path, rel: str | None) -> list[Path]:
    # Inside a container without its own cgroup namespace, /proc/self/cgroup
    # names a host path that is not mounted here: the mount root is then the
    # container's own cgroup, which is where its limit sits.
    if rel is None:
        return [mount] if mount.is_dir() else []
    here = mount / rel.strip("/")
    if not here.is_dir():
        return [mount] if mount.is_dir() else []
    dirs = [here]
    while here != mount and mount in here.parents:
        here = here.parent
        dirs.append(here)
    return dirs


def cgroup_dirs_live(root: Path = Path("/sys/fs/cgroup")) -> tuple[list[Path], list[Path]]:
    """The cgroup directories whose CPU limits apply to this process.

    Returns
    -------
    v2_dirs, v1_dirs : list of pathlib.Path
        From this process's own cgroup up to the mount root.
    """
    text, _ = read_text(Path("/proc/self/cgroup"))
    v2_path, v1_path = own_cgroup_paths(text or "")
    # Pure v2 mounts at the root; the "hybrid" layout puts v2 under unified/.
    v2_mount = root if (root / "cgroup.controllers").exists() else root / "unified"
    v1_mount = next(
        (root / n for n in ("cpu", "cpu,cpuacct") if (root / n / "cpu.cfs_quota_us").exists()),
        root / "cpu",
    )
    v2 = up_to(v2_mount, v2_path) if v2_path is not None else []
    v1 = up_to(v1_mount, v1_path) if v1_path is not None else []
    return v2, v1


def read_affinity() -> Found[frozenset[int]]:
    """The CPUs this process may run on (``os.sched_getaffinity``), where the OS has it."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:
        return Found(None, "sched_getaffinity", ("sched_getaffinity is not available here",))
    try:
        return Found(frozenset(getaffinity(0)), "sched_getaffinity")
    except OSError as exc:
        return Found(None, "sched_getaffinity", (f"sched_getaffinity failed: {exc}",))
