"""Hostile and malformed profile files through every way a profile is read.

tests/test_profile.py checks each refusal by name (one bad field, one tag, one bad file at a
time, mostly through ``Profile.load``).  Here hypothesis writes whole YAML *texts*: a real
profile with random fields replaced by wrong types, huge numbers, NaN/inf, zero or negative
workers and chunks, unknown schemas, unknown keys, deep nesting, YAML tags (the
``!!python/...`` ones carry a payload that would create a file), aliases and non-UTF-8 bytes.
Each file goes through ``Profile.load``, ``load_profile(workload, path=...)``,
``$AUTOTUNE_PROFILE`` and a scanned ``$AUTOTUNE_PROFILE_DIR``, read by libyaml's loader (where
PyYAML has it) and by the pure-Python one (the ``env`` fixture).  The contract: a valid
``Profile`` (which then survives a save and a reload) or a one-line ``ProfileError`` naming
the file, a ``ProfileWarning`` at most while scanning a directory, nothing else; and the
marker file never appears.  Special files (directory, FIFO, socket, devices, /proc files,
symlink loops) take the same four routes without blocking.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import I3, SHIPPED, YAML_LOADERS
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import autotune.profile.files as files_mod
import autotune.profile.lookup as profile_mod
from autotune import ProfileError
from autotune.profile import MAX_PROFILE_BYTES, Profile, ProfileWarning, load_profile
from autotune.profile.files import MAX_YAML_DEPTH, read_yaml, safe_loader

BASE = yaml.safe_load(SHIPPED.read_text())

# A payload that creates {marker} when a loader executes it; MARKER is formatted in per test.
PAYLOADS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/apply:builtins.open ['{marker}', 'w']",
    "!!python/object/new:builtins.open ['{marker}', 'w']",
    "!!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
    "!<tag:yaml.org,2002:python/object/apply:os.system> ['touch {marker}']",
    "!!python/object/apply:os.makedirs ['{marker}']",
]
OTHER_TAGS = [
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/tuple [1, 2]",
    "!!python/object:argparse.Namespace {a: 1}",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [{a: 1}, {b: 2}]",
    "!!pairs [{a: 1}]",
    "!!timestamp 2026-11-27",
    "!!timestamp not-a-date",
    "!!float '1e3'",
    "!!float 'nan'",
    "!!int '0x10'",
    "!!int 'twelve'",
    "!!str 12",
    "!!null ''",
    "!!bool yes",
    "!!merge <<",
    "!unknown thing",
    "!<tag:example.com,2000:app/foo> bar",
    "!!map {a: 1}",
    "!!seq [1]",
]
SCALARS = [
    ".nan",
    ".NaN",
    ".inf",
    "-.inf",
    "+.inf",
    "1.0e+400",
    "-1.0e+400",
    "1e3",
    "0",
    "-0",
    "-1",
    "0x7fffffffffffffffffff",
    "0o777",
    "0b101",
    "1_000_000",
    "190:20:30",
    "4611686018427387904",
    "4611686018427387905",
    "9" * 400,
    "9" * 5000,
    "~",
    "null",
    "yes",
    "no",
    "on",
    "off",
    "''",
    "'   '",
    '"\\x00"',
    '"\\ud800"',
    "2026-02-30",
    "2026-11-27T13:00:00Z",
    "&anchor 1",
    "*undefined_alias",
    "&loop [*loop]",
    "{? [1, 2] : x}",
    "{[1]: 2}",
    "[" * 300 + "]" * 300,
    "{a: " * 600 + "1" + "}" * 600,
    "<<: {a: 1}",
    "- just a list",
    "%YAML 1.1",
    "---",
    "...",
    "@reserved",
    "`backtick",
    "|\n  block",
    "\t",
]
KEYS = ["schema", "workload", "source", "created", "autotune_version", "backend", "item_bytes"]
KEYS += ["n", "cpu", "best", "serial_throughput", "measurements", "unknown", "1", "?", ""]


class Raw(str):
    """YAML text put into the document as is."""


def emit(obj: object) -> str:
    """Flow-style YAML for ``obj``; ``Raw`` pieces are copied verbatim."""
    if isinstance(obj, Raw):
        return str(obj)
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{emit(k)}: {emit(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(emit(v) for v in obj) + "]"
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return ".nan"
        if math.isinf(obj):
            return ".inf" if obj > 0 else "-.inf"
        return yaml.safe_dump(obj).split("\n")[0]  # a dot and a signed exponent
    text = str(obj)
    # JSON escapes are valid in a YAML double-quoted scalar
    return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path in the document (mapping keys and list indices)."""
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += paths(v, (*prefix, i))
    return found


