"""Per-domain thresholds of a memory bank, calibrated for a target TPR.

A threshold comes from the domain's own frames, scored against the domain's memory. Scoring a
frame against a memory that holds it would make the threshold optimistic; holding frames out
instead would leave a few-shot domain both a smaller memory and a noisier threshold (40 of 200
shots), so every frame stays in memory and is scored leave-one-out: its k+1 nearest rows, less
itself (:meth:`BankScorer.knn` with ``own``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edge_runtime.hdc.base import threshold_for_tpr
from edge_runtime.hdc.scoring import BankScorer
from edge_runtime.hdc.segments import Segments


def calibration_rows(n: int, seed: int, limit: int) -> torch.Tensor:
    """Rows of ``n`` frames used to calibrate a threshold: all of them, or a random ``limit``
    of them for a large domain (each costs one scan of the memory)."""
    if n <= limit:
        return torch.arange(n)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.sort(rng.choice(n, limit, replace=False)))


@dataclass(frozen=True)
class Calibration:
    """Thresholds that keep ``tpr`` of a domain's frames, each from at most ``limit`` frames
    scored by ``scorer``."""

    scorer: BankScorer
    tpr: float
    limit: int

    def threshold(
        self, x: torch.Tensor, segment: Segments, own: torch.Tensor | None = None
    ) -> float:
        """The threshold for checked frames ``x`` scored against one ``segment`` (``own``: see
        :meth:`BankScorer.knn`)."""
        sim, _, _ = self.scorer.knn(x, segment, own)
        return threshold_for_tpr(sim[:, 0].cpu().numpy(), self.tpr)

    def leave_one_out(
        self, x: torch.Tensor, keep: torch.Tensor, segment: Segments, offset: int, seed: int
    ) -> float:
        """The threshold from leave-one-out scores of checked frames ``x`` against one
        ``segment``, in which ``x[keep[j]]`` is row ``offset + j``; ``seed`` draws the frames
        scored when there are more than ``limit``."""
        own = torch.full((len(x),), -1, dtype=torch.int64)
        own[keep] = torch.arange(len(keep), dtype=torch.int64) + offset
        cal = calibration_rows(len(x), seed, self.limit)
        return self.threshold(x[cal], segment, own[cal])
