"""The ``autotune`` command line: probe, search, show, recommend.

Every user mistake ends with exit status 2 and one line on stderr, never a
traceback.  A reader that stops early (``autotune show PATH | head -1``) ends
a command as SIGPIPE ends ``cat``: no message, exit status 141.  Each
subcommand is a small ``_cmd_*`` function; the parser is built in one place.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from autotune._util import BACKENDS, STRATEGIES
from autotune._version import __version__

if TYPE_CHECKING:
    from autotune.tuner import SearchResult
    from autotune.workload import Workload

__all__ = ["EXIT_STDOUT_CLOSED", "main", "UsageError"]


class UsageError(Exception):
    """Bad usage or bad input on the command line: exit 2, one line on stderr."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before the error; our contract is
    # one line on stderr, so the usage is left to --help.
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_probe(args: argparse.Namespace) -> int:
    """Print what this CPU (or the ``--sysfs-root`` tree) is: a table, JSON or YAML."""
    import json

    from autotune.cpu import format_table, probe

    try:
        info = probe(args.sysfs_root)
    except ValueError as exc:  # an unusable --sysfs-root: probe() raises nothing else
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    elif args.yaml:
        import yaml

        print(yaml.safe_dump(info.to_dict(), sort_keys=False), end="")
    else:
        print(format_table(info))
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    """``1,2,4`` (and ranges ``0-3``) as a sorted list of distinct ints."""
    from autotune.cpu.linux import parse_cpu_list

    try:
        values = sorted(set(parse_cpu_list(text)))
    except ValueError:
        values = []
    if not values:
        raise UsageError(f"{flag} must be a list like 1,2,4 or 0-3, got {text!r}")
    return values