ALL_PATHS = paths(BASE)


def hostile_values(marker: Path) -> st.SearchStrategy:
    raw = [Raw(p.format(marker=marker)) for p in PAYLOADS] + [Raw(t) for t in OTHER_TAGS]
    raw += [Raw(s) for s in SCALARS if "\n" not in s and s not in ("---", "...", "%YAML 1.1")]
    leaves = (
        st.sampled_from(raw)
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.sampled_from([0, -1, 1, 2**62, 2**62 + 1, 2**63, 10**30])
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.booleans()
        | st.none()
        | st.text(max_size=12)
    )
    return st.recursive(
        leaves,
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.sampled_from(KEYS), kids),
        max_leaves=6,
    )


@st.composite
def documents(draw, marker: Path) -> bytes:
    """A shipped profile with a few random fields made hostile, as YAML bytes."""
    doc = yaml.safe_load(SHIPPED.read_text())
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = draw(st.sampled_from(["replace", "replace", "delete", "add", "nest"]))
            if action == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif action == "add" and isinstance(parent, dict):
                parent[draw(st.sampled_from(KEYS))] = draw(hostile_values(marker))
            elif action == "nest":
                depth = draw(st.sampled_from([1, 5, 50, 300]))
                parent[path[-1]] = Raw("[" * depth + emit(parent[path[-1]]) + "]" * depth)
            else:
                parent[path[-1]] = draw(hostile_values(marker))
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced the parent
    text = draw(st.sampled_from(["", "%YAML 1.1\n---\n", "--- !!map\n", "# c\n"])) + emit(doc)
    data = text.encode("utf-8", "surrogatepass")
    corruption = draw(st.sampled_from(["none", "none", "none", "byte", "cut", "bom", "nul"]))
    if corruption != "none" and data:
        at = draw(st.integers(0, len(data)))
        if corruption == "byte":  # not UTF-8: a lone continuation or an invalid lead byte
            data = (
                data[:at] + draw(st.sampled_from([b"\x80", b"\xc3", b"\xff", b"\xfe"])) + data[at:]
            )
        elif corruption == "cut":
            data = data[:at]
        elif corruption == "bom":
            data = b"\xef\xbb\xbf" + data
        else:
            data = data[:at] + b"\x00" + data[at:]
    return data


