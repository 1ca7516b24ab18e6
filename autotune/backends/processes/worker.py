"""The worker process: receive a kernel once per call, then run chunk batches.

Protocol (tuples over one duplex pipe per worker; the parent never waits on
a worker between batches because each worker has a batch queued ahead):

parent -> worker
    ("call", call_id, kernel_bytes, mode, plan)   plan: the call's ChunkPlan
    ("out", call_id, segment_name, segment_size, structure, layout)
                                             name None: send map results back inline
    ("batch", call_id, batch_id, c0, c1)
    ("end", call_id)
    ("stop",)
worker -> parent
    ("ready", -2)                            once, when started (before any call)
    ("need_out", call_id, structure, rows)   rows: [(row_shape, dtype)] per output
    ("done", call_id, batch_id, results, busy_s)
                                             results: list, or None if written to shm;
                                             busy_s: seconds spent in the kernel
    ("cancelled", call_id, batch_id)
    ("error", call_id, batch_id, start, stop, exc_bytes, type_name, message, traceback)

A worker that finds its pipe closed (the parent died or closed it) exits.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from autotune.backends.rows import check_row_like
from autotune.backends.schedule import ChunkPlan
from autotune.backends.shared import PackedShared, SharedNamespace, unpack
from autotune.backends.shm import SHM_OUTPUT_MIN, Layout, Segment, output_views
from autotune.backends.structure import Structure, split_map_result

__all__ = ["REPORT_ENV", "WorkerSpec", "check_not_bootstrapping", "in_worker", "worker_main"]

_IN_WORKER = False


def in_worker() -> bool:
    """True inside an autotune worker process (nested evaluators are refused)."""
    return _IN_WORKER


@dataclass
class WorkerSpec:
    """Everything a worker needs at start-up (picklable for spawn/forkserver)."""

    index: int
    shared: dict[str, Any] | None  # fork: the objects themselves (inherited, never pickled)
    packed: PackedShared | None  # spawn/forkserver: pickled once, arrays in shm
    control_name: str
    control_size: int
    blas_threads: int | None
    cpu: int | None  # pin to this logical CPU
    close_fds: tuple[int, ...]  # fork: parent-side pipe ends inherited from the parent


def _error_message(call_id: int, batch_id: int, start: int, stop: int, exc: BaseException) -> tuple:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc_bytes: bytes | None
    try:
        exc_bytes = pickle.dumps(exc)
        pickle.loads(exc_bytes)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        exc_bytes = None
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return ("error", call_id, batch_id, start, stop, exc_bytes, name, str(exc), tb)


class _Call:
    """State of the call being served: the kernel and, for map, the outputs."""

    def __init__(self, call_id: int, kernel: Callable[..., Any], mode: str, plan: ChunkPlan):
        self.call_id = call_id
        self.kernel = kernel
        self.mode = mode
        self.plan = plan
        self.rows = plan.stop  # of a map's output, as the parent counts them
        self.out: list[np.ndarray] | None = None  # one array per output of the map
        self.structure: Structure | None = None  # the call's, once known
        self.asked = False  # told where map results go (or to send them back)

    def release(self) -> None:
        self.out = None

    def told(self, name: str | None, size: int, structure: Structure, layout: Layout) -> None:
        """The parent's ``out`` message: where results go, or None to send them back."""
        self.asked = True
        if name is not None:
            self.structure = structure
            self.out = _output_views(name, size, layout)


# The last map output we mapped.  The parent reuses its segment for the next
# result of the same size, and then our pages are already mapped: no faults.
_output: Segment | None = None


def _output_views(name: str, size: int, layout: Layout) -> list[np.ndarray]:
    global _output
    if _output is None or _output.name != name:
        if _output is not None:
            _output.close()  # the parent has given that one up
        _output = Segment.attach(name, size)
    return output_views(_output.mmap, layout)


