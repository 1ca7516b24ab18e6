"""Profiles: the measured best way to run one workload on one CPU, as YAML.

A profile records, for a workload on a CPU, the worker count and chunk length
that ran fastest, every point measured (or published) on the way, and the
serial baseline.  This module reads and writes them (schema 1 of DESIGN.md),
finds the one that fits this CPU, and falls back to a documented heuristic
when none does: :func:`load_profile` never fails for "no profile found".

Reading is the trust boundary.  A profile can come from a shared directory or
an environment variable, so every file is read as hostile:

- only regular files (checked with ``stat`` before opening, so a FIFO never
  blocks), at most :data:`MAX_PROFILE_BYTES`, strict UTF-8;
- ``yaml.safe_load`` only: a ``!!python/...`` tag is refused, never executed;
- every field is checked once, here (type, range, finiteness; ``bool`` is
  refused where an integer is expected although Python calls it an ``int``);
- whatever goes wrong becomes a one-line :class:`~autotune.ProfileError`
  naming the file and the field.

Numbers.  PyYAML follows YAML 1.1, where ``4.28e6`` is a *string* (a float
needs a dot and a signed exponent: ``4.28e+06``).  Profiles are written with
``yaml.safe_dump``, whose floats always read back as the same float.  When
reading, float fields accept integers, and also a string spelling a plain
decimal number (``"4.28e6"``) because that is what a hand-edited profile
naturally contains; ``nan``, ``inf`` and anything else non-numeric are refused.

Writing is atomic: a temporary file in the target's directory, then
``os.replace``; a failed save leaves no partial file and an existing profile
untouched.  The file ends with the measurements as one bracketed list, so a
profile truncated anywhere (a partial copy) fails to load instead of loading
with points missing (:func:`dump_yaml`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import numbers
import os
import platform
import re
import stat
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from autotune._errors import ProfileError
from autotune.cpu import CpuInfo

__all__ = [
    "DEFAULT_ITEM_BYTES",
    "MAX_PROFILE_BYTES",
    "MIN_CHUNK_ITEMS",
    "SCHEMA",
    "SOURCES",
    "Measurement",
    "Profile",
    "ProfileWarning",
    "Recommendation",
    "cpu_mismatch",
    "cpu_section",
    "dump_yaml",
    "heuristic_profile",
    "is_unchunked",
    "load_profile",
    "pick_profile",
    "profile_dirs",
    "recommend",
    "shipped_profile_dir",
    "user_profile_dir",
]

#: The only schema this version reads and writes.
SCHEMA = 1
#: Where a profile's numbers come from, most trusted first.
SOURCES = ("measured", "published", "heuristic")
#: Backends a profile may have been measured with (DESIGN.md, ``Evaluator``).
BACKENDS = ("processes", "threads", "dask")
#: ``backend="local"`` in a lookup accepts either of these.
LOCAL_BACKENDS = ("processes", "threads")


def gil_enabled() -> bool:
    """Whether this Python build runs with the GIL (free-threaded builds may not)."""
    check = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def python_build() -> dict[str, Any]:
    """The ``python`` section of a profile measured with this interpreter."""
    return {"version": platform.python_version(), "gil": gil_enabled()}


#: Larger files are refused unread: a real profile is a few KiB.
MAX_PROFILE_BYTES = 1 << 20
#: Bytes per item assumed by the heuristic when the workload does not say.
DEFAULT_ITEM_BYTES = 16
#: The heuristic never hands out chunks shorter than this many items.
MIN_CHUNK_ITEMS = 4096
#: L2 per core assumed when the probe could not read the L2 (the smallest
#: per-core L2 of current x86 cores, the i3-3227U's included).
FALLBACK_L2_BYTES = 256 * 1024

# Upper bounds that keep absurd integers out (they would overflow numpy
# index arithmetic or mean a corrupted file); far above any real machine.
_MAX_WORKERS = 1 << 16
_MAX_COUNT = 1 << 62
_MAX_REPEATS = 1 << 20

_FLOAT_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TOP_KEYS = {
    "schema",
    "workload",
    "source",
    "created",
    "autotune_version",
    "backend",
    "python",
    "item_bytes",
    "n",
    "cpu",
    "best",
    "serial_throughput",
    "measurements",
}
_MEASUREMENT_KEYS = {"workers", "chunk_len", "chunk_bytes", "throughput", "repeats", "spread"}
_MEASUREMENT_KEYS_OPTIONAL = {"repeats", "spread", "backend"}


class ProfileWarning(UserWarning):
    """A profile was skipped or not used, or the heuristic stood in for one."""


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One point of the search: a worker count and a chunk length, and its speed.

    Parameters
    ----------
    workers : int
        Worker processes (1 is the serial point when the run is one chunk).
    chunk_len : int
        Items per chunk.
    chunk_bytes : int
        Bytes per chunk: ``chunk_len * item_bytes`` rounded to within one
        item (the seed's table is in round bytes: 7812 items of 16 bytes are
        filed as 125000).
    throughput : float or None
        Items per second (the median of the repeats).  ``None`` only for the
        heuristic's unmeasured pick.
    repeats : int
        How many timed runs the median is over.
    spread : float
        Relative spread of those runs, e.g. ``(max - min) / median``.
    backend : str, optional
        Backend of this point, where it differs from the profile's.
    """

    workers: int
    chunk_len: int
    chunk_bytes: int
    throughput: float | None
    repeats: int = 1
    spread: float = 0.0
    backend: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain types for YAML/JSON; defaults (1 repeat, no spread) are left out."""
        d: dict[str, Any] = {
            "workers": _plain(self.workers),
            "chunk_len": _plain(self.chunk_len),
            "chunk_bytes": _plain(self.chunk_bytes),
            "throughput": None if self.throughput is None else _plain_float(self.throughput),
        }
        if self.repeats != 1:
            d["repeats"] = _plain(self.repeats)
        if self.spread != 0.0:
            d["spread"] = _plain_float(self.spread)
        if self.backend is not None:
            d["backend"] = self.backend
        return d


@dataclass(frozen=True)
class Profile:
    """The best way found to run one workload on one CPU.

    Build one with :func:`heuristic_profile`, the tuner, :meth:`load` or
    :meth:`from_dict`; the YAML layout is DESIGN.md's schema 1.

    Parameters
    ----------
    workload : str
        Name of the workload it was made for.
    source : {"measured", "published", "heuristic"}
        Where the numbers come from.
    cpu : dict
        The CPU it was made on (:func:`cpu_section`): ``brand``,
        ``fingerprint``, ``logical_cpus``, ``physical_cores`` and
        ``caches: {l1d, l2, l3}`` in bytes.
    best : Measurement
        The point to use.
    serial_throughput : float or None
        Items per second of one process over the whole range; ``None`` for
        the heuristic.
    measurements : tuple of Measurement
        Every point measured (or published).
    created : str
        ISO 8601 time of creation, UTC.
    autotune_version : str
        Version of autotune that wrote it.
    schema : int
        Always :data:`SCHEMA`.
    item_bytes : int, optional
        Bytes touched per item, which turns chunk lengths into chunk bytes.
    n : int, optional
        Items per measured run.  A measurement is "unchunked" when no worker
        got more than one chunk of it (:func:`is_unchunked`).
    backend : str
        Backend of the best point (``"processes"`` or ``"threads"``).
    python : dict, optional
        The Python build measured on: ``{version: "3.11.7", gil: true}``.
        A threads profile is only used on a build with the same GIL setting.
    path : str, optional
        File it was loaded from; not written to YAML.
    """

    workload: str
    source: str
    cpu: dict[str, Any]
    best: Measurement
    serial_throughput: float | None
    measurements: tuple[Measurement, ...]
    created: str
    autotune_version: str
    schema: int = SCHEMA
    item_bytes: int | None = None
    n: int | None = None
    backend: str = "processes"
    python: dict[str, Any] | None = None
    path: str | None = field(default=None, compare=False, repr=False)

    @property
    def workers(self) -> int:
        """Worker count of the best point."""
        return self.best.workers

    @property
    def chunk_len(self) -> int:
        """Items per chunk of the best point."""
        return self.best.chunk_len

    @property
    def chunk_bytes(self) -> int:
        """Bytes per chunk of the best point."""
        return self.best.chunk_bytes

    @property
    def speedup(self) -> float | None:
        """Best throughput over the serial baseline, where both are known."""
        if self.best.throughput is None or not self.serial_throughput:
            return None
        return self.best.throughput / self.serial_throughput

    def to_dict(self) -> dict[str, Any]:
        """The YAML document, as plain types (``path`` is not part of it)."""
        d: dict[str, Any] = {
            "schema": self.schema,
            "workload": self.workload,
            "source": self.source,
            "created": self.created,
            "autotune_version": self.autotune_version,
            "backend": self.backend,
        }
        if self.item_bytes is not None:
            d["item_bytes"] = _plain(self.item_bytes)
        if self.n is not None:
            d["n"] = _plain(self.n)
        if self.python is not None:
            d["python"] = dict(self.python)
        caches = self.cpu.get("caches") or {}
        d["cpu"] = {
            **{k: _plain(v) for k, v in self.cpu.items() if k != "caches"},
            "caches": {k: _plain(v) for k, v in caches.items()},
        }
        d["best"] = self.best.to_dict()
        d["serial_throughput"] = (
            None if self.serial_throughput is None else _plain_float(self.serial_throughput)
        )
        d["measurements"] = [m.to_dict() for m in self.measurements]
        return d

    @classmethod
    def from_dict(cls, d: object, path: str | os.PathLike[str] | None = None) -> Profile:
        """Validate a parsed document and build the profile.

        Parameters
        ----------
        d : object
            What ``yaml.safe_load`` returned.
        path : str or path-like, optional
            The file it came from, named in errors and kept as ``.path``.

        Raises
        ------
        ProfileError
            On the first bad field, naming the file and the field.
        """
        return _Validator(path).profile(d)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Read and validate a profile file.

        Raises
        ------
        ProfileError
            The file is missing, not a regular file, too large, not UTF-8,
            not YAML, uses a tag that plain YAML lacks, or has a bad field.
        """
        return cls.from_dict(_read_yaml(path), path)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as YAML, atomically; return the path written.

        The directory must exist.  The document is validated first, so a
        file that :meth:`load` would refuse is never written, and the text is
        written to a temporary file beside ``path`` and renamed over it: on
        any error no partial file is left and an existing file is untouched.

        Raises
        ------
        ProfileError
            The profile is invalid, or the file cannot be written (missing or
            read-only directory, ``path`` is a directory ...).
        """
        target = Path(path)
        doc = self.to_dict()
        Profile.from_dict(doc, target)  # refuse to write what could not be read back
        _write_atomic(target, dump_yaml(doc).encode("utf-8"))
        return target


_HEADER = "# autotune profile (schema 1); print it with: autotune show PATH\n"


def dump_yaml(doc: Mapping[str, Any]) -> str:
    """The text of a profile document, as :meth:`Profile.save` writes it.

    ``yaml.safe_dump`` throughout (its floats read back exactly), small
    mappings in flow style as in DESIGN.md, and ``measurements`` last, as a
    bracketed list with one point per line::

        measurements: [
          {workers: 2, chunk_len: 7812, chunk_bytes: 125000, throughput: 4280000.0},
          {workers: 3, chunk_len: 7812, chunk_bytes: 125000, throughput: 2690000.0}
        ]

    The brackets make every truncation of the file an error: a block list
    cut at a line boundary would still be valid YAML, only shorter.
    """
    head = {k: v for k, v in doc.items() if k != "measurements"}
    text = _HEADER + yaml.safe_dump(
        head, sort_keys=False, default_flow_style=None, width=120, allow_unicode=True
    )
    points = [
        yaml.safe_dump(m, sort_keys=False, default_flow_style=True, width=1 << 20).strip()
        for m in doc.get("measurements", ())
    ]
    if not points:
        return text + "measurements: []\n"
    return text + "measurements: [\n  " + ",\n  ".join(points) + "\n]\n"


@dataclass(frozen=True)
class Recommendation:
    """What :func:`recommend` decided and why.

    Attributes
    ----------
    profile : Profile
        The profile to use; ``source == "heuristic"`` (and ``path`` None)
        when no file fitted.
    origin : str
        Where it came from: ``"published profile PATH (shipped profiles)"``,
        or ``"heuristic"``.
    why : str
        Why that one: it matches this CPU, or why no file did and how the
        heuristic derived its numbers.
    warnings : tuple of str
        Files skipped and profiles passed over on the way (the fallback to
        the heuristic itself is in ``why``).
    """

    profile: Profile
    origin: str
    why: str
    warnings: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """``origin`` and ``why`` in one line."""
        return f"{self.origin}: {self.why}"


# ---------------------------------------------------------------------------
# Reading and writing files
# ---------------------------------------------------------------------------


def _read_yaml(path: str | os.PathLike[str]) -> object:
    """Parse one untrusted YAML file; every failure is a ProfileError."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise ProfileError(name, "no such file") from None
    except OSError as exc:
        raise ProfileError(name, f"cannot read: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte in the name
        raise ProfileError(repr(name), "is not a usable file name") from None
    # Checked before opening: open() on a FIFO blocks until a writer comes.
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ProfileError(name, f"is {kind}, expected a profile YAML file")
    if st.st_size > MAX_PROFILE_BYTES:
        raise ProfileError(
            name, f"is {st.st_size} bytes, larger than the {MAX_PROFILE_BYTES} a profile may be"
        )
    try:
        # O_NONBLOCK and the fstat close the race where the file is swapped
        # for a FIFO between the stat and the open.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ProfileError(name, "is not a regular file, expected a profile YAML file")
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(name, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(name, f"is larger than the {MAX_PROFILE_BYTES} bytes a profile may be")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(name, f"is not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        raise ProfileError(name, _yaml_problem(exc)) from None
    except RecursionError:
        raise ProfileError(name, "YAML nested too deeply") from None
    except Exception as exc:
        # safe_load only parses, so whatever else it raises (a date such as
        # 2026-02-30, an integer over Python's digit limit, ...) is a bad
        # file, and the contract is a ProfileError, never a traceback.
        raise ProfileError(name, f"unreadable YAML: {_one_line(str(exc))}") from None


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    where = ""
    mark = exc.problem_mark or exc.context_mark
    if mark is not None:
        where = f" at line {mark.line + 1}, column {mark.column + 1}"
    problem = exc.problem or exc.context or "invalid YAML"
    if isinstance(exc, yaml.constructor.ConstructorError):
        # The only way safe_load meets a constructor it lacks is a tag such
        # as !!python/object/apply: say plainly that it was refused.
        return f"refused YAML tag{where}: {_one_line(problem)} (profiles are plain YAML)"
    return f"YAML syntax error{where}: {_one_line(problem)}"


def _write_atomic(target: Path, data: bytes) -> None:
    directory = target.parent
    if not directory.is_dir():
        raise ProfileError(target, f"cannot write: directory {str(directory)!r} does not exist")
    if target.is_dir():
        raise ProfileError(target, "cannot write: is a directory")
    # Never rename over a FIFO, a device or a socket: run as root, a profile
    # saved to /dev/null would replace the device with a regular file.
    if target.exists() and not target.is_file():
        raise ProfileError(target, "cannot write: is not a regular file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ProfileError(target, f"cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            # mkstemp makes the file 0600; a profile is meant to be shared,
            # so keep the mode of the file being replaced, else rw-r--r--.
            try:
                mode = stat.S_IMODE(os.stat(target).st_mode)
            except OSError:
                mode = 0o644
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, target)
    except BaseException as exc:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ProfileError(target, f"cannot write: {exc.strerror or exc}") from None
        raise


# ---------------------------------------------------------------------------
# Validation: every field, once
# ---------------------------------------------------------------------------


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: object) -> str:
    """A short one-line rendering of a bad value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return _one_line(repr(value), 60)


def _plain(value: Any) -> Any:
    """numpy scalars to Python ones, so yaml.safe_dump can write them."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _plain_float(value: Any) -> Any:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


class _Validator:
    """Checks one parsed document; errors name ``path`` and the field."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else os.fspath(path)

    def fail(self, problem: str) -> ProfileError:
        return ProfileError(self.path, problem)

    # -- scalars -------------------------------------------------------------
    def integer(self, value: object, name: str, lo: int = 1, hi: int = _MAX_COUNT) -> int:
        # bool is an int subclass: `workers: true` must not read as 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise self.fail(f"{name} must be an integer >= {lo}, got {_show(value)}")
        if value > hi:
            raise self.fail(f"{name} must be an integer from {lo} to {hi}, got {_show(value)}")
        return value

    def opt_integer(
        self, value: object, name: str, lo: int = 1, hi: int = _MAX_COUNT
    ) -> int | None:
        return None if value is None else self.integer(value, name, lo, hi)

    def number(self, value: object, name: str, *, positive: bool = True) -> float:
        what = "a finite number > 0" if positive else "a finite number >= 0"
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # "4.28e6": a YAML 1.1 string, see the module docstring
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{name} must be {what}, got {_show(value)}")
        try:
            x = float(value)
        except OverflowError:
            raise self.fail(f"{name} must be {what}, got {_show(value)}") from None
        if not math.isfinite(x) or x < 0 or (positive and x == 0):
            raise self.fail(f"{name} must be {what}, got {_show(value)}")
        return x

    def text(self, value: object, name: str, *, choices: Sequence[str] | None = None) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{name} must be a non-empty string, got {_show(value)}")
        if choices is not None and value not in choices:
            raise self.fail(f"{name} must be one of {', '.join(choices)}, got {_show(value)}")
        return value

    def timestamp(self, value: object, name: str) -> str:
        # YAML 1.1 turns an unquoted 2026-11-27T13:00:00Z into a datetime.
        if isinstance(value, datetime):
            if value.tzinfo is not None:
                return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            return value.isoformat()
        if isinstance(value, date):
            return value.isoformat()
        return self.text(value, name)

    def mapping(self, value: object, name: str) -> Mapping[Any, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(f"{name} must be a mapping, got {_show(value)}")
        return value

    def keys(
        self, d: Mapping[Any, Any], name: str, allowed: set[str] | None, required: Iterable[str]
    ) -> None:
        for key in required:
            if key not in d:
                raise self.fail(f"missing field {name}{key}")
        for key in d:
            if allowed is not None and key not in allowed:
                raise self.fail(f"unknown field {name}{_one_line(str(key), 40)}")

    # -- sections -------------------------------------------------------------
    def measurement(
        self, value: object, name: str, item_bytes: int | None, *, measured: bool = True
    ) -> Measurement:
        d = self.mapping(value, name)
        allowed = _MEASUREMENT_KEYS | _MEASUREMENT_KEYS_OPTIONAL
        self.keys(d, f"{name}.", allowed, _MEASUREMENT_KEYS - _MEASUREMENT_KEYS_OPTIONAL)
        workers = self.integer(d["workers"], f"{name}.workers", hi=_MAX_WORKERS)
        chunk_len = self.integer(d["chunk_len"], f"{name}.chunk_len")
        chunk_bytes = self.integer(d["chunk_bytes"], f"{name}.chunk_bytes")
        if item_bytes is not None and abs(chunk_len * item_bytes - chunk_bytes) >= item_bytes:
            raise self.fail(
                f"{name}.chunk_bytes must be chunk_len x item_bytes ({chunk_len} x {item_bytes}"
                f" = {chunk_len * item_bytes}) within one item, got {chunk_bytes}"
            )
        return Measurement(
            workers=workers,
            chunk_len=chunk_len,
            chunk_bytes=chunk_bytes,
            # The heuristic's pick is a rule, not a measurement: no throughput.
            throughput=(
                None
                if not measured and d["throughput"] is None
                else self.number(d["throughput"], f"{name}.throughput")
            ),
            repeats=self.integer(d.get("repeats", 1), f"{name}.repeats", hi=_MAX_REPEATS),
            spread=self.number(d.get("spread", 0.0), f"{name}.spread", positive=False),
            backend=(
                None
                if d.get("backend") is None
                else self.text(d["backend"], f"{name}.backend", choices=BACKENDS)
            ),
        )

    def cpu(self, value: object, name: str = "cpu") -> dict[str, Any]:
        d = self.mapping(value, name)
        self.keys(d, f"{name}.", None, ("logical_cpus", "physical_cores", "caches"))
        out: dict[str, Any] = {}
        for key, v in d.items():
            if not isinstance(key, str):
                raise self.fail(f"{name} keys must be strings, got {_show(key)}")
            if key == "caches":
                continue
            if key in ("brand", "fingerprint"):
                out[key] = None if v is None else self.text(v, f"{name}.{key}")
            elif key in ("logical_cpus", "physical_cores"):
                out[key] = self.opt_integer(v, f"{name}.{key}", hi=_MAX_WORKERS)
            elif key in ("dask_workers", "threads", "threads_per_worker", "nthreads"):
                # A Dask cluster's shape (backend: dask).
                out[key] = self.opt_integer(v, f"{name}.{key}")
            elif key == "worker_probes" and name == "cpu":
                # Each Dask worker's probe: the same shape as this section, one
                # level deep only.
                if not isinstance(v, list) or len(v) > _MAX_WORKERS:
                    raise self.fail(f"cpu.worker_probes must be a list, got {_show(v)}")
                out[key] = [self.cpu(p, f"cpu.worker_probes[{i}]") for i, p in enumerate(v)]
            elif v is None or isinstance(v, (str, int, float, bool)):
                # More figures from the probe are welcome; only scalars, so a
                # hostile document cannot hide structures here.
                out[key] = v
            else:
                raise self.fail(f"{name}.{key} must be a number or a string, got {_show(v)}")
        logical, physical = out["logical_cpus"], out["physical_cores"]
        if logical is not None and physical is not None and physical > logical:
            raise self.fail(
                f"{name}.physical_cores ({physical}) must not exceed "
                f"{name}.logical_cpus ({logical})"
            )
        caches = self.mapping(d["caches"], f"{name}.caches")
        self.keys(caches, f"{name}.caches.", None, ("l1d", "l2", "l3"))
        out["caches"] = {}
        for key, v in caches.items():
            if not isinstance(key, str):
                raise self.fail(f"{name}.caches keys must be strings, got {_show(key)}")
            out["caches"][key] = self.opt_integer(v, f"{name}.caches.{key}")
        return out

    def python_build(self, value: object) -> dict[str, Any]:
        d = self.mapping(value, "python")
        self.keys(d, "python.", {"version", "gil"}, ("version", "gil"))
        gil = d["gil"]
        if not isinstance(gil, bool):
            raise self.fail(f"python.gil must be true or false, got {_show(gil)}")
        return {"version": self.text(d["version"], "python.version"), "gil": gil}

    def profile(self, doc: object) -> Profile:
        if doc is None:
            raise self.fail("is empty, expected a profile mapping")
        d = self.mapping(doc, "the document")
        # The schema first: a future schema's other fields mean other things.
        if "schema" not in d:
            raise self.fail("missing field schema")
        schema = d["schema"]
        if isinstance(schema, bool) or schema != SCHEMA or not isinstance(schema, int):
            raise self.fail(f"unknown schema {_show(schema)}, this autotune reads schema {SCHEMA}")
        required = (
            "workload",
            "source",
            "created",
            "autotune_version",
            "cpu",
            "best",
            "serial_throughput",
            "measurements",
        )
        self.keys(d, "", _TOP_KEYS, required)
        source = self.text(d["source"], "source", choices=SOURCES)
        item_bytes = self.opt_integer(d.get("item_bytes"), "item_bytes")
        measurements = d["measurements"]
        if not isinstance(measurements, list):
            raise self.fail(f"measurements must be a list, got {_show(measurements)}")
        best = self.measurement(d["best"], "best", item_bytes, measured=source != "heuristic")
        serial = d["serial_throughput"]
        return Profile(
            workload=self.text(d["workload"], "workload"),
            source=source,
            cpu=self.cpu(d["cpu"]),
            best=best,
            serial_throughput=(
                None
                if serial is None and source == "heuristic"
                else self.number(serial, "serial_throughput")
            ),
            measurements=tuple(
                self.measurement(m, f"measurements[{i}]", item_bytes)
                for i, m in enumerate(measurements)
            ),
            created=self.timestamp(d["created"], "created"),
            autotune_version=self.text(d["autotune_version"], "autotune_version"),
            schema=SCHEMA,
            item_bytes=item_bytes,
            n=self.opt_integer(d.get("n"), "n"),
            backend=self.text(d.get("backend", "processes"), "backend", choices=BACKENDS),
            python=None if d.get("python") is None else self.python_build(d["python"]),
            path=self.path,
        )


# ---------------------------------------------------------------------------
# CPU matching and picking (pure)
# ---------------------------------------------------------------------------


def cpu_section(cpu: CpuInfo) -> dict[str, Any]:
    """The ``cpu:`` section of a profile made on ``cpu``."""
    return {
        "brand": cpu.brand,
        "fingerprint": cpu.fingerprint,
        "logical_cpus": cpu.logical_cpus,
        "physical_cores": cpu.physical_cores,
        "caches": {"l1d": cpu.l1d, "l2": cpu.l2, "l3": cpu.l3},
    }


def _size(b: int | None) -> str:
    if b is None:
        return "?"
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale and b % scale == 0:
            return f"{b // scale} {unit}"
    return f"{b} B"


def _describe(logical: Any, physical: Any, l1d: Any, l2: Any, l3: Any) -> str:
    return (
        f"{logical if logical is not None else '?'} logical / "
        f"{physical if physical is not None else '?'} physical, "
        f"L1d {_size(l1d)}, L2 {_size(l2)}, L3 {_size(l3)}"
    )


def cpu_mismatch(section: Mapping[str, Any], cpu: CpuInfo) -> str | None:
    """Why a profile's ``cpu`` section does not fit ``cpu``; ``None`` if it does.

    Topology (logical CPUs, physical cores) and cache sizes (L1d, L2, L3 of
    one instance) must be equal; the brand is not compared here (it only
    breaks ties, see :func:`pick_profile`).  Unknown topology or L2 on
    either side never matches: a profile is only worth using where we know
    it is the same machine shape.
    """
    caches = section.get("caches") or {}
    theirs = (
        section.get("logical_cpus"),
        section.get("physical_cores"),
        caches.get("l1d"),
        caches.get("l2"),
        caches.get("l3"),
    )
    ours = (cpu.logical_cpus, cpu.physical_cores, cpu.l1d, cpu.l2, cpu.l3)
    known = all(x is not None for x in (*theirs[:2], theirs[3], *ours[:2], ours[3]))
    if known and theirs == ours:
        return None
    return f"made on another CPU ({_describe(*theirs)}; this CPU: {_describe(*ours)})"


def _norm_brand(brand: object) -> str | None:
    return " ".join(brand.split()).casefold() if isinstance(brand, str) and brand.strip() else None


def _same_brand(section: Mapping[str, Any], cpu: CpuInfo) -> bool:
    theirs = _norm_brand(section.get("brand"))
    return theirs is not None and theirs == _norm_brand(cpu.brand)


def _unusable(profile: Profile, cpu: CpuInfo | None, backend: str, any_cpu: bool) -> str | None:
    """Why ``profile`` must not be handed out for ``cpu``; ``None`` if it may.

    ``cpu`` may be None only with ``any_cpu``: then only the backend is checked.
    """
    allowed = LOCAL_BACKENDS if backend == "local" else (backend,)
    if profile.backend not in allowed:
        return f"measured with backend {profile.backend!r}, not {backend!r}"
    build = profile.python
    if profile.backend == "threads" and build is not None and build.get("gil") != gil_enabled():

        def state(on: object) -> str:
            return "enabled" if on else "disabled"

        return (
            f"a threads profile measured with the GIL {state(build.get('gil'))}; "
            f"this Python build has it {state(gil_enabled())}"
        )
    if cpu is None:
        return None
    if not any_cpu:
        mismatch = cpu_mismatch(profile.cpu, cpu)
        if mismatch:
            return mismatch
    # A dask profile's workers are tasks in flight on a cluster, not local
    # CPUs; the cluster's shape is checked against the live one by the dask
    # backend (autotune._dask.load_cluster_profile).
    if (
        profile.backend != "dask"
        and cpu.usable_cpus is not None
        and profile.workers > cpu.usable_cpus
    ):
        # Same machine shape, but this process may use fewer CPUs (affinity,
        # a container quota): the profile's best point cannot run here.
        return f"wants {profile.workers} workers, only {cpu.usable_cpus} CPUs are usable here"
    return None


_SOURCE_RANK = {s: i for i, s in enumerate(SOURCES)}


def pick_profile(
    candidates: Sequence[Profile], cpu: CpuInfo, backend: str = "processes"
) -> Profile | None:
    """The candidate to use on ``cpu``, or ``None`` if none fits.

    Candidates that do not fit (another CPU shape, another backend, more
    workers than usable CPUs) are dropped.  Among the rest, one whose brand
    equals this CPU's wins; then measured beats published beats heuristic;
    then the earlier candidate (callers pass them in lookup order).
    """
    fitting = [
        (not _same_brand(p.cpu, cpu), _SOURCE_RANK.get(p.source, len(SOURCES)), i, p)
        for i, p in enumerate(candidates)
        if _unusable(p, cpu, backend, any_cpu=False) is None
    ]
    return min(fitting, key=lambda t: t[:3])[3] if fitting else None


def is_unchunked(m: Measurement, n: int | None) -> bool:
    """Whether ``m`` ran without chunking: no worker got more than one chunk.

    That is how a profile encodes the seed's "unlimited" column: the serial
    point is ``workers: 1, chunk_len: n``.  Unknown ``n``: ``False``.
    """
    return n is not None and m.chunk_len * m.workers >= n


# ---------------------------------------------------------------------------
# The heuristic
# ---------------------------------------------------------------------------


def _l2_per_core(cpu: CpuInfo) -> int | None:
    """Bytes of L2 one core has to itself (an L2 may serve a core cluster)."""
    size = cpu.l2
    if size is None:
        return None
    shared = [
        c.shared_cpus
        for c in cpu.caches
        if c.level == 2 and c.type in ("data", "unified") and c.size_bytes == size
    ]
    threads = cpu.threads_per_core or 1
    cores_sharing = max(1, min(shared, default=threads) // threads)
    return size // cores_sharing


def _heuristic_workers(cpu: CpuInfo) -> tuple[int, str]:
    if cpu.physical_cores:
        cores, why = cpu.physical_cores, "physical cores"
    elif cpu.logical_cpus and cpu.threads_per_core:
        cores, why = max(1, cpu.logical_cpus // cpu.threads_per_core), "logical / threads per core"
    elif cpu.logical_cpus:
        cores, why = cpu.logical_cpus, "logical CPUs (cores unknown)"
    elif cpu.usable_cpus:
        cores, why = cpu.usable_cpus, "usable CPUs (topology unknown)"
    else:
        cores, why = os.cpu_count() or 1, "os.cpu_count() (nothing probed)"
    if cpu.usable_cpus and cpu.usable_cpus < cores:
        return cpu.usable_cpus, f"{why}, capped at {cpu.usable_cpus} usable"
    return max(1, cores), why


def heuristic_profile(cpu: CpuInfo, workload: str, item_bytes: int | None = None) -> Profile:
    """The profile to use when none was measured: a rule from the probe.

    The rule: **workers = physical cores** (capped by the usable CPUs), and
    **chunk bytes = L2 per core / 8**, but never fewer than
    :data:`MIN_CHUNK_ITEMS` items per chunk.

    Evidence (DESIGN.md, "Measured so far"): on a 2-core machine with 2 MiB
    L2 per core, over five chunk-sensitive workloads (a Horner polynomial, an
    erf/exp mix, a row filter, a multi-pass stream, the seed's splines),
    2 workers with chunks between L2/16 and L2/4 per core reached >= 0.92 of
    each workload's best; L2/2 fell to 0.73 (polynomial), unchunked to
    0.18-0.5, and 1 worker never beat 0.59.  L2/8 sits in the middle of the
    good band in log scale, and cores rather than hardware threads is what
    the seed found too (2 workers beat 3 and 4 on the 2-core/4-thread
    i3-3227U).  The floor keeps the per-chunk overhead small where the L2 is
    small or items are big.

    Parameters
    ----------
    cpu : CpuInfo
        What the probe found; missing figures fall back to logical CPUs,
        ``os.cpu_count()`` and a 256 KiB L2.
    workload : str
        Name recorded in the profile.
    item_bytes : int, optional
        Bytes touched per item, temporaries included (the rule drifts when
        they are left out).  Unknown: :data:`DEFAULT_ITEM_BYTES` (two
        float64 per item), which the profile then records.

    Returns
    -------
    Profile
        ``source == "heuristic"``, no measurements, best throughput ``None``.
    """
    from autotune import __version__

    if item_bytes is None:
        item_bytes = DEFAULT_ITEM_BYTES
    if isinstance(item_bytes, bool) or not isinstance(item_bytes, int) or item_bytes < 1:
        raise ValueError(f"item_bytes must be an integer >= 1, got {item_bytes!r}")
    workers, _ = _heuristic_workers(cpu)
    l2 = _l2_per_core(cpu) or FALLBACK_L2_BYTES
    chunk_len = max(MIN_CHUNK_ITEMS, (l2 // 8) // item_bytes)
    best = Measurement(workers, chunk_len, chunk_len * item_bytes, throughput=None)
    return Profile(
        workload=workload,
        source="heuristic",
        cpu=cpu_section(cpu),
        best=best,
        serial_throughput=None,
        measurements=(),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        autotune_version=__version__,
        item_bytes=item_bytes,
    )


def _heuristic_why(cpu: CpuInfo, item_bytes: int | None) -> str:
    _, workers_why = _heuristic_workers(cpu)
    l2 = _l2_per_core(cpu)
    l2_why = f"L2 {_size(l2)} per core / 8" if l2 else f"L2 unknown, {_size(FALLBACK_L2_BYTES)} / 8"
    items = f"{item_bytes} B/item" if item_bytes else f"{DEFAULT_ITEM_BYTES} B/item assumed"
    return f"workers = {workers_why}; chunk = {l2_why}, >= {MIN_CHUNK_ITEMS} items, {items}"


# ---------------------------------------------------------------------------
# Lookup: explicit path, AUTOTUNE_PROFILE, AUTOTUNE_PROFILE_DIR, user, shipped
# ---------------------------------------------------------------------------


def shipped_profile_dir() -> Path:
    """The ``profiles/`` directory at the top of the autotune source tree."""
    return Path(__file__).resolve().parent.parent / "profiles"


def user_profile_dir() -> Path:
    """Where this user's profiles live: ``<user config dir>/autotune/profiles``."""
    import platformdirs

    return Path(platformdirs.user_config_dir("autotune")) / "profiles"


def profile_dirs(env: Mapping[str, str] | None = None) -> list[tuple[str, Path]]:
    """Directories searched for profiles, in order, with a label for each.

    ``AUTOTUNE_PROFILE_DIR`` (if set), the user's directory, the shipped one.
    """
    env = os.environ if env is None else env
    dirs = []
    if env.get("AUTOTUNE_PROFILE_DIR"):
        dirs.append(("AUTOTUNE_PROFILE_DIR", Path(env["AUTOTUNE_PROFILE_DIR"])))
    dirs.append(("user profiles", user_profile_dir()))
    dirs.append(("shipped profiles", shipped_profile_dir()))
    return dirs


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
    if item_bytes is not None and (
        isinstance(item_bytes, bool) or not isinstance(item_bytes, int) or item_bytes < 1
    ):
        raise ValueError(f"item_bytes must be an integer >= 1, got {item_bytes!r}")
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
    backend: str = "processes",
    any_cpu: bool = False,
) -> Recommendation:
    """Find the profile to use for ``workload``, and say why; never raises for "none found".

    Lookup order: ``path``; the file ``$AUTOTUNE_PROFILE``; the directory
    ``$AUTOTUNE_PROFILE_DIR``; :func:`user_profile_dir`;
    :func:`shipped_profile_dir`.  In a directory, the candidates are the
    ``*.yaml`` files whose ``workload`` is ``workload``; the first directory
    holding one that fits wins, and :func:`pick_profile` chooses within it.

    - ``path`` is final: if it does not fit this CPU or backend, the
      heuristic is returned with a warning (it is never silently replaced
      by another file).  A file for another workload raises.
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
        Backend the profile will be used with; profiles measured with
        another one are not handed out (their best point means something
        else there).
    any_cpu : bool
        Use ``path`` (or ``$AUTOTUNE_PROFILE``) even if it was made on
        another CPU.  Directories are always matched to the CPU.

    Raises
    ------
    ProfileError
        ``path`` or ``$AUTOTUNE_PROFILE`` is missing or malformed, or
        ``path`` is a profile for another workload.
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
            profile, "heuristic", f"{why}; {_heuristic_why(c, item_bytes)}", tuple(notes)
        )

    def found(p: Profile, label: str) -> Recommendation:
        brand = " and brand" if cpu_known and _same_brand(p.cpu, cpu_known) else ""
        how = "used on any CPU" if any_cpu else f"matches this CPU's topology, caches{brand}"
        return Recommendation(p, f"{p.source} profile {p.path} ({label})", how, tuple(notes))

    if path is not None:
        p = Profile.load(path)
        if p.workload != workload:
            raise ProfileError(path, f"is a profile for workload {p.workload!r}, not {workload!r}")
        # With any_cpu and no cpu given, nothing here needs the probe.
        why = _unusable(p, None if any_cpu and cpu is None else this_cpu(), backend, any_cpu)
        if why is None:
            return found(p, "given")
        return heuristic(f"profile {p.path} not used: {why}")

    env_file = os.environ.get("AUTOTUNE_PROFILE")
    if env_file:
        p = Profile.load(env_file)
        if p.workload == workload:
            why = _unusable(p, None if any_cpu and cpu is None else this_cpu(), backend, any_cpu)
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
    backend: str = "processes",
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
        A profile file to use (only if it fits, unless ``any_cpu``).
    cpu : CpuInfo, optional
        Match against this CPU instead of probing this machine.
    item_bytes : int, optional
        Bytes per item, for the heuristic.
    backend : str
        ``"processes"`` (default), ``"threads"``, or ``"local"`` for either;
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
        an unknown schema, or (``path``) for another workload.
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
