"""Reports of measurements: the seed-style table (the heatmap is :mod:`autotune.heatmap`).

The table is the one the seed published (rows: workers, columns: bytes per
chunk, cells: items per second in the unit that fits, k, M or G), followed by
the serial baseline, the best point with its speedups (vs one worker at the
same chunk, vs serial unchunked), and the spread of every point the search
kept, with whether the best is a tie with the runner-up.  ``autotune show``
prints it for a saved profile and ``autotune search`` for the points it just
measured: both go through
:func:`render_table`, which takes the measurements, the serial throughput and
the best point, so neither needs a saved file.

:func:`autotune.heatmap.plot_heatmap` draws the same grid (:func:`grid_of`)
with matplotlib.
"""

from __future__ import annotations

from collections.abc import Iterable

from autotune.cpu import CpuInfo
from autotune.engine import KEPT_REPEATS
from autotune.profile import Measurement, Profile, is_tie, is_unchunked

__all__ = [
    "UNCHUNKED",
    "Row",
    "best_key",
    "bytes_label",
    "caches_of",
    "format_rate",
    "format_table",
    "grid_of",
    "is_tie",
    "rate_unit",
    "render_table",
    "row_label",
]

UNCHUNKED = "unchunked"


def bytes_label(b: int) -> str:
    """A short column label for a chunk size in bytes.

    Round decimal sizes keep the seed's spelling (``125000 -> "125K"``,
    ``1000000 -> "1000K"``); binary ones, which cache-derived sizes are, use
    ``Ki``/``Mi`` (``32768 -> "32Ki"``); a size that is both takes the
    shorter label; anything else gets a decimal (``124992 -> "125.0K"``).
    """
    exact = []
    if b >= 1 << 20 and b % (1 << 20) == 0:
        exact.append(f"{b >> 20}Mi")
    elif b >= 1 << 10 and b % (1 << 10) == 0:
        exact.append(f"{b >> 10}Ki")
    if b >= 1000 and b % 1000 == 0:
        exact.append(f"{b // 1000}K")
    if exact:
        return min(exact, key=len)  # min keeps the first (binary) on a tie
    if b < 1000:
        return f"{b}B"
    if b < 1_000_000:
        return f"{b / 1000:.1f}K"
    return f"{b / 1e6:.2f}M"


Row = tuple[int, int]  # (0 for processes or 1 for threads, workers)


def _row(m: Measurement) -> Row:
    return (1 if m.backend == "threads" else 0, m.workers)


def row_label(row: Row) -> str:
    return f"{row[1]} thr" if row[0] else str(row[1])


def grid_of(
    measurements: Iterable[Measurement], n: int | None
) -> tuple[list[Row], list[int | str], dict[tuple[Row, int | str], float]]:
    """Rows (workers; threads rows after process rows), columns (chunk bytes,
    then "unchunked") and cells.

    A cell measured more than once shows its highest throughput.
    """
    cells: dict[tuple[Row, int | str], float] = {}
    for m in measurements:
        if m.throughput is None:
            continue
        col: int | str = UNCHUNKED if is_unchunked(m, n) else m.chunk_bytes
        key = (_row(m), col)
        cells[key] = max(cells.get(key, 0.0), m.throughput)
    rows = sorted({r for r, _ in cells})
    sized = sorted({c for _, c in cells if isinstance(c, int)})
    cols: list[int | str] = [
        *sized,
        *([UNCHUNKED] if any(c == UNCHUNKED for _, c in cells) else []),
    ]
    return rows, cols, cells


def best_key(best: Measurement | None, n: int | None) -> tuple[Row, int | str] | None:
    """The (row, column) of the best point, if it was measured."""
    if best is None or best.throughput is None:
        return None
    return (_row(best), UNCHUNKED if is_unchunked(best, n) else best.chunk_bytes)


_UNITS = ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))


def rate_unit(items_per_s: float) -> tuple[float, str]:
    """The scale and prefix (``k``, ``M``, ``G`` or none) that shows ``items_per_s`` as 1-999."""
    for scale, prefix in _UNITS:
        if items_per_s >= scale:
            return scale, prefix
    return 1.0, ""


def _unit(prefix: str) -> str:
    return f"{prefix} items/s" if prefix else "items/s"


def _number(value: float, top: float) -> str:
    """``value`` (already scaled) with as many decimals as a column topping at ``top`` needs."""
    decimals = 2 if top < 10 else 1 if top < 100 else 0
    return f"{value:.{decimals}f}"


def format_rate(items_per_s: float) -> str:
    """Items per second with a readable prefix: ``9.70 k items/s``, ``4.28 M items/s``."""
    scale, prefix = rate_unit(items_per_s)
    return f"{_number(items_per_s / scale, items_per_s / scale)} {_unit(prefix)}"


#: ``show`` and ``search`` list the spread of this many kept points at most.
KEPT_SHOWN = 5


def _point(m: Measurement) -> str:
    kind = " (threads)" if m.backend == "threads" else ""
    return (
        f"{m.workers} worker{'s' if m.workers != 1 else ''}{kind}, "
        f"chunk_len {m.chunk_len} ({m.chunk_bytes} bytes)"
    )


