"""Kernels for the evaluator tests, at module level so spawn/forkserver workers import them."""

from __future__ import annotations

import os
import signal
import time

import numpy as np


def double(shared, start, stop):
    return shared.x[start:stop] * 2.0


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
