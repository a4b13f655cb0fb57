"""Hypervector encoders: encoder features → D-dimensional hypervectors.

HDFF-style: the pooled outputs of several encoder layers are each L2-normalised
(so no layer dominates by scale), weighted, concatenated, optionally centred on
the training mean (:mod:`edge_runtime.hdc.normalise`), and projected by a seeded
Gaussian random matrix. Projecting the weighted concatenation equals bundling
(summing) per-layer projections, the HDFF recipe, in one matrix product.

Two views of the same projection:
- float (MAP, a ``torchhd.MAPTensor``): for prototypes and cosine similarity;
- packed binary (sign bits, 64 per int64 word): for Hamming k-NN. For a random
  Gaussian projection the expected Hamming distance of two sign codes is
  D·angle/π (SimHash), so packed k-NN approximates cosine k-NN at 1 bit/dim.

The projection matrix is regenerated from ``seed`` rather than stored, so a
checkpoint holds a few KB of preprocessing state instead of a 10,000×F matrix.

A torch batch is encoded on its own device (numpy batches on the CPU): the projection
state (matrix or Hadamard signs, centring mean) is copied there once and kept, and the
kernels' dispatch picks the backend for that device (C++ on CPU, CUDA or Triton on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torchhd

from edge_runtime import kernels
from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.hdc.devices import DeviceCopies
from edge_runtime.hdc.normalise import LayerNormaliser
from edge_runtime.kernels.hadamard import hadamard_project

# Queries are projected in chunks so the (chunk, D) intermediate stays small.
_CHUNK = 1024


class FusedPlan(NamedTuple):
    """What :func:`kernels.fused_bank_scores` takes from the encoder to normalise and project
    in native code: the kept layers as (L,2) int64 column ranges and (L,) float32 weights,
    and the Hadamard diagonals."""

    bounds: torch.Tensor
    weights: torch.Tensor
    signs: torch.Tensor


def check_features(
    features: np.ndarray | torch.Tensor,
    dim: int | None = None,
    *,
    name: str = "features",
    device: torch.device | str | None = "cpu",
) -> torch.Tensor:
    """Validate an (N,F) feature batch and return it as a float32 tensor on ``device``.

    ``device=None`` keeps a torch batch on its own device (a numpy batch goes to the CPU),
    so a GPU encoder's features are scored where they are. Raises :class:`InputError` for a
    wrong rank, an empty batch, a width other than ``dim``, or NaN/Inf values.
    """
    if device is not None and device != "cpu" and torch.device(device).type != "cpu":
        t = check_features(features, dim, name=name, device=None)
        return t.to(device)
    if isinstance(features, np.ndarray):
        if features.dtype != np.float32 and not (
            np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)
        ):
            raise InputError(f"{name} must be numeric, got dtype {features.dtype}")
        a = np.ascontiguousarray(features, dtype=np.float32)
        # The common case in as few numpy calls as possible (this runs per frame, on cold
        # caches): a NaN or Inf anywhere makes the float64 sum non-finite, and a float64 sum of
        # float32 values cannot overflow.
        ok_shape = a.ndim == 2 and a.size > 0 and (dim is None or a.shape[1] == dim)
        if ok_shape and math.isfinite(a.sum(dtype=np.float64)):
            return torch.from_numpy(a)
        t = torch.from_numpy(a)
    elif isinstance(features, torch.Tensor):
        t = features.detach().to(features.device if device is None else device, torch.float32)
    else:
        raise InputError(
            f"{name} must be a numpy array or torch tensor, got {type(features).__name__}"
        )
    if t.ndim != 2:
        raise InputError(f"{name} must have rank 2 (N,F), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise InputError(f"{name} is an empty batch (zero rows)")
    if dim is not None and t.shape[1] != dim:
        raise InputError(
            f"{name} have width {t.shape[1]}, but the detector was fitted on width {dim}"
        )
    if not bool(torch.isfinite(t).all()):
        bad = torch.nonzero(~torch.isfinite(t).all(dim=1)).flatten()[:5].tolist()
        raise InputError(f"{name} contain NaN or Inf values (rows {bad})")
    return t


def random_projection(dim: int, in_features: int, seed: int) -> torch.Tensor:
    """The (dim, in_features) float32 Gaussian projection, identical for the same seed."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(dim, in_features, generator=g, dtype=torch.float32)


