"""The heatmap of a profile: the table's grid drawn with matplotlib (the ``[plot]`` extra).

:func:`plot_heatmap` draws :func:`autotune.report.grid_of`'s cells (rows:
workers, columns: bytes per chunk, colour: items per second), stars the best
point and marks the L1d, L2 and L3 sizes on the chunk axis.  matplotlib is
imported only when a heatmap is drawn: :func:`require_matplotlib` says, with
the install hint, when it is missing.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from autotune.cpu import CpuInfo
from autotune.profile import Profile
from autotune.report import Row, best_key, bytes_label, caches_of, grid_of, row_label

__all__ = ["PLOT_HINT", "PlotUnavailable", "log_position", "plot_heatmap", "require_matplotlib"]

PLOT_HINT = "--plot needs matplotlib: pip install 'autotune[plot]'"


class PlotUnavailable(ImportError):
    """matplotlib, needed for a heatmap, is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailable` with the install hint if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(PLOT_HINT) from None


def log_position(b: float, centers: list[int]) -> float | None:
    """Where ``b`` bytes falls on the categorical chunk axis, in log scale.

    Column ``i`` is centred on ``centers[i]``; a size between two centres is
    interpolated in log space; up to half a column beyond either end it is
    extrapolated with the neighbouring step; further out, ``None``.
    """
    if not centers:
        return None
    logs = [math.log(c) for c in centers]
    x = math.log(b)
    if len(logs) == 1:
        return 0.0 if x == logs[0] else None
    for i in range(len(logs) - 1):
        if logs[i] <= x <= logs[i + 1]:
            return i + (x - logs[i]) / (logs[i + 1] - logs[i])
    if x < logs[0]:
        pos = (x - logs[0]) / (logs[1] - logs[0])
    else:
        pos = len(logs) - 1 + (x - logs[-1]) / (logs[-1] - logs[-2])
    return pos if -0.5 <= pos <= len(logs) - 0.5 else None


def plot_heatmap(
    profile: Profile, png_path: str | os.PathLike[str], cpu: CpuInfo | None = None
) -> Path:
    """Draw throughput over workers x chunk bytes as a PNG heatmap.

    Columns are the table's (chunk sizes ascending, then "unchunked"); the
    L1d, L2 and L3 sizes (one instance each, from ``cpu`` or else from the
    profile's ``cpu`` section) are dashed vertical lines where they fall
    inside the measured range, and listed in the title in any case.

    Parameters
    ----------
    profile : Profile
        The profile whose measurements to draw.
    png_path : str or path-like
        File to write; written to a temporary file beside it and renamed.
    cpu : CpuInfo, optional
        Take the cache sizes from here instead of the profile.

    Returns
    -------
    Path
        ``png_path``.

    Raises
    ------
    PlotUnavailable
        matplotlib is not installed.
    OSError
        The file cannot be written.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    rows, cols, cells = grid_of(profile.measurements, profile.n)
    # The object-oriented API, not pyplot: no global backend or figure state
    # is touched in the caller's process.
    fig = Figure(figsize=(1.2 * len(cols) + 3.0, 0.6 * len(rows) + 2.4))
    ax = fig.add_subplot()
    _draw_cells(fig, ax, rows, cols, cells, best_key(profile.best, profile.n))
    ax.set_xlabel(
        "bytes per chunk" + (f" ({profile.item_bytes} B per item)" if profile.item_bytes else "")
    )
    ax.set_ylabel("workers")
    caches = caches_of(profile, cpu)
    _markcaches_of(ax, caches, [c for c in cols if isinstance(c, int)])
    sizes = ", ".join(f"{k} {bytes_label(v)}" for k, v in caches.items() if v)
    ax.set_title(f"{profile.workload} ({profile.source})" + (f"\n{sizes}" if sizes else ""))
    fig.tight_layout()

    target = Path(png_path)
    _save_atomic(fig, target)
    return target


def _draw_cells(
    fig: Any,
    ax: Any,
    rows: list[Row],
    cols: list[int | str],
    cells: dict[tuple[Row, int | str], float],
    key: tuple[Row, int | str] | None,
) -> None:
    """The heatmap's image, its colour bar, each cell's M items/s (``*`` on ``key``,
    the best) and the axes' tick labels."""
    import numpy as np

    grid = np.full((max(len(rows), 1), max(len(cols), 1)), np.nan)
    for (w, c), value in cells.items():
        grid[rows.index(w), cols.index(c)] = value / 1e6
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax, label="M items/s")
    top = max(cells.values(), default=0.0)
    for (w, c), value in cells.items():
        i, j = rows.index(w), cols.index(c)
        star = "*" if (w, c) == key else ""
        ax.text(
            j,
            i,
            f"{value / 1e6:.2f}{star}",
            ha="center",
            va="center",
            # viridis is light at the top of the scale: dark text there.
            color="black" if value > 0.6 * top else "white",
            fontsize=9,
        )
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c if isinstance(c, str) else bytes_label(c) for c in cols])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([row_label(r) for r in rows])


def _markcaches_of(ax: Any, caches: dict[str, int | None], sized: list[int]) -> None:
    """A dashed red line, labelled, where each cache size falls on the chunk axis."""
    for name, size in caches.items():
        x = None if size is None else log_position(size, sized)
        if x is not None:
            ax.axvline(x, color="red", linestyle="--", linewidth=1)
            ax.annotate(
                f"{name} {bytes_label(size)}" if size else name,
                xy=(x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -12),
                textcoords="offset points",
                color="red",
                fontsize=8,
                # Readable over any cell colour.
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
            )


def _save_atomic(fig: Any, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
