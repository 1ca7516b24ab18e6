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
    raise UsageError("probe is not implemented yet")


def _cmd_search(args: argparse.Namespace) -> int:
    raise UsageError("search is not implemented yet")


def _cmd_show(args: argparse.Namespace) -> int:
    raise UsageError("show is not implemented yet")


def _cmd_recommend(args: argparse.Namespace) -> int:
    raise UsageError("recommend is not implemented yet")


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
