"""Errors the runtime raises on bad input.

Every error a user can cause derives from :class:`EdgeRuntimeError`, so the CLI
prints one clear line for it instead of a traceback from deep inside torch.
"""

from __future__ import annotations


class EdgeRuntimeError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class InputError(EdgeRuntimeError, ValueError):
    """A frame, batch or array has the wrong shape, dtype or values."""


class StreamFormatError(InputError):
    """A stream ``.npz`` file is missing an array or has inconsistent arrays."""


class ConfigError(EdgeRuntimeError, ValueError):
    """A configuration or device profile is invalid; the message names the field."""


class DataUnavailableError(EdgeRuntimeError, FileNotFoundError):
    """A dataset or weights package is not installed; the message names it."""


class CheckpointError(EdgeRuntimeError):
    """A checkpoint or weights file is missing, corrupt or incompatible."""


class BackendUnavailableError(EdgeRuntimeError, RuntimeError):
    """An encoder backend or kernel cannot run here (missing package or device)."""
