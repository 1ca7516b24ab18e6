"""Backends: the runners that execute a call's chunks, each behind one interface.

A runner has ``run(kernel, plan, mode, combine)`` (one call: the ranges of a
:class:`~autotune.backends.schedule.ChunkPlan`; the result, or the kernel's
exception raised as itself), ``close()`` (idempotent)
and ``closed``; it owns its workers, memory and counters, and nothing else
touches them.  ``processes`` (:class:`~autotune.backends.processes.pool.ProcessPool`:
worker processes sharing the data copy-on-write or through shared memory),
``threads`` (:class:`~autotune.backends.threads.ThreadRunner`) and ``dask``
(:class:`~autotune.backends.dask.runner.DaskRunner`), with what they share:
the chunk schedule (``schedule``), the in-order fold (``fold``), the shared
data (``shared``), shared memory (``shm``) and the checks on map results
(``rows``).
"""

__all__ = ["BACKENDS", "LOCAL_BACKENDS"]

from autotune._util import BACKENDS, LOCAL_BACKENDS