# -- routes -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, yaml_loader):
    """Empty user and shipped profile dirs, no AUTOTUNE_* from outside; a marker path; every
    test that uses it runs with each YAML loader."""
    base = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AUTOTUNE_PROFILE", raising=False)
        mp.delenv("AUTOTUNE_PROFILE_DIR", raising=False)
        mp.setattr(profile_mod, "user_profile_dir", lambda: base / "user")
        mp.setattr(profile_mod, "shipped_profile_dir", lambda: base / "shipped")
        yield base


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of blocking forever (a loader that opened a FIFO would)."""

    def expired(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_profile(p: Profile, tmp: Path) -> None:
    """What every accepted profile must be: sane numbers, and a save/load round trip."""
    assert p.schema == 1 and p.workers >= 1 and p.chunk_len >= 1 and p.chunk_bytes >= 1
    for m in (p.best, *p.measurements):
        assert m.workers >= 1 and m.chunk_len >= 1
        assert m.throughput is None or (math.isfinite(m.throughput) and m.throughput > 0)
    saved = p.save(tmp / "roundtrip.yaml")
    assert Profile.load(saved) == p


def routes(path: Path, tmp: Path) -> dict[str, object]:
    """The outcome of each way of reading ``path``: a Profile or a ProfileError."""
    outcomes: dict[str, object] = {}
    calls = {
        "Profile.load": lambda: Profile.load(path),
        "load_profile(path=)": lambda: load_profile("spline", path=path, cpu=I3),
        "AUTOTUNE_PROFILE": lambda: load_profile("spline", cpu=I3),
        "AUTOTUNE_PROFILE_DIR": lambda: load_profile("spline", cpu=I3),
    }
    scan = tmp / "scan"
    scan.mkdir(exist_ok=True)
    for name, call in calls.items():
        with pytest.MonkeyPatch.context() as mp:
            if name == "AUTOTUNE_PROFILE":
                mp.setenv("AUTOTUNE_PROFILE", str(path))
            if name == "AUTOTUNE_PROFILE_DIR":
                for old in scan.iterdir():
                    old.unlink()
                (scan / "hostile.yaml").symlink_to(path)
                mp.setenv("AUTOTUNE_PROFILE_DIR", str(scan))
            with warnings.catch_warnings(record=True) as caught, deadline(20):
                warnings.simplefilter("always")
                try:
                    outcomes[name] = call()
                except ProfileError as exc:
                    outcomes[name] = exc
        assert all(issubclass(w.category, ProfileWarning) for w in caught), [
            str(w.message) for w in caught
        ]
    for name, outcome in outcomes.items():
        if isinstance(outcome, ProfileError):
            # a scanned directory skips bad files: it never raises
            assert name != "AUTOTUNE_PROFILE_DIR", outcome
            message = str(outcome)
            assert "\n" not in message and len(message) < 2000, message
            assert str(path) in message or repr(str(path)) in message, message
        else:
            assert isinstance(outcome, Profile), (name, outcome)
            check_profile(outcome, tmp)
    return outcomes


# -- the generated documents ----------------------------------------------------------------------
def test_payloads_would_create_the_marker(env):
    """The positive control: an unsafe loader does run the payloads, so their absence
    below means safe loading, not a broken payload."""
    for i, payload in enumerate(PAYLOADS):
        marker = env / f"control-{i}"
        obj = yaml.unsafe_load(f"x: {payload.format(marker=marker)}\n")
        with contextlib.suppress(AttributeError):
            obj["x"].close()  # the open() payloads return a file
        assert marker.exists(), payload
        marker.rmdir() if marker.is_dir() else marker.unlink()


def test_the_unmutated_document_loads_through_every_route(env, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(emit(BASE).encode())
    outcomes = routes(path, tmp_path)
    assert all(isinstance(o, Profile) for o in outcomes.values()), outcomes
    assert outcomes["load_profile(path=)"].source == "published"


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_generated_hostile_documents(env, tmp_path, data):
    marker = env / "pwned"
    doc = data.draw(documents(marker))
    path = tmp_path / "hostile.yaml"
    path.write_bytes(doc)
    outcomes = routes(path, tmp_path)
    event("loaded" if isinstance(outcomes["Profile.load"], Profile) else "refused")
    assert not marker.exists(), "a YAML payload was executed"


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("where", ["top", "best.workers", "measurements", "cpu.brand", "key"])
def test_every_payload_everywhere_is_refused_and_never_run(env, tmp_path, payload, where):
    marker = tmp_path / "pwned"
    token = Raw(payload.format(marker=marker))
    doc = yaml.safe_load(SHIPPED.read_text())
    if where == "top":
        text = token
    elif where == "key":
        text = emit(doc)[:-1] + f", ? {token} : 1}}"
    else:
        if where == "best.workers":
            doc["best"]["workers"] = token
        elif where == "measurements":
            doc["measurements"].append(token)
        else:
            doc["cpu"]["brand"] = token
        text = emit(doc)
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    outcomes = routes(path, tmp_path)
    assert isinstance(outcomes["Profile.load"], ProfileError)
    assert "refused YAML tag" in str(outcomes["Profile.load"])
    assert not marker.exists()


def test_alias_bomb_is_cheap(env, tmp_path):
    """Billion laughs: nine levels of nine aliases.  safe_load shares the nodes, and nothing
    may walk the expansion (9**10 leaves) or print it."""
    levels = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = Raw("[" + ", ".join(levels) + "]")
    for where in ("measurements", "best", "cpu.extra", "unknown", "workload"):
        doc = yaml.safe_load(SHIPPED.read_text())
        if where == "cpu.extra":
            doc["cpu"]["extra"] = bomb
        else:
            doc[where] = bomb
        path = tmp_path / "bomb.yaml"
        path.write_text(emit(doc))
        with deadline(10):
            outcomes = routes(path, tmp_path)
        assert isinstance(outcomes["Profile.load"], ProfileError), where


# -- special files ---------------------------------------------------------------------------------
def _special(kind: str, tmp: Path) -> Path:
    path = tmp / f"{kind}.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "proc-environ":
        path.symlink_to("/proc/self/environ")
    elif kind == "proc-mem":
        path.symlink_to("/proc/self/mem")
    elif kind == "dangling-symlink":
        path.symlink_to(tmp / "absent.yaml")
    elif kind == "symlink-loop":
        path.symlink_to(path)
    elif kind == "symlink-to-fifo":
        os.mkfifo(tmp / "real-fifo")
        path.symlink_to(tmp / "real-fifo")
    elif kind == "sparse-huge":
        with open(path, "wb") as fh:
            fh.truncate(MAX_PROFILE_BYTES * 4)  # no disk used
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "utf16":
        path.write_bytes(emit(BASE).encode("utf-16"))
    elif kind == "latin1":  # a hand edit saved in another encoding
        text = SHIPPED.read_text().replace("workload: spline", "workload: splïne")
        path.write_bytes(text.encode("latin-1"))
    return path


SPECIAL = [
    "directory",
    "fifo",
    "socket",
    "dev-zero",
    "proc-environ",
    "proc-mem",
    "dangling-symlink",
    "symlink-loop",
    "symlink-to-fifo",
    "sparse-huge",
    "empty",
    "utf16",
    "latin1",
]


@pytest.mark.parametrize("kind", SPECIAL)
def test_special_files_are_refused_without_blocking(env, tmp_path, kind):
    path = _special(kind, tmp_path)
    outcomes = routes(path, tmp_path)
    for name in ("Profile.load", "load_profile(path=)", "AUTOTUNE_PROFILE"):
        assert isinstance(outcomes[name], ProfileError), (name, outcomes[name])
    # a scanned directory passes over it and falls back to the heuristic
    assert outcomes["AUTOTUNE_PROFILE_DIR"].source == "heuristic"


def test_unusable_file_names(env):
    for name in ("", "a\x00b", "x" * 5000, "/" + "a/" * 3000 + "p.yaml"):
        with deadline(10):
            try:
                Profile.load(name)
            except ProfileError as exc:
                assert "\n" not in str(exc)
            with pytest.raises(ProfileError):
                load_profile("spline", path=name, cpu=I3)


# -- the two loaders -------------------------------------------------------------------------------
def read_with(loader: type, path: Path) -> str:
    """What ``read_yaml`` makes of ``path`` with ``loader``: the data's repr, or "refused: ..."."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(files_mod, "safe_loader", lambda: loader)
        try:
            return repr(read_yaml(path))
        except ProfileError as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith(f"{path}: "), message
            return f"refused: {message}"


