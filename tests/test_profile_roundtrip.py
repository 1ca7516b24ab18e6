"""A profile from ``search --out`` used in production; ``item_bytes``; the memory reader.

The path a user takes: the tuner writes a file, ``Evaluator(profile=PATH)``
uses exactly that file (or says why it cannot), ``load_profile(name)``
hands out what ``Evaluator(profile=name)`` would use, and when nothing fits
the evaluator chunks exactly as with no profile at all.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from kernels import count_items

import autotune
import autotune.profile.lookup as lookup_mod
import autotune.settings as settings
from autotune import Evaluator, Profile, ProfileError, ProfileWarning, load_profile
from autotune.cpu import probe
from autotune.cpu.memory import available_memory, parse_meminfo_available, read_cgroup_memory
from autotune.profile import Measurement, heuristic_profile, python_build

# Every test once with libyaml's loader (where PyYAML has it) and once with the pure-Python one.
pytestmark = pytest.mark.usefixtures("yaml_loader")


def double(shared, start, stop):
    return shared.x[start:stop] * 2.0


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No profile from the environment, the home or the source tree is found."""
    monkeypatch.delenv("AUTOTUNE_PROFILE", raising=False)
    monkeypatch.delenv("AUTOTUNE_PROFILE_DIR", raising=False)
    monkeypatch.setattr(lookup_mod, "user_profile_dir", lambda: tmp_path / "user")
    monkeypatch.setattr(lookup_mod, "shipped_profile_dir", lambda: tmp_path / "shipped")
    return tmp_path


def measured_here(workload="knn", backend="threads", workers=1, chunk_len=3000, cpu=None):
    """A profile as ``autotune search --out`` writes it on this machine."""
    base = heuristic_profile(cpu or probe(), workload, 16)
    best = Measurement(workers, chunk_len, chunk_len * 16, 1e6, repeats=3, spread=0.02)
    return dataclasses.replace(
        base,
        source="measured",
        best=best,
        serial_throughput=5e5,
        measurements=(best,),
        backend=backend,
        python=python_build(),
        n=100_000,
    )


