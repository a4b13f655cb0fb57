"""edge_runtime: continual adaptation on Jetson-class edge devices."""

from __future__ import annotations

from edge_runtime.errors import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    DataUnavailableError,
    EdgeRuntimeError,
    InputError,
    StreamFormatError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "ConfigError",
    "DataUnavailableError",
    "EdgeRuntimeError",
    "InputError",
    "StreamFormatError",
    "__version__",
]
