"""``probe``, ``show`` and ``recommend`` print exactly what they printed before.

The golden files under ``tests/golden/`` were written by this module
(``python tests/test_cli_golden.py --write``) from the fixture trees and the
shipped profiles.  A refactoring that only moves code must leave every byte
of them alone; a change that means to alter the output rewrites them in the
same commit, where a reviewer sees the difference.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest

from autotune.cli import main

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
TREES = sorted(p.name for p in (ROOT / "tests" / "fixtures" / "sysfs").iterdir() if p.is_dir())
SHIPPED = sorted(p.name for p in (ROOT / "profiles").glob("*.yaml"))


def _cases() -> list[tuple[str, list[str]]]:
    cases = []
    for tree in TREES:
        root = str(Path("tests", "fixtures", "sysfs", tree))
        for fmt in ("table", "--json", "--yaml"):
            extra = [] if fmt == "table" else [fmt]
            args = ["probe", "--sysfs-root", root, *extra]
            cases.append((f"probe-{tree}-{fmt.strip('-')}", args))
        for workload in ("spline", "stream", "mine"):
            for fmt in ("text", "--json"):
                extra = [] if fmt == "text" else [fmt]
                args = ["recommend", "--workload", workload, "--sysfs-root", root, *extra]
                cases.append((f"recommend-{tree}-{workload}-{fmt.strip('-')}", args))
    for name in SHIPPED:
        cases.append((f"show-{name[:-5]}", ["show", str(Path("profiles", name))]))
    return cases


CASES = _cases()


def _run(args: list[str], home: Path) -> str:
    """Exit status, stdout and stderr of ``autotune ARGS``, run in this process.

    Paths that differ between machines (the temporary home, the checkout) are
    written as ``<HOME>`` and ``<ROOT>``.
    """
    saved = dict(os.environ)
    cwd = os.getcwd()
    for key in [k for k in os.environ if k.startswith("AUTOTUNE_")]:
        del os.environ[key]
    os.environ["AUTOTUNE_PROFILE_DIR"] = str(home / "none")  # no user profile takes part
    os.environ["XDG_CONFIG_HOME"] = str(home / "config")
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)
    text = f"exit {code}\n--- stdout\n{out.getvalue()}--- stderr\n{err.getvalue()}"
    return text.replace(str(home), "<HOME>").replace(str(ROOT), "<ROOT>")


@pytest.mark.parametrize(("name", "args"), CASES, ids=[name for name, _ in CASES])
def test_output_is_golden(name, args, tmp_path):
    expected = (GOLDEN / f"{name}.txt").read_text()
    assert _run(args, tmp_path) == expected


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in CASES:
            (GOLDEN / f"{name}.txt").write_text(_run(args, Path(tmp)))
    print(f"wrote {len(CASES)} golden files to {GOLDEN}")
