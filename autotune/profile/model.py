"""The profile as data: ``Profile``, ``Measurement``, ``Recommendation``, the YAML text.

A profile records, for a workload on a CPU, the worker count and chunk
length that ran fastest, every point measured (or published) on the way,
and the serial baseline (schema 1, field by field in docs/design.md,
"Profiles").  Reading a file is :mod:`autotune.profile.files` and
:mod:`autotune.profile.validate`.
"""

from __future__ import annotations

import numbers
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autotune.cpu.contention import SHARE
from autotune.profile.files import read_yaml, write_atomic
from autotune.profile.validate import SCHEMA, Validator

__all__ = [
    "DEFAULT_ITEM_BYTES",
    "MIN_CHUNK_ITEMS",
    "Measurement",
    "Profile",
    "Recommendation",
    "dump_yaml",
    "gil_enabled",
    "is_tie",
    "python_build",
]


def gil_enabled() -> bool:
    """Whether this Python build runs with the GIL (free-threaded builds may not)."""
    check = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def python_build() -> dict[str, Any]:
    """The ``python`` section of a profile measured with this interpreter."""
    return {"version": platform.python_version(), "gil": gil_enabled()}


#: Bytes per item assumed by the heuristic when the workload does not say.
DEFAULT_ITEM_BYTES = 16
#: The heuristic never hands out chunks shorter than this many items.
MIN_CHUNK_ITEMS = 4096


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
    runs : tuple of float
        Online profiles only: the throughput of each of the point's latest
        runs, oldest first (what a later process continues from).
    contended : int
        How many of the ``repeats`` runs were timed while other processes
        held CPUs the point needed, even after re-timing (0: none, or not
        known).  Such a point is kept, but marked.
    """

    workers: int
    chunk_len: int
    chunk_bytes: int
    throughput: float | None
    repeats: int = 1
    spread: float = 0.0
    backend: str | None = None
    runs: tuple[float, ...] = ()
    contended: int = 0

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
        if self.runs:
            d["runs"] = [_plain_float(t) for t in self.runs]
        if self.contended:
            d["contended"] = _plain(self.contended)
        return d


@dataclass(frozen=True)
class Profile:
    """The best way found to run one workload on one CPU.

    Build one with :func:`heuristic_profile`, the tuner, :meth:`load` or
    :meth:`from_dict`; the YAML layout is schema 1 (docs/design.md, "Profiles").

    Parameters
    ----------
    workload : str
        Name of the workload it was made for.
    source : {"measured", "published", "online", "heuristic"}
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
    exploring : bool
        Online profiles only: the refinement had not settled yet; ``best`` is
        the leader so far, and the next evaluator continues the exploration.
    sessions : int, optional
        Online profiles only: how many evaluators (processes) contributed.
    contention : dict, optional
        How busy the machine was while a search measured:
        ``{others, cpus, runs, contended}``, the CPUs other processes held on
        average, the CPUs the search could use, the runs metered and those
        still contended after re-timing (:attr:`doubts` reads it).  None where
        nothing was metered.
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
    exploring: bool = False
    sessions: int | None = None
    contention: dict[str, Any] | None = None
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

    @property
    def doubts(self) -> list[str]:
        """Why this profile's best may not hold on a quiet machine, one phrase each
        (empty: no reason known): its best slower than serial, or other processes
        holding CPUs while it was measured."""
        found = []
        speedup = self.speedup
        if speedup is not None and speedup < 1.0:
            found.append(
                f"its best ({_point_words(self.best, self.backend)}) ran {speedup:.2f}x serial: "
                f"no point beat one process"
            )
        busy = self.contention
        if busy is not None:
            held, cpus, contended = busy["others"], busy["cpus"], busy["contended"]
            if contended or held > SHARE * cpus:
                runs = (
                    f"; {contended} of its {busy['runs']} runs were still contended after re-timing"
                    if contended
                    else ""
                )
                found.append(
                    f"other processes held {held:.2f} of its {cpus} CPU{'s' if cpus != 1 else ''} "
                    f"on average while it was measured{runs}"
                )
        return found

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
        if self.contention is not None:
            d["contention"] = {k: _plain(v) for k, v in self.contention.items()}
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
        if self.exploring:
            d["exploring"] = True
        if self.sessions is not None:
            d["sessions"] = _plain(self.sessions)
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
        fields = Validator(path).profile(d)
        best = Measurement(**fields.pop("best"))
        measurements = tuple(Measurement(**f) for f in fields.pop("measurements"))
        return cls(best=best, measurements=measurements, **fields)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Read and validate a profile file.

        Raises
        ------
        ProfileError
            The file is missing, not a regular file, too large, not UTF-8,
            not YAML, uses a tag that plain YAML lacks, or has a bad field.
        """
        return cls.from_dict(read_yaml(path), path)

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
        write_atomic(target, dump_yaml(doc).encode("utf-8"))
        return target


_HEADER = "# autotune profile (schema 1); print it with: autotune show PATH\n"


def dump_yaml(doc: Mapping[str, Any]) -> str:
    """The text of a profile document, as :meth:`Profile.save` writes it.

    ``yaml.safe_dump`` throughout (its floats read back exactly), small
    mappings (``cpu.caches``, ``best``, ``python``) in flow style, and
    ``measurements`` last, as a bracketed list with one point per line::

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


def _point_words(m: Measurement, backend: str) -> str:
    """``2 x 4096`` (workers x chunk length), ``, threads`` on the threads backend."""
    threads = (m.backend or backend) == "threads"
    return f"{m.workers} x {m.chunk_len}" + (", threads" if threads else "")


def is_tie(best: Measurement, other: Measurement) -> bool:
    """Whether ``other`` is as fast as ``best`` within their runs' spread.

    A point's runs spread over ``spread x throughput`` around its median;
    two points tie when their medians are closer than the sum of half those
    spreads (their ranges overlap).  Points timed once have no spread and
    tie only when equal.
    """
    a, b = best.throughput or 0.0, other.throughput or 0.0
    return abs(a - b) <= (best.spread * a + other.spread * b) / 2