@dataclass
class HypervectorEncoder:
    """Per-layer-normalised features → float or packed sign hypervectors.

    ``layer_dims``: widths of the layers concatenated in each feature vector
    (None = one layer). ``layer_weights``: weight of each layer after its L2
    normalisation; 0 drops a layer; None gives the last layer 1 and every
    earlier layer ``early_weight`` (0.5 measured best on near-OOD, see
    ``benchmarks/eval_ood.py``). ``center``: subtract the training mean of the
    normalised features before projecting (fitted in :meth:`fit`); off by
    default because it cost 3-20 AUROC points in every setting measured.
    """

    dim: int = 10_000
    layer_dims: tuple[int, ...] | None = None
    layer_weights: tuple[float, ...] | None = None
    layer_norm: bool = True
    center: bool = False
    early_weight: float = 0.5
    seed: int = 0
    # "gaussian": dense seeded matrix; "hadamard": structured H·D2·H·D1 sign projection
    # (kernels.hadamard_project_pack): no stored matrix, O(D log F) per frame, same quality.
    projection: str = "gaussian"
    mean: torch.Tensor | None = field(default=None, repr=False)
    in_features: int | None = None
    _weight: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # ((width, dim, seed), the Hadamard diagonals they draw)
    _signs_cache: tuple[tuple[int, int, int], torch.Tensor] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    # the projection state (matrix, Hadamard diagonals) where a batch is
    _copies: DeviceCopies = field(
        default_factory=DeviceCopies, init=False, repr=False, compare=False
    )
    _normaliser: LayerNormaliser = field(
        default_factory=LayerNormaliser, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise InputError(f"hdc dim must be > 0, got {self.dim}")
        if self.projection not in ("gaussian", "hadamard"):
            raise InputError(
                f"projection must be 'gaussian' or 'hadamard', got {self.projection!r}"
            )
        if self.layer_dims is not None:
            self.layer_dims = tuple(int(d) for d in self.layer_dims)
            if not self.layer_dims or min(self.layer_dims) <= 0:
                raise InputError(f"layer_dims must be positive widths, got {self.layer_dims}")
        if self.layer_weights is not None:
            self.layer_weights = tuple(float(w) for w in self.layer_weights)
            n_layers = len(self.layer_dims) if self.layer_dims is not None else 1
            if len(self.layer_weights) != n_layers:
                raise InputError(
                    f"layer_weights has {len(self.layer_weights)} entries for {n_layers} layers"
                )
            if min(self.layer_weights) < 0 or max(self.layer_weights) <= 0:
                raise InputError(
                    f"layer_weights must be >= 0 with one > 0, got {self.layer_weights}"
                )
        if self.early_weight < 0:
            raise InputError(f"early_weight must be >= 0, got {self.early_weight}")

    # ------------------------------------------------------------------ preprocessing
    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        """Per-layer L2 norm and weighting, then centring: the vector that gets projected."""
        return self._normaliser.normalise(self, features)

    def _normalise_reference(self, features: torch.Tensor) -> torch.Tensor:
        # tests/test_hdc_fastpath.py holds the fast path to this reference
        return self._normaliser.reference(self, features)

    def fit(self, features: np.ndarray | torch.Tensor) -> HypervectorEncoder:
        """Fit the centring mean on training features (no-op for the projection itself)."""
        x = check_features(features)
        self.in_features = int(x.shape[1])
        self.mean = None
        if self.center:
            self.mean = self.normalise(x).mean(dim=0)
        return self

    # ------------------------------------------------------------------ projection
    @property
    def weight(self) -> torch.Tensor:
        """(dim, projected width) Gaussian matrix, regenerated from the seed on first use."""
        if self.in_features is None:
            raise InputError("HypervectorEncoder is not fitted: call fit(features) first")
        width = self.normalised_width
        if self._weight is None or self._weight.shape != (self.dim, width):
            if self.projection == "hadamard":  # the structured matrix, made explicit on demand
                eye = torch.eye(width, dtype=torch.float32)
                self._weight = self._hadamard_float(eye).T.contiguous()
            else:
                self._weight = random_projection(self.dim, width, self.seed)
        return self._weight

    def _hadamard_float(self, z: torch.Tensor) -> torch.Tensor:
        """Structured projection before the sign, scaled to unit-variance entries like the
        Gaussian matrix (each entry of H·D2·H·D1 has variance P)."""
        signs = self._signs(z.shape[1], z.device)
        return hadamard_project(z, signs, self.dim) / float(signs.shape[2]) ** 0.5

    def _signs(self, width: int, device: torch.device | None = None) -> torch.Tensor:
        """Hadamard diagonals for a projected width (on ``device``, default the CPU): drawn
        once per width and setting, not per call."""
        key = (width, self.dim, self.seed)
        if self._signs_cache is None or self._signs_cache[0] != key:
            self._signs_cache = (key, kernels.hadamard_signs(width, self.dim, self.seed))
        signs = self._signs_cache[1]
        return signs if device is None else self._copies.on("signs", signs, device)

    def _prepared(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        if self.in_features is None:
            raise InputError("HypervectorEncoder is not fitted: call fit(features) first")
        return self.normalise(check_features(features, self.in_features, device=None))

    @property
    def normalised_width(self) -> int:
        """Width of :meth:`normalise`'s output (the kept layers' columns)."""
        if self.in_features is None:
            raise InputError("HypervectorEncoder is not fitted: call fit(features) first")
        return self._normaliser.plan(self, self.in_features).width

    def fused_plan(self) -> FusedPlan | None:
        """The plan for :func:`kernels.fused_bank_scores` (normalise + Hadamard projection in
        native code), or None when the settings need the general path: a Gaussian projection,
        centring, or a weight that is not a float32 value."""
        if self.in_features is None or self.projection != "hadamard" or self.center:
            return None
        plan = self._normaliser.plan(self, self.in_features)
        return FusedPlan(plan.bounds, plan.weights, self._signs(plan.width)) if plan.exact else None

    def encode_packed_checked(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_packed` for a batch that already passed ``check_features(x, in_features)``
        (the memory bank validates once at its own boundary)."""
        if self.in_features is None:
            raise InputError("HypervectorEncoder is not fitted: call fit(features) first")
        return self.pack_normalised(self.normalise(x))

    def pack_normalised(self, z: torch.Tensor) -> torch.Tensor:
        """Packed sign codes of rows :meth:`normalise` has already produced (a caller that
        needs ``z`` itself too normalises once)."""
        return self._pack(z)

    def encode_float(self, features: np.ndarray | torch.Tensor) -> torchhd.MAPTensor:
        """Real-valued MAP hypervectors (N, dim): the projection before the sign."""
        z = self._prepared(features)
        if self.projection == "hadamard":
            out = torch.cat(
                [self._hadamard_float(z[i : i + _CHUNK]) for i in range(0, len(z), _CHUNK)]
            )
            return out.as_subclass(torchhd.MAPTensor)
        w = self._copies.on("weight", self.weight, z.device)
        out = torch.cat([z[i : i + _CHUNK] @ w.T for i in range(0, len(z), _CHUNK)])
        return out.as_subclass(torchhd.MAPTensor)

    def encode_packed(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Sign hypervectors packed 64 per int64 word: (N, ceil(dim/64)), via the kernels."""
        return self._pack(self._prepared(features))

    def _pack(self, z: torch.Tensor) -> torch.Tensor:
        if self.projection == "hadamard":
            signs = self._signs(z.shape[1], z.device)
            if z.dtype == torch.float32 and z.device.type == "cpu" and z.is_contiguous():
                # z and the cached signs are valid by construction: skip the API's checks
                # (same backend, same chunks, so the same bits as the checked calls below).
                project = kernels.api.unchecked("hadamard_project_pack", z.device)
                if len(z) <= _CHUNK:
                    return project(z, signs, self.dim, None)
                return torch.cat(
                    [
                        project(z[i : i + _CHUNK], signs, self.dim, None)
                        for i in range(0, len(z), _CHUNK)
                    ]
                )
            return torch.cat(
                [
                    kernels.hadamard_project_pack(z[i : i + _CHUNK], signs, self.dim)
                    for i in range(0, len(z), _CHUNK)
                ]
            )
        w = self._copies.on("weight", self.weight, z.device)
        return torch.cat(
            [kernels.sign_project_pack(z[i : i + _CHUNK], w) for i in range(0, len(z), _CHUNK)]
        )

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {
            "dim": self.dim,
            "layer_dims": list(self.layer_dims) if self.layer_dims is not None else None,
            "layer_weights": list(self.layer_weights) if self.layer_weights is not None else None,
            "layer_norm": self.layer_norm,
            "center": self.center,
            "early_weight": self.early_weight,
            "seed": self.seed,
            "projection": self.projection,
            "in_features": self.in_features,
        }

    def tensors(self, prefix: str = "encoder.") -> dict[str, torch.Tensor]:
        return {f"{prefix}mean": self.mean.contiguous()} if self.mean is not None else {}

    @classmethod
    def from_state(
        cls, config: dict, tensors: dict[str, torch.Tensor], prefix: str = "encoder."
    ) -> HypervectorEncoder:
        try:
            enc = cls(
                dim=int(config["dim"]),
                layer_dims=_opt_tuple(config.get("layer_dims"), int),
                layer_weights=_opt_tuple(config.get("layer_weights"), float),
                layer_norm=bool(config["layer_norm"]),
                center=bool(config["center"]),
                early_weight=float(config.get("early_weight", 0.5)),
                seed=int(config["seed"]),
                projection=str(config.get("projection", "gaussian")),
            )
            enc.in_features = (
                None if config.get("in_features") is None else int(config["in_features"])
            )
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise CheckpointError(f"hypervector encoder config is invalid: {exc}") from exc
        mean = tensors.get(f"{prefix}mean")
        if enc.center and enc.in_features is not None:
            if mean is None:
                raise CheckpointError("checkpoint lacks the encoder's centring mean")
            width = enc.normalised_width
            if tuple(mean.shape) != (width,):
                raise CheckpointError(
                    f"encoder mean has shape {tuple(mean.shape)}, expected ({width},)"
                )
            enc.mean = mean.to(torch.float32)
        return enc


def _opt_tuple(v: Sequence | None, kind: type) -> tuple | None:
    return None if v is None else tuple(kind(x) for x in v)
