"""Profiles: the YAML loader's refusals, round trips, atomic saves, lookup and matching."""

from __future__ import annotations

import copy
import math
import os
import re
import stat
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SHIPPED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autotune
import autotune.profile.lookup as profile_mod
import autotune.profile.validate as validate_mod
from autotune._errors import ProfileError
from autotune.cpu import CacheLevel, CpuInfo
from autotune.profile import (
    MAX_PROFILE_BYTES,
    MIN_CHUNK_ITEMS,
    Measurement,
    Profile,
    ProfileWarning,
    cpu_mismatch,
    cpu_section,
    heuristic_profile,
    is_unchunked,
    load_profile,
    pick_profile,
    recommend,
)

# Every test once with libyaml's loader (where PyYAML has it) and once with the pure-Python one.
pytestmark = pytest.mark.usefixtures("yaml_loader")

I3_BRAND = "Intel(R) Core(TM) i3-3227U CPU @ 1.90GHz"


def make_cpu(
    logical=4,
    physical=2,
    l1d=32768,
    l2=262144,
    l3=3145728,
    brand=I3_BRAND,
    usable=None,
    tpc=None,
    l2_shared=None,
):
    """A CpuInfo as the probe would give it; the defaults are the i3-3227U."""
    tpc = tpc if tpc is not None else (logical // physical if logical and physical else None)
    caches = []
    if l1d:
        caches.append(CacheLevel(1, "data", l1d, tpc or 1, physical or 1))
    if l2:
        shared = l2_shared or tpc or 1
        caches.append(CacheLevel(2, "unified", l2, shared, max(1, (logical or 1) // shared)))
    if l3:
        caches.append(CacheLevel(3, "unified", l3, logical or 1, 1))
    return CpuInfo(
        brand=brand,
        logical_cpus=logical,
        physical_cores=physical,
        threads_per_core=tpc,
        usable_cpus=usable if usable is not None else logical,
        cpu_quota=None,
        caches=tuple(caches),
    )


I3 = make_cpu()
# The 2-core VM of the heuristic's evidence (docs/design.md, "Evidence behind the
# heuristic"): 2 cores, 2 MiB L2 each.
HERE = make_cpu(logical=2, physical=2, l1d=49152, l2=2 << 20, l3=None, brand="Some CPU", tpc=1)


def doc_for(cpu=I3, workload="spline", workers=2, source="measured", **extra):
    """A valid schema-1 document (as a dict) made on ``cpu``."""
    best = {"workers": workers, "chunk_len": 4096, "chunk_bytes": 65536, "throughput": 3.0e6}
    d = {
        "schema": 1,
        "workload": workload,
        "source": source,
        "created": "2026-11-27T13:00:00Z",
        "autotune_version": "0.1.0",
        "backend": "processes",
        "item_bytes": 16,
        "n": 1000000,
        "cpu": cpu_section(cpu),
        "best": best,
        "serial_throughput": 1.0e6,
        "measurements": [dict(best), {**best, "workers": 1, "throughput": 1.5e6}],
    }
    d.update(extra)
    return d


def write(path: Path, doc) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No profile from the developer's environment or home leaks into a test."""
    monkeypatch.delenv("AUTOTUNE_PROFILE", raising=False)
    monkeypatch.delenv("AUTOTUNE_PROFILE_DIR", raising=False)
    user = tmp_path / "user-profiles"
    shipped = tmp_path / "shipped-profiles"
    monkeypatch.setattr(profile_mod, "user_profile_dir", lambda: user)
    monkeypatch.setattr(profile_mod, "shipped_profile_dir", lambda: shipped)
    return user, shipped


# ---------------------------------------------------------------------------
# The shipped profile
# ---------------------------------------------------------------------------


def test_shipped_i3_profile_holds_the_seed_table():
    p = Profile.load(SHIPPED)
    assert (p.workload, p.source, p.item_bytes, p.n) == ("spline", "published", 16, 1000000)
    assert (p.workers, p.chunk_len, p.chunk_bytes) == (2, 7812, 125000)
    assert p.best.throughput == 4280000.0 and p.serial_throughput == 820000.0
    assert cpu_mismatch(p.cpu, I3) is None and p.cpu["brand"] == I3_BRAND
    cells = {(m.workers, m.chunk_bytes): m.throughput for m in p.measurements}
    published = {
        2: (4.28, 1.96, 1.30, 1.31),
        3: (2.69, 1.06, 1.06, 1.07),
        4: (2.17, 1.27, 1.23, 1.28),
    }
    for workers, row in published.items():
        for size, value in zip((125000, 250000, 500000, 1000000), row, strict=True):
            assert cells[(workers, size)] == pytest.approx(value * 1e6)
    serial = [m for m in p.measurements if is_unchunked(m, p.n)]
    assert [(m.workers, m.throughput) for m in serial] == [(1, 820000.0)]
    assert len(p.measurements) == 13


def test_shipped_profile_is_found_for_the_i3(monkeypatch):
    monkeypatch.setattr(profile_mod, "shipped_profile_dir", lambda: SHIPPED.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = load_profile("spline", cpu=I3)
    assert (p.workers, p.chunk_bytes, p.source) == (2, 125000, "published")
    assert Path(p.path) == SHIPPED


@pytest.mark.parametrize("env", [{}, {"AUTOTUNE_PROFILE_DIR": "/somewhere/profiles"}])
def test_online_profiles_go_to_the_first_directory_of_the_lookup(env):
    from autotune.profile import profile_dirs
    from autotune.profile.online import online_dir

    assert online_dir(env) == profile_dirs(env)[0][1]


# ---------------------------------------------------------------------------
# Bad input: every failure is one ProfileError naming the file and the field
# ---------------------------------------------------------------------------


def assert_refused(path: Path, *fragments: str) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        Profile.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def mutate(path_keys, value):
    d = doc_for()
    target = d
    for k in path_keys[:-1]:
        target = target[k]
    target[path_keys[-1]] = value
    return d


BAD_FIELDS = [
    (("best", "workers"), -2, "best.workers must be an integer >= 1, got -2"),
    (("best", "workers"), 0, "best.workers must be an integer >= 1"),
    (("best", "workers"), True, "best.workers must be an integer >= 1, got True"),
    (("best", "workers"), 2.0, "best.workers must be an integer"),
    (("best", "workers"), "2", "best.workers must be an integer"),
    (("best", "workers"), 10**400, "an integer of 401 digits"),
    (("best", "chunk_len"), 0, "best.chunk_len"),
    (("best", "chunk_len"), None, "best.chunk_len"),
    (("best", "chunk_bytes"), 999999, "best.chunk_bytes must be chunk_len x item_bytes"),
    (("best", "throughput"), float("nan"), "best.throughput must be a finite number > 0"),
    (("best", "throughput"), float("inf"), "best.throughput"),
    (("best", "throughput"), float("-inf"), "best.throughput"),
    (("best", "throughput"), 0.0, "best.throughput"),
    (("best", "throughput"), -1.0, "best.throughput"),
    (("best", "throughput"), True, "best.throughput"),
    (("best", "throughput"), "fast", "best.throughput"),
    (("best", "throughput"), "nan", "best.throughput"),
    (("best", "throughput"), "1e999", "best.throughput"),
    (("best", "throughput"), 10**400, "best.throughput"),
    (("best", "throughput"), None, "best.throughput"),
    (("best", "spread"), -0.1, "best.spread must be a finite number >= 0"),
    (("best", "repeats"), 0, "best.repeats"),
    (("best", "repeats"), False, "best.repeats"),
    (("best", "backend"), "gpu", "best.backend must be one of"),
    (("best", "wrokers"), 2, "unknown field best.wrokers"),
    (("best", "runs"), [], "best.runs must be a list of 1 to 1024 throughputs"),
    (("best", "runs"), 5.0, "best.runs must be a list"),
    (("best", "runs"), [1.0] * 1025, "best.runs must be a list"),
    (("best", "runs"), [1.0, -2.0], "best.runs[1] must be a finite number > 0"),
    (("best", "runs"), [1.0, "nan"], "best.runs[1]"),
    (("exploring",), "yes", "exploring must be true or false"),
    (("exploring",), 1, "exploring must be true or false"),
    (("sessions",), 0, "sessions must be an integer >= 1"),
    (("sessions",), True, "sessions"),
    (("best",), [1, 2], "best must be a mapping"),
    (("measurements",), {"a": 1}, "measurements must be a list"),
    (("measurements",), [1], "measurements[0] must be a mapping"),
    (("measurements", 1, "workers"), -1, "measurements[1].workers must be an integer >= 1"),
    (("measurements", 1, "throughput"), float("nan"), "measurements[1].throughput"),
    (("serial_throughput",), float("nan"), "serial_throughput"),
    (("serial_throughput",), None, "serial_throughput"),
    (("schema",), 2, "unknown schema 2"),
    (("schema",), "1", "unknown schema '1'"),
    (("schema",), True, "unknown schema True"),
    (("schema",), 1.0, "unknown schema 1.0"),
    (("source",), "guessed", "source must be one of measured, published, online, heuristic"),
    (("workload",), "", "workload must be a non-empty string"),
    (("workload",), 5, "workload must be a non-empty string"),
    (("created",), 5, "created"),
    (("autotune_version",), 0.1, "autotune_version must be a non-empty string, got 0.1"),
    (("item_bytes",), 0, "item_bytes must be an integer >= 1"),
    (("item_bytes",), True, "item_bytes"),
    (("n",), -5, "n must be an integer >= 1"),
    (("backend",), "gpu", "backend must be one of"),
    (("extra",), 1, "unknown field extra"),
    (("cpu",), "i3", "cpu must be a mapping"),
    (("cpu", "logical_cpus"), 0, "cpu.logical_cpus must be an integer >= 1"),
    (("cpu", "physical_cores"), True, "cpu.physical_cores"),
    (("cpu", "physical_cores"), 8, "cpu.physical_cores (8) must not exceed cpu.logical_cpus"),
    (("cpu", "brand"), ["x"], "cpu.brand must be a non-empty string"),
    (("cpu", "caches"), [32768], "cpu.caches must be a mapping"),
    (("cpu", "caches", "l2"), -1, "cpu.caches.l2 must be an integer >= 1"),
    (("cpu", "caches", "l2"), 2.5, "cpu.caches.l2"),
    (("cpu", "extra"), {"nested": 1}, "cpu.extra must be a number or a string"),
    # How busy the machine was while a search measured (optional; see test_contention.py).
    (("best", "contended"), 2, "best.contended must be an integer from 0 to 1, got 2"),
    (("best", "contended"), True, "best.contended"),
    (("best", "contended"), -1, "best.contended must be an integer >= 0"),
    (("contention",), [1], "contention must be a mapping"),
    (("contention",), {"others": 1.0, "cpus": 2, "runs": 5}, "missing field contention.contended"),
    (
        ("contention",),
        {"others": 1.0, "cpus": 2, "runs": 5, "contended": 0, "load": 3},
        "unknown field contention.load",
    ),
    (
        ("contention",),
        {"others": -0.5, "cpus": 2, "runs": 5, "contended": 0},
        "contention.others must be a finite number >= 0",
    ),
    (
        ("contention",),
        {"others": float("nan"), "cpus": 2, "runs": 5, "contended": 0},
        "contention.others",
    ),
    (
        ("contention",),
        {"others": 0.5, "cpus": 0, "runs": 5, "contended": 0},
        "contention.cpus must be an integer >= 1",
    ),
    (
        ("contention",),
        {"others": 0.5, "cpus": 2, "runs": 5, "contended": 6},
        "contention.contended must be an integer from 0 to 5, got 6",
    ),
]


@pytest.mark.parametrize(("keys", "value", "fragment"), BAD_FIELDS)
def test_bad_field_is_refused_naming_file_and_field(tmp_path, keys, value, fragment):
    path = write(tmp_path / "x.yaml", mutate(keys, value))
    assert_refused(path, fragment)


@pytest.mark.parametrize(
    "field",
    [
        "schema",
        "workload",
        "source",
        "created",
        "autotune_version",
        "cpu",
        "best",
        "serial_throughput",
        "measurements",
    ],
)
def test_missing_field_is_refused(tmp_path, field):
    d = doc_for()
    del d[field]
    assert_refused(write(tmp_path / "x.yaml", d), f"missing field {field}")


@pytest.mark.parametrize(
    ("section", "field"),
    [("best", "workers"), ("best", "throughput"), ("cpu", "caches"), ("cpu", "logical_cpus")],
)
def test_missing_nested_field_is_refused(tmp_path, section, field):
    d = doc_for()
    del d[section][field]
    assert_refused(write(tmp_path / "x.yaml", d), f"missing field {section}.{field}")


def test_missing_cache_level_is_refused(tmp_path):
    d = doc_for()
    del d["cpu"]["caches"]["l3"]
    assert_refused(write(tmp_path / "x.yaml", d), "missing field cpu.caches.l3")


def test_every_truncation_of_a_profile_is_refused(tmp_path):
    text = SHIPPED.read_text()
    path = tmp_path / "cut.yaml"
    # A cut short of the final "]" (a partial copy) must fail, not load fewer
    # points: every line boundary (where a block list would still parse), and
    # every few characters in between.
    end = text.rindex("]")
    line_ends = [i + 1 for i, ch in enumerate(text) if ch == "\n" and i < end]
    for cut in sorted({*range(0, end, 5), *line_ends, end - 1}):
        path.write_text(text[:cut])
        with pytest.raises(ProfileError) as info:
            Profile.load(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "template",
    [
        "!!python/object/apply:os.system ['touch {marker}']\n",
        "schema: 1\nworkload: !!python/object/apply:os.system ['touch {marker}']\n",
        "schema: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
        "x: !!python/object/apply:subprocess.check_call [['touch', '{marker}']]\n",
        "x: !!python/name:os.system\n",
        "x: !!python/object:os.PathLike {{}}\n",
    ],
)
def test_python_tags_are_refused_and_never_executed(tmp_path, template):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(template.format(marker=marker))
    assert_refused(path, "refused YAML tag", "python/")
    assert not marker.exists()


def test_python_tag_inside_a_valid_profile_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    text = SHIPPED.read_text().replace(
        "serial_throughput: 820000.0",
        f"serial_throughput: !!python/object/apply:os.system ['touch {marker}']",
    )
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    assert_refused(path, "refused YAML tag at line")
    assert not marker.exists()


def test_no_unsafe_yaml_loader_in_the_package():
    package = Path(autotune.__file__).parent
    for source in package.rglob("*.py"):
        text = source.read_text()
        for unsafe in ("yaml.load(", "yaml.unsafe_load", "yaml.full_load", "yaml.Loader"):
            assert unsafe not in text, f"{source} uses {unsafe}"


# Deeper than MAX_YAML_DEPTH, than libyaml's cap (1000) and than the pure-Python parser's
# recursion can go (it recurses about twice a level).
DEEP = sys.getrecursionlimit()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "is empty"),
        (b"# only a comment\n", "is empty"),
        (b"- 1\n- 2\n", "the document must be a mapping"),
        (b"just text\n", "the document must be a mapping"),
        (b"schema: [1, 2\n", "YAML syntax error at line"),
        (b"a: 1\n---\nb: 2\n", "YAML syntax error"),
        (b"a: *undefined\n", "YAML syntax error"),
        (b"\xff\xfeschema: 1\n", "is not UTF-8 text"),
        (b"schema: 1\ncreated: 2026-02-30\n", "unreadable YAML"),
        (b"schema: 1\nn: " + b"9" * 5000 + b"\n", "unreadable YAML"),
        (b"x: " + b"[" * DEEP + b"]" * DEEP + b"\n", "nested too deeply"),
        (b"schema: 1\nmeasurements: &a [*a]\n", "missing field"),
        (b"\x00\x01\x02", "YAML"),
    ],
)
def test_malformed_files_are_refused(tmp_path, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert_refused(path, fragment)


def test_recursive_alias_in_measurements_is_refused(tmp_path):
    text = SHIPPED.read_text()
    text = text[: text.index("measurements:")] + "measurements: &a [*a]\n"
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    assert_refused(path, "measurements[0] must be a mapping")


def test_missing_file_directory_and_fifo_are_refused(tmp_path):
    assert_refused(tmp_path / "absent.yaml", "no such file")
    assert_refused(tmp_path, "is a directory")
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    # Would block forever if the loader opened it: the stat check comes first.
    assert_refused(fifo, "not a regular file")


def test_too_large_file_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (MAX_PROFILE_BYTES + 1))
    assert_refused(path, "larger than")


def test_unreadable_file_is_a_profile_error(tmp_path, monkeypatch):
    path = write(tmp_path / "x.yaml", doc_for())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(profile_mod.os, "open", denied)
    assert_refused(path, "cannot read: Permission denied")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_raise_nothing_but_profile_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.yaml"
    path.write_bytes(data)
    try:
        Profile.load(path)
    except ProfileError as exc:
        assert "\n" not in str(exc)


yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(["spline", "measured", 1, 2, 16, 4096]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(sorted(validate_mod._TOP_KEYS)), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(validate_mod._TOP_KEYS)), yaml_values))
def test_arbitrary_documents_raise_nothing_but_profile_error(doc):
    doc = {**doc, "schema": 1}
    try:
        Profile.from_dict(doc, "fuzz.yaml")
    except ProfileError as exc:
        assert str(exc).startswith("fuzz.yaml: ") and "\n" not in str(exc)


