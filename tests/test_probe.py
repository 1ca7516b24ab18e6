"""The CPU probe: every figure of every fixture tree, bad input, each reader, the live machine.

The truth below is written from the parts' data sheets (and, for
``xeon-2vcpu``, from this machine's /sys), not from the fixture generator.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autotune import CacheLevel, CpuInfo, probe
from autotune._util import format_bytes
from autotune.cpu.cgroup import (
    own_cgroup_paths,
    parse_cfs,
    parse_cpu_max,
    read_cgroup_limit,
    up_to,
)
from autotune.cpu.common import CacheSpec, Found, Topology, format_cpu_list
from autotune.cpu.linux import (
    parse_cache_size,
    parse_cpu_list,
    parse_cpuinfo_brand,
    read_caches,
    read_topology,
)
from autotune.cpu.pycpuinfo import caches_from_pycpuinfo, cross_check
from autotune.cpu.sysctl import facts_from_sysctl, parse_sysctl

# The module whose globals probe() reads (readers are patched there).
probe_mod = importlib.import_module("autotune.cpu.detect")

FIXTURES = Path(__file__).parent / "fixtures"
SYSFS = FIXTURES / "sysfs"
K, M = 1 << 10, 1 << 20
LIVE_CPU = Path("/sys/devices/system/cpu")


@pytest.fixture(autouse=True)
def hardware_read_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's live probe reads the machine (and its monkeypatched readers) again."""
    monkeypatch.setattr(probe_mod, "_HARDWARE", {})


def caches_of(info: CpuInfo) -> list[tuple[int, str, int, int, int]]:
    return [(c.level, c.type, c.size_bytes, c.shared_cpus, c.instances) for c in info.caches]


def tree(tmp_path: Path, name: str = "i3-3227u") -> Path:
    """A writable copy of a fixture tree, to spoil."""
    dst = tmp_path / name
    shutil.copytree(SYSFS / name, dst)
    return dst


def cpu(root: Path, rel: str) -> Path:
    return root / "devices" / "system" / "cpu" / rel


def assert_notes(info: CpuInfo, *expected: str) -> None:
    """Each expected text appears in a note, and there is no other note."""
    for text in expected:
        assert any(text in n for n in info.notes), (text, info.notes)
    assert len(info.notes) == len(expected), info.notes


# -- every figure of every fixture -------------------------------------------

