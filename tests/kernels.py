"""Kernels for the evaluator tests, at module level so spawn/forkserver workers import them."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from autotune.backends.schedule import EXACT, plan_chunks


def ranges_of(n, workers, chunk_len):
    """The ranges an evaluator of ``workers`` workers given ``chunk_len`` runs a call of
    ``n`` items in (its plan's: chunks of ``chunk_len``, the last round perhaps cut
    into a guided tail); a serial loop over them gives a reduce's bits."""
    return list(plan_chunks(n, workers, chunk_len, EXACT).ranges())


def double(shared, start, stop):
    return shared.x[start:stop] * 2.0


def triple(shared, start, stop):
    return shared.x[start:stop] * 3.0


def exp_sum(shared, start, stop):
    return float(np.exp(shared["x"][start:stop]).sum())


def pairs(shared, start, stop):
    x = shared.x[start:stop]
    return np.stack([x, x * x], axis=1)


def arange_map(shared, start, stop):
    return np.arange(start, stop, dtype=np.int64)


def vector_partial(shared, start, stop):
    return np.bincount(shared.labels[start:stop], minlength=4).astype(np.float64)


def spline_sum(shared, start, stop):
    x, y = shared.x[start:stop], shared.y[start:stop]
    return float(sum(np.exp(s.ev(x, y)).sum() for s in shared.splines))


def nested_flags(shared, start, stop):
    """For each chunk: is the nested array writeable, and is it a view of another buffer."""
    arr = shared.holder["big"]
    return np.array([[arr.flags.writeable, arr.base is not None]] * (stop - start))


def write_shared(shared, start, stop):
    shared.x[start] = 1.0
    return shared.x[start:stop]


def fail_at(shared, start, stop):
    if start <= shared.bad < stop:
        raise KeyError(f"bad item {shared.bad}")
    return shared.x[start:stop]


def fail_value(shared, start, stop):
    if start <= shared.bad < stop:
        raise ValueError("value out of range")
    return float(stop - start)


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(a)
        self.b = b

    def __reduce__(self):
        raise TypeError("no")


def fail_unpicklable(shared, start, stop):
    raise Unpicklable("odd", lambda: 0)


def wrong_length(shared, start, stop):
    return np.zeros(stop - start + 1)


def scalar_result(shared, start, stop):
    return 1.0


def changing_dtype(shared, start, stop):
    return np.zeros(stop - start, dtype=np.float32 if start else np.float64)


def kill_once(shared, start, stop):
    """SIGKILL this worker the first time it reaches item ``shared.at``."""
    if start <= shared.at < stop and not os.path.exists(shared.flag):
        with open(shared.flag, "w") as fh:
            fh.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return shared.x[start:stop] * 2.0


def kill_always(shared, start, stop):
    if start <= shared.at < stop:
        os.kill(os.getpid(), signal.SIGKILL)
    return float(stop - start)


def segfault_once(shared, start, stop):
    if start <= shared.at < stop and not os.path.exists(shared.flag):
        open(shared.flag, "w").close()
        import ctypes
        import faulthandler

        faulthandler.disable()  # the crash is the test: keep the log quiet

        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return float(stop - start)


def interrupt_parent(shared, start, stop):
    if start <= shared.at < stop:
        os.kill(shared.parent, signal.SIGINT)
    time.sleep(0.02)
    return float(stop - start)


def slow(shared, start, stop):
    time.sleep(shared.delay)
    return float(stop - start)


def blas_threads(shared, start, stop):
    from threadpoolctl import threadpool_info

    n = max((i["num_threads"] for i in threadpool_info()), default=1)
    return np.full(stop - start, n)


def affinity(shared, start, stop):
    return np.full(stop - start, min(os.sched_getaffinity(0)) * 100 + len(os.sched_getaffinity(0)))


def pid(shared, start, stop):
    return np.full(stop - start, os.getpid())


def nested_evaluator(shared, start, stop):
    from autotune import Evaluator

    Evaluator(1, 1)
    return float(stop - start)


class CountsPickles:
    """A shared object that counts how often it is pickled, in a file."""

    def __init__(self, path, data):
        self.path = path
        self.data = data

    def __reduce__(self):
        with open(self.path, "a") as fh:
            fh.write("x")
        return (CountsPickles, (self.path, self.data))


class RefusesPickle:
    def __reduce__(self):
        raise AssertionError("the shared object was pickled")


def uses_counted(shared, start, stop):
    return float(shared.obj.data[start:stop].sum())


# -- faults injected from inside a map (tests/test_faults.py) ---------------------------------
class FaultAt:
    """A map kernel (``2 * shared.x``) that injects a fault when it reaches item ``at``.

    ``kind``: ``"sigkill"`` or ``"sigsegv"`` end the worker, once (``flag`` is created
    atomically first, so the re-run of the chunk passes); ``"memoryerror"`` fails a real numpy
    allocation, every time; ``"sigint"`` and ``"sigterm"`` are sent to process ``parent``, once.
    An instance pickles by reference to this class, so spawn and forkserver workers load it.
    """

    def __init__(self, kind, at, flag, parent=None):
        self.kind = kind
        self.at = at
        self.flag = flag
        self.parent = parent

    def __call__(self, shared, start, stop):
        if start <= self.at < stop:
            inject_fault(self.kind, self.flag, self.parent)
        return shared.x[start:stop] * 2.0


def inject_fault(kind, flag, parent=None):
    if kind == "memoryerror":
        np.empty(1 << 60, dtype=np.uint8)  # numpy raises a MemoryError subclass
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return  # fired already
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "sigsegv":
        import ctypes
        import faulthandler
        import resource

        faulthandler.disable()  # the crash is the test: keep the log quiet
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        ctypes.string_at(0)
    elif kind in ("sigint", "sigterm"):
        os.kill(parent, signal.SIGINT if kind == "sigint" else signal.SIGTERM)


