"""Profiles: the measured best way to run one workload on one CPU, as YAML.

``model`` (the dataclasses and their YAML text), ``files`` (hostile reading,
atomic writing), ``validate`` (every field, once), ``match`` (which profile
fits which CPU), ``heuristic`` (what stands in when none does) and
``lookup`` (where profiles are searched: :func:`load_profile`,
:func:`recommend`).
"""

from autotune._errors import ProfileWarning
from autotune._util import BACKENDS, LOCAL_BACKENDS
from autotune.profile.files import MAX_PROFILE_BYTES
from autotune.profile.heuristic import heuristic_profile, infer_item_bytes, item_bytes_of
from autotune.profile.lookup import (
    load_profile,
    profile_dirs,
    recommend,
    shipped_profile_dir,
    user_profile_dir,
)
from autotune.profile.match import cpu_mismatch, cpu_section, is_unchunked, pick_profile
from autotune.profile.model import (
    DEFAULT_ITEM_BYTES,
    MIN_CHUNK_ITEMS,
    Measurement,
    Profile,
    Recommendation,
    dump_yaml,
    gil_enabled,
    is_tie,
    python_build,
)
from autotune.profile.validate import SCHEMA, SOURCES

__all__ = [
    "BACKENDS",
    "DEFAULT_ITEM_BYTES",
    "LOCAL_BACKENDS",
    "MAX_PROFILE_BYTES",
    "MIN_CHUNK_ITEMS",
    "SCHEMA",
    "SOURCES",
    "Measurement",
    "Profile",
    "ProfileWarning",
    "Recommendation",
    "cpu_mismatch",
    "cpu_section",
    "dump_yaml",
    "gil_enabled",
    "heuristic_profile",
    "infer_item_bytes",
    "item_bytes_of",
    "is_tie",
    "is_unchunked",
    "load_profile",
    "pick_profile",
    "profile_dirs",
    "python_build",
    "recommend",
    "shipped_profile_dir",
    "user_profile_dir",
]