TRUTH: dict[str, dict[str, Any]] = {
    "i3-3227u": dict(
        brand="Intel(R) Core(TM) i3-3227U CPU @ 1.90GHz",
        logical_cpus=4,
        physical_cores=2,
        threads_per_core=2,
        packages=1,
        usable_cpus=4,
        cpu_quota=None,
        caches=[
            (1, "data", 32 * K, 2, 2),
            (1, "instruction", 32 * K, 2, 2),
            (2, "unified", 256 * K, 2, 2),
            (3, "unified", 3 * M, 4, 1),
        ],
        pin_order=(0, 1, 2, 3),  # CPUs 0 and 2 are one core: one thread of each core first
        l1d=32 * K,
        l2=256 * K,
        l3=3 * M,
        quota_source="cgroup v2",
        notes=(),
    ),
    "xeon-2vcpu": dict(
        brand="Intel(R) Xeon(R) Processor",
        logical_cpus=2,
        physical_cores=2,
        threads_per_core=1,
        packages=1,
        usable_cpus=2,
        cpu_quota=None,
        caches=[
            (1, "data", 48 * K, 1, 2),
            (1, "instruction", 64 * K, 1, 2),
            (2, "unified", 2 * M, 1, 2),
            (3, "unified", 480 * M, 2, 1),
        ],
        pin_order=(0, 1),
        l1d=48 * K,
        l2=2 * M,
        l3=480 * M,
        quota_source="cgroup v1",
        notes=(),
    ),
    "epyc-7343": dict(
        brand="AMD EPYC 7343 16-Core Processor",
        logical_cpus=32,
        physical_cores=16,
        threads_per_core=2,
        packages=1,
        usable_cpus=32,
        cpu_quota=None,
        caches=[
            (1, "data", 32 * K, 2, 16),
            (1, "instruction", 32 * K, 2, 16),
            (2, "unified", 512 * K, 2, 16),
            (3, "unified", 32 * M, 8, 4),  # one L3 per CCD
        ],
        pin_order=tuple(range(32)),  # CPU i and i+16 share a core
        l1d=32 * K,
        l2=512 * K,
        l3=32 * M,
        quota_source="no cgroup CPU limit file",
        notes=(),
    ),
    "alderlake-12900k": dict(
        brand="12th Gen Intel(R) Core(TM) i9-12900K",
        logical_cpus=24,
        physical_cores=16,
        threads_per_core=2,
        packages=1,
        usable_cpus=24,
        cpu_quota=None,
        caches=[
            (1, "data", 32 * K, 1, 8),  # E cores
            (1, "data", 48 * K, 2, 8),  # P cores
            (1, "instruction", 32 * K, 2, 8),
            (1, "instruction", 64 * K, 1, 8),
            (2, "unified", 1280 * K, 2, 8),  # P core: 1.25 MiB each
            (2, "unified", 2 * M, 4, 2),  # E cluster: 2 MiB shared by 4
            (3, "unified", 30 * M, 24, 1),
        ],
        pin_order=(*range(0, 16, 2), *range(16, 24), *range(1, 16, 2)),
        l1d=48 * K,
        l2=2 * M,  # cache_bytes takes the largest entry at a level
        l3=30 * M,
        quota_source="no cgroup CPU limit file",
        notes=("threads per core differ between cores (1 to 2",),
    ),
    "container-v2": dict(
        brand=None,
        logical_cpus=4,
        physical_cores=4,
        threads_per_core=1,
        packages=1,
        usable_cpus=2,  # ceil(1.5)
        cpu_quota=1.5,
        caches=[
            (1, "data", 32 * K, 1, 4),
            (1, "instruction", 32 * K, 1, 4),
            (2, "unified", 1 * M, 1, 4),
            (3, "unified", 32 * M, 4, 1),
        ],
        pin_order=(0, 1, 2, 3),
        l1d=32 * K,
        l2=1 * M,
        l3=32 * M,
        quota_source="cgroup v2",
        notes=("brand unknown: ",),
    ),
    "container-v1": dict(
        brand=None,
        logical_cpus=4,
        physical_cores=4,
        threads_per_core=1,
        packages=1,
        usable_cpus=3,  # ceil(2.5)
        cpu_quota=2.5,
        caches=[
            (1, "data", 64 * K, 1, 4),
            (1, "instruction", 64 * K, 1, 4),
            (2, "unified", 1 * M, 1, 4),
            (3, "unified", 32 * M, 4, 1),
        ],
        pin_order=(0, 1, 2, 3),
        l1d=64 * K,
        l2=1 * M,
        l3=32 * M,
        quota_source="cgroup v1",
        notes=("has no 'model name' line",),
    ),
    "vm-nocache": dict(
        brand="QEMU Virtual CPU version 2.5+",
        logical_cpus=4,
        physical_cores=4,
        threads_per_core=1,
        packages=2,
        usable_cpus=4,
        cpu_quota=None,
        caches=[],
        pin_order=(0, 1, 2, 3),
        l1d=None,
        l2=None,
        l3=None,
        quota_source="no cgroup CPU limit file",
        notes=("sysfs has no cache directories", "cache sizes unknown"),
    ),
    "offline-i7-4770": dict(
        brand="Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz",
        logical_cpus=6,  # CPUs 6 and 7 offline
        physical_cores=4,
        threads_per_core=2,
        packages=1,
        usable_cpus=6,
        cpu_quota=None,
        # Cores 2 and 3 lost their second thread: their L1/L2 are shared by
        # one online CPU, a separate entry.
        caches=[
            (1, "data", 32 * K, 1, 2),
            (1, "data", 32 * K, 2, 2),
            (1, "instruction", 32 * K, 1, 2),
            (1, "instruction", 32 * K, 2, 2),
            (2, "unified", 256 * K, 1, 2),
            (2, "unified", 256 * K, 2, 2),
            (3, "unified", 8 * M, 6, 1),  # the file still lists 0-7
        ],
        pin_order=(0, 1, 2, 3, 4, 5),
        l1d=32 * K,
        l2=256 * K,
        l3=8 * M,
        quota_source="no cgroup CPU limit file",
        notes=("threads per core differ between cores (1 to 2",),
    ),
}


def test_every_fixture_tree_has_its_truth() -> None:
    assert {p.name for p in SYSFS.iterdir() if p.is_dir()} == set(TRUTH)


@pytest.mark.parametrize("name", sorted(TRUTH))
def test_fixture_figures(name: str) -> None:
    want = TRUTH[name]
    info = probe(SYSFS / name)
    for key in (
        "brand",
        "logical_cpus",
        "physical_cores",
        "threads_per_core",
        "packages",
        "usable_cpus",
        "cpu_quota",
        "pin_order",
        "l1d",
        "l2",
        "l3",
    ):
        assert getattr(info, key) == want[key], key
    assert caches_of(info) == want["caches"]
    assert all(c.line_bytes == 64 for c in info.caches)
    assert info.sources["cpu_quota"] == want["quota_source"]
    assert info.sources["logical_cpus"] == "sysfs"
    if want["caches"]:
        assert info.sources["caches"] == "sysfs"
    if want["brand"]:
        assert info.sources["brand"].endswith("cpuinfo")
    assert_notes(info, *want["notes"])