def _check_writable(path: str, flag: str) -> None:
    """Refuse an output path that cannot be written, before spending a minute measuring."""
    import os

    if not path or "\0" in path:
        raise UsageError(f"{flag} must be a file name, got {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory; give a file name")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r} exists and is not a regular file")
    if not os.path.isdir(directory):
        raise UsageError(f"{flag} {path!r}: cannot write: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"{flag} {path!r}: cannot write: directory {directory!r} is not writable")


def _cmd_search(args: argparse.Namespace) -> int:
    """Measure workers x chunk length for a workload, print the table, write a profile."""
    budget, items = _search_numbers(args)
    backend = _search_backend(args)
    cpus, workers = _search_lanes(args, dask=backend == "dask")
    _check_search_outputs(args)
    workload = _search_workload(args.workload)
    result = _run_search(args, workload, budget, items, workers, cpus, backend)
    _report_search(args, result)
    return 0


def _search_numbers(args: argparse.Namespace) -> tuple[float, int | None]:
    """``--budget`` and ``--items``, checked as :func:`autotune.search` checks them."""
    from autotune.tuner import check_search

    try:
        budget = float(args.budget)
    except ValueError:
        raise UsageError(f"--budget must be a number of seconds > 0, got {args.budget!r}") from None
    items = None
    if args.items is not None:
        if not (args.items.isascii() and args.items.isdigit()):
            raise UsageError(f"--items must be a positive integer, got {args.items!r}")
        items = int(args.items)
    try:  # the same checks as search() itself, before the workload is loaded
        return check_search(budget, args.strategy, items, name=lambda arg: f"--{arg}")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _search_backend(args: argparse.Namespace) -> str | None:
    """The one backend to search (None: both local ones), with ``--scheduler`` checked."""
    # --scheduler means the dask backend; it must be the only one searched.
    backend: str | None = args.backend or ("dask" if args.scheduler else None)
    dask = backend == "dask"
    if dask and not args.scheduler:
        raise UsageError("--backend dask needs --scheduler ADDRESS (e.g. tcp://host:8786)")
    if args.scheduler and not dask:
        raise UsageError(f"--scheduler is for --backend dask, not --backend {backend}")
    if dask and args.cpus is not None:
        raise UsageError("--cpus restricts local CPUs; it does not apply to --backend dask")
    return backend


def _search_lanes(
    args: argparse.Namespace, dask: bool
) -> tuple[list[int] | None, list[int] | None]:
    """``--cpus`` and ``--workers``, checked against the usable CPUs (or, on Dask,
    as tasks in flight)."""
    import os

    from autotune.cpu import probe

    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cpus = _int_list(args.cpus, "--cpus") if args.cpus is not None else None
    if cpus is not None and usable is not None and not set(cpus) <= set(usable):
        raise UsageError(f"--cpus {args.cpus!r} names CPUs outside the usable ones {usable}")
    workers = _int_list(args.workers, "--workers") if args.workers is not None else None
    if dask:  # tasks in flight on the cluster, not local CPUs
        if workers is not None and workers[0] < 1:
            raise UsageError(f"--workers {args.workers!r} must be tasks in flight >= 1")
    else:
        limit = len(cpus) if cpus else (probe().usable_cpus or os.cpu_count() or 1)
        if workers is not None and (workers[0] < 1 or workers[-1] > limit):
            raise UsageError(f"--workers {args.workers!r} must be between 1 and {limit}")
    return cpus, workers


def _check_search_outputs(args: argparse.Namespace) -> None:
    """``--out`` and ``--plot`` can be written (and matplotlib is there for ``--plot``)."""
    from autotune.heatmap import PlotUnavailable, require_matplotlib

    if args.out is not None:
        _check_writable(args.out, "--out")
    if args.plot is not None:
        _check_writable(args.plot, "--plot")
    if args.plot:
        try:
            require_matplotlib()
        except PlotUnavailable as exc:
            raise UsageError(str(exc)) from None


def _search_workload(name: str) -> Workload:
    """The workload ``--workload`` names: a built-in one or ``MODULE:CALLABLE``."""
    import os

    from autotune.workloads import get_workload

    if ":" in name:
        # MODULE is found from the current directory too, as `python -m` does
        # (the `autotune` script's own directory is what sys.path starts with).
        here = os.getcwd()
        if "" not in sys.path and here not in sys.path:
            sys.path.insert(0, here)
    try:
        return get_workload(name)
    except (ValueError, TypeError) as exc:
        raise UsageError(" ".join(str(exc).split())) from None


def _run_search(
    args: argparse.Namespace,
    workload: Workload,
    budget: float,
    items: int | None,
    workers: list[int] | None,
    cpus: list[int] | None,
    backend: str | None,
) -> SearchResult:
    """Run the search (connecting to ``--scheduler`` for Dask); its warnings go to
    stderr as ``autotune search: warning: ...``."""
    import warnings

    from autotune.profile import LOCAL_BACKENDS
    from autotune.tuner import search

    dask = backend == "dask"
    client = None
    if dask:
        from autotune.backends.dask.runner import connect

        try:
            client = connect(args.scheduler)
        except (ImportError, ConnectionError, ValueError) as exc:
            raise UsageError(str(exc)) from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = search(
                workload,
                budget=budget,
                workers=workers,
                strategy=args.strategy,
                cpus=cpus,
                items=items,
                backends=(backend,) if backend else LOCAL_BACKENDS,
                client=client,
            )
    except (TypeError, RuntimeError, OSError) as exc:
        if not dask:
            raise
        # The cluster's bad input (no workers, a kernel or data that cannot be
        # pickled, a lost connection): one line, no traceback.
        raise UsageError(" ".join(str(exc).split())) from None
    finally:
        if client is not None:
            client.close()
    for w in caught:
        print(f"autotune search: warning: {w.message}", file=sys.stderr)
    return result


def _report_search(args: argparse.Namespace, result: SearchResult) -> None:
    """Write the profile (``--out``, else the user's profile directory), print the
    table or the JSON, and draw ``--plot``."""
    import json

    from autotune.heatmap import plot_heatmap
    from autotune.profile import user_profile_dir

    profile = result.profile
    if args.out is not None:
        out = args.out
    else:
        directory = user_profile_dir()
        directory.mkdir(parents=True, exist_ok=True)
        out = str(directory / f"{profile.workload}-{profile.cpu['fingerprint']}.yaml")
    written = profile.save(out)
    if args.json:
        print(json.dumps({**profile.to_dict(), "path": str(written), "elapsed": result.elapsed}))
    else:
        print(result.table())
        print(f"\n{result.strategy} search: {result.runs} runs in {result.elapsed:.1f} s")
        print(f"profile written to {written}")
    if args.plot:
        try:
            plot_heatmap(profile, args.plot)
        except OSError as exc:
            raise UsageError(f"cannot write {args.plot}: {exc.strerror or exc}") from None


def _cmd_show(args: argparse.Namespace) -> int:
    """Print a profile's table and best point; ``--plot PNG`` also draws the heatmap."""
    from autotune.heatmap import PlotUnavailable, plot_heatmap, require_matplotlib
    from autotune.profile import Profile
    from autotune.report import backend_reason, format_table

    profile = Profile.load(args.path)
    if args.plot is not None:
        _check_writable(args.plot, "--plot")
    try:
        if args.plot:
            require_matplotlib()  # before any output: fail whole, not half done
    except PlotUnavailable as exc:
        raise UsageError(str(exc)) from None
    print(format_table(profile))
    reason = backend_reason(profile)
    if reason:
        print(f"backend {profile.backend}: {reason}")
    if args.plot:
        # Only the heatmap's own errors are about --plot: one from printing
        # the table (a closed stdout) is not "cannot write PNG".
        try:
            written = plot_heatmap(profile, args.plot)
        except PlotUnavailable as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise UsageError(f"cannot write {args.plot}: {exc.strerror or exc}") from None
        print(f"autotune show: heatmap written to {written}", file=sys.stderr)
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    """Print the workers and chunk length to use here, and where they come from."""
    import json
    import os

    from autotune.cpu import probe
    from autotune.profile import recommend
    from autotune.report import backend_reason

    item_bytes = None
    if args.item_bytes is not None:
        text = args.item_bytes.strip()
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1 << 40:
            raise UsageError(f"--item-bytes must be a positive integer, got {args.item_bytes!r}")
        item_bytes = int(text)
    if not args.workload or not args.workload.strip():
        raise UsageError("--workload must be a non-empty name")
    if args.sysfs_root is not None and not os.path.isdir(args.sysfs_root):
        raise UsageError(f"--sysfs-root {args.sysfs_root!r} is not a directory")
    try:
        cpu = probe(args.sysfs_root)
    except (OSError, ValueError) as exc:
        where = args.sysfs_root or "this machine"
        raise UsageError(f"cannot probe {where}: {' '.join(str(exc).split())}") from None

    if item_bytes is None:
        from autotune.workloads import ITEM_BYTES

        item_bytes = ITEM_BYTES.get(args.workload)
    rec = recommend(args.workload, cpu=cpu, item_bytes=item_bytes, backend="local")
    p = rec.profile
    reason = backend_reason(p)
    for message in rec.warnings:
        print(f"autotune recommend: warning: {message}", file=sys.stderr)
    if args.json:
        answer = {
            "workload": p.workload,
            "workers": p.workers,
            "chunk_len": p.chunk_len,
            "chunk_bytes": p.chunk_bytes,
            "item_bytes": p.item_bytes,
            "backend": p.backend,
            "source": p.source,
            "profile": p.path,
            "throughput": p.best.throughput,
            "origin": rec.origin,
            "why": rec.why,
            "backend_why": reason,
        }
        print(json.dumps(answer, indent=2))
        return 0
    print(f"workload     {p.workload}")
    print(f"workers      {p.workers}")
    print(f"chunk_len    {p.chunk_len} items")
    per_item = f" ({p.item_bytes} B per item)" if p.item_bytes else ""
    print(f"chunk_bytes  {p.chunk_bytes}{per_item}")
    print(f"backend      {p.backend}" + (f" ({reason})" if reason else ""))
    print(f"source       {rec.origin}")
    print(f"why          {rec.why}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autotune",
        description="Probe the CPU, tune worker count and chunk length, and use the result.",
    )
    parser.add_argument("--version", action="version", version=f"autotune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("probe", help="show cores, hardware threads, caches and usable CPUs")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print CpuInfo.to_dict() as JSON")
    fmt.add_argument("--yaml", action="store_true", help="print CpuInfo.to_dict() as YAML")
    p.add_argument("--sysfs-root", metavar="DIR", help="read a tree that mirrors /sys instead")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("search", help="measure workers x chunk length and write a profile")
    p.add_argument("--workload", default="spline", metavar="NAME|MODULE:CALLABLE")
    p.add_argument("--budget", default=60.0, metavar="SECONDS", help="time budget (default 60)")
    p.add_argument("--workers", metavar="LIST", help="worker counts to try, e.g. 1,2,4")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto")
    p.add_argument("--cpus", metavar="LIST", help="restrict to these CPUs, e.g. 0-3,6")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="search only this backend (default: processes and threads)",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="Dask scheduler for --backend dask (e.g. tcp://host:8786); --workers are then "
        "tasks in flight",
    )
    p.add_argument("--items", metavar="N", help="items per timed run (default: from the budget)")
    p.add_argument("--out", metavar="PATH", help="profile file to write")
    p.add_argument("--plot", metavar="PNG", help="also draw a heatmap (needs autotune[plot])")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("show", help="print a profile's table and best point")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--plot", metavar="PNG", help="also draw a heatmap (needs autotune[plot])")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("recommend", help="workers and chunk length this CPU should use")
    p.add_argument("--workload", default="spline", metavar="NAME")
    p.add_argument("--item-bytes", metavar="N", help="bytes touched per item")
    p.add_argument("--sysfs-root", metavar="DIR", help="read a tree that mirrors /sys instead")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=_cmd_recommend)
    return parser


