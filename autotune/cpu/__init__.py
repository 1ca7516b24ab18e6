"""The CPU probe: cores, hardware threads, caches and the CPUs this process may use.

One reader per source (``linux``: sysfs and ``/proc/cpuinfo``; ``cgroup``:
the CPU quota and the affinity mask; ``sysctl``: macOS; ``pycpuinfo``: the
fallback), merged in one place (``detect``), into the dataclasses of
``model``; ``table`` prints them.
"""

from autotune.cpu.detect import probe
from autotune.cpu.model import CacheLevel, CpuInfo
from autotune.cpu.table import format_table

__all__ = ["CacheLevel", "CpuInfo", "format_table", "probe"]
