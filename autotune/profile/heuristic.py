"""The heuristic that stands in when no profile fits: cores and an L2-sized chunk."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from autotune._util import check_int, utc_timestamp
from autotune._version import __version__
from autotune.cpu import CpuInfo
from autotune.cpu.model import FALLBACK_L2_BYTES
from autotune.profile.match import cpu_section, size_text
from autotune.profile.model import (
    DEFAULT_ITEM_BYTES,
    MIN_CHUNK_ITEMS,
    Measurement,
    Profile,
)

__all__ = ["heuristic_profile", "heuristic_why", "infer_item_bytes", "item_bytes_of"]


def _l2_per_core(cpu: CpuInfo) -> int | None:
    """Bytes of L2 one core has to itself (an L2 may serve a core cluster)."""
    size = cpu.l2
    if size is None:
        return None
    shared = [
        c.shared_cpus
        for c in cpu.caches
        if c.level == 2 and c.type in ("data", "unified") and c.size_bytes == size
    ]
    threads = cpu.threads_per_core or 1
    cores_sharing = max(1, min(shared, default=threads) // threads)
    return size // cores_sharing


def _heuristic_workers(cpu: CpuInfo) -> tuple[int, str]:
    if cpu.physical_cores:
        cores, why = cpu.physical_cores, "physical cores"
    elif cpu.logical_cpus and cpu.threads_per_core:
        cores, why = max(1, cpu.logical_cpus // cpu.threads_per_core), "logical / threads per core"
    elif cpu.logical_cpus:
        cores, why = cpu.logical_cpus, "logical CPUs (cores unknown)"
    elif cpu.usable_cpus:
        cores, why = cpu.usable_cpus, "usable CPUs (topology unknown)"
    else:
        cores, why = os.cpu_count() or 1, "os.cpu_count() (nothing probed)"
    if cpu.usable_cpus and cpu.usable_cpus < cores:
        return cpu.usable_cpus, f"{why}, capped at {cpu.usable_cpus} usable"
    return max(1, cores), why


def heuristic_profile(
    cpu: CpuInfo,
    workload: str,
    item_bytes: int | None = None,
    *,
    min_items: int = MIN_CHUNK_ITEMS,
) -> Profile:
    """The profile to use when none was measured: a rule from the probe.

    The rule: **workers = physical cores** (capped by the usable CPUs), and
    **chunk bytes = L2 per core / 8**, but never fewer than
    :data:`MIN_CHUNK_ITEMS` items per chunk.

    Evidence (docs/design.md, "Evidence behind the heuristic"): on a 2-core
    VM with 2 MiB L2 per core, over five chunk-sensitive workloads (a Horner
    polynomial, an erf/exp mix, a row filter, a multi-pass stream, the seed's
    splines), 2 workers with chunks between L2/16 and L2/4 per core reached
    >= 0.92 of each workload's best; L2/2 fell to 0.73 (polynomial),
    unchunked to 0.18-0.5, and 1 worker never beat 0.59.  L2/8 sits in the
    middle of the good band in log scale, and cores rather than hardware
    threads is what the seed's published table shows too (2 workers beat 3
    and 4 on the 2-core/4-thread i3-3227U).  The floor keeps the per-chunk
    overhead small where the L2 is small or items are big.

    Parameters
    ----------
    cpu : CpuInfo
        What the probe found; missing figures fall back to logical CPUs,
        ``os.cpu_count()`` and a 256 KiB L2.
    workload : str
        Name recorded in the profile.
    item_bytes : int, optional
        Bytes touched per item, temporaries included (the rule drifts when
        they are left out).  Unknown: :data:`DEFAULT_ITEM_BYTES` (two
        float64 per item), which the profile then records.
    min_items : int
        The floor (:data:`MIN_CHUNK_ITEMS`).  An evaluator that adapts uses
        a lower one where it knows the bytes per item from the data: a floor
        in items forces 4 MiB chunks on 1 KiB rows, and it explores from
        there anyway.

    Returns
    -------
    Profile
        ``source == "heuristic"``, no measurements, best throughput ``None``.
    """
    if item_bytes is None:
        item_bytes = DEFAULT_ITEM_BYTES
    item_bytes = check_int("item_bytes", item_bytes)
    workers, _ = _heuristic_workers(cpu)
    l2 = _l2_per_core(cpu) or FALLBACK_L2_BYTES
    chunk_len = max(min_items, (l2 // 8) // item_bytes)
    best = Measurement(workers, chunk_len, chunk_len * item_bytes, throughput=None)
    return Profile(
        workload=workload,
        source="heuristic",
        cpu=cpu_section(cpu),
        best=best,
        serial_throughput=None,
        measurements=(),
        created=utc_timestamp(),
        autotune_version=__version__,
        item_bytes=item_bytes,
    )


def heuristic_why(cpu: CpuInfo, item_bytes: int | None) -> str:
    _, workers_why = _heuristic_workers(cpu)
    l2 = _l2_per_core(cpu)
    l2_why = (
        f"L2 {size_text(l2)} per core / 8"
        if l2
        else f"L2 unknown, {size_text(FALLBACK_L2_BYTES)} / 8"
    )
    items = f"{item_bytes} B/item" if item_bytes else f"{DEFAULT_ITEM_BYTES} B/item assumed"
    return f"workers = {workers_why}; chunk = {l2_why}, >= {MIN_CHUNK_ITEMS} items, {items}"


def infer_item_bytes(shared: Mapping[str, Any], n: int, row_bytes: int | None = None) -> int | None:
    """Bytes each item touches, from the data: rows of ``shared`` arrays of length ``n``.

    Every top-level array in ``shared`` whose first axis has ``n`` entries
    is read row by row as the items go (``x[start:stop]``); ``row_bytes``
    adds the output row of a map.  ``None`` when nothing says.
    """
    total = 0
    for value in shared.values():
        if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == n and n:
            total += value.nbytes // n
    if row_bytes:
        total += row_bytes
    return total or None


def item_bytes_of(shared: Mapping[str, Any] | None, n: int, given: int | None = None) -> int:
    """Bytes per item, by one rule for the search and the evaluator: ``given`` (a
    Workload's or an Evaluator's ``item_bytes``), else counted from the rows of
    the ``shared`` arrays of length ``n`` (:func:`infer_item_bytes`), else
    :data:`DEFAULT_ITEM_BYTES`."""
    return given or infer_item_bytes(shared or {}, n) or DEFAULT_ITEM_BYTES
