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

A user's workload is ``MODULE:CALLABLE``, the callable returning a
:class:`autotune.Workload` (called with no arguments).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from autotune.workload import Workload

__all__ = ["BUILTIN", "ITEM_BYTES", "get_workload", "ndimage", "spline", "stream"]

#: Bytes each built-in workload touches per item, known without building it.
ITEM_BYTES = {"spline": 16, "stream": 32, "ndimage": 1024 * 8 * 3}


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


def spline(points: int = 1_000_000, splines: int = 50, seed: int = 0) -> Workload:
    """The seed workload (``item_bytes=16``: the x and z slices, as in the seed's table)."""
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


def stream(n: int = 1 << 24, seed: int = 0) -> Workload:
    """Memory-bound map (``item_bytes=32``: the input, the output and two temporaries)."""
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


def ndimage(rows: int = 8192, cols: int = 1024, seed: int = 0) -> Workload:
    """Row filters over a ``rows x cols`` float64 image (``item_bytes``: a row in, out and
    one temporary)."""
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
