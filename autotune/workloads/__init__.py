"""Built-in workloads the tuner can measure, and loading a user's own.

``spline``
    The seed's computation: 50 linear ``RectBivariateSpline`` objects on a
    50x50 grid; for each chunk of points, the sum over all splines of
    ``exp(spline.ev(x, y))``.  Reduce mode, compute-bound, holds the GIL.
``stream``
    A memory-bound multi-pass numpy expression in map mode.  Each pass
    reads and writes the whole chunk, so a chunk that fits the cache is
    several times faster than one that streams from memory.
``ndimage``
    A row filter in map mode: ``scipy.ndimage`` smoothing along each row of
    an image (items are rows).

Their default sizes fit the machine: at least the sizes they always had
(1e6 points, 2^24 values, 8192 rows), and more where the usable CPUs need more
items for a search to give each worker several chunks of the longest length
it screens (:func:`run_items`).  On a 2-core machine with a 2 MiB L2 that is
the sizes they always had; on a 16-core one the spline has 6.3e6 points.

A user's workload is ``MODULE:CALLABLE``, the callable returning a
:class:`autotune.Workload` (called with no arguments).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from autotune.cpu import CpuInfo, probe
from autotune.cpu.model import FALLBACK_L2_BYTES
from autotune.workload import Workload

__all__ = [
    "BUILTIN",
    "CHUNKS_PER_WORKER",
    "ITEM_BYTES",
    "get_workload",
    "machine_sized",
    "ndimage",
    "run_items",
    "short_runs",
    "spline",
    "stream",
]

#: Bytes each built-in workload touches per item, known without building it.
ITEM_BYTES = {"spline": 16, "stream": 32, "ndimage": 1024 * 8 * 3}

#: Chunks of the longest length a search screens that each worker should get in one
#: timed run.  With one, every worker count's best is "one chunk each" for want of
#: items: on a lent 16-core Xeon, ``autotune search --workload spline --budget 25`` ran
#: 38240 items a run and picked 16 workers x 2390, one chunk each (issue 19).  Three
#: leave room for the ladder above and below the longest length.
CHUNKS_PER_WORKER = 3


def run_items(cpu: CpuInfo, item_bytes: int, workers: int) -> int:
    """Items a timed run needs for each of ``workers`` to get :data:`CHUNKS_PER_WORKER`
    chunks of the longest length the search screens.

    The search screens every worker count at a chunk of about L2/8 and at one eight
    times longer (:func:`autotune.engine.auto_requests`): one L2 of items, which is
    the longest length here (the fallback L2 where the probe found none).
    """
    longest = max(1, (cpu.l2 or FALLBACK_L2_BYTES) // max(1, item_bytes))
    return workers * CHUNKS_PER_WORKER * longest


def short_runs(cpu: CpuInfo, item_bytes: int, workers: int, n: int, total: int) -> tuple[str, ...]:
    """A note when runs of ``n`` items (of the workload's ``total``) leave ``workers``
    fewer than :data:`CHUNKS_PER_WORKER` chunks each of the longest length screened: a
    best point of one chunk per worker may then be for want of items.  ``()`` otherwise."""
    needed = run_items(cpu, item_bytes, workers)
    if n >= needed:
        return ()
    longest = needed // (workers * CHUNKS_PER_WORKER)
    how = (
        f"--items {needed} and a larger --budget would measure them"
        if total >= needed
        else f"the workload has only {total} items: a larger one would measure them"
    )
    return (
        f"runs of {n} items gave {workers} workers fewer than {CHUNKS_PER_WORKER} chunks "
        f"each of the longest length screened ({longest} items); {how}",
    )


def machine_sized(default: int, item_bytes: int, cpu: CpuInfo | None = None) -> int:
    """``default`` items, or :func:`run_items` at every usable CPU of ``cpu`` (the
    probe's, by default) where that is more."""
    cpu = probe() if cpu is None else cpu
    return max(default, run_items(cpu, item_bytes, cpu.usable_cpus or 1))


# -- spline ----------------------------------------------------------------------
def spline_kernel(shared, start, stop):
    """Sum over all splines of exp(spline(x, y)) for points [start, stop)."""
    x = shared.x[start:stop]
    y = shared.y[start:stop]
    total = 0.0
    for s in shared.splines:
        total += float(np.exp(s.ev(x, y)).sum())
    return total


def spline_data(points: int = 1_000_000, splines: int = 50, seed: int = 0) -> dict:
    """The seed's data: ``splines`` linear splines on a 50x50 grid, ``points`` points."""
    from scipy.interpolate import RectBivariateSpline

    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, 50)
    return {
        "splines": [
            RectBivariateSpline(grid, grid, rng.random((50, 50)), kx=1, ky=1)
            for _ in range(splines)
        ],
        "x": rng.random(points),
        "y": rng.random(points),
    }


def spline(points: int | None = None, splines: int = 50, seed: int = 0) -> Workload:
    """The seed workload (``item_bytes=16``: the x and z slices, as in the seed's table);
    ``points`` defaults to 1e6, or :func:`machine_sized` where the machine needs more."""
    if points is None:
        points = machine_sized(1_000_000, ITEM_BYTES["spline"])
    return Workload(
        name="spline",
        n=points,
        kernel=spline_kernel,
        shared=spline_data(points, splines, seed),
        mode="reduce",
        item_bytes=ITEM_BYTES["spline"],
        description=f"{splines} linear RectBivariateSplines, {points} points, sum of exp",
    )


# -- stream ----------------------------------------------------------------------
def stream_kernel(shared, start, stop):
    """Four passes over the chunk, two temporaries: fast only when they stay in cache."""
    x = shared.x[start:stop]
    t = x * 1.0001
    t += 0.5
    u = t * t
    u -= x
    np.abs(u, out=u)
    np.sqrt(u, out=u)
    u += t
    return u


def stream(n: int | None = None, seed: int = 0) -> Workload:
    """Memory-bound map (``item_bytes=32``: the input, the output and two temporaries);
    ``n`` defaults to 2^24, or :func:`machine_sized` where the machine needs more."""
    if n is None:
        n = machine_sized(1 << 24, ITEM_BYTES["stream"])
    rng = np.random.default_rng(seed)
    return Workload(
        name="stream",
        n=n,
        kernel=stream_kernel,
        shared={"x": rng.random(n)},
        mode="map",
        item_bytes=ITEM_BYTES["stream"],
        description=f"multi-pass numpy expression over {n} float64 values (map)",
    )


# -- ndimage ---------------------------------------------------------------------
def ndimage_kernel(shared, start, stop):
    """Smooth rows [start, stop) of the image along each row."""
    from scipy import ndimage

    block = shared.image[start:stop]
    smooth = ndimage.uniform_filter1d(block, size=9, axis=1)
    return ndimage.gaussian_filter1d(smooth, sigma=2.0, axis=1)


def ndimage(rows: int | None = None, cols: int = 1024, seed: int = 0) -> Workload:
    """Row filters over a ``rows x cols`` float64 image (``item_bytes``: a row in, out and
    one temporary); ``rows`` defaults to 8192, or :func:`machine_sized` where the machine
    needs more."""
    if rows is None:
        rows = machine_sized(8192, cols * 8 * 3)
    rng = np.random.default_rng(seed)
    return Workload(
        name="ndimage",
        n=rows,
        kernel=ndimage_kernel,
        shared={"image": rng.random((rows, cols))},
        mode="map",
        item_bytes=cols * 8 * 3,
        description=f"uniform then gaussian filter along the rows of a {rows}x{cols} image",
    )


BUILTIN: dict[str, Callable[..., Workload]] = {
    "spline": spline,
    "stream": stream,
    "ndimage": ndimage,
}


def get_workload(spec: str, **kwargs: object) -> Workload:
    """A built-in workload by name, or ``MODULE:CALLABLE`` returning a Workload.

    Raises
    ------
    ValueError
        Unknown name, a module or attribute that cannot be imported, or a
        callable that does not return a :class:`Workload`; one line each.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError("workload must be a name or MODULE:CALLABLE")
    if ":" not in spec:
        try:
            factory = BUILTIN[spec]
        except KeyError:
            names = ", ".join(sorted(BUILTIN))
            raise ValueError(
                f"unknown workload {spec!r}: use one of {names}, or MODULE:CALLABLE"
            ) from None
        return factory(**kwargs)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(
            f"cannot import module {module_name!r} for workload {spec!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(factory):
        raise ValueError(f"{spec} is not callable")
    try:
        workload = factory()
    except Exception as exc:
        raise ValueError(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(workload, Workload):
        raise ValueError(f"{spec}() returned {type(workload).__name__}, expected autotune.Workload")
    return workload
