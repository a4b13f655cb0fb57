"""The shape every OOD detector shares (pytorch-ood / OpenOOD style).

``fit(features, labels) -> self``, ``score(features) -> (N,) float32`` with
higher = more in-distribution, ``calibrate(features, tpr)`` to set a threshold
on held-out in-distribution features, and ``predict`` (True = in-distribution).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

from edge_runtime.errors import InputError
from edge_runtime.hdc.projection import check_features


def check_labels(labels: np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    """Validate (N,) non-negative integer labels and return them as int64."""
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if t.ndim != 1 or t.shape[0] != n:
        raise InputError(f"labels must have shape ({n},), got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise InputError(f"labels must be integers, got {t.dtype}")
    if n and int(t.min()) < 0:
        raise InputError("labels must be >= 0")
    return t.to(torch.int64)


def threshold_for_tpr(scores: np.ndarray, tpr: float) -> float:
    """Largest threshold t with mean(scores >= t) >= tpr on these scores."""
    if not 0.0 < tpr < 1.0:
        raise InputError(f"tpr must lie in (0, 1), got {tpr}")
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise InputError("cannot calibrate a threshold on zero scores")
    # Keep the ceil(tpr * n) highest scores: the exact order statistic, no interpolation.
    keep = math.ceil(tpr * s.size - 1e-9)
    return float(s[s.size - keep])


class OODDetector(ABC):
    """Base class: subclasses implement ``fit`` and ``_score`` on validated float32 tensors."""

    threshold: float | None = None
    in_features: int | None = None

    @abstractmethod
    def fit(self, features: np.ndarray, labels: np.ndarray) -> OODDetector: ...

    @abstractmethod
    def _score(self, x: torch.Tensor) -> torch.Tensor: ...

    def _checked(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        if self.in_features is None:
            raise InputError(
                f"{type(self).__name__} is not fitted: call fit(features, labels) first"
            )
        return check_features(features, self.in_features)

    def score(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,) float32 OOD score, higher = more in-distribution."""
        return self._score(self._checked(features)).detach().cpu().numpy().astype(np.float32)

    def calibrate(self, features: np.ndarray | torch.Tensor, tpr: float = 0.95) -> float:
        """Set ``threshold`` so ``tpr`` of these held-out ID features are accepted."""
        self.threshold = threshold_for_tpr(self.score(features), tpr)
        return self.threshold

    def predict(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Bool mask, True = in-distribution (score >= calibrated threshold)."""
        if self.threshold is None:
            raise InputError(
                f"{type(self).__name__} has no threshold: call calibrate(features) first"
            )
        return self.score(features) >= self.threshold
