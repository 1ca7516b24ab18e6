"""Code and objects from ``__main__`` (a notebook, ``python -c``) reach the workers by value.

The worker processes of spawn and forkserver have another ``__main__``: a
function or class pickled by reference to it is not found there.  These
tests run their programs with ``python -c``, whose ``__main__`` is as
unimportable as a notebook's.  The real notebook is in test_notebook.py.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import kernels
import numpy as np
import pytest
from conftest import START_METHODS

from autotune import Evaluator
from autotune.backends.sending import KERNEL_WARN_BYTES, dumps_code, main_snapshot


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _main_function(source: str, **globals_):
    """A function defined as a notebook cell defines it: in a ``__main__`` namespace."""
    namespace = {"__name__": "__main__", **globals_}
    exec(textwrap.dedent(source), namespace)
    return namespace


# -- by reference or by value --------------------------------------------------------
def test_importable_kernel_goes_by_reference():
    payload = dumps_code(kernels.double, "kernel")
    assert len(payload) < 200
    assert pickle.loads(payload) is kernels.double


def test_main_kernel_goes_by_value_with_its_globals():
    ns = _main_function(
        """
        def helper(v):
            return v * SCALE

        def kernel(shared, start, stop):
            return helper(shared.x[start:stop])
        """,
        SCALE=3.0,
    )
    payload = dumps_code(ns["kernel"], "kernel")
    assert b"helper" in payload and b"SCALE" in payload  # the code travels, not a name
    assert len(payload) < 4096  # a typical notebook function: a few hundred bytes


def test_fork_sends_inherited_main_code_by_reference_and_newer_code_by_value(monkeypatch):
    main = type(sys)("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    big = np.zeros(1_000_000)  # 8 MB a by-value pickle would drag along
    ns = _main_function("def kernel(shared, start, stop):\n    return BIG[start:stop]\n", BIG=big)
    main.__dict__.update(ns)
    inherited = main_snapshot()
    by_reference = dumps_code(main.kernel, "kernel", inherited)
    assert len(by_reference) < 200 and b"cloudpickle" not in by_reference  # the worker has it
    with pytest.warns(UserWarning, match="BIG"):  # spawn: by value, BIG with it
        assert len(dumps_code(main.kernel, "kernel")) > big.nbytes
    ns2 = _main_function("def kernel(shared, start, stop):\n    return start\n")
    main.kernel = ns2["kernel"]  # the cell was edited and run again after the fork
    assert b"cloudpickle" in dumps_code(main.kernel, "kernel", inherited)


def test_big_global_in_a_by_value_kernel_warns_naming_it():
    big = np.ones(KERNEL_WARN_BYTES // 8 + 1000)
    ns = _main_function(
        "def kernel(shared, start, stop):\n    return float(TABLE[start:stop].sum())\n", TABLE=big
    )
    with pytest.warns(UserWarning, match=r"TABLE \(numpy.ndarray, 4.* MiB\).*shared") as rec:
        dumps_code(ns["kernel"], "kernel")
    assert "shared={'TABLE': TABLE}" in str(rec[0].message)
    small = _main_function(
        "def kernel(shared, start, stop):\n    return TABLE[0]\n", TABLE=np.ones(10)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dumps_code(small["kernel"], "kernel")


# -- what cannot be sent ------------------------------------------------------------------
@pytest.mark.parametrize("method", [m for m in START_METHODS if m != "fork"])
def test_unpicklable_shared_object_is_named_with_its_type(method, tmp_path, no_leaks):
    lock = threading.Lock()
    with pytest.raises(TypeError) as err:
        Evaluator(1, 10, shared={"x": np.ones(10), "guard": lock}, start_method=method)
    message = str(err.value)
    assert "shared['guard'] (type _thread.lock)" in message
    assert f"cannot be sent to {method} workers" in message
    assert "start_method='fork'" in message


def test_unpicklable_kernel_global_is_named():
    ns = _main_function(
        "def kernel(shared, start, stop):\n    with GUARD:\n        return start\n",
        GUARD=threading.Lock(),
    )
    with pytest.raises(TypeError, match=r"kernel kernel cannot be pickled .*uses GUARD, a _thread"):
        dumps_code(ns["kernel"], "kernel")


# -- whole programs whose __main__ no worker can import -------------------------------
PROGRAM = """
    import operator, sys, warnings
    import numpy as np
    import autotune

    method = sys.argv[1] if len(sys.argv) > 1 else {method!r}
    OFFSET = 0.5  # a notebook global the kernel uses without `shared`

    class Scaler:
        def __init__(self, k):
            self.k = k

        def __call__(self, v):
            return v * self.k

    def scaled(shared, start, stop):
        assert isinstance(shared.scaler, Scaler)  # one class, kernel's and shared's
        return shared.scaler(shared.x[start:stop]) + OFFSET

    def partial_max(shared, start, stop):
        return float(shared.x[start:stop].max())

    x = np.random.default_rng(1).random(10_000)
    shared = {{"x": x, "scaler": Scaler(3.0)}}
    with autotune.Evaluator(2, 700, shared=shared, start_method=method) as ev:
        out = ev.map(scaled, len(x))
        assert np.array_equal(out, x * 3.0 + 0.5), "map"
        top = ev.reduce(partial_max, len(x), combine=max)
        assert top == x.max(), "reduce"

        def late(shared, start, stop):  # defined after the workers started
            return shared.x[start:stop] * 2.0

        assert np.array_equal(ev.map(late, len(x)), x * 2.0), "late"

        def late(shared, start, stop):  # the cell edited and run again
            return shared.x[start:stop] * 5.0

        assert np.array_equal(ev.map(late, len(x)), x * 5.0), "redefined"
    print("ok", method)
"""


@pytest.mark.parametrize("method", START_METHODS)
def test_main_kernel_class_and_combine_work_under_every_start_method(method):
    proc = _run(PROGRAM.format(method=method))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", method]


# -- fork while other threads run -------------------------------------------------------
@pytest.mark.forks_with_threads
def test_fork_stays_the_default_with_foreign_threads_and_works(no_leaks):
    """The decision: keep fork when the parent has threads (a notebook kernel has several).

    The worker runs only autotune's code and the kernel after the fork, and
    takes no lock another thread could have held at that moment; a thread
    that holds a lock of its own, or writes to stdout, all the while does not
    stop workers from starting and serving.
    """
    stop = threading.Event()
    held = threading.Lock()

    def busy():
        while not stop.is_set():
            with held:
                print("", end="", flush=True)
                time.sleep(0.0001)

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        x = np.arange(50_000.0)
        for _ in range(5):
            with Evaluator(2, 1000, shared={"x": x}) as ev:
                assert ev.start_method == "fork"
                assert np.array_equal(ev.map(kernels.double, len(x)), x * 2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