# ---------------------------------------------------------------------------
# What the reader accepts
# ---------------------------------------------------------------------------


def test_ints_and_decimal_strings_are_accepted_for_float_fields(tmp_path):
    text = SHIPPED.read_text()
    text = text.replace("serial_throughput: 820000.0", "serial_throughput: 820000")
    text = text.replace(
        "best: {workers: 2, chunk_len: 7812, chunk_bytes: 125000, throughput: 4280000.0}",
        "best: {workers: 2, chunk_len: 7812, chunk_bytes: 125000, throughput: 4.28e6}",
    )
    # The YAML 1.1 trap: 4.28e6 reads as a string; it is accepted as the number it spells.
    assert yaml.safe_load("x: 4.28e6")["x"] == "4.28e6"
    path = tmp_path / "hand.yaml"
    path.write_text(text)
    p = Profile.load(path)
    assert p.serial_throughput == 820000.0 and isinstance(p.serial_throughput, float)
    assert p.best.throughput == 4280000.0


def test_unquoted_timestamp_is_read_as_text(tmp_path):
    text = SHIPPED.read_text().replace("'2026-11-27T13:45:00Z'", "2026-11-27T13:45:00Z")
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert Profile.load(path).created == "2026-11-27T13:45:00Z"


def test_extra_cpu_figures_are_kept(tmp_path):
    d = doc_for()
    d["cpu"]["threads_per_core"] = 2
    d["cpu"]["caches"]["l4"] = 134217728
    p = Profile.load(write(tmp_path / "p.yaml", d))
    assert p.cpu["threads_per_core"] == 2 and p.cpu["caches"]["l4"] == 134217728


