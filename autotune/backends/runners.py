"""The runner interface, and starting the runner of a backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from autotune.backends.dask.runner import DaskRunner
from autotune.backends.processes.pool import ProcessPool
from autotune.backends.stats import Meter
from autotune.backends.threads import ThreadRunner

__all__ = ["Runner", "open_runner"]


class Runner(Protocol):
    """What the evaluator and the tuner ask of a backend.

    ``run`` records into ``meter`` (when given) each worker's time in
    kernels, batches re-run and items completed (:class:`~autotune.backends.stats.Meter`).
    """

    workers: int

    def run(
        self,
        kernel: Callable[..., Any],
        n: int,
        chunk_len: int,
        mode: str,
        combine: Callable[[Any, Any], Any] | None,
        meter: Meter | None = None,
        workers: int | None = None,
    ) -> Any: ...

    def close(self) -> None: ...

    @property
    def closed(self) -> bool: ...


def open_runner(
    backend: str,
    workers: int | None,
    shared: dict[str, Any],
    *,
    start_method: str = "fork",
    blas_threads: int | None = 1,
    cpus: Sequence[int] | None = None,
    retries: int = 2,
    client: Any = None,
    address: str | None = None,
) -> Runner:
    """Start the runner of ``backend`` (``workers`` may be None for dask only)."""
    if backend == "dask":
        # Connects, and sends `shared` to every Dask worker once.
        return DaskRunner(workers, shared, blas_threads, client=client, address=address)
    assert workers is not None
    if backend == "threads":
        return ThreadRunner(workers, shared, blas_threads)
    return ProcessPool(
        workers,
        shared,
        start_method=start_method,
        blas_threads=blas_threads,
        cpus=cpus,
        retries=retries,
    )
