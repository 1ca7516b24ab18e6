"""Profile files: read as hostile, written atomically.

Reading is the trust boundary.  A profile can come from a shared directory or
an environment variable, so every file is read as hostile:

- only regular files (checked with ``stat`` before opening, so a FIFO never
  blocks), at most :data:`MAX_PROFILE_BYTES`, strict UTF-8;
- PyYAML's safe loader only (libyaml's ``CSafeLoader`` where PyYAML has it
  and it bounds nesting, else the pure-Python ``SafeLoader``; they read and
  refuse the same documents, but for a tab between tokens, ``workers:<tab>2``,
  which libyaml reads as the YAML spec allows and PyYAML's scanner refuses):
  a ``!!python/...`` tag is refused, never executed; collections nested
  deeper than :data:`MAX_YAML_DEPTH` and strings that are not Unicode text
  (a lone surrogate such as ``"\\ud800"``, which libyaml refuses) are refused;
- whatever goes wrong becomes a one-line :class:`~autotune.ProfileError`
  naming the file (the fields are checked by :mod:`autotune.profile.validate`).

Writing is atomic: a temporary file in the target's directory, then
``os.replace``; a failed save leaves no partial file and an existing profile
untouched.  The file ends with the measurements as one bracketed list, so a
profile truncated anywhere (a partial copy) fails to load instead of loading
with points missing (:func:`~autotune.profile.model.dump_yaml`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import tempfile
from pathlib import Path

import yaml

from autotune._errors import ProfileError
from autotune._util import one_line

__all__ = ["MAX_PROFILE_BYTES", "MAX_YAML_DEPTH", "read_yaml", "safe_loader", "write_atomic"]

#: Larger files are refused unread: a real profile is a few KiB.
MAX_PROFILE_BYTES = 1 << 20
#: Deeper nesting of collections is refused, whichever loader parses.  A profile
#: nests 5 deep (a Dask profile's cpu.worker_probes[i].caches); without a bound
#: of our own the pure-Python loader refuses some hundreds of levels down (a
#: RecursionError, sooner when called deep in a stack) and libyaml at 1000.
MAX_YAML_DEPTH = 64


@functools.cache
def safe_loader() -> type:
    """The loader profiles are read with: libyaml's where it is safe, else PyYAML's own.

    ``yaml.CSafeLoader`` parses a profile about eight times faster than the
    pure-Python ``yaml.SafeLoader`` (0.6 ms against 4.8 ms for the shipped
    ``xeon-2vcpu-stream.yaml`` on the development VM) and constructs the same
    safe types.  It is used only when its libyaml refuses deep nesting itself:
    libyaml caps it at 1000 levels since 2024 (PyYAML's wheels bundle such a
    libyaml); an older one (PyYAML built against a distribution's libyaml
    0.2.5) composes any depth by C recursion, and there a profile of 100000
    ``[`` ends the process with a segfault before any check of ours could run.
    """
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is None:
        return yaml.SafeLoader
    depth = 1001  # composing this much is harmless even without the cap
    probe = loader("[" * depth + "]" * depth)
    try:
        probe.get_single_node()
    except yaml.YAMLError:
        return loader  # refused: this libyaml bounds nesting
    finally:
        probe.dispose()
    return yaml.SafeLoader


def read_yaml(path: str | os.PathLike[str]) -> object:
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
        return _load(text)
    except yaml.MarkedYAMLError as exc:
        raise ProfileError(name, _yaml_problem(exc)) from None
    except _Refused as exc:
        raise ProfileError(name, str(exc)) from None
    except RecursionError:  # the pure-Python composer, hundreds of levels past our bound
        raise ProfileError(name, _TOO_DEEP) from None
    except Exception as exc:
        # The safe loader only parses, so whatever else it raises (a date
        # such as 2026-02-30, an integer over Python's digit limit, ...) is
        # a bad file, and the contract is a ProfileError, never a traceback.
        raise ProfileError(name, f"unreadable YAML: {one_line(str(exc))}") from None


_TOO_DEEP = f"YAML nested too deeply (more than {MAX_YAML_DEPTH} levels)"


class _Refused(Exception):
    """A composed document refused before anything is constructed (the problem)."""


def _load(text: str) -> object:
    """The document in ``text``, read with :func:`safe_loader`; its nodes are
    checked between composing and constructing (:func:`_check_nodes`)."""
    loader = safe_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, MAX_YAML_DEPTH, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_nodes(node: yaml.Node, levels: int, seen: set[int]) -> None:
    """Refuse collections nested more than ``levels`` deep from ``node``, and lone surrogates.

    Both loaders then read and refuse the same documents.  Depth is counted in
    document order, as the loaders parse: an alias is the node its anchor made,
    already counted where the anchor stands (a node that contains itself,
    ``&a [*a]``, is one level).  A ``"\\ud800"`` escape is a syntax error to
    libyaml, a one-character string to the pure-Python loader, and text that
    cannot be printed or saved as UTF-8.
    """
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        if not node.value.isascii():
            try:
                node.value.encode("utf-8")
            except UnicodeEncodeError:
                mark = node.start_mark
                raise _Refused(
                    f"YAML string at line {mark.line + 1}, column {mark.column + 1} is not "
                    f"Unicode text (a lone surrogate escape)"
                ) from None
        return
    if levels == 0:
        raise _Refused(_TOO_DEEP)
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = node.value
    for child in children:
        _check_nodes(child, levels - 1, seen)


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    if exc.problem == "exceeded maximum nesting depth":  # libyaml's own cap (1000)
        return _TOO_DEEP
    where = ""
    mark = exc.problem_mark or exc.context_mark
    if mark is not None:
        where = f" at line {mark.line + 1}, column {mark.column + 1}"
    problem = exc.problem or exc.context or "invalid YAML"
    if isinstance(exc, yaml.constructor.ConstructorError):
        # The only way a safe loader meets a constructor it lacks is a tag
        # such as !!python/object/apply: say plainly that it was refused.
        return f"refused YAML tag{where}: {one_line(problem)} (profiles are plain YAML)"
    return f"YAML syntax error{where}: {one_line(problem)}"


def write_atomic(target: Path, data: bytes) -> None:
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