def _same_chunk_one_worker(
    measurements: list[Measurement], best: Measurement
) -> Measurement | None:
    return next(
        (
            m
            for m in measurements
            if m.workers == 1
            and m.chunk_len == best.chunk_len
            and m.backend == best.backend
            and m.throughput
        ),
        None,
    )


def _confidence(measurements: list[Measurement], best: Measurement | None) -> list[str]:
    """The kept points' spreads, and whether the best is a tie with the runner-up."""
    kept = sorted(
        (m for m in measurements if m.repeats >= KEPT_REPEATS and m.throughput),
        key=lambda m: -(m.throughput or 0.0),
    )
    if not kept:
        return []
    lines = ["", "kept points (timed >= 3 times; spread = (max - min) / median of the runs):"]
    for m in kept[:KEPT_SHOWN]:
        mark = "  * best" if best is not None and m == best else ""
        if m.contended:
            mark += f"  ({m.contended} run{'s' if m.contended != 1 else ''} contended)"
        lines.append(
            f"  {format_rate(m.throughput or 0.0):>16}  spread {m.spread:4.0%}  "
            f"{m.repeats:3d} runs  {_point(m)}{mark}"
        )
    if len(kept) > KEPT_SHOWN:
        lines.append(f"  ({len(kept) - KEPT_SHOWN} more)")
    if best is not None and best.throughput and best.repeats >= KEPT_REPEATS:
        others = [m for m in kept if m != best]
        if others:
            runner = others[0]
            ratio = (runner.throughput or 0.0) / best.throughput
            if is_tie(best, runner):
                lines.append(
                    f"best and runner-up are a tie within their spread (runner-up "
                    f"{ratio:.2f}x the best: {_point(runner)})"
                )
            else:
                lines.append(
                    f"best leads the runner-up beyond their spread (runner-up {ratio:.2f}x)"
                )
    return lines


def _above_best(
    measurements: list[Measurement],
    best: Measurement | None,
    n: int | None,
    scale: float,
    top: float,
) -> list[str]:
    """Why the table shows a figure above the starred best, if it does.

    The best is picked among the points confirmed by :data:`KEPT_REPEATS`
    runs (:func:`autotune.engine.pick_kept`): a point the table shows higher
    was timed fewer times (a search cut short by its budget, a screening run)
    and may have been lucky.  Each such point is named with its runs.
    """
    if best is None or not best.throughput:
        return []
    higher = sorted(
        (m for m in measurements if m != best and (m.throughput or 0.0) > best.throughput),
        key=lambda m: -(m.throughput or 0.0),
    )
    if not higher:
        return []
    named = ", ".join(
        f"{_number((m.throughput or 0.0) / scale, top)} at {row_label(_row(m))} x "
        f"{UNCHUNKED if is_unchunked(m, n) else bytes_label(m.chunk_bytes)} "
        f"({m.repeats} run{'s' if m.repeats != 1 else ''})"
        for m in higher[:KEPT_SHOWN]
    )
    more = f" and {len(higher) - KEPT_SHOWN} more" if len(higher) > KEPT_SHOWN else ""
    why = (
        f"; the best is picked among points timed >= {KEPT_REPEATS} times, "
        f"a point timed fewer times may have been lucky"
        if best.repeats >= KEPT_REPEATS and all(m.repeats < KEPT_REPEATS for m in higher)
        else ""
    )
    return [f"(above the * best, not picked: {named}{more}{why})"]


