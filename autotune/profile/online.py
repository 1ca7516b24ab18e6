"""Profiles the evaluator learned while it worked (``source: online``).

An evaluator that tuned itself (:mod:`autotune.adapt`) saves what it
settled on here, so that the next process with the same kernel on the same
CPU starts from it.  The file is a schema-1 profile like any other, found by
the same lookup (``$AUTOTUNE_PROFILE_DIR`` first, then the user's config
directory), matched to the CPU the same way; each measurement's
``repeats`` is the number of calls it rests on.

Writing follows :meth:`Profile.save`: atomic (a temporary file renamed over
the old one), so processes that save the same profile at once never leave a
torn file; a directory that cannot be written (a read-only home) is a
warning, once per process and directory, never an error.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autotune._errors import ProfileError, ProfileWarning
from autotune._util import utc_timestamp
from autotune._version import __version__
from autotune.cpu import CpuInfo
from autotune.profile.lookup import profile_dirs
from autotune.profile.match import cpu_mismatch, cpu_section
from autotune.profile.model import Measurement, Profile, python_build

__all__ = [
    "file_slug",
    "kernel_name",
    "load_online",
    "online_dir",
    "online_path",
    "online_profile",
    "save_online",
]

_WARNED: set[str] = set()


def kernel_name(kernel: Any) -> str:
    """``module:qualname`` of a kernel: the name its online profile is saved under."""
    module = getattr(kernel, "__module__", None) or "?"
    qualname = getattr(kernel, "__qualname__", None) or type(kernel).__qualname__
    return f"{module}:{qualname}"


def file_slug(name: str) -> str:
    """``name`` as a safe file-name part (``mymod:kernel`` -> ``mymod-kernel``)."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-.")
    return slug[:80] or "kernel"


def online_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where online profiles are written: the first directory the lookup searches
    (``$AUTOTUNE_PROFILE_DIR``, else the user's)."""
    return profile_dirs(env)[0][1]


def online_path(slug: str, cpu: CpuInfo, directory: Path | None = None) -> Path:
    """``<dir>/online-<slug>-<cpu fingerprint>.yaml``: one file per kernel and CPU."""
    return (directory or online_dir()) / f"online-{slug}-{cpu.fingerprint}.yaml"


def online_profile(
    workload: str,
    cpu: CpuInfo,
    best: Measurement,
    measurements: Sequence[Measurement],
    *,
    backend: str,
    item_bytes: int,
    n: int,
) -> Profile:
    """The profile of what an evaluator settled on (``repeats``: calls per point)."""
    return Profile(
        workload=workload,
        source="online",
        cpu=cpu_section(cpu),
        best=best,
        serial_throughput=None,
        measurements=tuple(measurements),
        created=utc_timestamp(),
        autotune_version=__version__,
        item_bytes=item_bytes,
        n=n,
        backend=backend,
        python=python_build(),
    )


def load_online(name: str, cpu: CpuInfo, backend: str) -> Profile | None:
    """The online profile saved for ``name`` on this CPU and backend, if one fits.

    A file that cannot be read, or is not a valid profile, is a
    ``ProfileWarning`` (tune afresh), never an error.
    """
    path = online_path(file_slug(name), cpu)
    if not path.is_file():
        return None
    try:
        found = Profile.load(path)
    except ProfileError as exc:
        warnings.warn(
            f"online profile not used, tuning afresh: {exc}", ProfileWarning, stacklevel=6
        )
        return None
    if (
        found.source != "online"
        or found.workload != name
        or found.backend != backend
        or cpu_mismatch(found.cpu, cpu) is not None
    ):
        return None
    return found


def save_online(profile: Profile, path: Path) -> bool:
    """Write ``profile`` to ``path`` atomically; warn (once per directory) when it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        profile.save(path)
        return True
    except (OSError, ProfileError) as exc:
        where = str(path.parent)
        if where not in _WARNED:
            _WARNED.add(where)
            warnings.warn(
                f"autotune could not save what it learned about {profile.workload!r} to "
                f"{path}: {exc}; the next process will tune it again (set "
                f"AUTOTUNE_PROFILE_DIR to a writable directory to keep it)",
                ProfileWarning,
                stacklevel=3,
            )
        return False
