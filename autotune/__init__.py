"""autotune: measure, save and reuse the best way to run process-parallel numpy/scipy code.

Probe the CPU, search the worker count and chunk length for a workload with a
copy-on-write evaluator, save the result as a YAML profile, and run
production code with it::

    import autotune

    with autotune.Evaluator(profile="spline", shared={"x": x, "y": y}) as ev:
        total = ev.reduce(kernel, len(x))
"""

from autotune._errors import (
    EfficiencyWarning,
    ProfileError,
    ProfileWarning,
    RemoteError,
    WorkerLost,
)
from autotune._version import __version__
from autotune.backends.shared import shared_array
from autotune.backends.stats import CallStats
from autotune.cpu import CacheLevel, CpuInfo, probe
from autotune.evaluator import Evaluator
from autotune.profile import Measurement, Profile, load_profile
from autotune.tuner import SearchResult, search
from autotune.workload import Workload

__all__ = [
    "CacheLevel",
    "CallStats",
    "CpuInfo",
    "EfficiencyWarning",
    "Evaluator",
    "Measurement",
    "Profile",
    "ProfileError",
    "ProfileWarning",
    "RemoteError",
    "SearchResult",
    "WorkerLost",
    "Workload",
    "__version__",
    "load_profile",
    "probe",
    "search",
    "shared_array",
]
