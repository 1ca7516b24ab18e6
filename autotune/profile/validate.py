"""Validation of a parsed profile document: every field, once.

Every field is checked here (type, range, finiteness; ``bool`` is refused
where an integer is expected although Python calls it an ``int``); the first
bad one becomes a one-line :class:`~autotune.ProfileError` naming the file
and the field.

Numbers.  PyYAML follows YAML 1.1, where ``4.28e6`` is a *string* (a float
needs a dot and a signed exponent: ``4.28e+06``).  Profiles are written with
``yaml.safe_dump``, whose floats always read back as the same float.  When
reading, float fields accept integers, and also a string spelling a plain
decimal number (``"4.28e6"``) because that is what a hand-edited profile
naturally contains; ``nan``, ``inf`` and anything else non-numeric are refused.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any

from autotune._errors import ProfileError
from autotune._util import BACKENDS, one_line, utc_timestamp

__all__ = ["SCHEMA", "SOURCES", "Validator"]

#: The only schema this version reads and writes.
SCHEMA = 1
#: Where a profile's numbers come from, most trusted first.
SOURCES = ("measured", "published", "online", "heuristic")

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
    "exploring",
    "sessions",
    "contention",
}
_MEASUREMENT_KEYS = {"workers", "chunk_len", "chunk_bytes", "throughput", "repeats", "spread"}
_MEASUREMENT_KEYS_OPTIONAL = {"repeats", "spread", "backend", "runs", "contended"}
#: The most runs a measurement may list (an online profile keeps its latest 16).
_MAX_RUNS = 1024
_CONTENTION_KEYS = ("others", "cpus", "runs", "contended")


def _show(value: object) -> str:
    """A short one-line rendering of a bad value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return one_line(repr(value), 60)


class Validator:
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
                return utc_timestamp(value)
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
                raise self.fail(f"unknown field {name}{one_line(str(key), 40)}")

    # -- sections -------------------------------------------------------------
    def measurement(
        self, value: object, name: str, item_bytes: int | None, *, measured: bool = True
    ) -> dict[str, Any]:
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
        # The heuristic's pick is a rule, not a measurement: no throughput.
        throughput = (
            None
            if not measured and d["throughput"] is None
            else self.number(d["throughput"], f"{name}.throughput")
        )
        repeats = self.integer(d.get("repeats", 1), f"{name}.repeats", hi=_MAX_REPEATS)
        return dict(
            workers=workers,
            chunk_len=chunk_len,
            chunk_bytes=chunk_bytes,
            throughput=throughput,
            repeats=repeats,
            spread=self.number(d.get("spread", 0.0), f"{name}.spread", positive=False),
            backend=(
                None
                if d.get("backend") is None
                else self.text(d["backend"], f"{name}.backend", choices=BACKENDS)
            ),
            runs=self.runs(d.get("runs"), f"{name}.runs"),
            # Runs of the point timed under contention: at most all of them.
            contended=self.integer(d.get("contended", 0), f"{name}.contended", lo=0, hi=repeats),
        )

    def runs(self, value: object, name: str) -> tuple[float, ...]:
        """An online profile's latest runs of a point, items per second each."""
        if value is None:
            return ()
        if not isinstance(value, list) or not 0 < len(value) <= _MAX_RUNS:
            raise self.fail(
                f"{name} must be a list of 1 to {_MAX_RUNS} throughputs, got {_show(value)}"
            )
        return tuple(self.number(v, f"{name}[{i}]") for i, v in enumerate(value))

    def flag(self, value: object, name: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"{name} must be true or false, got {_show(value)}")
        return value

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

    def contention(self, value: object) -> dict[str, Any]:
        """``{others, cpus, runs, contended}``: how busy the machine was during a search."""
        d = self.mapping(value, "contention")
        self.keys(d, "contention.", set(_CONTENTION_KEYS), _CONTENTION_KEYS)
        runs = self.integer(d["runs"], "contention.runs", lo=0)
        return {
            "others": self.number(d["others"], "contention.others", positive=False),
            "cpus": self.integer(d["cpus"], "contention.cpus", hi=_MAX_WORKERS),
            "runs": runs,
            "contended": self.integer(d["contended"], "contention.contended", lo=0, hi=runs),
        }

    def python_build(self, value: object) -> dict[str, Any]:
        d = self.mapping(value, "python")
        self.keys(d, "python.", {"version", "gil"}, ("version", "gil"))
        gil = d["gil"]
        if not isinstance(gil, bool):
            raise self.fail(f"python.gil must be true or false, got {_show(gil)}")
        return {"version": self.text(d["version"], "python.version"), "gil": gil}

    def profile(self, doc: object) -> dict[str, Any]:
        """The validated fields of a profile: ``best`` and ``measurements`` as
        :class:`~autotune.profile.model.Measurement` keyword dicts."""
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
        return dict(
            workload=self.text(d["workload"], "workload"),
            source=source,
            cpu=self.cpu(d["cpu"]),
            best=best,
            serial_throughput=(
                None
                # The heuristic measured nothing; an online profile measured
                # the calls the user made, not a serial run.
                if serial is None and source in ("heuristic", "online")
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
            exploring=self.flag(d.get("exploring", False), "exploring"),
            sessions=self.opt_integer(d.get("sessions"), "sessions"),
            contention=None if d.get("contention") is None else self.contention(d["contention"]),
            path=self.path,
        )
