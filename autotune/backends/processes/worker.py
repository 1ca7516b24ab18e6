"""The worker process: receive a kernel once per call, then run chunk batches.

Protocol (tuples over one duplex pipe per worker; the parent never waits on
a worker between batches because each worker has a batch queued ahead):

parent -> worker
    ("call", call_id, kernel_bytes, mode, n, chunk_len)
    ("out", call_id, segment_name, segment_size, shape, dtype)
    ("batch", call_id, batch_id, c0, c1)
    ("end", call_id)
    ("stop",)
worker -> parent
    ("ready", -2)                            once, when started (before any call)
    ("done", call_id, batch_id, results)     results: list, or None if written to shm
    ("cancelled", call_id, batch_id)
    ("error", call_id, batch_id, start, stop, exc_bytes, type_name, message, traceback)

A worker that finds its pipe closed (the parent died or closed it) exits.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from autotune.backends.rows import check_map_result, check_row_like
from autotune.backends.shared import PackedShared, SharedNamespace, unpack
from autotune.backends.shm import SHM_OUTPUT_MIN, Segment

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
    """State of the call being served: the kernel and, for map, the output."""

    def __init__(self, call_id: int, kernel: Callable[..., Any], mode: str, n: int, cl: int):
        self.call_id = call_id
        self.kernel = kernel
        self.mode = mode
        self.n = n
        self.chunk_len = cl
        self.out: np.ndarray | None = None
        self.asked = False  # told where map results go (or to send them back)

    def release(self) -> None:
        self.out = None


# The last map output we mapped.  The parent reuses its segment for the next
# result of the same size, and then our pages are already mapped: no faults.
_output: Segment | None = None


def _output_view(name: str, size: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    global _output
    if _output is None or _output.name != name:
        if _output is not None:
            _output.close()  # the parent has given that one up
        _output = Segment.attach(name, size)
    count = int(np.prod(shape))
    return np.frombuffer(_output.mmap, dtype=dtype, count=count).reshape(shape)


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
        with contextlib.suppress(OSError), open(report, "a", encoding="utf-8") as f:
            f.write(message + "\n")
    raise RuntimeError(message)


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
            _, call_id, kernel_bytes, mode, n, chunk_len = msg
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
            call = _Call(call_id, kernel, mode, n, chunk_len)
        elif kind == "out":
            _, call_id, name, size, shape, dtype = msg
            if call is not None and call.call_id == call_id:
                call.asked = True
                if name is not None:
                    call.out = _output_view(name, size, shape, dtype)
        elif kind == "end":
            if call is not None:
                call.release()
            call = None
        elif kind == "stop":
            return


def wants_shared_output(row: np.ndarray, n: int) -> bool:
    """Whether a map result of ``n`` rows like ``row`` goes through shared memory.

    The parent and the workers decide it with this same function.
    """
    return not row.dtype.hasobject and n * row.nbytes >= SHM_OUTPUT_MIN


def _request_output(conn: Any, stash: deque[tuple], call: _Call, arr: np.ndarray) -> None:
    """Ask the parent for the map output and wait for it (once per call).

    Without this, the first result of a call would travel through the pipe;
    with one big chunk per worker, that is the whole output, pickled.
    """
    conn.send(("need_out", call.call_id, arr.shape[1:], arr.dtype))
    while not call.asked:
        msg = conn.recv()
        if msg[0] == "out" and msg[1] == call.call_id:
            call.asked = True
            if msg[2] is not None:
                call.out = _output_view(*msg[2:])
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
    kernel, call_id, chunk_len, n = call.kernel, call.call_id, call.chunk_len, call.n
    out = call.out
    mapping = call.mode == "map"
    results: list[Any] = []
    append = results.append
    start = stop = c0 * chunk_len
    try:
        for c in range(c0, c1):
            # The parent writes the id of a failed call here, or a number
            # above every call id when it shuts down.
            if cancelled[0] >= call_id:
                return ("cancelled", call_id, batch_id)
            start = c * chunk_len
            stop = min(n, start + chunk_len)
            r = kernel(shared, start, stop)
            if not mapping:
                append(r)
                continue
            arr = check_map_result(r, start, stop)
            if out is None and not call.asked and wants_shared_output(arr[:1], n):
                _request_output(conn, stash, call, arr)
                out = call.out
            if out is None:
                append(arr)
            else:
                check_row_like(arr, out, start, stop)
                out[start:stop] = arr
    except Exception as exc:
        return _error_message(call_id, batch_id, start, stop, exc)
    if out is None:
        return ("done", call_id, batch_id, results)
    if results:  # rows from before the output existed, then rows written
        return ("done", call_id, batch_id, results + [None] * (c1 - c0 - len(results)))
    return ("done", call_id, batch_id, None)
