"""Checkpoints: safetensors arrays plus a JSON manifest, written atomically and versioned."""

from edge_runtime.state.checkpoint import (
    FORMAT,
    VERSION,
    flatten_state,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    unflatten_state,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "flatten_state",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "unflatten_state",
]
