"""Meta-init files: one per adaptor family, bound to the encoder they were learned on.

A meta-init is two files side by side:

* ``<family>.safetensors``: the tensors of :class:`~edge_runtime.meta.maml.MetaParams`
  (``body.*``, ``log_lr.*``, ``log_gain``, ``log_scale``), read with safetensors only (no
  pickle: a meta-init may come from another machine and must not be able to run code);
* ``<family>.json``: the manifest: ``format`` ("edge-runtime.meta-init"), ``format_version``,
  ``family``, ``arch`` (:class:`AdaptorArch` dict), ``encoder_hash`` (the runtime's
  :attr:`~edge_runtime.runtime.Runtime.encoder_hash`), ``inner_steps``, ``first_order``,
  ``tensors_sha256`` (of the safetensors file), ``detector`` (the threshold correction, or
  null) and ``training`` (what produced it).

The runtime looks for ``<cache>/meta/<encoder_hash[:16]>/<family>.json`` (``$EDGE_RUNTIME_CACHE``
or ``~/.cache/edge_runtime``) when no path is configured. Every way a file can be wrong (another
encoder, another family, an unknown version, a truncated or edited tensor file, non-finite
values) is a :class:`~edge_runtime.errors.CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edge_runtime.adapt.adaptor import AdaptorArch
from edge_runtime.errors import CheckpointError
from edge_runtime.meta.detector import ThresholdCorrection
from edge_runtime.meta.maml import MetaParams, expected_shapes, family_name
from edge_runtime.state.atomic import atomic_path, atomic_write_json

FORMAT = "edge-runtime.meta-init"
FORMAT_VERSION = 1
CACHE_ENV = "EDGE_RUNTIME_CACHE"


#: The run summary ``meta-train`` writes beside the family files (not a meta-init itself).
SUMMARY_NAME = "meta_train.json"


def meta_cache_dir(encoder_hash: str | None = None) -> Path:
    """``$EDGE_RUNTIME_CACHE/meta`` (or ``~/.cache/edge_runtime/meta``), per encoder hash."""
    root = os.environ.get(CACHE_ENV)
    base = (Path(root).expanduser() if root else Path.home() / ".cache" / "edge_runtime") / "meta"
    return base / encoder_hash[:16] if encoder_hash else base


@dataclass
class MetaInitFile:
    """A loaded, verified meta-init."""

    path: Path
    family: str
    arch: AdaptorArch
    encoder_hash: str
    inner_steps: int
    meta: MetaParams
    correction: ThresholdCorrection | None = None
    manifest: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_meta_init(
    directory: str | os.PathLike[str],
    arch: AdaptorArch,
    meta: MetaParams,
    encoder_hash: str,
    *,
    inner_steps: int,
    first_order: bool = False,
    correction: ThresholdCorrection | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``<directory>/<family>.safetensors`` and its manifest (tensors first, manifest
    last and atomically: a reader never sees a manifest whose tensors are missing)."""
    family = family_name(arch)
    root = Path(directory)
    tensors_path = root / f"{family}.safetensors"
    with atomic_path(tensors_path) as tmp:
        save_file(meta.tensors(), str(tmp))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": family,
        "arch": arch.to_dict(),
        "encoder_hash": str(encoder_hash),
        "inner_steps": int(inner_steps),
        "first_order": bool(first_order),
        "tensors": tensors_path.name,
        "tensors_sha256": _sha256(tensors_path),
        "detector": correction.to_dict() if correction is not None else None,
        "training": training or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return atomic_write_json(root / f"{family}.json", manifest)


def _manifest_path(path: Path, arch: AdaptorArch | None) -> Path:
    if path.is_dir():
        if arch is None:
            raise CheckpointError(f"{path} is a directory: name the family's .json file")
        return path / f"{family_name(arch)}.json"
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    return path


def load_meta_init(
    path: str | os.PathLike[str],
    encoder_hash: str,
    arch: AdaptorArch | None = None,
) -> MetaInitFile:
    """Read and verify a meta-init (a manifest, its tensors file, or a directory of them with
    ``arch`` naming the family). CheckpointError if it does not belong to this encoder or
    family, or is damaged in any way."""
    mpath = _manifest_path(Path(path), arch)
    if not mpath.is_file():
        raise CheckpointError(f"meta-init {mpath}: no such file")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"meta-init {mpath}: manifest is not readable JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"meta-init {mpath}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"meta-init {mpath}: format version {version!r}, this runtime reads {FORMAT_VERSION}"
        )
    theirs = str(manifest.get("encoder_hash", ""))
    if theirs != encoder_hash:
        raise CheckpointError(
            f"meta-init {mpath} was learned on encoder {theirs[:16] or '?'}..., this encoder is "
            f"{encoder_hash[:16]}...: meta-train again for this encoder (edge-runtime meta-train)"
        )
    try:
        file_arch = AdaptorArch.from_dict(manifest["arch"])
        family = str(manifest["family"])
        inner_steps = int(manifest["inner_steps"])
        tensors_name = str(manifest["tensors"])
        sha = str(manifest["tensors_sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"meta-init {mpath}: manifest lacks a field ({exc})") from exc
    if family != family_name(file_arch):
        raise CheckpointError(f"meta-init {mpath}: family {family!r} does not match its arch")
    if arch is not None and family_name(arch) != family:
        raise CheckpointError(
            f"meta-init {mpath} is for family {family}, the adaptor is {family_name(arch)}"
        )
    tpath = mpath.parent / Path(tensors_name).name  # never a path outside the manifest's folder
    if not tpath.is_file():
        raise CheckpointError(f"meta-init {mpath}: tensors file {tpath.name} is missing")
    if _sha256(tpath) != sha:
        raise CheckpointError(f"meta-init {tpath}: SHA-256 does not match the manifest (corrupt)")
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"meta-init {tpath}: unreadable safetensors ({exc})") from exc
    want = expected_shapes(file_arch)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise CheckpointError(
            f"meta-init {tpath}: tensors do not fit family {family} "
            f"(missing {missing}, unexpected {extra}, wrong shape {wrong})"
        )
    for k, v in tensors.items():
        if v.dtype != torch.float32 or not torch.isfinite(v).all():
            raise CheckpointError(f"meta-init {tpath}: tensor {k} is not finite float32")
    detector = manifest.get("detector")
    correction = ThresholdCorrection.from_dict(detector) if detector else None
    return MetaInitFile(
        path=mpath,
        family=family,
        arch=file_arch,
        encoder_hash=encoder_hash,
        inner_steps=inner_steps,
        meta=MetaParams.from_tensors(tensors),
        correction=correction,
        manifest=manifest,
    )


def find_meta_init(encoder_hash: str, arch: AdaptorArch) -> Path | None:
    """The cached meta-init manifest for this encoder and family, or None."""
    p = meta_cache_dir(encoder_hash) / f"{family_name(arch)}.json"
    return p if p.is_file() else None
