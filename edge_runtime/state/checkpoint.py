"""Atomic, versioned checkpoints: one safetensors file of arrays plus a JSON manifest.

A checkpoint is a directory::

    <path>/manifest.json        format, version, kind, the JSON tree of the state, sha256s
    <path>/tensors.safetensors  every array of the state, by flat name

Any nested state (dicts, lists, scalars, strings, numpy arrays, torch tensors) is
split into a JSON tree in which each array is replaced by a reference
``{"__tensor__": name}`` and a flat ``{name: array}`` map stored with safetensors
(no pickle: a checkpoint may come from another device and must not run code).

Writing is atomic (:func:`edge_runtime.state.atomic.replace_directory`): everything goes to
a temporary sibling directory, each file and the directory are fsynced, the old checkpoint is
moved to a fixed aside name, the new one renamed in, the aside copy deleted. A crash or a
power cut leaves the old checkpoint or the new one, never a half-written mixture; if it comes
between the two renames, only the aside copy is left and :func:`load_checkpoint` reads it,
with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from edge_runtime.errors import CheckpointError
from edge_runtime.state.atomic import aside_path, replace_directory

log = logging.getLogger(__name__)

FORMAT = "edge_runtime.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
_REF = "__tensor__"
_TORCH = "__torch__"


def flatten_state(state: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """Split a nested state into (JSON-able tree, {name: array})."""
    tensors: dict[str, np.ndarray] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            name = path or "root"
            tensors[name] = np.ascontiguousarray(node.detach().cpu().numpy())
            return {_REF: name, _TORCH: True}
        if isinstance(node, np.ndarray):
            if node.dtype == object:
                raise CheckpointError(f"state entry {path!r} is an object array; cannot save it")
            name = path or "root"
            tensors[name] = np.ascontiguousarray(node)
            return {_REF: name}
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if not isinstance(key, str):
                    raise CheckpointError(f"state key {key!r} under {path!r} is not a string")
                if key in (_REF, _TORCH):
                    raise CheckpointError(f"state key {key!r} is reserved")
                out[key] = walk(value, f"{path}.{key}" if path else key)
            return out
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
        if isinstance(node, np.generic):
            return node.item()
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise CheckpointError(f"state entry {path!r} has unsupported type {type(node).__name__}")

    return walk(state, ""), tensors


def unflatten_state(tree: Any, tensors: dict[str, np.ndarray]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(tree, dict):
        if _REF in tree:
            name = tree[_REF]
            if name not in tensors:
                raise CheckpointError(f"checkpoint manifest references missing tensor {name!r}")
            arr = tensors[name]
            return torch.from_numpy(arr.copy()) if tree.get(_TORCH) else arr
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _IncompleteCheckpoint(CheckpointError):
    """The checkpoint at a path is missing or damaged (not merely of another kind or version):
    the previous one, if an interrupted save left it aside, may stand in."""


class IncompatibleCheckpoint(CheckpointError):
    """An intact checkpoint this build must not load: another format version, or (raised by
    the state codec) another encoder or state version. A resume stops on it rather than
    falling back to an older checkpoint of the same wrong kind."""


def _tree_sha256(tree: Any) -> str:
    # The JSON tree has no checksum of its own in the file: a flipped digit in a threshold would
    # otherwise load silently. Canonical form, so the hash does not depend on the indentation.
    text = json.dumps(tree, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_checkpoint(path: str | os.PathLike[str], state: Any, *, kind: str) -> Path:
    """Write ``state`` atomically as a checkpoint directory at ``path``; returns the path."""
    tree, tensors = flatten_state(state)

    def build(folder: Path) -> None:
        tensor_path = folder / TENSORS
        save_file(tensors, str(tensor_path))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "kind": kind,
            "created": time.time(),
            "tensors_sha256": _sha256(tensor_path),
            "num_tensors": len(tensors),
            "state_sha256": _tree_sha256(tree),
            "state": tree,
        }
        text = json.dumps(manifest, indent=1, allow_nan=True)
        (folder / MANIFEST).write_text(text, encoding="utf-8")

    return replace_directory(path, build)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path``, checked for format and version."""
    root = Path(path)
    if not root.exists():
        raise _IncompleteCheckpoint(f"checkpoint {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {root} is not a directory")
    mpath = root / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _IncompleteCheckpoint(f"checkpoint {root} has no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _IncompleteCheckpoint(f"checkpoint {root}: {MANIFEST} is corrupt ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _IncompleteCheckpoint(
            f"checkpoint {root}: {MANIFEST} is not an edge_runtime checkpoint"
        )
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _IncompleteCheckpoint(f"checkpoint {root}: {MANIFEST} has no format version")
    if version > VERSION or version < 1:
        raise IncompatibleCheckpoint(
            f"checkpoint {root} has format version {version!r}; this build reads 1..{VERSION}"
        )
    return manifest


def load_checkpoint(path: str | os.PathLike[str], *, kind: str) -> Any:
    """Read, verify (sha256, kind) and rebuild the state saved by :func:`save_checkpoint`.

    If the checkpoint at ``path`` is missing or damaged and an interrupted save left the
    previous one aside, that one is loaded instead and a warning says so.
    """
    root = Path(path)
    try:
        return _load(root, kind)
    except _IncompleteCheckpoint as exc:
        aside = aside_path(root)
        if not aside.is_dir():
            raise
        try:
            state = _load(aside, kind)
        except CheckpointError:
            raise exc from None
        log.warning(
            "%s; loaded the previous checkpoint %s that an interrupted save left aside",
            exc,
            aside,
        )
        return state


def has_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`load_checkpoint` has something to try at ``path`` (the checkpoint, or the
    previous one that an interrupted save left aside): the question a resume asks."""
    root = Path(path)
    return (root / MANIFEST).is_file() or (aside_path(root) / MANIFEST).is_file()


def _load(root: Path, kind: str) -> Any:
    manifest = read_manifest(root)
    if manifest.get("kind") != kind:
        raise CheckpointError(
            f"checkpoint {root} holds {manifest.get('kind')!r}, expected {kind!r}"
        )
    tpath = root / TENSORS
    if not tpath.is_file():
        raise _IncompleteCheckpoint(f"checkpoint {root} has no {TENSORS}")
    if _sha256(tpath) != manifest.get("tensors_sha256"):
        raise _IncompleteCheckpoint(f"checkpoint {root}: {TENSORS} is corrupt (sha256 mismatch)")
    try:
        tensors = load_file(str(tpath))
    except Exception as exc:  # safetensors raises its own error types
        raise _IncompleteCheckpoint(f"checkpoint {root}: cannot read {TENSORS} ({exc})") from None
    tree = manifest.get("state")
    expected = manifest.get("state_sha256")
    # Checkpoints written before the tree had a checksum have none to check.
    if expected is not None and _tree_sha256(tree) != expected:
        raise _IncompleteCheckpoint(f"checkpoint {root}: {MANIFEST} is corrupt (sha256 mismatch)")
    return unflatten_state(tree, tensors)