@pytest.mark.parametrize("name", sorted(TRUTH))
def test_to_dict_has_the_contract_keys_and_round_trips(name: str) -> None:
    info = probe(SYSFS / name)
    d = json.loads(json.dumps(info.to_dict()))
    for key in (
        "brand",
        "logical_cpus",
        "physical_cores",
        "threads_per_core",
        "usable_cpus",
        "cpu_quota",
        "caches",
    ):
        assert key in d
    for c in d["caches"]:
        assert {"level", "type", "size_bytes", "shared_cpus", "instances"} <= set(c)
        assert c["type"] in ("data", "instruction", "unified")
    assert CpuInfo.from_dict(d) == info
    assert d["fingerprint"] == info.fingerprint


def test_fingerprint_follows_topology_and_caches_not_brand() -> None:
    a = probe(SYSFS / "container-v2")
    b = probe(SYSFS / "container-v1")  # same topology, other L1 sizes
    assert a.fingerprint != b.fingerprint
    renamed = CpuInfo.from_dict({**a.to_dict(), "brand": "another name"})
    assert renamed.fingerprint == a.fingerprint


def test_probe_accepts_path_objects_and_strings() -> None:
    assert probe(str(SYSFS / "i3-3227u")) == probe(SYSFS / "i3-3227u")


# -- bad input -----------------------------------------------------------------


def test_root_that_does_not_exist_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist") as err:
        probe(tmp_path / "nope")
    assert "\n" not in str(err.value)


def test_root_without_cpu_dir_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "devices").mkdir()
    with pytest.raises(ValueError, match="has no devices/system/cpu"):
        probe(tmp_path)


def test_empty_cpu_dir_gives_none_figures_not_a_crash(tmp_path: Path) -> None:
    cpu(tmp_path, "").mkdir(parents=True)
    info = probe(tmp_path)
    assert info.logical_cpus is None and info.physical_cores is None
    assert info.usable_cpus is None and info.caches == () and info.pin_order == ()
    assert any("no online CPU" in n for n in info.notes)


def test_garbage_size_leaves_that_cache_kind_out(tmp_path: Path) -> None:
    root = tree(tmp_path)
    cpu(root, "cpu1/cache/index2/size").write_text("lots\n")
    info = probe(root)
    assert info.l2 is None
    assert [c[0] for c in caches_of(info)] == [1, 1, 3]  # L1 and L3 still counted
    assert_notes(info, "L2 unified cache left out: cpu1/cache/index2/size: 'lots' is not a size")


def test_garbage_shared_cpu_list_leaves_that_cache_kind_out(tmp_path: Path) -> None:
    root = tree(tmp_path)
    cpu(root, "cpu3/cache/index3/shared_cpu_list").write_text("0-x\n")
    info = probe(root)
    assert info.l3 is None and info.l2 == 256 * K
    assert_notes(info, "L3 unified cache left out: cpu3/cache/index3/shared_cpu_list")


def test_unreadable_file_is_a_note(tmp_path: Path) -> None:
    # Tests may run as root, where chmod 000 reads fine: a directory in the
    # file's place is unreadable for everybody.
    root = tree(tmp_path)
    size = cpu(root, "cpu0/cache/index0/size")
    size.unlink()
    size.mkdir()
    info = probe(root)
    assert info.l1d is None
    assert_notes(info, "L1 data cache left out: cpu0/cache/index0/size: unreadable")


def test_unreadable_level_spoils_the_kind_that_index_is_elsewhere(tmp_path: Path) -> None:
    root = tree(tmp_path)
    cpu(root, "cpu2/cache/index1/level").write_text("one\n")
    info = probe(root)
    assert [(c[0], c[1]) for c in caches_of(info)] == [(1, "data"), (2, "unified"), (3, "unified")]
    assert_notes(info, "L1 instruction cache left out: cpu2/cache/index1/level")


def test_binary_and_huge_garbage_is_quoted_briefly(tmp_path: Path) -> None:
    root = tree(tmp_path)
    cpu(root, "cpu0/cache/index2/size").write_bytes(b"\xff\xfe\x00garbage")
    cpu(root, "cpu0/cache/index3/size").write_text("9" * 10 + "x" * 100_000)
    info = probe(root)
    assert info.l2 is None and info.l3 is None
    assert any("not text" in n for n in info.notes)
    assert all(len(n) < 300 for n in info.notes)