def offset_map(shared, start, stop):
    """``x + shared.offset``: two evaluators with different offsets must not mix results."""
    return shared.x[start:stop] + shared.offset


def offset_sum(shared, start, stop):
    return float((shared.x[start:stop] + shared.offset).sum())


#: A test stores an evaluator here, then starts a second (fork) pool whose workers inherit
#: it; ``uses_inherited`` then tries to use the inherited copy from inside a kernel.
INHERITED = None


def uses_inherited(shared, start, stop):
    return float(INHERITED.map(double, 10).sum())


def thread_count(shared, start, stop):
    """Threads in this worker process (BLAS pools included)."""
    return np.full(stop - start, len(os.listdir("/proc/self/task")))


# -- several outputs and call statistics (tests/test_outputs.py, tests/test_stats.py) ---------
def dist_idx(shared, start, stop):
    """A tuple of two outputs of different row shape and dtype (distances and indices)."""
    x = shared.x[start:stop]
    idx = np.arange(start, stop, dtype=np.int64)[:, None] + np.arange(3, dtype=np.int32)
    return x * 2.0, idx


def fit_dict(shared, start, stop):
    x = shared.x[start:stop]
    return {"params": np.stack([x, -x], axis=1), "resid": (x * x).astype(np.float32)}


def sum_count(shared, start, stop):
    """A tuple partial: (sum, count, [min, max] as an array)."""
    x = shared.x[start:stop]
    return float(x.sum()), stop - start, np.array([x.min(), x.max()])


def moments(shared, start, stop):
    x = shared.x[start:stop]
    return {"s1": float(x.sum()), "s2": float((x * x).sum()), "n": stop - start}


def ragged_tuple(shared, start, stop):
    """Two arrays whose lengths disagree in the chunk holding item ``shared.bad``."""
    x = shared.x[start:stop]
    return (x, x[:-1]) if start <= shared.bad < stop else (x, x)


def changing_keys(shared, start, stop):
    x = shared.x[start:stop]
    return {"a": x, ("c" if start <= shared.bad < stop else "b"): x}


def tuple_then_scalar(shared, start, stop):
    """Tuple partials, but a plain float for the chunk holding item ``shared.bad``."""
    if start <= shared.bad < stop:
        return float(stop - start)
    return float(stop - start), 1


def records(shared, start, stop):
    """A structured dtype, alone and beside a plain array."""
    out = np.zeros(stop - start, dtype=[("x", "f8"), ("i", "i4")])
    out["x"] = shared.x[start:stop]
    out["i"] = np.arange(start, stop)
    return out, shared.x[start:stop] + 1.0


def sleep_first(shared, start, stop):
    """Sleeps ``shared.delay`` s in the first chunk only: one slow chunk holds one worker."""
    if start == 0:
        time.sleep(shared.delay)
    return float(stop - start)


def heavy_map(shared, start, stop):
    """About 20 passes over the chunk: tens of ns per item, so the pool pays at 1e5 items."""
    y = shared.x[start:stop] * 1.0
    for _ in range(10):
        np.multiply(y, y, out=y)
        y += 1.0
        np.sqrt(y, out=y)
    return y


def heavy_sum(shared, start, stop):
    return float(heavy_map(shared, start, stop).sum())


# -- kernels whose result depends on the item numbers alone ------------------------
# An array slice past n comes back short and is caught; a range past n given
# to one of these is not, unless the ranges themselves are right.
def spin(seconds):
    """Busy work for ``seconds`` (holds the CPU, as a numerical kernel would)."""
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        pass


def busy_index_sum(shared, start, stop):
    """About 0.2 ms of work per item; the sum of the item numbers."""
    spin(200e-6 * (stop - start))
    return float(np.arange(start, stop).sum())


def index_hash(start, stop):
    """A 64-bit hash of each item number: a per-item seed, a lookup by index."""
    i = np.arange(start, stop, dtype=np.uint64)
    return (i * np.uint64(0x9E3779B97F4A7C15)) ^ (i >> np.uint64(29))


def hash_sum(shared, start, stop):
    """The exact sum (a Python int) of the items' hashes, ``shared.spin`` s an item."""
    spin(shared.spin * (stop - start))
    h = index_hash(start, stop)
    # High and low halves summed apart: exact (no wrap) up to 2^30 items.
    return (int((h >> np.uint64(32)).sum()) << 32) + int((h & np.uint64(0xFFFFFFFF)).sum())


def hash_rows(shared, start, stop):
    """Each item's hash and its item number, one row per item."""
    spin(shared.spin * (stop - start))
    return np.stack([index_hash(start, stop), np.arange(start, stop, dtype=np.uint64)], axis=1)


def range_rows(shared, start, stop):
    """Each item's row says which range it was handed in: ``(start, stop)``."""
    return np.tile(np.array([start, stop], dtype=np.int64), (stop - start, 1))


def ranges_seen(rows):
    """The ranges a map of :func:`range_rows` was run in, in order."""
    return sorted({(int(a), int(b)) for a, b in np.unique(rows, axis=0)})


def kill_once_hash_sum(shared, start, stop):
    """:func:`hash_sum`, after killing this worker the first time it reaches ``shared.at``
    (never the parent: an adapting evaluator runs some calls there)."""
    in_parent = os.getpid() == shared.parent
    if start <= shared.at < stop and not in_parent and not os.path.exists(shared.flag):
        with open(shared.flag, "w") as fh:
            fh.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return hash_sum(shared, start, stop)


def count_items(shared, start, stop):
    """The number of items of the chunk: a reduce gives n, whatever the plan."""
    return stop - start
