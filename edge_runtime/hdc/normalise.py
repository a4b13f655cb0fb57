"""Per-layer normalisation of encoder features: the vector a hypervector encoder projects.

The pooled outputs of several encoder layers are each L2-normalised (so no layer dominates by
scale), weighted, concatenated and optionally centred on the training mean. A layer of weight 0
is dropped before projection rather than projected as zeros.

This runs on every served frame, so a float32 CPU batch takes a numpy formulation that gives the
same bits as the torch one with a fraction of its per-op dispatch cost; the torch formulation
stays as the reference it must equal, and serves every other dtype and device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from edge_runtime.errors import InputError
from edge_runtime.hdc.devices import DeviceCopies

_EPS32 = np.float32(1e-12)  # F.normalize's eps, as its clamp_min applies it to float32


class LayerSettings(Protocol):
    """The settings normalisation follows (a :class:`HypervectorEncoder`'s fields).

    ``layer_dims``: widths of the layers concatenated in each feature vector (None = one
    layer); ``layer_weights``: each layer's weight after its L2 norm (None: the last layer 1,
    every earlier one ``early_weight``); ``mean``: the centring mean, used when ``center``.
    """

    layer_dims: tuple[int, ...] | None
    layer_weights: tuple[float, ...] | None
    early_weight: float
    layer_norm: bool
    center: bool
    mean: torch.Tensor | None


@dataclass(frozen=True)
class LayerPlan:
    """What the layer settings imply for one input width, computed once per setting.

    ``layers``: kept (start, stop, weight) column ranges; ``width``: normalised width;
    ``exact``: every weight is a float32 value (then numpy's float32 multiply gives the same
    bits as torch's, whichever precision torch keeps the scalar in); ``bounds`` and
    ``weights``: the layers as tensors for native code, (L,2) int64 ranges and (L,) float32.
    """

    key: tuple
    layers: tuple[tuple[int, int, float], ...]
    width: int
    exact: bool
    bounds: torch.Tensor
    weights: torch.Tensor


class LayerNormaliser:
    """Per-layer L2 norm, weighting and centring of (N,F) feature batches.

    Every call takes the settings it follows rather than keeping them: the encoder's fields
    stay assignable, so a plan is cached only under the settings it was made from.
    """

    def __init__(self) -> None:
        self._plan: LayerPlan | None = None
        self._copies = DeviceCopies()  # the centring mean, where a batch is

    @staticmethod
    def layers(settings: LayerSettings, width: int) -> list[tuple[slice, float]]:
        """The kept layers' column slices in features of ``width`` and their weights."""
        dims = settings.layer_dims if settings.layer_dims is not None else (width,)
        if sum(dims) != width:
            raise InputError(
                f"features have width {width}, but layer_dims {dims} sum to {sum(dims)}"
            )
        weights = settings.layer_weights
        if weights is None:
            weights = (*(settings.early_weight for _ in dims[:-1]), 1.0)
        out, start = [], 0
        for d, w in zip(dims, weights, strict=True):
            if w > 0:
                out.append((slice(start, start + d), w))
            start += d
        return out

    def plan(self, settings: LayerSettings, width: int) -> LayerPlan:
        """The :class:`LayerPlan` for ``width``, cached until a setting it rests on changes."""
        key = (width, settings.layer_dims, settings.layer_weights, settings.early_weight)
        plan = self._plan
        if plan is None or plan.key != key:
            layers = tuple((sl.start, sl.stop, w) for sl, w in self.layers(settings, width))
            kept = sum(b - a for a, b, _ in layers)
            exact = all(float(np.float32(w)) == w for _, _, w in layers)
            bounds = torch.tensor([[a, b] for a, b, _ in layers], dtype=torch.int64)
            weights = torch.tensor([w for _, _, w in layers], dtype=torch.float32)
            plan = LayerPlan(key, layers, kept, exact, bounds.reshape(-1, 2), weights)
            self._plan = plan
        return plan

    def normalise(self, settings: LayerSettings, features: torch.Tensor) -> torch.Tensor:
        """The normalised (N, plan width) batch, by the fast path where it gives the same
        bits as :meth:`reference`."""
        mean = settings.mean
        if (
            features.dtype == torch.float32
            and features.device.type == "cpu"
            and features.ndim == 2
            and not features.requires_grad
            and features.is_contiguous()
            and (mean is None or not settings.center or mean.dtype == torch.float32)
        ):
            plan = self.plan(settings, features.shape[1])
            if plan.exact:
                return self._fast(settings, features, plan)
        return self.reference(settings, features)

    def _fast(self, settings: LayerSettings, x: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
        """:meth:`reference` for a checked float32 CPU batch, bit for bit, with fewer ops.

        Each layer's norm is the very torch op ``F.normalize`` runs on the same view (its
        reduction order is torch's own); the clamp, division, weighting and centring are
        single IEEE float32 operations per element, so numpy gives the same bits.
        """
        xn = x.numpy()
        z = np.empty((x.shape[0], plan.width), dtype=np.float32)
        o = 0
        for a, b, w in plan.layers:
            dst = z[:, o : o + b - a]
            if settings.layer_norm:
                norm = x[:, a:b].norm(2, 1, keepdim=True).numpy()
                np.divide(xn[:, a:b], np.maximum(norm, _EPS32), out=dst)
                if w != 1.0:
                    np.multiply(dst, np.float32(w), out=dst)
            else:
                np.multiply(xn[:, a:b], np.float32(w), out=dst)
            o += b - a
        if settings.center and settings.mean is not None:
            np.subtract(z, settings.mean.numpy(), out=z)
        return torch.from_numpy(z)

    def reference(self, settings: LayerSettings, features: torch.Tensor) -> torch.Tensor:
        """The plain torch formulation (any dtype and device)."""
        parts = []
        for sl, w in self.layers(settings, features.shape[1]):
            x = features[:, sl]
            if settings.layer_norm:
                x = torch.nn.functional.normalize(x, dim=1, eps=1e-12)
            parts.append(x * w)
        z = torch.cat(parts, dim=1)
        if settings.center and settings.mean is not None:
            z = z - self._copies.on("mean", settings.mean, z.device)
        return z
