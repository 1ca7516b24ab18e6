"""BLAS thread limits for worker processes: the environment for spawned ones, a
refcounted hold in the parent for forked ones."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["BLAS_ENV", "BLAS_HOLD", "environ"]


#: Read by OpenBLAS, OpenMP, MKL and Accelerate when a process first loads them.
BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


@contextlib.contextmanager
def environ(names: tuple[str, ...], value: str) -> Iterator[None]:
    """Set environment variables for the duration (a spawned child inherits them)."""
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, value))
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


class BlasHold:
    """This process's BLAS limit while fork evaluators are open (a refcount).

    Setting the limit inside a freshly forked worker makes OpenBLAS start its
    thread pool there, and those threads spin for about a fifth of a second
    of CPU: a core stolen from the other workers.  Setting it in the parent
    and restoring it right after the fork only moves the spin into the
    parent.  So the parent keeps the limit while an evaluator is open (its
    workers occupy the cores anyway), forked workers inherit it and start no
    thread, and the last evaluator to close restores the original limits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._threads: int | None = None
        self._limiter: Any = None

    def acquire(self, threads: int) -> None:
        from threadpoolctl import threadpool_limits

        with self._lock:
            if self._holders == 0:
                self._limiter = threadpool_limits(limits=threads)
            elif threads != self._threads:
                threadpool_limits(limits=threads)  # undone by the first limiter's restore
            self._threads = threads
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = self._threads = None


BLAS_HOLD = BlasHold()
