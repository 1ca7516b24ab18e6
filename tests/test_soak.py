"""Slow tests: many calls on one evaluator leak nothing; repeated faults always recover."""

from __future__ import annotations

import os

import kernels
import numpy as np
import pytest
from conftest import children_of

from autotune import Evaluator
from autotune.backends.shm import list_segments

pytestmark = pytest.mark.slow


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_soak_many_calls_leak_nothing(start_method, no_leaks):
    x = np.random.default_rng(0).random(300_000)
    samples = []
    with Evaluator(2, 5_000, shared={"x": x}, start_method=start_method) as ev:
        for i in range(600):
            out = ev.map(kernels.double, len(x))
            if i % 100 == 99:
                assert np.array_equal(out, x * 2.0)
                samples.append(
                    (
                        open_fds(),
                        len(children_of(os.getpid())),
                        rss_kib(),
                        len(list_segments(os.getpid())),
                    )
                )
            del out
    fds, children, rss, segments = zip(*samples, strict=True)
    assert max(fds) == min(fds), f"file descriptors grew: {fds}"
    assert max(children) == min(children), f"children changed: {children}"
    assert max(segments) == min(segments), f"segments grew: {segments}"
    assert rss[-1] - rss[1] < 20_000, f"parent RSS grew by {rss[-1] - rss[1]} KiB: {rss}"


def test_repeated_kills_always_complete(start_method, tmp_path, no_leaks):
    x = np.random.default_rng(1).random(100_000)
    with Evaluator(2, 1_000, shared={"x": x}, start_method=start_method) as ev:
        for k in range(8):  # the same pool, a fresh fault at another item each time
            flag = tmp_path / f"killed-{k}"
            out = ev.map(_killer(1_000 + 11_111 * k, str(flag)), len(x))
            assert flag.exists()
            assert np.array_equal(out, x * 2.0)


def _killer(at, flag):
    """A kernel that SIGKILLs its worker the first time it reaches item ``at``."""

    def kernel(shared, start, stop):
        if start <= at < stop and not os.path.exists(flag):
            open(flag, "w").close()
            os.kill(os.getpid(), 9)
        return shared.x[start:stop] * 2.0

    return kernel