# The one difference: libyaml, as the YAML spec allows, reads a tab between tokens
# (`workers:<tab>2`, `[1,<tab>2]`), which PyYAML's own scanner refuses.
TAB_REFUSED = "found character '\\t' that cannot start any token"


def both_loaders(path: Path) -> str:
    """The outcome of reading ``path`` with every loader: the data's repr, or "refused"."""
    outcomes = {name: read_with(loader, path) for name, loader in YAML_LOADERS.items()}
    pure = outcomes["pure"]
    for outcome in outcomes.values():
        if outcome.startswith("refused") and pure.startswith("refused"):
            continue  # the messages may differ (libyaml's wording and positions)
        assert outcome == pure or TAB_REFUSED in pure, outcomes
    return "refused" if pure.startswith("refused") else pure


needs_libyaml = pytest.mark.skipif("libyaml" not in YAML_LOADERS, reason="PyYAML without libyaml")

SAME_EITHER_WAY = {
    # text: what both loaders make of it ("refused": a one-line ProfileError)
    "a: [1, {b: 2}]": "{'a': [1, {'b': 2}]}",
    "": "None",
    "a: &a [*a]": "{'a': [[...]]}",
    "a: &b {x: 1}\nc: {<<: *b, y: 2}": "{'a': {'x': 1}, 'c': {'x': 1, 'y': 2}}",
    "\ufeffa: 1": "{'a': 1}",
    "!!set {a}": "{'a'}",
    "a: .nan": "{'a': nan}",
    'a: "\\x00\\e"': "{'a': '\\x00\\x1b'}",
    'a: "\\U0001F600"': "{'a': '\U0001f600'}",
    'a: "\\ud800"': "refused",  # a lone surrogate: libyaml's syntax error, and ours
    'a: "\\ud83d\\ude00"': "refused",  # a surrogate pair is two lone ones in YAML
    "a: \x00": "refused",
    "a: \x85x": "refused",
    "a: [1": "refused",
    "\t": "refused",
    "*undefined": "refused",
    "a: 1\n---\nb: 2": "refused",
    "%YAML 2.0\n---\na: 1": "refused",
    "a: !!python/object/apply:os.system ['true']": "refused",
    "{[1]: 2}": "refused",
    "x: 2026-02-30": "refused",
    "x: " + "9" * 5000: "refused",
    "a: 'x\ty'": "{'a': 'x\\ty'}",  # a tab in a quoted string
    "a:\n\t- 1": "refused",  # a tab as indentation
}