def render_table(
    measurements: Iterable[Measurement],
    *,
    serial_throughput: float | None = None,
    best: Measurement | None = None,
    n: int | None = None,
    item_bytes: int | None = None,
) -> str:
    """The seed-style table, the serial baseline and the best point.

    Parameters
    ----------
    measurements : iterable of Measurement
        The points; unmeasured ones (throughput ``None``) are left out.
    serial_throughput : float, optional
        Items per second of one process over the whole range.
    best : Measurement, optional
        The point picked; marked ``*`` in the table.
    n : int, optional
        Items per run: points where no worker got more than one chunk go to
        the "unchunked" column.
    item_bytes : int, optional
        Bytes per item, quoted in the legend.

    Returns
    -------
    str
        Lines without a trailing newline.
    """
    measurements = list(measurements)
    rows, cols, cells = grid_of(measurements, n)
    scale, prefix = rate_unit(max(cells.values(), default=1.0))
    top = max(cells.values(), default=1.0) / scale
    lines: list[str] = []
    if rows:
        labels = [c if isinstance(c, str) else bytes_label(c) for c in cols]
        widths = [max(len(label), 6) for label in labels]
        key = best_key(best, n)
        # Each column is followed by one character, "*" on the best cell, so
        # the star never shifts the numbers out of line.
        lines.append(
            "workers "
            + "".join(f" {lab.rjust(w)} " for lab, w in zip(labels, widths, strict=True)).rstrip()
        )
        for r in rows:
            line = f"{row_label(r):>7} "
            for c, w in zip(cols, widths, strict=True):
                value = cells.get((r, c))
                text = "" if value is None else _number(value / scale, top)
                line += f" {text.rjust(w)}{'*' if (r, c) == key else ' '}"
            lines.append(line.rstrip())
        per_item = f", {item_bytes} B per item" if item_bytes else ""
        star = "; * best" if key in cells else ""
        threads = "; 'thr': threads backend" if any(r[0] for r in rows) else ""
        lines.append(f"({_unit(prefix)}; columns: bytes per chunk{per_item}{star}{threads})")
        lines.extend(_above_best(measurements, best, n, scale, top))
    else:
        lines.append("(no measurements)")
    lines.append("")
    if serial_throughput is not None:
        lines.append(f"serial  {format_rate(serial_throughput)} (1 process, one chunk)")
    else:
        lines.append("serial  not measured")
    if best is not None:
        point = _point(best)
        if best.throughput is None:
            lines.append(f"best    {point} (not measured)")
        else:
            lines.append(f"best    {format_rate(best.throughput)}: {point}")
            one = _same_chunk_one_worker(measurements, best)
            speedups = []
            if one is not None and best.workers > 1:
                ratio = best.throughput / (one.throughput or 1.0)
                speedups.append(f"{ratio:.2f}x vs one worker, same chunk")
            if serial_throughput:
                ratio = best.throughput / serial_throughput
                speedups.append(f"{ratio:.2f}x vs serial, unchunked")
            if speedups:
                lines.append(f"speedup {'; '.join(speedups)}")
    lines.extend(_confidence(measurements, best))
    return "\n".join(lines)


def caches_of(profile: Profile, cpu: CpuInfo | None) -> dict[str, int | None]:
    if cpu is not None:
        return {"L1d": cpu.l1d, "L2": cpu.l2, "L3": cpu.l3}
    caches = profile.cpu.get("caches") or {}
    return {"L1d": caches.get("l1d"), "L2": caches.get("l2"), "L3": caches.get("l3")}


def format_table(profile: Profile) -> str:
    """A profile as ``autotune show`` prints it: a title line, then :func:`render_table`."""
    cpu = profile.cpu
    brand = cpu.get("brand") or "unknown CPU"
    shape = f"{cpu.get('logical_cpus') or '?'} logical / {cpu.get('physical_cores') or '?'} cores"
    sizes = ", ".join(
        f"{name} {bytes_label(size)}" for name, size in caches_of(profile, None).items() if size
    )
    title = f"{profile.workload}: {profile.source} profile, {brand} ({shape}"
    title += f", {sizes})" if sizes else ")"
    if profile.source == "online":
        title += "\n" + _online_line(profile)
    body = render_table(
        profile.measurements,
        serial_throughput=profile.serial_throughput,
        best=profile.best,
        n=profile.n,
        item_bytes=profile.item_bytes,
    )
    # What makes the verdict doubtful (Profile.doubts): said under the table,
    # so that `search` and `show` both say it.
    cautions = "".join(f"\ncaution: {doubt}" for doubt in profile.doubts)
    return f"{title}\n\n{body}{cautions}"


def _online_line(profile: Profile) -> str:
    """What an online profile rests on: settled, or still exploring."""
    calls = sum(m.repeats for m in profile.measurements)
    over = "" if profile.sessions is None else f" over {_plural(profile.sessions, 'program run')}"
    best = profile.best
    if profile.exploring:
        return (
            f"exploring: {_plural(len(profile.measurements), 'point')} measured{over} "
            f"({_plural(calls, 'call')}), best so far {best.workers} x {best.chunk_len} at "
            f"{format_rate(best.throughput or 0.0)}, spread {best.spread:.0%}"
        )
    return (
        f"learned by an evaluator while it worked: rests on {calls} calls{over} "
        f"({best.repeats} at the best point)"
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def backend_reason(profile: Profile) -> str | None:
    """Why the profile's backend won, from its own measurements (None: one backend only).

    E.g. "kernel holds the GIL: 2 threads ran 1.05x one thread; best threads
    0.52x best processes".
    """
    threads = [m for m in profile.measurements if m.backend == "threads" and m.throughput]
    procs = [
        m
        for m in profile.measurements
        if m.backend == "processes" and m.throughput and m.workers > 0
    ]
    if not threads or not procs:
        return None
    parts = []
    one = max((m.throughput or 0.0 for m in threads if m.workers == 1), default=0.0)
    many = [m for m in threads if m.workers > 1]
    if one and many:
        top = max(many, key=lambda m: m.throughput or 0.0)
        ratio = (top.throughput or 0.0) / one
        verdict = (
            "threads scale"
            if ratio >= 1.3
            else "threads do not scale (the kernel holds the GIL, or its GIL-free calls are short)"
        )
        parts.append(f"{verdict}: {top.workers} threads ran {ratio:.2f}x one thread")
    best_t = max(m.throughput or 0.0 for m in threads)
    best_p = max(m.throughput or 0.0 for m in procs)
    parts.append(f"best threads {best_t / best_p:.2f}x best processes")
    return "; ".join(parts)