def test_index_numbers_are_not_levels(tmp_path: Path) -> None:
    # Renumber every CPU's index directories differently: the figures must
    # not change, since level and type are read, not inferred from the name.
    root = tree(tmp_path)
    for n, c in enumerate(("cpu0", "cpu1", "cpu2", "cpu3")):
        cache = cpu(root, f"{c}/cache")
        for d in list(cache.iterdir()):
            d.rename(cache / f"tmp{d.name[5:]}")
        for d in list(cache.iterdir()):
            d.rename(cache / f"index{(int(d.name[3:]) + n + 1) % 4 + 7}")
    assert caches_of(probe(root)) == TRUTH["i3-3227u"]["caches"]


def test_bad_line_size_costs_only_the_line_size(tmp_path: Path) -> None:
    root = tree(tmp_path)
    cpu(root, "cpu0/cache/index2/coherency_line_size").write_text("wide\n")
    info = probe(root)
    assert caches_of(info) == TRUTH["i3-3227u"]["caches"]
    l2 = next(c for c in info.caches if c.level == 2)
    assert l2.line_bytes is None  # one instance unknown: no common line size
    assert_notes(info, "cpu0/cache/index2/coherency_line_size")


def test_cpu_without_cache_directory_is_noted(tmp_path: Path) -> None:
    root = tree(tmp_path, "xeon-2vcpu")
    shutil.rmtree(cpu(root, "cpu1/cache"))
    info = probe(root)
    # cpu1's own L1/L2 are invisible: one instance counted, and said so.
    assert (2, "unified", 2 * M, 1, 1) in caches_of(info)
    assert_notes(info, "online CPUs without a cache directory (1)")


def test_garbage_online_list_falls_back_to_cpu_directories(tmp_path: Path) -> None:
    root = tree(tmp_path, "offline-i7-4770")
    cpu(root, "online").write_text("zero to five\n")
    info = probe(root)
    # cpu6/online and cpu7/online say 0: still excluded.
    assert info.logical_cpus == 6 and caches_of(info) == TRUTH["offline-i7-4770"]["caches"]
    assert any("online CPUs taken from the cpuN directories" in n for n in info.notes)


def test_missing_sibling_list_falls_back_to_core_ids(tmp_path: Path) -> None:
    root = tree(tmp_path)
    cpu(root, "cpu0/topology/core_cpus_list").write_text("?\n")
    cpu(root, "cpu0/topology/thread_siblings_list").unlink()
    info = probe(root)
    assert (info.physical_cores, info.threads_per_core, info.pin_order) == (2, 2, (0, 1, 2, 3))
    assert any("told apart by (physical_package_id, core_id)" in n for n in info.notes)


def test_unknown_cores_give_none_not_a_guess(tmp_path: Path) -> None:
    root = tree(tmp_path)
    for name in ("core_cpus_list", "thread_siblings_list", "core_id"):
        cpu(root, f"cpu1/topology/{name}").unlink()
    info = probe(root)
    assert info.physical_cores is None and info.threads_per_core is None
    assert info.logical_cpus == 4 and info.pin_order == (0, 1, 2, 3)
    assert any("physical cores unknown" in n for n in info.notes)


def test_package_id_minus_one_is_unknown(tmp_path: Path) -> None:
    root = tree(tmp_path)
    cpu(root, "cpu2/topology/physical_package_id").write_text("-1\n")
    info = probe(root)
    assert info.packages is None and info.physical_cores == 2
    assert_notes(info, "packages unknown")


@pytest.mark.parametrize(
    ("files", "quota", "usable", "note"),
    [
        ({"cpu.max": "150000\n"}, None, 4, "expected '<quota> <period>'"),
        ({"cpu.max": "max 100000\n"}, None, 4, None),
        ({"cpu.max": "50000 100000\n"}, 0.5, 1, None),  # half a CPU still runs one worker
        ({"cpu.max": "400000 100000\n"}, 4.0, 4, None),
        ({"cpu.max": "0 100000\n"}, None, 4, "neither 'max' nor positive"),
        ({"cpu/cpu.cfs_quota_us": "-1\n"}, None, 4, None),
        ({"cpu/cpu.cfs_quota_us": "150000\n"}, None, 4, "cpu.cfs_period_us: missing"),
        (
            {
                "cpu.max": "300000 100000",
                "cpu/cpu.cfs_quota_us": "150000",
                "cpu/cpu.cfs_period_us": "100000",
            },
            1.5,
            2,
            None,
        ),
        (
            {"cpu.max": "x y", "cpu/cpu.cfs_quota_us": "250000", "cpu/cpu.cfs_period_us": "100000"},
            2.5,
            3,
            "the smallest of the files that could be read",
        ),
    ],
)
def test_cgroup_quota(
    tmp_path: Path, files: dict[str, str], quota: float | None, usable: int, note: str | None
) -> None:
    root = tree(tmp_path)
    shutil.rmtree(root / "fs")
    for rel, text in files.items():
        path = root / "fs" / "cgroup" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = probe(root)
    assert (info.cpu_quota, info.usable_cpus) == (quota, usable)
    if note is None:
        assert info.notes == ()
    else:
        assert any(note in n for n in info.notes), info.notes
        if quota is None:
            assert any("usable CPUs are not narrowed" in n for n in info.notes)