def test_evaluator_uses_the_file_search_wrote(isolated, no_leaks):
    path = measured_here().save(isolated / "knn.yaml")
    x = np.arange(10_000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file fits: nothing to warn about
        for given in (str(path), path):  # a str path, and a PathLike
            with Evaluator(profile=given, shared={"x": x}) as ev:
                assert (ev.backend, ev.workers, ev.chunk_len) == ("threads", 1, 3000)
                assert np.array_equal(ev.map(double, len(x)), x * 2.0)


def test_a_named_file_that_does_not_fit_is_an_error_naming_why(isolated, no_leaks):
    other_cpu = dataclasses.replace(probe(), physical_cores=64, logical_cpus=128)
    path = measured_here(cpu=other_cpu).save(isolated / "elsewhere.yaml")
    with pytest.raises(ProfileError, match=r"elsewhere.yaml: cannot be used here: made on another"):
        Evaluator(profile=str(path))
    threads = measured_here().save(isolated / "threads.yaml")
    with pytest.raises(ProfileError, match="backend 'threads', not 'processes'"):
        Evaluator(profile=str(threads), backend="processes")
    with pytest.raises(ProfileError, match="no such file"):
        Evaluator(profile=str(isolated / "missing.yaml"))


def test_load_profile_and_the_evaluator_agree_on_the_backend(isolated, monkeypatch, no_leaks):
    (isolated / "dir").mkdir()
    measured_here().save(isolated / "dir" / "knn.yaml")
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(isolated / "dir"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = load_profile("knn")
        assert (p.backend, p.source) == ("threads", "measured")
        with Evaluator(profile="knn") as ev:
            assert (ev.backend, ev.workers, ev.chunk_len) == (p.backend, p.workers, p.chunk_len)


def chunk_lens(ev, sizes):
    """The chunk length each call of ``sizes`` items ran with (ev.stats)."""
    lengths = []
    for n in sizes:
        assert ev.reduce(count_items, n) == n
        lengths.append(ev.stats.chunk_len)
    return lengths


def test_a_fallback_chunks_exactly_like_zero_config(isolated, no_leaks):
    sizes = (10_000, 100_000, 10_000_000)
    with Evaluator(workers=2) as zero:
        expected = chunk_lens(zero, sizes)
    with pytest.warns(ProfileWarning, match="no profile for 'knn'"):
        ev = Evaluator(profile="knn", workers=2)
    with ev:
        assert chunk_lens(ev, sizes) == expected
        assert chunk_lens(ev, [10_000]) == [10_000 // 8]  # 8 chunks, not 2


def test_item_bytes_sets_the_heuristic_chunk(no_leaks):
    with Evaluator(workers=1, item_bytes=1024) as ev:
        assert ev.chunk_len == heuristic_profile(probe(), "x", 1024).chunk_len
        assert ev.item_bytes == 1024
    with pytest.raises(ValueError, match="item_bytes must be an integer >= 1"):
        Evaluator(item_bytes=0)
    with pytest.raises(TypeError, match="item_bytes"):
        Evaluator(item_bytes=1.5)


def test_memory_warning_names_the_numbers(monkeypatch, no_leaks):
    monkeypatch.setattr(settings, "available_memory", lambda: 1_000_000)
    x = np.arange(4000.0)
    with Evaluator(2, 1000, shared={"x": x}, item_bytes=1000) as ev:
        with pytest.warns(RuntimeWarning) as record:
            assert np.array_equal(ev.map(double, 4000), x * 2.0)
        message = str(record[0].message)
        assert "chunk_len 1000 x item_bytes 1000 x 2 workers = 2000000 bytes" in message
        assert "1000000 bytes of memory available" in message
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ev.map(double, 400)  # one chunk of 400: 400 kB fits


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_meminfo_and_cgroup_readers(tmp_path):
    assert parse_meminfo_available("MemTotal: 100 kB\nMemAvailable:   2048 kB\n") == 2048 * 1024
    assert parse_meminfo_available("MemTotal: 100 kB\n") is None
    assert parse_meminfo_available("MemAvailable: lots\n") is None
    v2 = tmp_path / "v2"
    write(v2 / "memory.max", "max\n")
    assert read_cgroup_memory([v2], []) is None  # "max": no limit
    write(v2 / "memory.max", "1000000\n")
    write(v2 / "memory.current", "400000\n")
    assert read_cgroup_memory([v2], []) == 600_000
    v1 = tmp_path / "v1"
    write(v1 / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    assert read_cgroup_memory([], [v1]) is None
    write(v1 / "memory.limit_in_bytes", "500000\n")
    assert read_cgroup_memory([v2], [v1]) == 500_000


def test_available_memory_is_the_smallest_figure(tmp_path):
    root = tmp_path / "root"
    write(root / "proc" / "meminfo", "MemAvailable: 8000 kB\n")
    write(root / "proc" / "self" / "cgroup", "0::/job\n")
    write(root / "sys" / "fs" / "cgroup" / "cgroup.controllers", "memory\n")
    assert available_memory(root) == 8000 * 1024  # no memory.max anywhere
    write(root / "sys" / "fs" / "cgroup" / "job" / "memory.max", "3000000\n")
    write(root / "sys" / "fs" / "cgroup" / "job" / "memory.current", "1000000\n")
    assert available_memory(root) == 2_000_000
    assert available_memory(tmp_path / "nothing") is None
    assert autotune.Evaluator is Evaluator  # (the public name is unchanged)


def test_profile_text_round_trip(isolated):
    p = measured_here()
    again = Profile.load(p.save(isolated / "p.yaml"))
    assert again.best == p.best and again.backend == "threads"
