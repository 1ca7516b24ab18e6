"""Finding a profile: explicit path, ``AUTOTUNE_PROFILE``, ``AUTOTUNE_PROFILE_DIR``,
the user's config dir, the shipped profiles; ``load_profile`` and ``recommend``.

:func:`load_profile` never fails for "no profile found": it falls back to the
heuristic with a :class:`~autotune.ProfileWarning`.
"""

from __future__ import annotations

import errno
import functools
import importlib.resources
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from autotune._errors import ProfileError, ProfileWarning
from autotune._util import BACKENDS, check_int
from autotune.cpu import CpuInfo
from autotune.profile.heuristic import heuristic_profile, heuristic_why
from autotune.profile.match import pick_profile, same_brand, unusable_reason
from autotune.profile.model import Profile, Recommendation

__all__ = ["load_profile", "profile_dirs", "recommend", "shipped_profile_dir", "user_profile_dir"]


def shipped_profile_dir() -> Path:
    """The profiles shipped with autotune: package data ``autotune.shipped_profiles``.

    In a source checkout that is the top-level ``profiles/`` directory; in an
    installed wheel, ``site-packages/autotune/shipped_profiles``.
    """
    return Path(str(importlib.resources.files("autotune.shipped_profiles")))


def user_profile_dir() -> Path:
    """Where this user's profiles live: ``<user config dir>/autotune/profiles``."""
    import platformdirs

    return Path(platformdirs.user_config_dir("autotune")) / "profiles"


def profile_dirs(env: Mapping[str, str] | None = None) -> list[tuple[str, Path]]:
    """Directories searched for profiles, in order, with a label for each.

    ``AUTOTUNE_PROFILE_DIR`` (if set), the user's directory, the shipped one.
    """
    return [*own_profile_dirs(env), ("shipped profiles", shipped_profile_dir())]