# -- pure parsers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [("0-3,8,10-11\n", (0, 1, 2, 3, 8, 10, 11)), ("5", (5,)), ("\n", ()), ("1,1,0", (0, 1))],
)
def test_parse_cpu_list(text: str, ids: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == ids


@pytest.mark.parametrize("text", ["0-", "a", "3-1", "0-4294967295", "1;2", "٣", "0,,1"])
def test_parse_cpu_list_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a CPU list"):
        parse_cpu_list(text)


@given(st.sets(st.integers(0, 4000), max_size=50))
def test_cpu_list_round_trip(ids: set[int]) -> None:
    assert parse_cpu_list(format_cpu_list(ids)) == tuple(sorted(ids))


@pytest.mark.parametrize(
    ("text", "size"),
    [("32K\n", 32 * K), ("491520K", 480 * M), ("2M", 2 * M), ("1024", 1024), ("1 KiB", K)],
)
def test_parse_cache_size(text: str, size: int) -> None:
    assert parse_cache_size(text) == size


@pytest.mark.parametrize("text", ["", "K", "0K", "-32K", "32Q", "1.5M", "32K 32K"])
def test_parse_cache_size_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cache_size(text)


def test_parse_cgroup_files() -> None:
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("max 100000") == math.inf
    assert parse_cfs("-1", "100000") == math.inf
    assert parse_cfs("250000\n", "100000\n") == 2.5
    for text in ("150000", "max", "1 2 3", "max 0", "abc 100000", ""):
        with pytest.raises(ValueError):
            parse_cpu_max(text)
    for quota, period in (("0", "100000"), ("100", "0"), ("x", "100000"), ("100", "")):
        with pytest.raises(ValueError):
            parse_cfs(quota, period)


def test_read_cgroup_limit_takes_the_smallest_level(tmp_path: Path) -> None:
    outer, inner = tmp_path / "a", tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    (outer / "cpu.max").write_text("100000 100000\n")
    (inner / "cpu.max").write_text("max 100000\n")
    assert read_cgroup_limit([inner, outer], []) == Found(1.0, "cgroup v2")
    assert read_cgroup_limit([], []).value == math.inf


def test_own_cgroup_paths_and_the_levels_above() -> None:
    text = "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n0::/user.slice/x.scope\n"
    assert own_cgroup_paths(text) == ("/user.slice/x.scope", "/docker/abc")
    assert own_cgroup_paths("0::/\n") == ("/", None)
    assert own_cgroup_paths("garbage") == (None, None)


def test_cgroup_levels_up_to_the_mount(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert up_to(tmp_path, "/a/b") == [tmp_path / "a" / "b", tmp_path / "a", tmp_path]
    # A host path not mounted in this container: the mount root is its cgroup.
    assert up_to(tmp_path, "/docker/elsewhere") == [tmp_path]
    assert up_to(tmp_path, "/") == [tmp_path]


def test_parse_cpuinfo_brand() -> None:
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R)  Xeon(R)  X\n"
    assert parse_cpuinfo_brand(text) == "Intel(R) Xeon(R) X"
    assert parse_cpuinfo_brand("processor\t: 0\nCPU part\t: 0xd0c\n") is None
    assert parse_cpuinfo_brand("model name\t:\n") is None


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (512, 48 * K, 1280 * K, 480 * M, 3 << 30)] == [
        "512 B",
        "48 KiB",
        "1.25 MiB",
        "480 MiB",
        "3 GiB",
    ]


# -- py-cpuinfo: cross-check and fallback -------------------------------------


def pycpuinfo_capture() -> dict[str, Any]:
    """py-cpuinfo 9.0.0 on the machine of the xeon-2vcpu tree (flags dropped)."""
    return json.loads((FIXTURES / "pycpuinfo" / "xeon-2vcpu.json").read_text())


def xeon_sysfs() -> tuple[Found[Topology], Found[tuple[CacheSpec, ...]]]:
    cpu_dir = SYSFS / "xeon-2vcpu" / "devices" / "system" / "cpu"
    topology = read_topology(cpu_dir)
    assert topology.value is not None
    return topology, read_caches(cpu_dir, topology.value.online)


def merge(**kw: Any) -> CpuInfo:
    args: dict[str, Any] = dict(
        brands=[Found("X", "test")],
        limit=Found(math.inf, "cgroup v2"),
        affinity=None,
        pycpuinfo=None,
    )
    args.update(kw)
    return probe_mod._merge(**args)


