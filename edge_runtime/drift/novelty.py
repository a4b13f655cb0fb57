"""Novel classes or a domain shift? Decided from low-level statistics of the OOD frames.

A novel class (new objects, same camera) keeps the image's low-level statistics -- brightness,
contrast, edge sharpness, noise -- inside the range seen in-distribution; a domain shift (fog,
sensor noise, a different camera) moves them. :class:`NoveltyClassifier` fits the in-distribution
range of a low-level descriptor (a cheap pixel statistic from :func:`pixel_statistics`, or
early-layer encoder features) and, given the descriptors of the OOD frames around a flag, calls it
``domain_shift`` when most of them fall outside that range.

The range is a robust Mahalanobis distance (Ledoit-Wolf shrinkage covariance) with a per-frame
cut-off at the ``quantile`` of in-distribution distances; the decision is the fraction of OOD
frames beyond that cut-off against ``shift_fraction``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.errors import InputError

#: Number of grey-level histogram bins in :func:`pixel_statistics`.
HIST_BINS = 8
#: Number of gradient-magnitude histogram bins in :func:`pixel_statistics`.
GRAD_BINS = 8


def pixel_statistics(frames: np.ndarray) -> np.ndarray:
    """Cheap per-frame low-level descriptor: (N, 4 + HIST_BINS + GRAD_BINS) float32.

    Mean and std of the grey levels, mean gradient magnitude, a high-frequency energy ratio
    (Laplacian over gradient energy: noise raises it, blur and fog lower it), a grey-level
    histogram and a gradient-magnitude histogram. Costs a few microseconds per 28x28 frame.
    """
    if not isinstance(frames, np.ndarray) or frames.ndim not in (3, 4) or len(frames) == 0:
        raise InputError("frames must be a non-empty (N,H,W) or (N,H,W,C) array")
    x = torch.from_numpy(np.array(frames, dtype=np.float32))  # a copy: inputs may be read-only
    if frames.dtype == np.uint8:
        x = x / 255.0
    if x.ndim == 4:
        x = x.mean(dim=3)
    x = x.unsqueeze(1)  # (N,1,H,W)
    n = x.shape[0]
    gx = x[..., :, 1:] - x[..., :, :-1]
    gy = x[..., 1:, :] - x[..., :-1, :]
    grad = torch.sqrt(gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2 + 1e-12).reshape(n, -1)
    lap_k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    lap = F.conv2d(x, lap_k).reshape(n, -1)
    flat = x.reshape(n, -1)
    hf = (lap.pow(2).mean(1) + 1e-8) / (grad.pow(2).mean(1) + 1e-8)
    hist = torch.stack(
        [
            ((flat >= lo) & (flat < lo + 1.0 / HIST_BINS)).float().mean(1)
            for lo in np.arange(HIST_BINS) / HIST_BINS
        ],
        dim=1,
    )
    hist[:, -1] += (flat >= 1.0).float().mean(1)
    edges = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, float("inf")])
    ghist = torch.stack(
        [((grad >= edges[i]) & (grad < edges[i + 1])).float().mean(1) for i in range(GRAD_BINS)],
        dim=1,
    )
    out = torch.cat(
        [
            flat.mean(1, keepdim=True),
            flat.std(1, keepdim=True),
            grad.mean(1, keepdim=True),
            torch.log(hf).unsqueeze(1),
            hist,
            ghist,
        ],
        dim=1,
    )
    return out.numpy().astype(np.float32)


@dataclass
class NoveltyDecision:
    kind: str  # "novel_class" | "domain_shift"
    outside_fraction: float  # fraction of OOD frames outside the in-distribution range
    reason: str


class NoveltyClassifier:
    """Fit on in-distribution descriptors; classify the OOD frames around a drift flag."""

    def __init__(
        self, quantile: float = 0.99, shift_fraction: float = 0.5, shrinkage: float | None = None
    ):
        if not 0.5 < quantile < 1.0:
            raise InputError(f"quantile must be in (0.5, 1), got {quantile}")
        if not 0.0 < shift_fraction < 1.0:
            raise InputError(f"shift_fraction must be in (0, 1), got {shift_fraction}")
        self.quantile = float(quantile)
        self.shift_fraction = float(shift_fraction)
        self.shrinkage = shrinkage
        self.mean: np.ndarray | None = None
        self.precision: np.ndarray | None = None
        self.cutoff = float("nan")

    @property
    def fitted(self) -> bool:
        return self.precision is not None

    def fit(self, descriptors: np.ndarray) -> NoveltyClassifier:
        """Learn the in-distribution range from (N, D) descriptors (N >= 20)."""
        from sklearn.covariance import LedoitWolf, ShrunkCovariance

        d = np.asarray(descriptors, dtype=np.float64)
        if d.ndim != 2 or len(d) < 20:
            raise InputError(f"need (N>=20, D) in-distribution descriptors, got shape {d.shape}")
        est = LedoitWolf() if self.shrinkage is None else ShrunkCovariance(shrinkage=self.shrinkage)
        est.fit(d)
        self.mean = est.location_
        self.precision = est.precision_
        # Cut-off from the fitting frames themselves: a slight under-estimate of held-out
        # distances, which errs towards "domain_shift" (the safer call: a new adaptor).
        self.cutoff = float(np.quantile(self.distances(d), self.quantile))
        return self

    def distances(self, descriptors: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each descriptor to the in-distribution mean."""
        if not self.fitted:
            raise InputError("NoveltyClassifier is not fitted")
        diff = np.asarray(descriptors, dtype=np.float64) - self.mean
        return np.einsum("nd,de,ne->n", diff, self.precision, diff)

    def classify(self, ood_descriptors: np.ndarray) -> NoveltyDecision:
        """``domain_shift`` when at least ``shift_fraction`` of the frames are out of range."""
        d = np.asarray(ood_descriptors)
        if d.ndim == 1:
            d = d[None]
        if len(d) == 0:
            return NoveltyDecision("domain_shift", float("nan"), "no OOD frames to inspect")
        frac = float(np.mean(self.distances(d) > self.cutoff))
        kind = "domain_shift" if frac >= self.shift_fraction else "novel_class"
        reason = (
            f"{frac:.0%} of {len(d)} OOD frames have low-level statistics outside the "
            f"in-distribution {self.quantile:.0%} range (cut {self.shift_fraction:.0%})"
        )
        return NoveltyDecision(kind, frac, reason)

    def state_dict(self) -> dict[str, Any]:
        return {
            "quantile": self.quantile,
            "shift_fraction": self.shift_fraction,
            "shrinkage": self.shrinkage,
            "mean": None if self.mean is None else self.mean.tolist(),
            "precision": None if self.precision is None else self.precision.tolist(),
            "cutoff": self.cutoff,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> NoveltyClassifier:
        obj = cls(state["quantile"], state["shift_fraction"], state.get("shrinkage"))
        if state.get("mean") is not None:
            obj.mean = np.asarray(state["mean"], dtype=np.float64)
            obj.precision = np.asarray(state["precision"], dtype=np.float64)
            obj.cutoff = float(state["cutoff"])
        return obj
