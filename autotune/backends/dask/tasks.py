"""What runs on a Dask worker: adopt the shared data once, run a batch of chunks.

These functions are shipped to the workers by reference, so they live in an
importable module of their own, apart from the client side (``runner``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from autotune._errors import add_note
from autotune.backends.rows import check_row_like, where
from autotune.backends.schedule import ChunkPlan
from autotune.backends.shared import SharedNamespace
from autotune.backends.structure import Structure, split_map_result

__all__ = ["Missing", "adopt", "forget_shared", "probe_worker", "run_batch"]

if TYPE_CHECKING:
    pass


# -- what runs on a worker -------------------------------------------------------------
_blas_limit: int | None = None
_blas_limiter: Any = None


def _limit_blas(threads: int | None) -> None:
    """Cap BLAS/OpenMP threads in this worker process, once (threadpoolctl is not cheap)."""
    global _blas_limit, _blas_limiter
    if threads is None or threads == _blas_limit:
        return
    from threadpoolctl import threadpool_limits

    _blas_limiter = threadpool_limits(limits=threads)  # process-wide until changed
    _blas_limit = threads


# The shared dicts this worker process holds, by evaluator token.  Tasks read
# them from here rather than naming the scattered data as a dependency: the
# scheduler's Active Memory Manager drops "extra" replicas of data no task is
# waiting for (every 2 s by default), and each later task naming it would make
# the worker fetch it again, once per call instead of once per evaluator.
_SHARED: dict[str, Mapping[str, Any]] = {}


@dataclass(frozen=True)
class Missing:
    """A task's answer when its worker lacks the shared data (a new or restarted worker)."""

    worker: str


def adopt(token: str, key: str, dask_worker: Any = None) -> bool:
    """Run on every worker after the broadcast: keep the copy it received."""
    if dask_worker is None or key not in dask_worker.data:
        return False
    _SHARED[token] = dask_worker.data[key]
    return True


def forget_shared(token: str) -> None:
    """Run on every worker when the evaluator closes."""
    _SHARED.pop(token, None)


def run_batch(
    kernel: Callable[..., Any],
    token: str,
    data: Mapping[str, Any] | None,
    mode: str,
    plan: ChunkPlan,
    c0: int,
    c1: int,
    blas_threads: int | None,
) -> Any:
    """One task: chunks ``[c0, c1)`` of ``plan``; ``(result, busy_s, worker)``, or
    :class:`Missing`.

    The result is the partials (reduce) or the batch's rows (map: an array,
    or a tuple or dict of arrays like the kernel's); ``busy_s`` the seconds
    spent in the kernel, for ``ev.stats``.  ``data`` is the shared dict only
    where the client resent the task with the scattered data as a
    dependency, after this worker answered :class:`Missing`.
    """
    from distributed import get_worker

    if data is not None:
        _SHARED[token] = data
    else:
        found = _SHARED.get(token)
        if found is None:
            return Missing(get_worker().address)
        data = found
    _limit_blas(blas_threads)
    shared = SharedNamespace(data)  # read-only views; the data itself is not copied
    start = stop = 0
    began = time.perf_counter()
    try:
        s0, s1 = plan.bounds(c0, c1)  # chunks of this call, or RangeError
        if mode == "reduce":
            partials = []
            for start, stop in plan.ranges(c0, c1):
                partials.append(kernel(shared, start, stop))
            result: Any = partials
        else:
            # The batch's rows, in the structure the kernel returns (one
            # array, or a tuple or dict of arrays).
            structure: Structure | None = None
            rows: list[np.ndarray] = []
            for start, stop in plan.ranges(c0, c1):
                r = kernel(shared, start, stop)
                structure, arrays = split_map_result(r, start, stop, structure)
                if c1 - c0 == 1:
                    rows = arrays
                    break
                if not rows:
                    rows = [np.empty((s1 - s0, *a.shape[1:]), dtype=a.dtype) for a in arrays]
                for i, (arr, out) in enumerate(zip(arrays, rows, strict=True)):
                    check_row_like(arr, out, start, stop, structure.label(i))
                    out[start - s0 : stop - s0] = arr
            assert structure is not None
            result = structure.build(rows)
    except Exception as exc:
        add_note(exc, f"[{where(exc, start, stop, 'on a Dask worker')}]")
        raise
    return result, time.perf_counter() - began, get_worker().address


def probe_worker() -> dict[str, Any]:
    """Run on each worker by :func:`describe_cluster`."""
    from autotune.cpu import probe

    return probe().to_dict()