def worker_main(conn: Any, spec: WorkerSpec) -> None:
    """Entry point of a worker process."""
    global _IN_WORKER
    _IN_WORKER = True
    # Ctrl-C goes to the whole process group; the parent decides what an
    # interrupt means and ends the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Under fork we inherited the parent's ends of every worker's pipe
    # (our own included).  While we hold them, a dead parent never shows up
    # as EOF on our pipe and we would be left behind as an orphan.
    for fd in spec.close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        if spec.cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {spec.cpu})
        limiter = None
        if spec.blas_threads is not None:
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(limits=spec.blas_threads)  # noqa: F841 (kept alive)
        if spec.packed is not None:
            data, _segments = unpack(spec.packed)
        else:
            data, _segments = dict(spec.shared or {}), []
        shared = SharedNamespace(data)
        control = Segment.attach(spec.control_name, spec.control_size)
        # A memoryview reads the word as a plain int, faster than numpy.
        cancelled = memoryview(control.mmap).cast("q")
    except BaseException as exc:
        conn.send(_error_message(-1, -1, 0, 0, exc))
        return
    # The pool waits for this before its constructor returns: a worker that
    # dies before it is a start-up failure (told once), not a crash to retry.
    conn.send(("ready", -2))
    _serve(conn, shared, cancelled)


#: Set by the pool for spawned workers: a file where a worker that fails while
#: importing the main module leaves its message for the parent.
REPORT_ENV = "AUTOTUNE_WORKER_REPORT"


def check_not_bootstrapping() -> None:
    """Refuse to start a pool while this process is a worker importing ``__main__``.

    Under spawn and forkserver a worker imports the parent's main module
    before it runs anything of ours; a script that creates its evaluator at
    module level, without ``if __name__ == "__main__":``, would start pools
    from inside every worker.  Say so (also to the parent, through the file
    named by :data:`REPORT_ENV`) instead of multiprocessing's generic
    "bootstrapping phase" error.
    """
    import multiprocessing as mp

    if not getattr(mp.current_process(), "_inheriting", False):
        return
    message = (
        "autotune.Evaluator was created while a worker process was importing the main "
        "module: under spawn and forkserver every worker re-imports the script, so code "
        'that starts an evaluator must sit under `if __name__ == "__main__":`'
    )
    report = os.environ.get(REPORT_ENV)
    if report:
        _append_if_there(report, message + "\n")
    raise RuntimeError(message)


