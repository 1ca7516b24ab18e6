"""Describing a Dask cluster for profiles, and finding the profile measured on one like it."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from autotune.backends.dask.runner import DEFAULT_INFLIGHT, check_client, connect
from autotune.backends.dask.tasks import probe_worker
from autotune.profile.match import ClusterInfo, cluster_mismatch, cluster_section

__all__ = ["describe_cluster", "load_cluster_profile"]

if TYPE_CHECKING:
    from autotune.profile import Profile


def describe_cluster(client: Any) -> ClusterInfo:
    """Probe every worker of ``client``'s cluster (one ``client.run``)."""
    from autotune.cpu import CpuInfo

    check_client(client)
    nthreads = client.nthreads()
    if not nthreads:
        raise RuntimeError("the Dask cluster has no workers to describe")
    probes = client.run(probe_worker)
    addresses = sorted(a for a in probes if a in nthreads)
    cpus = tuple(CpuInfo.from_dict(probes[a]) for a in addresses)
    section = cluster_section([(a, int(nthreads[a])) for a in addresses], cpus)
    return ClusterInfo(section, cpus, int(sum(nthreads[a] for a in addresses)))


def load_cluster_profile(
    workload: str, cluster: Any, *, item_bytes: int | None = None, path: Any = None
) -> Profile:
    """The dask profile for ``workload`` measured on a cluster like ``cluster``'s.

    ``cluster`` is a Client or a scheduler address.  Profiles are looked up
    as :func:`autotune.load_profile` does, with ``backend="dask"`` and the
    first worker's CPU, then the cluster's shape (workers, threads, each
    worker's CPU) must match too.  Otherwise the heuristic, with a warning:
    its chunk length from the workers' caches, two tasks in flight per thread.
    """
    from autotune.profile import ProfileWarning, load_profile

    client = connect(cluster) if isinstance(cluster, str) else cluster
    try:
        info = describe_cluster(client)
    finally:
        if client is not cluster:
            with contextlib.suppress(Exception):
                client.close()
    profile = load_profile(workload, path, info.cpu, item_bytes=item_bytes, backend="dask")
    if profile.source != "heuristic":
        why = cluster_mismatch(profile.cpu, info)
        if why is None:
            return profile
        warnings.warn(f"profile {profile.path} not used: {why}", ProfileWarning, stacklevel=2)
        from autotune.profile import heuristic_profile

        profile = heuristic_profile(info.cpu, workload, item_bytes)
    best = replace(profile.best, workers=DEFAULT_INFLIGHT * info.threads)
    return replace(profile, best=best, backend="dask", cpu=info.section)
