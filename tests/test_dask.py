"""The dask backend: the same map/reduce contract, on a LocalCluster the tests start.

One 2-worker cluster (processes, one thread each) serves the module.  Kernels
and helpers live at module level: the cluster's spawned workers import this
module to unpickle them.
"""

from __future__ import annotations

import logging
import operator
import os
import signal
import socket
import threading
import time

import kernels
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import autotune  # noqa: E402
from autotune import Evaluator, WorkerLost, Workload  # noqa: E402
from autotune.backends.shared import SharedNamespace  # noqa: E402
from autotune.workloads import stream_kernel  # noqa: E402

N = 200_003


@pytest.fixture(scope="module")
def cluster():
    cluster = distributed.LocalCluster(
        processes=True,
        n_workers=2,
        threads_per_worker=1,
        dashboard_address=":0",
        silence_logs=logging.CRITICAL,
    )
    yield cluster
    cluster.close()


@pytest.fixture
def client(cluster):
    with distributed.Client(cluster, set_as_default=False) as client:
        # A test that kills a worker leaves the nanny restarting it.
        client.wait_for_workers(2, timeout=60)
        yield client


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(11).random(N)


# -- kernels and helpers (module level: the workers import them) ------------------------
def exp_sum(shared, start, stop):
    return float(np.exp(shared["x"][start:stop]).sum())


def histogram(shared, start, stop):
    return np.bincount((shared.x[start:stop] * 4).astype(np.int64), minlength=4).astype(float)


def pairs(shared, start, stop):
    x = shared.x[start:stop]
    return np.stack([x, x * x], axis=1)


def tagged_sum(shared, start, stop):
    return float(shared.x[start:stop].sum()) + shared.tag.value


def fails_at_100k(shared, start, stop):
    if start <= 100_000 < stop:
        raise ValueError("bad item")
    return 0.0