def own_profile_dirs(env: Mapping[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """The lookup's directories before the shipped one, lazily: ``AUTOTUNE_PROFILE_DIR``
    (if set), then the user's (found only when asked for: ``platformdirs`` is imported)."""
    env = os.environ if env is None else env
    if env.get("AUTOTUNE_PROFILE_DIR"):
        yield "AUTOTUNE_PROFILE_DIR", Path(env["AUTOTUNE_PROFILE_DIR"])
    yield "user profiles", user_profile_dir()


def _scan(directory: Path, workload: str, notes: list[str]) -> Iterator[Profile]:
    """Valid profiles for ``workload`` in ``directory``, in file-name order.

    A malformed file is skipped with a note rather than raised: one bad file
    in a shared or user directory must not stop every program that looks
    for some other profile there.  (A file named explicitly does raise.)
    """
    try:
        files = sorted(p for p in directory.iterdir() if p.name.endswith(".yaml"))
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            notes.append(f"cannot list {directory}: {exc.strerror or exc}")
        return
    for file in files:
        try:
            profile = Profile.load(file)
        except ProfileError as exc:
            notes.append(f"skipped {exc}")
            continue
        if profile.workload == workload:
            yield profile


@functools.lru_cache(maxsize=1)
def _this_cpu() -> CpuInfo:
    from autotune.cpu import probe

    return probe()


def _check_args(workload: object, item_bytes: object, backend: object) -> None:
    if not isinstance(workload, str) or not workload:
        raise ValueError(f"workload must be a non-empty string, got {workload!r}")
    if item_bytes is not None:
        check_int("item_bytes", item_bytes)
    if backend not in BACKENDS and backend != "local":
        raise ValueError(
            f"backend must be one of {', '.join(BACKENDS)} or 'local', got {backend!r}"
        )


def recommend(
    workload: str,
    path: str | os.PathLike[str] | None = None,
    cpu: CpuInfo | None = None,
    *,
    item_bytes: int | None = None,
    backend: str = "local",
    any_cpu: bool = False,
) -> Recommendation:
    """Find the profile to use for ``workload``, and say why; never raises for "none found".

    Lookup order: ``path``; the file ``$AUTOTUNE_PROFILE``; the directory
    ``$AUTOTUNE_PROFILE_DIR``; :func:`user_profile_dir`;
    :func:`shipped_profile_dir`.  In a directory, the candidates are the
    ``*.yaml`` files whose ``workload`` is ``workload``; the first directory
    holding one that fits wins, and :func:`pick_profile` chooses within it.

    - ``path`` is final: if it does not fit this CPU or backend,
      :class:`ProfileError` says why (it is never replaced by another file
      or by the heuristic).  A file for another workload raises too.
    - ``$AUTOTUNE_PROFILE`` applies to the whole process, so a file there for
      another workload is passed over silently, and one that does not fit
      this CPU is warned about and the directories are searched next.
    - A malformed file named by ``path`` or ``$AUTOTUNE_PROFILE`` raises; one
      met while scanning a directory is skipped with a warning.

    Parameters
    ----------
    workload : str
        The workload's name.
    path : str or path-like, optional
        A profile file to use.
    cpu : CpuInfo, optional
        The CPU to match against; default: :func:`autotune.probe` of this
        machine (probed once per process).
    item_bytes : int, optional
        Bytes per item, for the heuristic only (a profile records its own).
    backend : str
        Backend the profile will be used with: ``"local"`` (default, as
        ``Evaluator(profile=name)`` looks up: processes or threads, whichever
        the profile measured fastest), ``"processes"``, ``"threads"``;
        profiles measured with another one are not handed out (their best
        point means something else there).
    any_cpu : bool
        Use ``path`` (or ``$AUTOTUNE_PROFILE``) even if it was made on
        another CPU.  Directories are always matched to the CPU.

    Raises
    ------
    ProfileError
        ``path`` or ``$AUTOTUNE_PROFILE`` is missing or malformed, or
        ``path`` is a profile for another workload, CPU or backend.
    """
    _check_args(workload, item_bytes, backend)
    notes: list[str] = []
    cpu_known = cpu

    def this_cpu() -> CpuInfo:
        # Probed lazily: a named file used with any_cpu needs no probe.
        nonlocal cpu_known
        if cpu_known is None:
            cpu_known = _this_cpu()
        return cpu_known

    def heuristic(why: str) -> Recommendation:
        c = this_cpu()
        profile = heuristic_profile(c, workload, item_bytes)
        return Recommendation(
            profile, "heuristic", f"{why}; {heuristic_why(c, item_bytes)}", tuple(notes)
        )

    def found(p: Profile, label: str) -> Recommendation:
        brand = " and brand" if cpu_known and same_brand(p.cpu, cpu_known) else ""
        how = "used on any CPU" if any_cpu else f"matches this CPU's topology, caches{brand}"
        return Recommendation(p, f"{p.source} profile {p.path} ({label})", how, tuple(notes))

    if path is not None:
        p = Profile.load(path)
        if p.workload != workload:
            raise ProfileError(path, f"is a profile for workload {p.workload!r}, not {workload!r}")
        # With any_cpu and no cpu given, nothing here needs the probe.
        why = unusable_reason(p, None if any_cpu and cpu is None else this_cpu(), backend, any_cpu)
        if why is None:
            return found(p, "given")
        # Named explicitly: an error, never a silent (or warned) fallback.
        raise ProfileError(path, f"cannot be used here: {why}")

    env_file = os.environ.get("AUTOTUNE_PROFILE")
    if env_file:
        p = Profile.load(env_file)
        if p.workload == workload:
            why = unusable_reason(
                p, None if any_cpu and cpu is None else this_cpu(), backend, any_cpu
            )
            if why is None:
                return found(p, "AUTOTUNE_PROFILE")
            notes.append(f"AUTOTUNE_PROFILE {p.path} not used: {why}")

    searched = []
    others = 0
    for label, directory in profile_dirs():
        if label == "AUTOTUNE_PROFILE_DIR" and not directory.is_dir():
            notes.append(f"AUTOTUNE_PROFILE_DIR {str(directory)!r} is not a directory")
            continue
        searched.append(str(directory))
        candidates = list(_scan(directory, workload, notes))
        chosen = pick_profile(candidates, this_cpu(), backend)
        if chosen is not None:
            return found(chosen, label)
        # Profiles for other machines are expected in a shared directory:
        # counted in the final message, not warned about one by one.
        others += len(candidates)
    where = ", ".join(searched) or "nowhere"
    other = f"; {others} for other CPUs or backends" if others else ""
    return heuristic(f"no profile for {workload!r} fits this CPU (searched {where}{other})")


def load_profile(
    workload: str,
    path: str | os.PathLike[str] | None = None,
    cpu: CpuInfo | None = None,
    *,
    item_bytes: int | None = None,
    backend: str = "local",
    any_cpu: bool = False,
) -> Profile:
    """The profile to use for ``workload`` on this CPU (or ``cpu``).

    Looks in ``path``, ``$AUTOTUNE_PROFILE``, ``$AUTOTUNE_PROFILE_DIR``, the
    user's profile directory and the shipped ``profiles/``, and keeps the
    first that fits the CPU (same logical CPUs, physical cores and L1d/L2/L3
    sizes; the brand breaks ties).  See :func:`recommend` for the details.

    Never fails for "no profile found": then it returns
    :func:`heuristic_profile` (``source == "heuristic"``) and warns with a
    :class:`ProfileWarning`.  Skipped files and profiles not used because
    they were made on another CPU are warned about too.

    Parameters
    ----------
    workload : str
        The workload's name.
    path : str or path-like, optional
        A profile file to use; one that does not fit this CPU (unless
        ``any_cpu``) or ``backend`` raises :class:`ProfileError` naming why.
    cpu : CpuInfo, optional
        Match against this CPU instead of probing this machine.
    item_bytes : int, optional
        Bytes per item, for the heuristic.
    backend : str
        ``"local"`` (default: processes or threads, the same choice as
        ``Evaluator(profile=name)``), ``"processes"`` or ``"threads"``;
        profiles of other backends are not used.
    any_cpu : bool
        Use ``path`` or ``$AUTOTUNE_PROFILE`` even if made on another CPU.

    Returns
    -------
    Profile

    Raises
    ------
    ProfileError
        ``path`` or ``$AUTOTUNE_PROFILE`` is missing, malformed, hostile, of
        an unknown schema, or (``path``) for another workload, CPU or backend.
    """
    rec = recommend(workload, path, cpu, item_bytes=item_bytes, backend=backend, any_cpu=any_cpu)
    messages = list(rec.warnings)
    if rec.profile.source == "heuristic" and rec.profile.path is None:
        p = rec.profile
        messages.append(
            f"{rec.reason}; using {p.workers} workers, chunk_len {p.chunk_len} "
            f"({p.chunk_bytes} bytes)"
        )
    for message in messages:
        warnings.warn(message, ProfileWarning, stacklevel=2)
    return rec.profile