def test_sysfs_wins_over_pycpuinfo_and_the_disagreements_are_noted() -> None:
    topology, caches = xeon_sysfs()
    info = merge(
        topology=topology, caches=caches, pycpuinfo=Found(pycpuinfo_capture(), "py-cpuinfo")
    )
    assert caches_of(info) == TRUTH["xeon-2vcpu"]["caches"]
    assert info.sources["caches"] == "sysfs"
    assert_notes(
        info,
        "l1_data_cache_size (96 KiB) is the total over 2 instances; sysfs gives 48 KiB",
        "l1_instruction_cache_size (128 KiB) is the total over 2 instances",
        "l2_cache_size (4 MiB) is the total over 2 instances; sysfs gives 2 MiB",
        "l2_cache_line_size (2048) disagrees with sysfs (64 bytes); sysfs used",
    )


def test_pycpuinfo_fallback_divides_totals_and_reads_the_swapped_cpuid_field() -> None:
    topology, _ = xeon_sysfs()
    info = merge(
        topology=topology,
        caches=Found(None, "sysfs", ("sysfs has no cache directories (cpuN/cache/indexM)",)),
        pycpuinfo=Found(pycpuinfo_capture(), "py-cpuinfo"),
    )
    assert info.sources["caches"] == "py-cpuinfo"
    assert caches_of(info) == TRUTH["xeon-2vcpu"]["caches"]
    assert all(c.line_bytes is None for c in info.caches)  # py-cpuinfo's line size is not one
    assert_notes(
        info,
        "sysfs has no cache directories",
        "l1_data_cache_size (96 KiB) taken as the total over 2 cores",
        "l1_instruction_cache_size (128 KiB) taken as the total over 2 cores",
        "l2_cache_line_size (2048) is CPUID's L2 size per core in KiB",
        "l3_cache_size (480 MiB) taken as one L3 shared by all 2 CPUs",
    )


def test_pycpuinfo_fallback_on_old_lscpu_takes_per_core_figures() -> None:
    # util-linux < 2.37 prints "L1d cache: 32K" (one instance); the i3-3227U's
    # per-core 16 KiB or 128 KiB halves would be too small to be real.
    info = {"l1_data_cache_size": 32 * K, "l2_cache_size": 256 * K, "l3_cache_size": 3 * M}
    found = caches_from_pycpuinfo(info, physical_cores=2, threads_per_core=2, logical_cpus=4)
    assert found.value == (
        CacheSpec(1, "data", 32 * K, 2, 2),
        CacheSpec(2, "unified", 256 * K, 2, 2),
        CacheSpec(3, "unified", 3 * M, 4, 1),
    )
    assert sum("taken as one core's cache" in n for n in found.notes) == 2


def test_pycpuinfo_fallback_in_a_vm_without_lscpu_caches() -> None:
    # Only CPUID and /proc/cpuinfo answer: l2_cache_size is the line size x 1024.
    info = {"l2_cache_size": 64 * K, "l2_cache_line_size": 1024, "l3_cache_size": 16 * M}
    found = caches_from_pycpuinfo(info, physical_cores=4, threads_per_core=1, logical_cpus=4)
    assert found.value == (
        CacheSpec(2, "unified", 1 * M, 1, 4),
        CacheSpec(3, "unified", 16 * M, 4, 1),
    )


def test_pycpuinfo_fallback_drops_amd_l2_filed_as_l3() -> None:
    info = {"l2_cache_line_size": 512, "l3_cache_size": 512 * K, "vendor_id_raw": "AuthenticAMD"}
    found = caches_from_pycpuinfo(info, physical_cores=8, threads_per_core=2, logical_cpus=16)
    assert found.value == (CacheSpec(2, "unified", 512 * K, 2, 8),)
    assert any("it is an L2 figure, left out" in n for n in found.notes)


def test_pycpuinfo_fallback_without_core_count_makes_up_nothing() -> None:
    found = caches_from_pycpuinfo(pycpuinfo_capture(), None, None, None)
    assert found.value is None
    assert any("number of cores is unknown" in n for n in found.notes)
    assert caches_from_pycpuinfo({}, 2, 1, 2).value is None


def test_cross_check_is_silent_when_pycpuinfo_agrees() -> None:
    caches = (CacheSpec(2, "unified", 2 * M, 1, 2, 64),)
    assert cross_check({"l2_cache_size": 2 * M, "l2_cache_line_size": 64}, caches, "sysfs") == []
    assert "not used" in cross_check({"l3_cache_size": M}, caches, "sysfs")[0]


# -- the live machine and the lazy py-cpuinfo -----------------------------------


def live_is_linux_with_caches() -> bool:
    return sys.platform.startswith("linux") and any(LIVE_CPU.glob("cpu0/cache/index*"))