@needs_libyaml
@pytest.mark.parametrize("text", list(SAME_EITHER_WAY))
def test_both_loaders_read_and_refuse_the_same_documents(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    assert both_loaders(path) == SAME_EITHER_WAY[text]


@needs_libyaml
@pytest.mark.parametrize("text", ["a:\t2", "{a: \t2}", "[1,\t2]"])
def test_only_libyaml_reads_a_tab_between_tokens(tmp_path, text):
    path = tmp_path / "tab.yaml"
    path.write_text(text)
    assert read_with(YAML_LOADERS["libyaml"], path) in ("{'a': 2}", "[1, 2]")
    assert TAB_REFUSED in read_with(YAML_LOADERS["pure"], path)


@needs_libyaml
@pytest.mark.parametrize("style", ["flow", "block", "mapping"])
@pytest.mark.parametrize("depth", [MAX_YAML_DEPTH, MAX_YAML_DEPTH + 1, 1001])
def test_both_loaders_refuse_the_same_nesting(tmp_path, style, depth):
    """Our bound, far below the pure-Python loader's recursion and libyaml's cap of 1000."""
    text = {
        "flow": "[" * depth + "]" * depth,
        "block": "- " * depth + "1",
        "mapping": "{a: " * depth + "1" + "}" * depth,
    }[style]
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    assert (both_loaders(path) == "refused") == (depth > MAX_YAML_DEPTH)
    if depth > MAX_YAML_DEPTH:
        with pytest.raises(ProfileError, match="YAML nested too deeply"):
            read_yaml(path)


@needs_libyaml
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_both_loaders_agree_on_generated_documents(tmp_path, data):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.yaml"
    path.write_bytes(data.draw(documents(marker)))
    event("read" if both_loaders(path) != "refused" else "refused")
    assert not marker.exists()


class _Composes:
    """A stand-in for a libyaml loader; ``bounded`` says whether it caps nesting."""

    bounded = True

    def __init__(self, text: str) -> None:
        self.text = text

    def get_single_node(self) -> yaml.Node:
        if self.bounded and self.text.startswith("[" * 1001):
            raise yaml.scanner.ScannerError(problem="exceeded maximum nesting depth")
        return yaml.SequenceNode("tag:yaml.org,2002:seq", [])

    def dispose(self) -> None:
        pass


class _Unbounded(_Composes):
    bounded = False


def test_libyaml_is_used_only_where_it_bounds_nesting(monkeypatch):
    choose = safe_loader.__wrapped__  # uncached, and not what the yaml_loader fixture put
    monkeypatch.setattr(yaml, "CSafeLoader", _Composes, raising=False)
    assert choose() is _Composes
    # an older libyaml composes any depth by C recursion: a deep file would crash
    monkeypatch.setattr(yaml, "CSafeLoader", _Unbounded)
    assert choose() is yaml.SafeLoader
    monkeypatch.delattr(yaml, "CSafeLoader")
    assert choose() is yaml.SafeLoader