def _append_if_there(path: str, text: str) -> None:
    """Append ``text`` to the parent's report file, never creating it: a worker
    that reports after the parent read the file and removed it (the first
    report already failed the start) must not leave a new one behind."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, text.encode("utf-8"))
        finally:
            os.close(fd)


def _serve(conn: Any, shared: SharedNamespace, cancelled: Any) -> None:
    call: _Call | None = None
    # Messages read while waiting for a map's output segment, served next.
    stash: deque[tuple] = deque()
    while True:
        try:
            msg = stash.popleft() if stash else conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone or closed our pipe
        kind = msg[0]
        if kind == "batch":
            _, call_id, batch_id, c0, c1 = msg
            if call is None or call.call_id != call_id:
                continue  # a batch of a call we failed to set up; already reported
            try:
                reply = _run_batch(call, shared, cancelled, batch_id, c0, c1, conn, stash)
            except (EOFError, OSError):
                return
            try:
                conn.send(reply)
            except (BrokenPipeError, OSError):
                return
        elif kind == "call":
            _, call_id, kernel_bytes, mode, plan = msg
            if call is not None:
                call.release()
            call = None
            try:
                kernel = pickle.loads(kernel_bytes)
            except BaseException as exc:
                hint = RuntimeError(
                    f"the worker could not load the kernel ({type(exc).__name__}: {exc}); "
                    f"define it at module level in an importable module"
                )
                conn.send(_error_message(call_id, -1, 0, 0, hint))
                continue
            call = _Call(call_id, kernel, mode, plan)
        elif kind == "out":
            if call is not None and call.call_id == msg[1]:
                call.told(*msg[2:])
        elif kind == "end":
            if call is not None:
                call.release()
            call = None
        elif kind == "stop":
            return


def wants_shared_output(rows: list[tuple[tuple[int, ...], Any]], n: int) -> bool:
    """Whether a map result of ``n`` rows of each ``(row_shape, dtype)`` goes through shm.

    The parent and the workers decide it with this same function.  All the
    outputs of a map go the same way; one holding objects keeps them all
    in the pipe.
    """
    dtypes = [np.dtype(dtype) for _, dtype in rows]
    if any(dtype.hasobject for dtype in dtypes):
        return False
    row_bytes = sum(math.prod(tail) * d.itemsize for (tail, _), d in zip(rows, dtypes, strict=True))
    return n * row_bytes >= SHM_OUTPUT_MIN


def _row_specs(arrays: list[np.ndarray]) -> list[tuple[tuple[int, ...], Any]]:
    return [(a.shape[1:], a.dtype) for a in arrays]


def _request_output(
    conn: Any,
    stash: deque[tuple],
    call: _Call,
    structure: Structure,
    arrays: list[np.ndarray],
) -> None:
    """Ask the parent for the map output and wait for it (once per call).

    Without this, the first result of a call would travel through the pipe;
    with one big chunk per worker, that is the whole output, pickled.
    """
    conn.send(("need_out", call.call_id, structure, _row_specs(arrays)))
    while not call.asked:
        msg = conn.recv()
        if msg[0] == "out" and msg[1] == call.call_id:
            call.told(*msg[2:])
        elif msg[0] == "out":
            continue  # for a call that is over
        else:
            stash.append(msg)
            if msg[0] in ("end", "call", "stop"):
                return  # the call ended without us: the result is not wanted


def _run_batch(
    call: _Call,
    shared: SharedNamespace,
    cancelled: Any,
    batch_id: int,
    c0: int,
    c1: int,
    conn: Any,
    stash: deque[tuple],
) -> tuple:
    # The hot loop: an empty kernel costs about a microsecond per chunk here,
    # so keep attribute lookups and calls out of it.
    kernel, call_id, rows = call.kernel, call.call_id, call.rows
    out = call.out
    structure = call.structure
    mapping = call.mode == "map"
    results: list[Any] = []
    append = results.append
    start = stop = 0
    # Time in the kernel and in writing its rows, sent back for ev.stats; the
    # wait for the parent's answer about the output is not work.
    began = time.perf_counter()
    waited = 0.0
    try:
        # The plan's ranges, checked to be chunks of this call (or RangeError).
        for start, stop in call.plan.ranges(c0, c1):
            # The parent writes the id of a failed call here, or a number
            # above every call id when it shuts down.
            if cancelled[0] >= call_id:
                return ("cancelled", call_id, batch_id)
            r = kernel(shared, start, stop)
            if not mapping:
                append(r)
                continue
            structure, arrays = split_map_result(r, start, stop, structure)
            if out is None:
                if call.structure is None:
                    call.structure = structure  # later chunks must match it
                if not call.asked and wants_shared_output(_row_specs(arrays), rows):
                    t = time.perf_counter()
                    _request_output(conn, stash, call, structure, arrays)
                    waited += time.perf_counter() - t
                    out = call.out
                    if call.structure != structure:
                        # Another worker's first chunk made the output: this
                        # chunk must have its structure.
                        structure, arrays = split_map_result(r, start, stop, call.structure)
                else:
                    # A small output: results go back through the pipe.  Decided
                    # once per call (every chunk has the same rows), not per chunk.
                    call.asked = True
                if out is None:
                    append(arrays[0] if structure.kind == "array" else structure.build(arrays))
                    continue
            if len(arrays) == 1:  # one array: the common case, kept lean
                arr, o = arrays[0], out[0]
                check_row_like(arr, o, start, stop)
                o[start:stop] = arr
                continue
            for i, arr in enumerate(arrays):
                o = out[i]
                check_row_like(arr, o, start, stop, structure.label(i))
                o[start:stop] = arr
    except Exception as exc:
        return _error_message(call_id, batch_id, start, stop, exc)
    busy = time.perf_counter() - began - waited
    if out is None:
        return ("done", call_id, batch_id, results, busy)
    if results:  # rows from before the output existed, then rows written
        return ("done", call_id, batch_id, results + [None] * (c1 - c0 - len(results)), busy)
    return ("done", call_id, batch_id, None, busy)
