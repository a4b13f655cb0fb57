"""Checkpoints and crash-safe writes.

:mod:`~edge_runtime.state.checkpoint`: safetensors arrays plus a JSON manifest, versioned.
:mod:`~edge_runtime.state.atomic`: the one atomic-write helper that every writer of a file the
runtime keeps uses (temporary sibling, fsync, ``os.replace``, fsync of the folder), and the
crash-safe replacement of a checkpoint directory.
"""

from edge_runtime.state.atomic import (
    aside_path,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    fsync_file,
    replace_directory,
)
from edge_runtime.state.checkpoint import (
    FORMAT,
    VERSION,
    IncompatibleCheckpoint,
    flatten_state,
    has_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    unflatten_state,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "IncompatibleCheckpoint",
    "aside_path",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "flatten_state",
    "fsync_dir",
    "fsync_file",
    "has_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "replace_directory",
    "save_checkpoint",
    "unflatten_state",
]
