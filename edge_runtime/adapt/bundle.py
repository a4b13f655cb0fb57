"""Domain bundles: adapt once, share the domain with the fleet.

A device that learned a domain exports it as ONE safetensors blob (never pickle: a bundle comes
from another device and must not run code). Its tensors:

- ``adaptor.<param>``: the adaptor's ``state_dict`` (head, body, feature normaliser);
- ``memory.packed`` (M, W) int64 sign codes, ``memory.labels`` (M,) int64 and, when the bank
  re-ranks, ``memory.exact`` (M, F') float16: the domain's HDC memory, as the bank keeps it.

Its metadata holds one JSON ``manifest``: format and version, the encoder hash, the HDC
fingerprint (every setting that must match for packed exemplars and a calibrated threshold to
mean the same on another device), the domain (id, name, kind, version, labels), the adaptor's
description, the memory's threshold and row count, the signature (HDC prototype of the
exemplars, :mod:`edge_runtime.drift.signature`) and the source.

:func:`read_bundle` checks, in order: size, SHA-256, the safetensors layout, the manifest, the
encoder hash, the HDC fingerprint, then every tensor's name, dtype and shape; each failure is a
:class:`BundleError` (an :class:`~edge_runtime.errors.InputError`) that says what and why.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edge_runtime import kernels
from edge_runtime.adapt.adaptor import Adaptor
from edge_runtime.adapt.domains import DomainSet
from edge_runtime.drift.signature import prototype_hex
from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.hdc.bank import DomainMemoryBank

FORMAT = "edge_runtime.domain_bundle"
VERSION = 1
MANIFEST_KEY = "manifest"
#: Caps on what a device reads from the network before it trusts any of it. 32 MiB holds a
#: 6,000-exemplar base domain with re-rank rows (about 17 MB); a few-shot domain is ~0.2 MB.
MAX_BUNDLE_BYTES = 32 * 2**20
MAX_HEADER_BYTES = 1 * 2**20
MAX_ROWS = 50_000

_ADAPTOR = "adaptor."
_PACKED, _LABELS, _EXACT = "memory.packed", "memory.labels", "memory.exact"


class BundleError(InputError):
    """A domain bundle that is corrupt, oversized, or made for another encoder or HDC setup."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hdc_fingerprint(bank: DomainMemoryBank) -> dict[str, Any]:
    """What must match for one bank's packed rows and threshold to mean the same in another:
    the hypervector encoder's settings (dim, projection, seed, layers, weights, centring, input
    width), the k-NN settings the threshold was calibrated with (k, reduce, rerank), and a hash
    of the centring mean when there is one. JSON-able."""
    enc = bank.encoder
    fp: dict[str, Any] = {
        "encoder": enc.config(),
        "words": kernels.words_for(enc.dim),
        "k": bank.k,
        "reduce": bank.reduce,
        "rerank": bank.rerank,
        # the width of the exact re-rank rows (None until the bank's first domain)
        "normalised_width": None if enc.in_features is None else enc.normalised_width,
    }
    if enc.mean is not None:
        mean = enc.mean.detach().cpu().to(torch.float32).contiguous().numpy()
        fp["mean_sha256"] = hashlib.sha256(mean.tobytes()).hexdigest()
    # a JSON round trip so tuples and lists compare equal to what a manifest reads back
    return json.loads(json.dumps(fp, sort_keys=True))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint_difference(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """``"dim=4096 (this device 2048), ..."`` for every differing setting, or None."""
    a, b = _flat(ours), _flat(theirs)
    diffs = [
        f"{k}={b.get(k)!r} (this device {a.get(k)!r})"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    return ", ".join(diffs) if diffs else None


@dataclass(frozen=True)
class ExportedBundle:
    data: bytes
    sha256: str
    manifest: dict[str, Any]


@dataclass(frozen=True)
class DomainBundle:
    """A verified bundle, ready for :meth:`AdaptationController.adopt`."""

    manifest: dict[str, Any]
    adaptor: Adaptor
    packed: torch.Tensor  # (M, W) int64
    labels: torch.Tensor  # (M,) int64
    exact: torch.Tensor | None  # (M, F') float16, with rerank
    threshold: float
    sha256: str
    nbytes: int

    @property
    def domain(self) -> dict[str, Any]:
        return dict(self.manifest["domain"])

    @property
    def signature(self) -> str:
        return str(self.manifest["signature"])

    @property
    def source(self) -> dict[str, Any]:
        return dict(self.manifest.get("source") or {})


def export_bundle(
    domains: DomainSet,
    domain_id: int,
    encoder_hash: str,
    *,
    source: dict[str, Any] | None = None,
) -> ExportedBundle:
    """One domain of ``domains`` (its serving adaptor and its HDC memory) as a bundle."""
    d = domains.get(domain_id)  # InputError for an unknown id
    packed, labels, exact, threshold = domains.bank.domain_rows(d.id)
    tensors: dict[str, torch.Tensor] = {
        f"{_ADAPTOR}{k}": t.detach().cpu().contiguous().clone()
        for k, t in d.adaptor.state_dict().items()
    }
    tensors[_PACKED] = packed.contiguous()
    tensors[_LABELS] = labels.to(torch.int64).contiguous()
    if exact is not None:
        tensors[_EXACT] = exact.to(torch.float16).contiguous()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "encoder_hash": str(encoder_hash),
        "hdc": hdc_fingerprint(domains.bank),
        "domain": {
            "id": d.id,
            "name": d.name,
            "kind": d.kind,
            "version": d.version,
            "labels": list(d.labels),
            "created_at_frame": d.created_at_frame,
        },
        "adaptor": d.adaptor.describe(),
        "memory": {"threshold": threshold, "rows": len(packed), "exact": exact is not None},
        "signature": prototype_hex(packed),
        "source": {**(source or {}), "domain": d.id, "exported_at": time.time()},
    }
    data = st_save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest, allow_nan=False)})
    return ExportedBundle(data, sha256_hex(data), manifest)