# ---------------------------------------------------------------------------
# Round trips and atomic saves
# ---------------------------------------------------------------------------

AWKWARD_FLOATS = [
    4280000.0,
    820000.0,
    0.1,
    1e-05,
    5e-324,
    1.5e300,
    1e16,
    1e20,
    123456789.123,
    2.0 / 3.0,
    1.7976931348623157e308,
]


def awkward_profile():
    ms = tuple(
        Measurement(
            workers=i + 1,
            chunk_len=4096 * (i + 1),
            chunk_bytes=4096 * (i + 1) * 8,
            throughput=t,
            repeats=i + 2,
            spread=AWKWARD_FLOATS[-1 - i] if i % 2 else 0.03,
        )
        for i, t in enumerate(AWKWARD_FLOATS)
    )
    return Profile(
        workload="stream",
        source="measured",
        cpu=cpu_section(HERE),
        best=ms[3],
        serial_throughput=5e-324,
        measurements=ms,
        created="2026-11-27T13:00:00Z",
        autotune_version="0.1.0",
        item_bytes=8,
        n=(1 << 62) - 1,
    )


def test_every_number_survives_a_round_trip(tmp_path):
    p = awkward_profile()
    path = p.save(tmp_path / "p.yaml")
    q = Profile.load(path)
    assert q == p
    assert [m.throughput for m in q.measurements] == AWKWARD_FLOATS
    assert all(type(m.throughput) is float for m in q.measurements)
    assert q.n == (1 << 62) - 1 and q.serial_throughput == 5e-324
    assert q.path == str(path)
    # Saving what was loaded writes the same bytes: nothing drifts.
    again = q.save(tmp_path / "q.yaml")
    assert again.read_bytes() == path.read_bytes()


