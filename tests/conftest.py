"""Shared fixtures: start methods, and a check that nothing leaks."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from autotune._shm import list_segments

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]


@pytest.fixture(params=START_METHODS)
def start_method(request):
    return request.param


def process_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie about to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().split(")")[-1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves autotune segments in /dev/shm or child processes."""
    before_segments = set(list_segments(os.getpid()))
    before_children = set(children_of(os.getpid()))
    yield
    leaked = set(list_segments(os.getpid())) - before_segments
    assert not leaked, f"leaked shared-memory segments: {sorted(leaked)}"
    # the forkserver and resource-tracker helpers are Python's, started once
    helpers = set()
    for pid in set(children_of(os.getpid())) - before_children:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read()
        if b"forkserver" in cmd or b"resource_tracker" in cmd:
            helpers.add(pid)
    left = set(children_of(os.getpid())) - before_children - helpers
    assert not left, f"child processes left running: {sorted(left)}"
