"""The runner interface, and starting the runner of a backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from autotune.backends.dask.runner import DaskRunner
from autotune.backends.processes.pool import ProcessPool
from autotune.backends.schedule import ChunkPlan
from autotune.backends.stats import Meter
from autotune.backends.threads import ThreadRunner

__all__ = ["LazyRunner", "Runner", "open_runner"]


class Runner(Protocol):
    """What the evaluator and the tuner ask of a backend.

    ``run`` executes exactly the ranges of ``plan``
    (:class:`~autotune.backends.schedule.ChunkPlan`) on ``plan.workers`` of
    its workers (at most all of them), and records into ``meter`` (when
    given) each worker's time in kernels, batches re-run and items completed
    (:class:`~autotune.backends.stats.Meter`).
    """

    @property
    def workers(self) -> int: ...

    def run(
        self,
        kernel: Callable[..., Any],
        plan: ChunkPlan,
        mode: str,
        combine: Callable[[Any, Any], Any] | None,
        meter: Meter | None = None,
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


class LazyRunner:
    """A runner started at its first call and closed once: an evaluator's handle on
    its backend, whether it starts its workers at once or when a call pays for them.

    Parameters
    ----------
    open : callable
        Starts the runner (:func:`open_runner` with the evaluator's settings).
    workers : int
        What :attr:`workers` says before the runner has started.
    """

    def __init__(self, open: Callable[[], Runner], workers: int) -> None:
        self._open = open
        self._runner: Runner | None = None
        self._closed = False
        self._workers = workers

    def start(self) -> Runner:
        """The runner, started now if it was not."""
        if self._closed:
            raise RuntimeError("this Evaluator is closed")
        if self._runner is None:
            self._runner = self._open()
        return self._runner

    @property
    def started(self) -> bool:
        return self._runner is not None

    @property
    def workers(self) -> int:
        return self._runner.workers if self._runner is not None else self._workers

    @property
    def pids(self) -> list[int]:
        """The workers' process ids (none for threads, Dask, or before the start)."""
        return list(getattr(self._runner, "pids", []))

    def run(
        self,
        kernel: Callable[..., Any],
        plan: ChunkPlan,
        mode: str,
        combine: Callable[[Any, Any], Any] | None,
        meter: Meter | None = None,
    ) -> Any:
        return self.start().run(kernel, plan, mode, combine, meter)

    def close(self) -> None:
        """Close the runner if it started; no start after this (idempotent)."""
        self._closed = True
        if self._runner is not None:
            self._runner.close()

    @property
    def closed(self) -> bool:
        """Closed here, or by the runner itself (Ctrl-C or a failure of its own mid-call)."""
        return self._closed or (self._runner is not None and self._runner.closed)
