"""A new user's whole path, as the README tells it, on a program with tuple outputs.

A brute-force k-nearest-neighbours program written for ``multiprocessing.Pool``
(each task: a block of query rows -> their distances and indices) is ported
to autotune: zero configuration first, then ``autotune search --out`` from the
program's directory, then ``Evaluator(profile=PATH)`` in production.  Every
step must give the Pool's answer, and the last must run what the file says.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import textwrap

import numpy as np
import pytest

from autotune import Evaluator, Profile
from autotune.cli import main

PROGRAM = textwrap.dedent(
    """
    import numpy as np
    import autotune

    K = 4

    def make_data(seed=0):
        rng = np.random.default_rng(seed)
        return {"queries": rng.random((3_000, 3)), "points": rng.random((500, 3))}

    def knn_block(queries, points):
        d = ((queries[:, None, :] - points[None, :, :]) ** 2).sum(-1)
        idx = np.argpartition(d, K, axis=1)[:, :K]
        dist = np.take_along_axis(d, idx, axis=1)
        order = np.argsort(dist, axis=1)
        return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)

    # The user's original Pool task: a (start, stop) block of rows.
    DATA = make_data()

    def pool_task(bounds):
        start, stop = bounds
        return knn_block(DATA["queries"][start:stop], DATA["points"])

    # The port: the same work as an autotune kernel.
    def knn_kernel(shared, start, stop):
        return knn_block(shared.queries[start:stop], shared.points)

    def make():
        data = make_data()
        return autotune.Workload("knn", len(data["queries"]), knn_kernel, data, "map")
    """
)


@pytest.fixture
def program(tmp_path, monkeypatch):
    (tmp_path / "knn_user.py").write_text(PROGRAM)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path / "profiles"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import knn_user

    yield knn_user
    sys.modules.pop("knn_user", None)


def test_pool_program_through_zero_config_search_and_profile(program, tmp_path, no_leaks):
    data = program.make_data()
    n = len(data["queries"])
    bounds = [(s, min(n, s + 500)) for s in range(0, n, 500)]
    with mp.get_context("fork").Pool(2) as pool:
        blocks = pool.map(program.pool_task, bounds)
    expected = tuple(np.concatenate(parts) for parts in zip(*blocks, strict=True))

    # 1. zero configuration
    with Evaluator(shared=data) as ev:
        for _ in range(3):
            dist, idx = ev.map(program.knn_kernel, n)
            assert np.array_equal(dist, expected[0]) and np.array_equal(idx, expected[1])

    # 2. a search from the program's directory, written where the user says
    out = tmp_path / "knn.yaml"
    code = main(["search", "--workload", "knn_user:make", "--budget", "3", "--out", str(out)])
    assert code == 0 and out.is_file()
    profile = Profile.load(out)
    assert profile.source == "measured" and profile.workload == "knn"

    # 3. production: the file is used as it is
    with Evaluator(profile=os.fspath(out), shared=data) as ev:
        assert (ev.backend, ev.workers) == (profile.backend, profile.workers)
        assert not ev.settings.adapt  # a measured profile: nothing to explore
        dist, idx = ev.map(program.knn_kernel, n)
        assert ev.stats is not None and ev.stats.backend == profile.backend
    assert np.array_equal(dist, expected[0]) and np.array_equal(idx, expected[1])
