"""OOD metrics as OpenOOD reports them: in-distribution is the positive class.

Scores follow the detector convention: higher = more in-distribution.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from edge_runtime.errors import InputError


def _check(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(id_scores, dtype=np.float64).ravel()
    b = np.asarray(ood_scores, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise InputError("OOD metrics need at least one ID and one OOD score")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("OOD scores contain NaN or Inf")
    return a, b


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve with ID as positive (0.5 = chance, 1 = perfect)."""
    a, b = _check(id_scores, ood_scores)
    y = np.r_[np.ones(a.size), np.zeros(b.size)]
    return float(roc_auc_score(y, np.r_[a, b]))


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted at the threshold that keeps ``tpr`` of ID samples."""
    a, b = _check(id_scores, ood_scores)
    # The largest threshold t with mean(a >= t) >= tpr (as OpenOOD reads it off the ROC curve).
    a_sorted = np.sort(a)
    thr = a_sorted[a.size - math.ceil(tpr * a.size - 1e-9)]
    return float(np.mean(b >= thr))


def aupr_in(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Average precision with ID as positive and the score as is."""
    a, b = _check(id_scores, ood_scores)
    return float(average_precision_score(np.r_[np.ones(a.size), np.zeros(b.size)], np.r_[a, b]))


def aupr_out(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Average precision with OOD as positive and the negated score."""
    a, b = _check(id_scores, ood_scores)
    return float(average_precision_score(np.r_[np.zeros(a.size), np.ones(b.size)], -np.r_[a, b]))


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """AUROC, FPR@95TPR, AUPR-in and AUPR-out, all as fractions in [0, 1]."""
    return {
        "auroc": auroc(id_scores, ood_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores, 0.95),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
    }