@settings(max_examples=100, deadline=None)
@given(
    st.floats(min_value=5e-324, allow_nan=False, allow_infinity=False),
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
    st.integers(1, (1 << 62) // 64),
)
def test_any_float_survives_safe_dump_and_safe_load(throughput, spread, chunk_len):
    m = Measurement(2, chunk_len, chunk_len * 64, throughput, repeats=3, spread=spread)
    p = Profile("w", "measured", cpu_section(I3), m, throughput, (m,), "t", "0.1.0", item_bytes=64)
    text = yaml.safe_dump(p.to_dict(), sort_keys=False, default_flow_style=None)
    assert Profile.from_dict(yaml.safe_load(text)) == p


def test_an_online_profiles_runs_and_state_survive_a_round_trip(tmp_path):
    runs = (4.1e7, 3.9e7, 1e-300, 5e-324, 4.2e7)
    m = Measurement(2, 4096, 32768, 4.1e7, repeats=5, spread=0.05, runs=runs)
    p = Profile(
        "k", "online", cpu_section(I3), m, None, (m,), "t", "0.1.0", exploring=True, sessions=7
    )
    q = Profile.load(p.save(tmp_path / "online.yaml"))
    assert q == p and q.best.runs == runs and q.exploring and q.sessions == 7
    # Not exploring, no sessions: the keys are left out, as in files written before them.
    plain = Profile(
        "k", "online", cpu_section(I3), Measurement(2, 4096, 32768, 4e7), None, (), "t", "0.1.0"
    )
    text = tmp_path / "plain.yaml"
    plain.save(text)
    assert "exploring" not in text.read_text() and "runs" not in text.read_text()
    assert Profile.load(text) == plain


def test_numpy_scalars_are_saved_as_plain_numbers(tmp_path):
    m = Measurement(np.int64(2), np.int64(4096), np.int64(65536), np.float64(3.5e6))
    p = Profile("w", "measured", cpu_section(I3), m, np.float64(1e6), (m,), "t", "0.1.0")
    q = Profile.load(p.save(tmp_path / "np.yaml"))
    assert q.best.throughput == 3.5e6 and type(q.best.workers) is int


def test_heuristic_profile_round_trips(tmp_path):
    p = heuristic_profile(I3, "spline", None)
    q = Profile.load(p.save(tmp_path / "h.yaml"))
    assert q == p and q.best.throughput is None and q.serial_throughput is None


def test_saved_file_layout_matches_the_design(tmp_path):
    text = Profile.load(SHIPPED).save(tmp_path / "p.yaml").read_text()
    assert text.startswith("# autotune profile (schema 1)")
    point = "{workers: 2, chunk_len: 7812, chunk_bytes: 125000, throughput: 4280000.0}"
    assert f"\nbest: {point}\n" in text
    assert "\nmeasurements: [\n  {workers: 1, chunk_len: 1000000," in text
    assert f"\n  {point},\n" in text
    assert text.endswith("1280000.0}\n]\n")
    assert "path" not in yaml.safe_load(text)


def test_new_file_is_readable_by_others(tmp_path):
    path = Profile.load(SHIPPED).save(tmp_path / "p.yaml")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_save_into_missing_directory_fails_cleanly(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        Profile.load(SHIPPED).save(tmp_path / "nowhere" / "p.yaml")
    assert not (tmp_path / "nowhere").exists()


def test_save_onto_a_directory_fails_cleanly(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(ProfileError, match="is a directory"):
        Profile.load(SHIPPED).save(tmp_path / "d.yaml")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_save_into_read_only_directory_leaves_no_file(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ProfileError, match="cannot write"):
            Profile.load(SHIPPED).save(ro / "p.yaml")
        assert _entries(ro) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch, failing):
    # Works as root too: the failure is injected where a read-only file
    # system or a full disk would raise.
    old = Profile.load(SHIPPED).save(tmp_path / "p.yaml")
    before = old.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(profile_mod.os, failing, fail)
    with pytest.raises(ProfileError, match="cannot write: Read-only file system"):
        awkward_profile().save(old)
    assert _entries(tmp_path) == ["p.yaml"]
    assert old.read_bytes() == before


def test_invalid_profile_is_never_written(tmp_path):
    bad = replace_best(Profile.load(SHIPPED), workers=0)
    with pytest.raises(ProfileError, match="best.workers must be an integer >= 1, got 0"):
        bad.save(tmp_path / "p.yaml")
    assert _entries(tmp_path) == []


def replace_best(p: Profile, **changes) -> Profile:
    from dataclasses import replace

    return replace(p, best=replace(p.best, **changes))


# ---------------------------------------------------------------------------
# CPU matching and picking
# ---------------------------------------------------------------------------


def test_cpu_match_is_exact_on_topology_and_caches():
    section = cpu_section(I3)
    assert cpu_mismatch(section, I3) is None
    assert cpu_mismatch(section, make_cpu(brand="Another brand")) is None  # brand: ties only
    for other in (
        make_cpu(l2=524288),
        make_cpu(l1d=49152),
        make_cpu(l3=None),
        make_cpu(logical=2, physical=2),
        make_cpu(logical=4, physical=4, tpc=1),
    ):
        why = cpu_mismatch(section, other)
        assert why is not None and why.startswith("made on another CPU")
    assert "L2 256 KiB" in cpu_mismatch(section, make_cpu(l2=524288))


def test_unknown_topology_never_matches():
    blind = make_cpu(logical=None, physical=None)
    assert cpu_mismatch(cpu_section(blind), blind) is not None
    no_l2 = make_cpu(l2=None)
    assert cpu_mismatch(cpu_section(no_l2), no_l2) is not None


def profile_from(doc) -> Profile:
    return Profile.from_dict(copy.deepcopy(doc))


def test_brand_breaks_ties_then_source_then_order():
    other_brand = make_cpu(brand="Intel(R) Celeron(R) with the same shape")
    a = profile_from(doc_for(cpu=other_brand, workers=1))
    b = profile_from(doc_for(cpu=I3, workers=2, source="published"))
    c = profile_from(doc_for(cpu=I3, workers=3, source="measured"))
    assert pick_profile([a, b], I3) is b
    assert pick_profile([a, b, c], I3) is c
    assert pick_profile([a], I3) is a
    assert pick_profile([b, profile_from(doc_for(cpu=I3, workers=4, source="published"))], I3) is b
    assert pick_profile([a, b, c], HERE) is None
    # Brand spelling: whitespace and case do not matter.
    spaced = make_cpu(brand="intel(r)  core(tm) i3-3227U CPU @ 1.90GHz ")
    assert pick_profile([a, b], spaced) is b


def test_pick_skips_other_backends_and_too_many_workers():
    threads = profile_from(doc_for(backend="threads"))
    assert pick_profile([threads], I3) is None
    assert pick_profile([threads], I3, backend="threads") is threads
    four = profile_from(doc_for(workers=4))
    assert pick_profile([four], make_cpu(usable=2)) is None


def test_is_unchunked():
    assert is_unchunked(Measurement(1, 1000, 16000, 1.0), 1000)
    assert is_unchunked(Measurement(4, 250, 4000, 1.0), 1000)
    assert not is_unchunked(Measurement(4, 249, 3984, 1.0), 1000)
    assert not is_unchunked(Measurement(1, 1000, 16000, 1.0), None)


# ---------------------------------------------------------------------------
# The heuristic
# ---------------------------------------------------------------------------


def test_heuristic_on_the_i3_uses_cores_and_the_item_floor():
    p = heuristic_profile(I3, "spline", None)
    # L2/8 = 32 KiB = 2048 items of 16 B: below the floor of 4096 items.
    assert (p.workers, p.chunk_len, p.chunk_bytes) == (2, MIN_CHUNK_ITEMS, 65536)
    assert p.source == "heuristic" and p.item_bytes == 16 and p.measurements == ()
    assert p.best.throughput is None and p.path is None


def test_heuristic_on_this_machine_sits_in_the_measured_good_band():
    p = heuristic_profile(HERE, "stream", 16)
    assert (p.workers, p.chunk_len, p.chunk_bytes) == (2, 16384, 262144)
    # docs/design.md, "Evidence behind the heuristic": chunks of L2/16 .. L2/4 per core
    # reached >= 0.92 of the best.
    assert HERE.l2 // 16 <= p.chunk_bytes <= HERE.l2 // 4
    assert heuristic_profile(HERE, "stream", 8).chunk_len == 32768
    assert heuristic_profile(HERE, "stream", 1024).chunk_len == MIN_CHUNK_ITEMS


def test_heuristic_caps_workers_at_usable_cpus():
    big = make_cpu(logical=32, physical=16, l2=1 << 20, usable=3)
    assert heuristic_profile(big, "w", 16).workers == 3
    assert heuristic_profile(make_cpu(logical=32, physical=16, l2=1 << 20), "w", 16).workers == 16


def test_heuristic_divides_a_shared_l2_among_its_cores():
    # Four cores without SMT sharing one 2 MiB L2 (an E-core cluster): 512 KiB each.
    cluster = make_cpu(logical=4, physical=4, l2=2 << 20, tpc=1, l2_shared=4)
    assert heuristic_profile(cluster, "w", 4).chunk_bytes == (512 << 10) // 8


def test_heuristic_falls_back_when_the_probe_found_little():
    blind = CpuInfo(None, None, None, None, None, None)
    p = heuristic_profile(blind, "w", None)
    assert p.workers == (os.cpu_count() or 1)
    assert p.chunk_len == MIN_CHUNK_ITEMS
    only_logical = CpuInfo(None, 8, None, 2, 6, None)
    assert heuristic_profile(only_logical, "w", 16).workers == 4


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_heuristic_refuses_bad_item_bytes(bad):
    with pytest.raises(ValueError, match="item_bytes"):
        heuristic_profile(I3, "w", bad)


# ---------------------------------------------------------------------------
# Lookup order and fallbacks
# ---------------------------------------------------------------------------


def levels(tmp_path, isolated, monkeypatch):
    """A matching profile at every level, told apart by its worker count."""
    user, shipped = isolated
    env_dir = tmp_path / "env-dir"
    for d in (user, shipped, env_dir):
        d.mkdir()
    write(shipped / "spline.yaml", doc_for(workers=1))
    write(user / "spline.yaml", doc_for(workers=2))
    write(env_dir / "spline.yaml", doc_for(workers=3))
    env_file = write(tmp_path / "env-file.yaml", doc_for(workers=4))
    explicit = write(tmp_path / "explicit.yaml", doc_for(workers=1, source="published"))
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(env_dir))
    monkeypatch.setenv("AUTOTUNE_PROFILE", str(env_file))
    return explicit, env_file, env_dir, user


def load_quietly(*args, **kwargs) -> Profile:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_profile(*args, **kwargs)


def test_lookup_order(tmp_path, isolated, monkeypatch):
    explicit, env_file, env_dir, user = levels(tmp_path, isolated, monkeypatch)
    p = load_quietly("spline", explicit, cpu=I3)
    assert (p.workers, p.source, p.path) == (1, "published", str(explicit))
    assert load_quietly("spline", cpu=I3).workers == 4
    monkeypatch.delenv("AUTOTUNE_PROFILE")
    assert load_quietly("spline", cpu=I3).workers == 3
    monkeypatch.delenv("AUTOTUNE_PROFILE_DIR")
    assert load_quietly("spline", cpu=I3).workers == 2
    (user / "spline.yaml").unlink()
    p = load_quietly("spline", cpu=I3)
    assert p.workers == 1 and p.source == "measured"


def test_nothing_found_gives_the_heuristic_with_a_warning():
    with pytest.warns(ProfileWarning, match="no profile for 'spline' fits this CPU"):
        p = load_profile("spline", cpu=I3)
    assert p.source == "heuristic" and p.path is None
    assert (p.workers, p.chunk_bytes) == (2, 65536)


def test_item_bytes_reaches_the_heuristic():
    with pytest.warns(ProfileWarning):
        assert load_profile("w", cpu=HERE, item_bytes=8).chunk_len == 32768


def test_other_workloads_in_a_directory_are_ignored(isolated):
    user, _ = isolated
    user.mkdir()
    write(user / "stream.yaml", doc_for(workload="stream"))
    with pytest.warns(ProfileWarning, match="heuristic"):
        assert load_profile("spline", cpu=I3).source == "heuristic"
    assert load_quietly("stream", cpu=I3).source == "measured"


def test_malformed_file_in_a_directory_is_skipped_with_a_warning(isolated):
    user, shipped = isolated
    user.mkdir()
    shipped.mkdir()
    (user / "a-broken.yaml").write_text("schema: [1\n")
    os.mkfifo(user / "b-fifo.yaml")
    write(user / "c-spline.yaml", doc_for(workers=2))
    with pytest.warns(ProfileWarning) as record:
        p = load_profile("spline", cpu=I3)
    assert p.workers == 2 and p.path == str(user / "c-spline.yaml")
    messages = [str(w.message) for w in record]
    assert any("a-broken.yaml" in m and "YAML syntax error" in m for m in messages)
    assert any("b-fifo.yaml" in m for m in messages)


def test_non_yaml_files_are_not_read(isolated):
    user, _ = isolated
    user.mkdir()
    (user / "notes.txt").write_text("!!python/object/apply:os.system ['false']")
    write(user / "spline.yml", doc_for())  # only *.yaml is a profile
    with pytest.warns(ProfileWarning, match="heuristic"):
        assert load_profile("spline", cpu=I3).source == "heuristic"


def test_explicit_malformed_file_raises(tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: 2\n")
    with pytest.raises(ProfileError, match="unknown schema 2"):
        load_profile("spline", bad, cpu=I3)
    monkeypatch.setenv("AUTOTUNE_PROFILE", str(bad))
    with pytest.raises(ProfileError, match="bad.yaml: unknown schema 2"):
        load_profile("spline", cpu=I3)
    monkeypatch.setenv("AUTOTUNE_PROFILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ProfileError, match="no such file"):
        load_profile("spline", cpu=I3)


def test_explicit_file_for_another_workload_raises(tmp_path):
    path = write(tmp_path / "stream.yaml", doc_for(workload="stream"))
    with pytest.raises(ProfileError, match="is a profile for workload 'stream', not 'spline'"):
        load_profile("spline", path, cpu=I3)


def test_env_file_for_another_workload_is_passed_over(tmp_path, monkeypatch, isolated):
    user, _ = isolated
    user.mkdir()
    write(user / "spline.yaml", doc_for(workers=2))
    monkeypatch.setenv("AUTOTUNE_PROFILE", str(write(tmp_path / "s.yaml", doc_for(workload="s"))))
    assert load_quietly("spline", cpu=I3).path == str(user / "spline.yaml")


def test_explicit_profile_from_another_cpu_is_an_error_naming_why(tmp_path):
    # A file named explicitly that does not fit is an error, never a fallback
    # (docs/design.md, "Which profile is used").
    path = write(tmp_path / "i3.yaml", doc_for(cpu=I3, workers=2))
    with pytest.raises(ProfileError, match=r"i3.yaml: cannot be used here: made on another CPU"):
        load_profile("spline", path, cpu=HERE)
    # Asked for: with any_cpu, or by naming the CPU it was made for.
    assert load_quietly("spline", path, cpu=HERE, any_cpu=True).path == str(path)
    assert load_quietly("spline", path, cpu=I3).path == str(path)


def test_env_profile_from_another_cpu_falls_through_to_the_directories(
    tmp_path, monkeypatch, isolated
):
    user, _ = isolated
    user.mkdir()
    write(user / "here.yaml", doc_for(cpu=HERE, workers=2))
    monkeypatch.setenv("AUTOTUNE_PROFILE", str(write(tmp_path / "i3.yaml", doc_for(cpu=I3))))
    with pytest.warns(ProfileWarning, match="AUTOTUNE_PROFILE .*i3.yaml not used"):
        p = load_profile("spline", cpu=HERE)
    assert p.path == str(user / "here.yaml")


def test_directory_profiles_for_other_cpus_are_not_used(isolated):
    user, _ = isolated
    user.mkdir()
    write(user / "i3.yaml", doc_for(cpu=I3))
    with pytest.warns(ProfileWarning, match="1 for other CPUs"):
        assert load_profile("spline", cpu=HERE).source == "heuristic"


def test_other_backends_are_not_handed_out_by_default(tmp_path, isolated):
    user, _ = isolated
    user.mkdir()
    write(user / "dask.yaml", doc_for(backend="dask"))
    with pytest.warns(ProfileWarning, match="heuristic"):
        assert load_profile("spline", cpu=I3).source == "heuristic"
    assert load_quietly("spline", cpu=I3, backend="dask").backend == "dask"
    explicit = write(tmp_path / "t.yaml", doc_for(backend="threads"))
    # The default backend is the evaluator's ("local": processes or threads) ...
    assert load_quietly("spline", explicit, cpu=I3, any_cpu=True).backend == "threads"
    # ... and a named file measured with another backend than asked is an error.
    with pytest.raises(ProfileError, match="backend 'threads', not 'processes'"):
        load_profile("spline", explicit, cpu=I3, any_cpu=True, backend="processes")


def test_missing_env_dir_is_warned(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path / "nope"))
    with pytest.warns(ProfileWarning) as record:
        load_profile("spline", cpu=I3)
    messages = [str(w.message) for w in record]
    assert any(re.search("AUTOTUNE_PROFILE_DIR .* is not a directory", m) for m in messages)


def test_cpu_is_probed_lazily_and_once(tmp_path, monkeypatch):
    import importlib

    probe_mod = importlib.import_module("autotune.cpu")
    calls = []

    def fake_probe(sysfs_root=None):
        calls.append(sysfs_root)
        return I3

    monkeypatch.setattr(probe_mod, "probe", fake_probe)
    profile_mod._this_cpu.cache_clear()
    try:
        path = write(tmp_path / "p.yaml", doc_for(cpu=HERE))
        assert load_quietly("spline", path, any_cpu=True).path == str(path)
        assert calls == []  # a named file used on any CPU needs no probe
        with pytest.warns(ProfileWarning):
            load_profile("spline")
            load_profile("spline")
        assert calls == [None]
    finally:
        profile_mod._this_cpu.cache_clear()


def test_recommend_says_why():
    rec = recommend("spline", cpu=I3)
    assert rec.profile.source == "heuristic"
    assert rec.origin == "heuristic"
    assert rec.reason.startswith("heuristic: no profile for 'spline' fits this CPU")
    assert "workers = physical cores" in rec.reason and "L2 256 KiB per core / 8" in rec.reason
    assert "16 B/item assumed" in rec.reason


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"workload": ""}, "workload"),
        ({"workload": "w", "item_bytes": 0}, "item_bytes"),
        ({"workload": "w", "backend": "gpu"}, "backend"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_profile(cpu=I3, **kwargs)


def test_huge_and_nan_values_in_memory_profiles_do_not_save(tmp_path):
    p = Profile.load(SHIPPED)
    for bad in (math.nan, math.inf):
        with pytest.raises(ProfileError, match="best.throughput"):
            replace_best(p, throughput=bad).save(tmp_path / "p.yaml")
    assert _entries(tmp_path) == []


def test_threads_profile_needs_the_same_gil_setting(tmp_path, isolated):
    from autotune.profile import gil_enabled

    here = {"version": "3.11.7", "gil": gil_enabled()}
    other = {"version": "3.14.0", "gil": not gil_enabled()}
    same = write(tmp_path / "same.yaml", doc_for(backend="threads", python=here))
    assert load_quietly("spline", same, cpu=I3, backend="local").backend == "threads"
    built_elsewhere = write(tmp_path / "other.yaml", doc_for(backend="threads", python=other))
    with pytest.raises(ProfileError, match="GIL"):
        load_profile("spline", built_elsewhere, cpu=I3, backend="local")
    with pytest.raises(ProfileError, match="python.gil must be true or false"):
        Profile.load(write(tmp_path / "bad.yaml", doc_for(python={"version": "3", "gil": 1})))
