"""The detector side of meta-learning: a new domain's OOD threshold, right from few shots.

The memory bank calibrates a new domain's threshold as the ``1 - tpr`` quantile of its shots'
leave-one-out k-NN scores. From 50 shots that quantile is a single order statistic near the
bottom (the 3rd lowest score), so it is noisy, and it is biased: a held-out frame is scored
against all shots, a shot only against the others. The correction here is a function learned
across meta-training episodes: from statistics of the few shots' scores (the bank's threshold,
the mean, spread and lower quantiles of the shots' own scores, the shot count) to the offset
between the bank's threshold and the threshold that gives exactly ``tpr`` on that domain's
held-out frames. It is a ridge regression: few parameters, fitted in seconds, and monotone
enough not to surprise (the corrected threshold is clipped to the shots' score range).

Only public :class:`~edge_runtime.hdc.bank.DomainMemoryBank` calls are used: ``add_domain``
returns the threshold, ``scores`` gives raw similarities (the shots' own scores include each
shot itself; the regression absorbs that known bias).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.hdc.bank import DomainMemoryBank
from edge_runtime.hdc.base import threshold_for_tpr

FEATURES = ("1", "mean-t", "std", "q10-t", "q25-t", "std/sqrt(n)")


def shot_statistics(threshold: float, own_scores: np.ndarray) -> np.ndarray:
    """The regression's inputs: see :data:`FEATURES` (all in the bank's raw score units,
    relative to the bank's threshold so the fit is shift-invariant)."""
    s = np.asarray(own_scores, dtype=np.float64)
    if s.size < 2:
        raise InputError("a threshold correction needs at least 2 shots")
    t = float(threshold)
    sd = float(s.std())
    return np.array(
        [
            1.0,
            float(s.mean()) - t,
            sd,
            float(np.quantile(s, 0.10)) - t,
            float(np.quantile(s, 0.25)) - t,
            sd / np.sqrt(s.size),
        ]
    )


@dataclass
class ThresholdCorrection:
    """``threshold + coef . stats``, clipped to the shots' own score range."""

    coef: np.ndarray = field(default_factory=lambda: np.zeros(len(FEATURES)))
    tpr: float = 0.95
    fitted_on: int = 0

    def offset(self, threshold: float, own_scores: np.ndarray) -> float:
        return float(self.coef @ shot_statistics(threshold, own_scores))

    def apply(self, threshold: float, own_scores: np.ndarray) -> float:
        s = np.asarray(own_scores, dtype=np.float64)
        corrected = float(threshold) + self.offset(threshold, s)
        # Never further from the bank's value than the shots' own spread: a wild extrapolation
        # on an unlike domain would otherwise reject (or accept) everything.
        span = float(s.max() - s.min()) if s.size else 0.0
        return float(np.clip(corrected, threshold - span, threshold + span))

    @classmethod
    def fit(
        cls, stats: np.ndarray, targets: np.ndarray, tpr: float, ridge: float = 1e-3
    ) -> ThresholdCorrection:
        """Ridge fit of ``targets`` (true threshold minus the bank's) on ``stats`` rows."""
        x = np.asarray(stats, dtype=np.float64)
        y = np.asarray(targets, dtype=np.float64)
        if x.ndim != 2 or len(x) != len(y) or len(x) < x.shape[1]:
            raise InputError(f"need at least {len(FEATURES)} episodes to fit, got {len(x)}")
        reg = ridge * np.eye(x.shape[1])
        reg[0, 0] = 0.0  # the intercept is not shrunk
        coef = np.linalg.solve(x.T @ x + reg * len(x), x.T @ y)
        return cls(coef=coef, tpr=float(tpr), fitted_on=len(x))

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(FEATURES),
            "coef": [float(v) for v in self.coef],
            "tpr": self.tpr,
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ThresholdCorrection:
        try:
            if list(d["features"]) != list(FEATURES):
                raise CheckpointError(
                    f"threshold correction features {d['features']} are not {list(FEATURES)}"
                )
            coef = np.asarray(d["coef"], dtype=np.float64)
            if coef.shape != (len(FEATURES),) or not np.isfinite(coef).all():
                raise CheckpointError(f"threshold correction coef is not {len(FEATURES)} finite")
            return cls(coef=coef, tpr=float(d["tpr"]), fitted_on=int(d.get("fitted_on", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"threshold correction is malformed: {exc}") from exc


def domain_threshold(
    bank: DomainMemoryBank,
    domain_id: int,
    shots_x: np.ndarray,
    shots_y: np.ndarray,
    correction: ThresholdCorrection | None,
) -> tuple[float, float]:
    """Add the domain to ``bank``; returns (bank threshold, corrected threshold) and leaves the
    corrected one in the bank (the bank's own if ``correction`` is None)."""
    t = float(bank.add_domain(domain_id, shots_x, shots_y))
    if correction is None:
        return t, t
    col = bank.domain_ids.index(int(domain_id))
    own = bank.scores(shots_x)[:, col]
    corrected = correction.apply(t, own)
    bank.set_threshold(domain_id, corrected)
    return t, corrected


def correction_episodes(
    bank: DomainMemoryBank,
    domains: Sequence[tuple[np.ndarray, np.ndarray]],
    shot_counts: Sequence[int],
    draws: int,
    tpr: float,
    seed: int = 0,
    domain_id: int = 9_000,
) -> tuple[np.ndarray, np.ndarray]:
    """(stats, targets) from ``draws`` random shot sets of each size on each domain: the bank
    gets the shots as a temporary domain, the rest of the domain's frames are its held-out
    frames, and the target is their exact-``tpr`` threshold minus the bank's."""
    rng = np.random.default_rng(seed)
    stats, targets = [], []
    for x, y in domains:
        for n in shot_counts:
            if n >= len(x) - 20:
                continue
            for _ in range(draws):
                perm = rng.permutation(len(x))
                s, h = perm[:n], perm[n:]
                t = float(bank.add_domain(domain_id, x[s], y[s]))
                try:
                    col = bank.domain_ids.index(domain_id)
                    own = bank.scores(x[s])[:, col]
                    held = bank.scores(x[h])[:, col]
                finally:
                    bank.remove_domain(domain_id)
                stats.append(shot_statistics(t, own))
                targets.append(threshold_for_tpr(held, tpr) - t)
    return np.asarray(stats), np.asarray(targets)
