"""Router: pick the domain for each frame from calibrated per-domain scores.

Scores come from ``DomainMemoryBank.calibrated_scores`` (N, S): 0 is each domain's own calibrated
threshold, so columns are comparable. A frame goes to the best-scoring domain and is
in-distribution iff that score is >= ``threshold`` (0 by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import InputError


@dataclass
class RouteDecision:
    domain: np.ndarray  # (N,) int64 domain id, -1 when no domain exists
    score: np.ndarray  # (N,) float32 best calibrated score (-inf when no domain / all NaN)
    is_ood: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.domain)


class Router:
    """Argmax routing. Ties go to the earliest column (the older domain): deterministic, and an
    older domain has seen more data. NaN scores count as -inf (never chosen over a real score)."""

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = float(threshold)

    def route(
        self, calibrated_scores: np.ndarray, domain_ids: Sequence[int] | None = None
    ) -> RouteDecision:
        s = np.asarray(calibrated_scores, dtype=np.float32)
        if s.ndim != 2:
            raise InputError(f"calibrated_scores must be (N, S), got shape {s.shape}")
        n, k = s.shape
        ids = (
            np.arange(k, dtype=np.int64)
            if domain_ids is None
            else np.asarray(domain_ids, dtype=np.int64)
        )
        if len(ids) != k:
            raise InputError(f"domain_ids has {len(ids)} entries for {k} score columns")
        if k == 0:
            return RouteDecision(
                np.full(n, -1, dtype=np.int64),
                np.full(n, -np.inf, dtype=np.float32),
                np.ones(n, dtype=bool),
            )
        if n == 1 and k <= 64:  # the per-frame case, in plain Python: numpy's per-call cost
            row = [-math.inf if v != v else v for v in s[0].tolist()]  # NaN -> -inf
            c = max(range(k), key=row.__getitem__)  # first maximum on ties
            top = row[c]
            dom = -1 if top == -math.inf else int(ids[c])
            return RouteDecision(
                np.array([dom], dtype=np.int64),
                np.array([top], dtype=np.float32),
                np.array([not top >= self.threshold]),
            )
        s = np.where(np.isnan(s), -np.inf, s)
        col = s.argmax(1)  # first maximum on ties
        best = s[np.arange(n), col]
        domain = np.where(best == -np.inf, -1, ids[col]).astype(np.int64)
        return RouteDecision(domain, best.astype(np.float32), ~(best >= self.threshold))