#: The status a shell reports for a command that SIGPIPE ended (128 + 13).
EXIT_STDOUT_CLOSED = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    try:
        try:
            return _main(argv)
        finally:
            # What is still buffered is written here, where a closed pipe can be
            # handled, not at interpreter exit; also after --help (SystemExit).
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()


def _main(argv: Sequence[str] | None) -> int:
    from autotune._errors import ProfileError

    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UsageError, ProfileError) as exc:
        print(f"autotune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"autotune {args.command}: interrupted", file=sys.stderr)
        return 130


def _stdout_closed() -> int:
    """End quietly because the reader of stdout went away, as ``cat`` would.

    A coreutils command is killed by SIGPIPE, silently, and the shell reports
    141; Python ignores SIGPIPE, so the write raised BrokenPipeError instead.
    Setting SIGPIPE back to its default would also kill ``search`` when one
    of its workers' pipes broke, so, as Python's documentation on SIGPIPE
    advises, stdout is pointed at /dev/null (what is still buffered cannot
    fail again at exit with "Exception ignored ... BrokenPipeError") and the
    status is the one SIGPIPE would have given.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass  # stdout is not a file here (None, or replaced): nothing left to flush at exit
    finally:
        os.close(devnull)
    return EXIT_STDOUT_CLOSED