def export_domain(
    domains: DomainSet,
    domain_id: int,
    encoder_hash: str,
    *,
    source: dict[str, Any] | None = None,
) -> bytes:
    """:func:`export_bundle`'s bytes."""
    return export_bundle(domains, domain_id, encoder_hash, source=source).data


def _header(data: bytes) -> dict[str, Any]:
    """The safetensors JSON header, read before safetensors parses anything (caps first)."""
    if len(data) < 8:
        raise BundleError(f"adaptor bundle is truncated: {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise BundleError(
            f"adaptor bundle is truncated or not a safetensors file (header of {n} bytes in "
            f"{len(data)})"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"adaptor bundle is not a safetensors file (its header is not JSON: {exc})"
        ) from None
    if not isinstance(header, dict):
        raise BundleError("adaptor bundle header is not a JSON object")
    return header


def _manifest(header: dict[str, Any]) -> dict[str, Any]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or MANIFEST_KEY not in meta:
        raise BundleError("adaptor bundle has no manifest in its metadata")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except (TypeError, json.JSONDecodeError) as exc:
        raise BundleError(f"adaptor bundle manifest is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"not an edge_runtime domain bundle (format {FORMAT!r} expected)")
    if manifest.get("version") != VERSION:
        raise BundleError(
            f"adaptor bundle has version {manifest.get('version')!r}; this build reads {VERSION}"
        )
    for key, kind in (
        ("encoder_hash", str),
        ("hdc", dict),
        ("domain", dict),
        ("adaptor", dict),
        ("memory", dict),
        ("signature", str),
    ):
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"adaptor bundle manifest: {key!r} must be a {kind.__name__}")
    return manifest


def bundle_manifest(data: bytes) -> dict[str, Any]:
    """A bundle's manifest, read without verifying its checksum or tensors (to list or match
    a bundle before deciding to fetch or install it)."""
    return _manifest(_header(bytes(data)))


