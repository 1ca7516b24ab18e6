"""Backends: the runners that execute a call's chunks, each behind ``run(...)``/``close()``.

``processes`` (worker processes sharing the data copy-on-write or through
shared memory), ``threads`` (threads of this process) and ``dask`` (tasks on
a Dask cluster), with what they share: the chunk schedule (``schedule``),
the shared data (``shared``) and shared-memory segments (``shm``).
"""
