"""The ``autotune`` command line: probe, search, show, recommend.

Every user mistake ends with exit status 2 and one line on stderr, never a
traceback.  Each subcommand is a small ``_cmd_*`` function; the parser is
built in one place.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

__all__ = ["main", "UsageError"]


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

    from autotune.probe import format_table, probe

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


def _cmd_search(args: argparse.Namespace) -> int:
    raise UsageError("search is not implemented yet")


def _cmd_show(args: argparse.Namespace) -> int:
    """Print a profile's table and best point; ``--plot PNG`` also draws the heatmap."""
    from autotune.profile import Profile
    from autotune.report import PlotUnavailable, format_table, plot_heatmap, require_matplotlib

    profile = Profile.load(args.path)
    try:
        if args.plot:
            require_matplotlib()  # before any output: fail whole, not half done
        print(format_table(profile))
        if args.plot:
            written = plot_heatmap(profile, args.plot)
            print(f"autotune show: heatmap written to {written}", file=sys.stderr)
    except PlotUnavailable as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write {args.plot}: {exc.strerror or exc}") from None
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    """Print the workers and chunk length to use here, and where they come from."""
    import json
    import os

    from autotune.probe import probe
    from autotune.profile import recommend

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

    rec = recommend(args.workload, cpu=cpu, item_bytes=item_bytes)
    p = rec.profile
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
        }
        print(json.dumps(answer, indent=2))
        return 0
    print(f"workload     {p.workload}")
    print(f"workers      {p.workers}")
    print(f"chunk_len    {p.chunk_len} items")
    per_item = f" ({p.item_bytes} B per item)" if p.item_bytes else ""
    print(f"chunk_bytes  {p.chunk_bytes}{per_item}")
    print(f"source       {rec.origin}")
    print(f"why          {rec.why}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autotune",
        description="Probe the CPU, tune worker count and chunk length, and use the result.",
    )
    from autotune import __version__

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
    p.add_argument("--strategy", choices=("auto", "grid"), default="auto")
    p.add_argument("--cpus", metavar="LIST", help="restrict to these CPUs, e.g. 0-3,6")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
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
    except BrokenPipeError:
        return 0