def live_has_model_name() -> bool:
    try:
        return parse_cpuinfo_brand(Path("/proc/cpuinfo").read_text()) is not None
    except OSError:
        return False


@pytest.mark.all_cpus  # the machine as it is, every usable CPU
def test_live_probe_is_consistent() -> None:
    info = probe()
    assert info.logical_cpus is not None and info.logical_cpus >= 1
    assert info.logical_cpus <= (os.cpu_count() or info.logical_cpus)
    if info.physical_cores is not None:
        assert 1 <= info.physical_cores <= info.logical_cpus
    if info.threads_per_core is not None and info.physical_cores is not None:
        assert info.physical_cores * info.threads_per_core >= info.logical_cpus
    assert info.usable_cpus is not None and 1 <= info.usable_cpus <= info.logical_cpus
    if hasattr(os, "sched_getaffinity"):
        assert set(info.pin_order) <= os.sched_getaffinity(0)
        assert len(info.pin_order) == len(set(info.pin_order)) >= info.usable_cpus
    for c in info.caches:
        assert c.size_bytes > 0 and c.instances >= 1
        assert 1 <= c.shared_cpus <= info.logical_cpus
    assert CpuInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_tests_see_at_most_the_capped_cpus() -> None:
    """conftest narrows every test's affinity: an evaluator left to pick one worker
    per core starts at most MAX_TEST_CPUS of them, whatever the machine has."""
    from conftest import MAX_TEST_CPUS

    from autotune import Evaluator

    usable = probe().usable_cpus
    assert usable is not None and usable <= MAX_TEST_CPUS
    if hasattr(os, "sched_getaffinity"):
        assert usable <= len(os.sched_getaffinity(0)) <= MAX_TEST_CPUS
    with Evaluator(adapt=False) as ev:
        assert 1 <= ev.workers <= MAX_TEST_CPUS


@pytest.mark.skipif(not live_is_linux_with_caches(), reason="needs Linux sysfs with caches")
def test_live_probe_agrees_with_sysfs() -> None:
    info = probe()
    assert info.sources["caches"] == "sysfs"
    online = parse_cpu_list((LIVE_CPU / "online").read_text())
    assert info.logical_cpus == len(online)
    # Whatever the machine, the L3 is the one sysfs shows.
    for index in LIVE_CPU.glob("cpu0/cache/index*"):
        if (index / "level").read_text().strip() == "3":
            assert info.l3 == parse_cache_size((index / "size").read_text())
    if info.logical_cpus == 2 and info.l2 == 2 * M and info.physical_cores == 2:
        # This machine (the xeon-2vcpu tree's source): the figures.
        assert (2, "unified", 2 * M, 1, 2) in caches_of(info)
        assert info.threads_per_core == 1


@pytest.mark.skipif(
    not (live_is_linux_with_caches() and live_has_model_name()),
    reason="needs Linux sysfs with caches and a model name in /proc/cpuinfo",
)
def test_live_probe_does_not_call_pycpuinfo_when_sysfs_has_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom() -> Found[dict[str, Any]]:
        raise AssertionError("py-cpuinfo called although nothing was missing")

    monkeypatch.setattr(probe_mod, "load_pycpuinfo", boom)
    assert probe().sources["brand"] == "/proc/cpuinfo"


