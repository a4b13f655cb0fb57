"""Runtime configuration and device profiles, validated.

``load_config(path)`` reads a YAML config (None: defaults); ``load_profile(name)`` reads a
device profile from ``firmware_configs/``; both raise :class:`ConfigError` naming the bad
field. ``cfg.with_overrides({"adapt.label_budget": "100"})`` applies CLI overrides.
"""

from __future__ import annotations

from edge_runtime.config.defaults import DEFAULT_INPUT_SIZE, DEFAULT_LAYERS
from edge_runtime.config.detect import Detection, detect_device, detect_profile
from edge_runtime.config.loader import (
    PROFILES_ENV,
    list_profiles,
    load_config,
    load_profile,
    profiles_dir,
    read_yaml_mapping,
    resolve_profile_path,
)
from edge_runtime.config.schema import (
    NOT_IMPLEMENTED,
    AdaptConfig,
    DeviceConfig,
    DriftConfig,
    EncoderConfig,
    FleetConfig,
    HDCConfig,
    RuntimeConfig,
    TelemetryConfig,
    parse_override_args,
    reset_unimplemented,
    validate_config,
)
from edge_runtime.errors import ConfigError

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_LAYERS",
    "NOT_IMPLEMENTED",
    "PROFILES_ENV",
    "AdaptConfig",
    "ConfigError",
    "Detection",
    "DeviceConfig",
    "DriftConfig",
    "EncoderConfig",
    "FleetConfig",
    "HDCConfig",
    "RuntimeConfig",
    "TelemetryConfig",
    "detect_device",
    "detect_profile",
    "list_profiles",
    "load_config",
    "load_profile",
    "parse_override_args",
    "profiles_dir",
    "read_yaml_mapping",
    "reset_unimplemented",
    "resolve_profile_path",
    "validate_config",
]