def read_bundle(
    data: bytes,
    *,
    sha256: str,
    encoder_hash: str,
    hdc_fingerprint: dict[str, Any],
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> DomainBundle:
    """Verify and parse a bundle for this device (its ``encoder_hash`` and HDC fingerprint);
    :class:`BundleError` says what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BundleError(f"adaptor bundle must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise BundleError(f"adaptor bundle is {len(data)} bytes; the limit is {max_bytes}")
    got = sha256_hex(data)
    if got != str(sha256).lower():
        raise BundleError(f"adaptor bundle checksum mismatch: expected {sha256}, got {got}")
    manifest = _manifest(_header(data))
    if manifest["encoder_hash"] != encoder_hash:
        raise BundleError(
            f"bundle was trained for encoder {manifest['encoder_hash']}, this device runs "
            f"{encoder_hash}"
        )
    diff = fingerprint_difference(hdc_fingerprint, manifest["hdc"])
    if diff is not None:
        raise BundleError(f"bundle's HDC memory was built with other settings: {diff}")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise BundleError(f"adaptor bundle tensors cannot be read: {exc}") from None
    return _parsed(manifest, tensors, hdc_fingerprint, got, len(data))


def _parsed(
    manifest: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    fingerprint: dict[str, Any],
    sha: str,
    nbytes: int,
) -> DomainBundle:
    mem, words = manifest["memory"], int(fingerprint["words"])
    rerank = bool(fingerprint["rerank"])
    expected = {_PACKED, _LABELS} | ({_EXACT} if rerank else set())
    memory_keys = {k for k in tensors if not k.startswith(_ADAPTOR)}
    if memory_keys != expected:
        raise BundleError(
            f"adaptor bundle memory tensors {sorted(memory_keys)}, expected {sorted(expected)}"
        )
    packed, labels = tensors[_PACKED], tensors[_LABELS]
    rows = mem.get("rows")
    if not isinstance(rows, int) or not 1 <= rows <= MAX_ROWS:
        raise BundleError(f"adaptor bundle memory has {rows!r} rows; 1..{MAX_ROWS} allowed")
    if packed.dtype != torch.int64 or tuple(packed.shape) != (rows, words):
        raise BundleError(
            f"adaptor bundle memory.packed is {tuple(packed.shape)} {packed.dtype}, expected "
            f"({rows}, {words}) int64"
        )
    if labels.dtype != torch.int64 or tuple(labels.shape) != (rows,) or bool((labels < 0).any()):
        raise BundleError(
            f"adaptor bundle memory.labels is {tuple(labels.shape)} {labels.dtype}, expected "
            f"({rows},) non-negative int64"
        )
    exact = tensors.get(_EXACT)
    if exact is not None:
        width = fingerprint["normalised_width"]
        if exact.dtype != torch.float16 or tuple(exact.shape) != (rows, width):
            raise BundleError(
                f"adaptor bundle memory.exact is {tuple(exact.shape)} {exact.dtype}, expected "
                f"({rows}, {width}) float16"
            )
        if not bool(torch.isfinite(exact).all()):
            raise BundleError("adaptor bundle memory.exact has NaN or Inf values")
    threshold = mem.get("threshold")
    if not isinstance(threshold, (int, float)) or not math.isfinite(float(threshold)):
        raise BundleError(f"adaptor bundle threshold must be finite, got {threshold!r}")
    adaptor = _adaptor(manifest, tensors, fingerprint)
    if not set(labels.tolist()) <= set(adaptor.label_map):
        raise BundleError("adaptor bundle exemplars have labels its adaptor does not predict")
    return DomainBundle(manifest, adaptor, packed, labels, exact, float(threshold), sha, nbytes)


def _adaptor(
    manifest: dict[str, Any], tensors: dict[str, torch.Tensor], fingerprint: dict[str, Any]
) -> Adaptor:
    state = {k[len(_ADAPTOR) :]: t for k, t in tensors.items() if k.startswith(_ADAPTOR)}
    desc = manifest["adaptor"]
    in_features = fingerprint["encoder"].get("in_features")
    arch = desc.get("arch") if isinstance(desc.get("arch"), dict) else {}
    if arch.get("tap") is not None:
        # An adaptor on an encoder tap reads that block's flattened map; the encoder hash
        # (checked before) fixes the map's shape, so its width must be the shape's product.
        shape = arch.get("in_shape") or ()
        if not shape or math.prod(int(v) for v in shape) != arch.get("in_dim"):
            raise BundleError(
                f"adaptor bundle's adaptor on tap {arch.get('tap')} takes {arch.get('in_dim')!r} "
                f"inputs, which is not its map shape {list(shape)}"
            )
    elif in_features is not None and arch.get("in_dim") != in_features:
        raise BundleError(
            f"adaptor bundle's adaptor takes {arch.get('in_dim')!r} features, this device's "
            f"encoder gives {in_features}"
        )
    for k, t in state.items():
        if k.endswith("num_batches_tracked"):
            # BatchNorm's step counter (conv adaptors): one non-negative integer.
            if t.dtype != torch.int64 or t.numel() != 1 or int(t) < 0:
                raise BundleError(f"adaptor bundle tensor adaptor.{k} is not a step counter")
            continue
        if not t.dtype.is_floating_point or not bool(torch.isfinite(t).all()):
            raise BundleError(f"adaptor bundle tensor adaptor.{k} is not finite floating point")
    try:
        return Adaptor.from_state(desc, state)
    except (CheckpointError, InputError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"adaptor bundle's adaptor does not match its tensors: {exc}") from None