def die_once(shared, start, stop):
    """SIGKILL our own worker the first time the chunk holding item 100000 runs."""
    if start <= 100_000 < stop:
        try:
            os.close(os.open(shared.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return float(np.exp(shared.x[start:stop]).sum())


def die_always(shared, start, stop):
    if start <= 100_000 < stop:
        os.kill(os.getpid(), signal.SIGKILL)
    return 0.0


def dist_idx(shared, start, stop):
    x = shared.x[start:stop]
    return x * 2.0, np.arange(start, stop, dtype=np.int32)


def fit_dict(shared, start, stop):
    x = shared.x[start:stop]
    return {"params": np.stack([x, -x], axis=1), "resid": (x * x).astype(np.float32)}


def sum_count(shared, start, stop):
    x = shared.x[start:stop]
    return float(x.sum()), {"n": stop - start, "minmax": np.array([x.min(), x.max()])}


def ragged_at_100k(shared, start, stop):
    x = shared.x[start:stop]
    return (x, x[:-1]) if start <= 100_000 < stop else (x, x)


def scalar_at_100k(shared, start, stop):
    return 1.0 if start <= 100_000 < stop else (1.0, 2.0)


def _revive(path, value):
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    return Counted(path, value)


class Counted:
    """Writes a line to ``path`` each time it is unpickled: counts deliveries."""

    def __init__(self, path, value):
        self.path = path
        self.value = value

    def __reduce__(self):
        return (_revive, (self.path, self.value))


def small_stream():
    """A small workload for the search tests (``MODULE:CALLABLE``)."""
    x = np.random.default_rng(3).random(60_000)
    return Workload("stream", len(x), stream_kernel, {"x": x}, mode="map", item_bytes=32)


def serial_parts(kernel, shared, n, chunk_len, workers):
    ns = SharedNamespace(shared)
    return [kernel(ns, s, e) for s, e in kernels.ranges_of(n, workers, chunk_len)]


def fold(parts, combine=operator.add):
    acc = parts[0]
    for p in parts[1:]:
        acc = combine(acc, p)
    return acc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the contract -----------------------------------------------------------------------
def test_map_reduce_equal_serial(client, x):
    with Evaluator(2, 3_000, shared={"x": x}, backend="dask", client=client) as ev:
        assert ev.backend == "dask" and ev.pids == [] and ev.start_method is None
        out = ev.map(stream_kernel, N)
        rows = serial_parts(stream_kernel, {"x": x}, N, 3_000, ev.workers)
        assert np.array_equal(out, np.concatenate(rows))
        total = ev.reduce(exp_sum, N)
        assert total == fold(serial_parts(exp_sum, {"x": x}, N, 3_000, ev.workers))  # same bits
        hist = ev.reduce(histogram, N)
        assert np.array_equal(hist, fold(serial_parts(histogram, {"x": x}, N, 3_000, ev.workers)))
        assert ev.map(pairs, 10).shape == (10, 2)
        maxed = ev.reduce(exp_sum, N, combine=max)  # combine runs here, never pickled
        assert maxed == max(serial_parts(exp_sum, {"x": x}, N, 3_000, ev.workers))
        assert ev.reduce(exp_sum, 0) == 0 and ev.map(stream_kernel, 0).shape == (0,)


def test_a_guided_tail_runs_as_planned_and_a_reduce_repeats_to_the_bit(client, x):
    """An explicit chunk length that leaves one chunk for the last round: the tasks
    run exactly the plan's ranges (the last chunk cut into pieces for the idle
    workers), and a reduce repeats to the bit, a serial fold's bits."""
    from autotune.backends.schedule import EXACT, plan_chunks

    with Evaluator(2, 4_096, shared={"x": x}, backend="dask", client=client) as ev:
        n = (ev.workers * 3 + 1) * 4_096
        plan = plan_chunks(n, ev.workers, 4_096, EXACT)
        assert plan.piece_len < 4_096  # it has a tail
        assert kernels.ranges_seen(ev.map(kernels.range_rows, n)) == list(plan.ranges())
        first = ev.reduce(exp_sum, n)
        assert all(ev.reduce(exp_sum, n) == first for _ in range(3))
        assert first == fold(serial_parts(exp_sum, {"x": x}, n, 4_096, ev.workers))


def test_a_slice_of_a_call_runs_where_its_items_are(client):
    """A plan at ``start`` (an adapting evaluator's slice; the Dask backend never adapts,
    but every runner keeps the plan's contract): the tasks are given the slice's item
    numbers, a map fills the rows ``[start, stop)`` of an output of ``stop`` rows."""
    from autotune.backends.runners import open_runner
    from autotune.backends.schedule import EXACT, plan_chunks

    n, start = 30_000, 70_001
    plan = plan_chunks(n, 2, 4_096, EXACT).at(start)
    runner = open_runner("dask", 2, {"spin": 0.0}, client=client)
    try:
        rows = runner.run(kernels.hash_rows, plan, "map", None)
        assert rows.shape[0] == start + n
        ns = SharedNamespace({"spin": 0.0})
        assert np.array_equal(rows[start:], kernels.hash_rows(ns, start, start + n))
        total = runner.run(kernels.hash_sum, plan, "reduce", operator.add)
        assert total == kernels.hash_sum(ns, 0, start + n) - kernels.hash_sum(ns, 0, start)
    finally:
        runner.close()


def test_several_outputs_equal_serial(client, x, capsys):
    shared = {"x": x}
    with Evaluator(2, 3_000, shared=shared, backend="dask", client=client) as ev:
        for kernel in (dist_idx, fit_dict):
            got = ev.map(kernel, N, progress=True)
            want = kernel(SharedNamespace(shared), 0, N)
            assert type(got) is type(want)
            for g, w in zip(
                got.values() if isinstance(got, dict) else got,
                want.values() if isinstance(want, dict) else want,
                strict=True,
            ):
                assert g.dtype == w.dtype and np.array_equal(g, w)
        assert list(ev.map(fit_dict, 10)) == ["params", "resid"]
        assert "100%" in capsys.readouterr().err
        total, rest = ev.reduce(sum_count, N)  # element by element, nested too
        parts = serial_parts(sum_count, shared, N, 3_000, ev.workers)
        assert total == fold([p[0] for p in parts])
        assert rest["n"] == N
        assert np.array_equal(rest["minmax"], fold([p[1]["minmax"] for p in parts]))
        st = ev.stats
        assert (st.backend, st.n, st.mode, st.workers) == ("dask", N, "reduce", 2)
        assert st.chunks == len(parts)  # the plan's ranges, a guided tail's pieces counted
        assert len(st.busy_s) == 2 and sum(st.busy_s) > 0 and st.retries == 0
        assert st.efficiency == pytest.approx(sum(st.busy_s) / (2 * st.wall_s))


def test_several_outputs_bad_input(client, x):
    with Evaluator(2, 1_000, shared={"x": x}, backend="dask", client=client) as ev:
        with pytest.raises(ValueError, match=r"a tuple of 2 arrays for items \[100000, 101000\)"):
            ev.map(ragged_at_100k, N)
        with pytest.raises(ValueError, match=r"a float for items \[100000, 101000\)"):
            ev.reduce(scalar_at_100k, N)
        assert ev.reduce(exp_sum, N) == fold(serial_parts(exp_sum, {"x": x}, N, 1_000, ev.workers))


def test_shared_data_sent_once_per_worker(client, x, tmp_path):
    log = tmp_path / "unpickled"
    shared = {"x": x, "tag": Counted(str(log), 0.5)}
    with Evaluator(4, 1_000, shared=shared, backend="dask", client=client) as ev:
        for _ in range(3):  # 3 calls of dozens of tasks each
            total = ev.reduce(tagged_sum, N)
            # Dask's memory manager drops "extra" replicas of data no task
            # waits for; that must not make a worker fetch it again.
            client.amm.run_once()
        workers = ev.workers
    tagged = serial_parts(tagged_sum, {"x": x, "tag": Counted(None, 0.5)}, N, 1_000, workers)
    assert total == fold(tagged)
    pids = log.read_text().split()
    assert len(pids) == 2 and len(set(pids)) == 2  # one delivery to each worker, no more


def test_kernel_error_keeps_its_type_and_the_evaluator(client, x):
    with Evaluator(shared={"x": x}, chunk_len=10_000, backend="dask", client=client) as ev:
        with pytest.raises(ValueError, match="bad item") as info:
            ev.reduce(fails_at_100k, N)
        shown = "\n".join([str(info.value), *getattr(info.value, "__notes__", [])])
        assert "raised by the kernel on a Dask worker on items [100000, 110000)" in shown
        assert ev.reduce(exp_sum, N) == fold(serial_parts(exp_sum, {"x": x}, N, 10_000, ev.workers))


def test_worker_killed_mid_run_result_complete(client, x, tmp_path):
    marker = tmp_path / "killed"
    shared = {"x": x, "marker": str(marker)}
    with Evaluator(2, 5_000, shared=shared, backend="dask", client=client) as ev:
        total = ev.reduce(die_once, N)
        workers = ev.workers
    assert marker.exists()  # a worker really died during the run
    assert total == fold(serial_parts(exp_sum, {"x": x}, N, 5_000, workers))


def test_worker_lost_when_retries_run_out(cluster, client, x):
    scheduler = cluster.scheduler
    saved = scheduler.allowed_failures
    scheduler.allowed_failures = 0  # the first death of a task's worker is final
    try:
        # One task in flight: only the culprit is on the worker that dies.
        with (
            Evaluator(1, 10_000, shared={"x": x}, backend="dask", client=client) as ev,
            pytest.raises(WorkerLost, match="died") as info,
        ):
            ev.reduce(die_always, N)
    finally:
        scheduler.allowed_failures = saved
    assert info.value.start <= 100_000 < info.value.stop


def test_a_worker_without_the_shared_data_gets_it(client, x):
    """A worker that joined later (here: one made to forget) is sent the data with a task."""
    from autotune.backends.dask.tasks import forget_shared

    with Evaluator(4, 2_000, shared={"x": x}, backend="dask", client=client) as ev:
        expected = ev.reduce(exp_sum, N)
        some = sorted(client.nthreads())[:1]
        client.run(forget_shared, ev._runner.start().token, workers=some)
        assert ev.reduce(exp_sum, N) == expected
        assert ev.map(stream_kernel, N).shape == (N,)


@pytest.mark.slow
def test_shared_data_sent_again_after_a_restart(client, x):
    """A restart loses every copy of the shared data: the next call sends it again."""
    with Evaluator(2, 10_000, shared={"x": x}, backend="dask", client=client) as ev:
        expected = ev.reduce(exp_sum, N)
        client.restart()
        assert ev.reduce(exp_sum, N) == expected


# -- bad input: one-line errors that name the fix ---------------------------------------
def test_unpicklable_kernel(client, x):
    lock = threading.Lock()

    def kernel(shared, start, stop):
        with lock:
            return 0.0

    with Evaluator(shared={"x": x}, backend="dask", client=client) as ev:
        with pytest.raises(TypeError, match="cannot be pickled for the Dask cluster") as info:
            ev.reduce(kernel, 100)
        assert "\n" not in str(info.value) and "module level" in str(info.value)
        assert ev.reduce(exp_sum, 100) > 0  # still usable


def test_unpicklable_shared(client):
    with pytest.raises(TypeError, match="cannot be sent to the Dask cluster") as info:
        Evaluator(shared={"lock": threading.Lock()}, backend="dask", client=client)
    assert "\n" not in str(info.value)


def test_client_closed_under_the_evaluator(cluster, x):
    client = distributed.Client(cluster, set_as_default=False)
    ev = Evaluator(shared={"x": x}, backend="dask", client=client)
    client.close()
    with pytest.raises(RuntimeError, match="close the Evaluator before its client") as info:
        ev.reduce(exp_sum, N)
    assert "\n" not in str(info.value)
    ev.close()  # still closes cleanly


def test_unreachable_scheduler(monkeypatch, tmp_path, capsys):
    import autotune.backends.dask.runner as dask_backend
    from autotune.cli import main

    monkeypatch.setattr(dask_backend, "CONNECT_TIMEOUT", 0.5)
    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot connect to a Dask scheduler") as info:
        Evaluator(backend="dask", address=address)
    assert time.monotonic() - t0 < 15
    assert "\n" not in str(info.value) and "dask scheduler" in str(info.value)
    out = tmp_path / "p.yaml"
    assert main(["search", "--backend", "dask", "--scheduler", address, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot connect to a Dask scheduler" in err


def test_usage_errors(client, cluster, capsys):
    from autotune.cli import main

    with pytest.raises(ValueError, match="needs client="):
        Evaluator(backend="dask")
    with pytest.raises(ValueError, match="for backend='dask'"):
        Evaluator(1, backend="threads", client=client)
    with pytest.raises(ValueError, match="not both"):
        Evaluator(backend="dask", client=client, address=cluster.scheduler_address)
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        Evaluator(backend="dask", client="tcp://nowhere:1")
    assert main(["search", "--backend", "dask"]) == 2
    assert "--scheduler" in capsys.readouterr().err
    assert main(["search", "--scheduler", cluster.scheduler_address, "--cpus", "0"]) == 2
    assert "--cpus" in capsys.readouterr().err


def test_address_connection_is_owned(cluster, x):
    address = cluster.scheduler_address
    with Evaluator(chunk_len=1000, shared={"x": x}, backend="dask", address=address) as ev:
        parts = serial_parts(exp_sum, {"x": x}, 1000, 1000, ev.workers)
        assert ev.reduce(exp_sum, 1000) == fold(parts)
        own = ev._runner.start().client
    assert own.status == "closed"


# -- the tuner on dask ------------------------------------------------------------------
def test_search_writes_a_cluster_profile(client, tmp_path):
    from autotune import ProfileError
    from autotune.backends.dask.cluster import describe_cluster, load_cluster_profile
    from autotune.profile import Profile, load_profile

    # 60k items of a fast map: a few ms of Dask tasks lose to one local process.
    with pytest.warns(UserWarning, match="slower than one local process"):
        result = autotune.search(
            small_stream(), budget=5, backends=("dask",), client=client, progress=False
        )
    p = result.profile
    assert p.backend == "dask"
    assert p.cpu["dask_workers"] == 2 and p.cpu["threads"] == 2
    assert p.cpu["threads_per_worker"] == 1 and len(p.cpu["worker_probes"]) == 2
    assert {m.workers for m in p.measurements} >= {2, 4}  # tasks in flight: 1, 2 per thread
    path = p.save(tmp_path / "stream-dask.yaml")
    loaded = Profile.load(path)
    assert loaded.cpu == p.cpu and loaded.best == p.best

    # Never to a local evaluator ...
    with pytest.raises(ProfileError, match="backend 'dask', not a local one"):
        load_profile("stream", path, backend="local")
    # ... and found again for this cluster.
    found = load_cluster_profile("stream", client, path=path)
    assert found.best == p.best and found.path == str(path)
    # A cluster of another shape does not get it.
    other = dict(p.cpu, worker_probes=p.cpu["worker_probes"][:1], dask_workers=1)
    from autotune.profile.match import cluster_mismatch

    assert "1 workers" in cluster_mismatch(other, describe_cluster(client))

    with Evaluator(profile=loaded, shared=small_stream().shared, client=client) as ev:
        assert ev.backend == "dask" and ev.workers == p.workers
        assert ev.map(stream_kernel, 100).shape == (100,)


def test_local_profile_never_runs_on_dask(client, tmp_path, monkeypatch):
    """A dask evaluator given a workload name looks for a dask profile only."""
    from dataclasses import replace

    from autotune.profile import ProfileWarning, heuristic_profile

    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path))
    rule = heuristic_profile(autotune.probe(), "stream", 32)
    measured = replace(rule.best, throughput=1e8)
    local = replace(rule, source="measured", best=measured, measurements=(measured,))
    replace(local, serial_throughput=5e7).save(tmp_path / "stream-local.yaml")
    with pytest.warns(ProfileWarning):
        ev = Evaluator(profile="stream", backend="dask", client=client)
    with ev:
        assert ev.settings.profile is not None and ev.settings.profile.backend == "dask"
        assert ev.settings.profile.source == "heuristic" and ev.workers == 4  # 2 per worker thread


def test_cli_search_on_the_cluster(cluster, tmp_path, capsys):
    from autotune.cli import main
    from autotune.profile import Profile

    out = tmp_path / "p.yaml"
    argv = ["search", "--backend", "dask", "--scheduler", cluster.scheduler_address]
    argv += ["--workload", "test_dask:small_stream", "--budget", "5", "--out", str(out)]
    assert main(argv) == 0
    assert Profile.load(out).backend == "dask"
    assert "profile written" in capsys.readouterr().out


def test_cluster_section_is_validated(client):
    """The cluster's ``cpu`` section round-trips; malformed ones name the field."""
    from autotune import ProfileError
    from autotune.backends.dask.cluster import describe_cluster
    from autotune.profile.validate import Validator

    section = describe_cluster(client).section
    assert Validator("p.yaml").cpu(section) == section
    bad = [
        (dict(section, worker_probes="all of them"), "cpu.worker_probes must be a list"),
        (dict(section, dask_workers=-1), "cpu.dask_workers must be an integer"),
        (
            dict(section, worker_probes=[dict(section["worker_probes"][0], worker_probes=[])]),
            "cpu.worker_probes[0].worker_probes must be a number or a string",
        ),
    ]
    for doc, problem in bad:
        with pytest.raises(ProfileError, match=problem.replace("[", r"\[").replace("]", r"\]")):
            Validator("p.yaml").cpu(doc)