@pytest.mark.skipif(not LIVE_CPU.is_dir(), reason="needs Linux sysfs")
def test_the_hardware_is_read_once_per_process_until_a_cpu_goes_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every Evaluator probes: the caches of every CPU are read once, what this process may
    use (affinity, quota) every time."""
    first = probe()
    reads = []
    real = probe_mod.read_caches
    monkeypatch.setattr(probe_mod, "read_caches", lambda *a: reads.append(1) or real(*a))
    monkeypatch.setattr(probe_mod, "read_affinity", lambda: Found(frozenset({0}), "affinity"))
    again = probe()
    assert reads == [] and again.caches == first.caches
    assert again.usable_cpus == 1  # read now, not kept
    quotas = []
    monkeypatch.setattr(
        probe_mod, "read_cgroup_limit", lambda *a: quotas.append(1) or Found(0.5, "cgroup v2")
    )
    assert probe().cpu_quota == 0.5 and probe().cpu_quota == 0.5
    assert quotas == [1, 1] and reads == []  # the quota every time, the caches not
    online = probe_mod.read_text(LIVE_CPU / "online")[0]
    monkeypatch.setattr(
        probe_mod,
        "read_text",
        lambda path: ("0\n", None) if path.name == "online" else (online, None),
    )
    probe()
    assert reads == [1]  # another online list: read again


@pytest.mark.skipif(not LIVE_CPU.is_dir(), reason="needs Linux sysfs")
def test_live_probe_asks_pycpuinfo_for_what_sysfs_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake() -> Found[dict[str, Any]]:
        calls.append(1)
        return Found(pycpuinfo_capture(), "py-cpuinfo")

    monkeypatch.setattr(probe_mod, "load_pycpuinfo", fake)
    monkeypatch.setattr(
        probe_mod, "read_caches", lambda *a: Found(None, "sysfs", ("no cache dirs",))
    )
    monkeypatch.setattr(
        probe_mod, "read_cpuinfo_brand", lambda p: Found(None, str(p), ("no model name",))
    )
    info = probe()
    assert calls == [1]  # once, for both the brand and the caches
    assert info.brand == "Intel(R) Xeon(R) Processor" and info.sources["brand"] == "py-cpuinfo"
    assert info.sources["caches"] == "py-cpuinfo"
    assert info.l2 == 2 * M  # from the capture's swapped CPUID field, not its 4 MiB total


# -- macOS sysctl ---------------------------------------------------------------


def sysctl_capture(name: str) -> dict[str, str]:
    return parse_sysctl((FIXTURES / "sysctl" / f"{name}.txt").read_text())


def test_parse_sysctl() -> None:
    values = parse_sysctl("hw.ncpu: 8\nkern.bootargs: \nhw.pagesize = 4096\n  continued line\n")
    assert values == {"hw.ncpu": "8", "kern.bootargs": "", "hw.pagesize": "4096"}


def test_sysctl_apple_m1_reads_each_performance_level() -> None:
    topology, caches, brand = facts_from_sysctl(sysctl_capture("apple-m1"))
    assert brand.value == "Apple M1"
    assert topology.value == Topology(tuple(range(8)), 8, None, 1)
    # The top-level hw.l2cachesize (4 MiB) is the E cluster's; each level's own keys win.
    assert caches.value == (
        CacheSpec(1, "data", 64 * K, 1, 4, 128),
        CacheSpec(1, "data", 128 * K, 1, 4, 128),
        CacheSpec(1, "instruction", 128 * K, 1, 4, 128),
        CacheSpec(1, "instruction", 192 * K, 1, 4, 128),
        CacheSpec(2, "unified", 4 * M, 4, 1, 128),
        CacheSpec(2, "unified", 12 * M, 4, 1, 128),
    )
    assert caches.notes == ()


def test_sysctl_intel_mac_uses_cacheconfig_for_sharing() -> None:
    topology, caches, brand = facts_from_sysctl(sysctl_capture("intel-mac-i9-9880h"))
    assert brand.value == "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz"
    assert topology.value == Topology(tuple(range(16)), 8, None, 1)
    assert caches.value == (
        CacheSpec(1, "data", 32 * K, 2, 8, 64),
        CacheSpec(1, "instruction", 32 * K, 2, 8, 64),
        CacheSpec(2, "unified", 256 * K, 2, 8, 64),
        CacheSpec(3, "unified", 16 * M, 16, 1, 64),
    )


def test_sysctl_missing_and_garbage_values() -> None:
    topology, caches, brand = facts_from_sysctl({"hw.ncpu": "four", "hw.l2cachesize": "1"})
    assert topology.value is None and caches.value is None and brand.value is None
    assert any("'four' is not an integer" in n for n in topology.notes)
    values = sysctl_capture("intel-mac-i9-9880h")
    del values["hw.cacheconfig"]
    _, caches, _ = facts_from_sysctl(values)
    assert caches.value is not None and [c.level for c in caches.value] == [1, 1]  # L1: per core
    assert sum("how many CPUs share it is unknown" in n for n in caches.notes) == 2


def test_probe_on_darwin_uses_sysctl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        probe_mod, "read_sysctl", lambda: facts_from_sysctl(sysctl_capture("apple-m1"))
    )

    def boom() -> Found[dict[str, Any]]:
        raise AssertionError("py-cpuinfo called although sysctl had everything")

    monkeypatch.setattr(probe_mod, "load_pycpuinfo", boom)
    info = probe_mod._probe_live("darwin")
    assert (info.brand, info.logical_cpus, info.physical_cores, info.threads_per_core) == (
        "Apple M1",
        8,
        8,
        1,
    )
    assert (info.usable_cpus, info.cpu_quota, info.l1d, info.l2) == (8, None, 128 * K, 12 * M)
    assert info.sources["caches"] == "sysctl" and info.sources["brand"] == "sysctl"
    assert_notes(info, "pin order is plain CPU id order")


def test_cache_level_round_trip() -> None:
    c = CacheLevel(2, "unified", 2 * M, 1, 2, 64)
    assert CacheLevel.from_dict(c.to_dict()) == c
    assert "line_bytes" not in CacheLevel(1, "data", K, 1, 1).to_dict()
