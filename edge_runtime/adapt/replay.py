"""Class-balanced replay buffers: a few stored features per class, per domain.

A new adaptor version (new classes in a known domain) or a new domain's head is trained on its
few labelled shots plus a replay sample, so it keeps predicting what the runtime already knew
instead of only the new labels (the frozen encoder makes stored features exactly reusable).
"""

from __future__ import annotations

import numpy as np

from edge_runtime.errors import InputError

#: Default number of stored features per class.
PER_CLASS = 50


def balanced_indices(labels: np.ndarray, per_class: int = PER_CLASS, seed: int = 0) -> np.ndarray:
    """Sorted row indices: at most ``per_class`` random rows of every class (deterministic)."""
    y = np.asarray(labels, dtype=np.int64)
    if per_class <= 0:
        raise InputError(f"replay per_class must be > 0, got {per_class}")
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y).tolist()]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def balanced_sample(
    features: np.ndarray, labels: np.ndarray, per_class: int = PER_CLASS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``per_class`` random rows of every class (classes ascending, deterministic)."""
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or y.shape != (len(x),):
        raise InputError(f"replay: features {x.shape} and labels {y.shape} do not match")
    idx = balanced_indices(y, per_class, seed)
    return np.ascontiguousarray(x[idx]), y[idx].copy()


def merge_replay(
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    per_class: int = PER_CLASS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One balanced buffer from two (e.g. a domain's buffer and its new classes' shots)."""
    x = np.concatenate([a[0], b[0]]).astype(np.float32)
    y = np.concatenate([a[1], b[1]]).astype(np.int64)
    return balanced_sample(x, y, per_class, seed)
