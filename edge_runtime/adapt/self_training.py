"""Self-training: a new domain's head refitted on its own unlabelled frames, pseudo-labelled.

Labels are the operator's cost; the frames the router sends to a new domain after its head is
trained are free. A head trained on 50 shots labels those frames well enough where it is most
confident, and refitting on the shots plus the confident frames recovers much of what the
other 150 labels of the default budget would have bought (``benchmarks/bench_self_training.py``:
an isolated conv@13 adaptor, 50 labels and 450 unlabelled frames, three rounds: MNIST 79.5 ->
92.0 against 93.3 at 200 labels, fog 71.7 -> 78.1 against 82.0, noise 70.1 -> 74.0 against
77.0; six segments' mean 72.2 -> 78.9 against 83.4). In the runtime the gain is smaller (see
the config field's comment).

Two things keep the pseudo-labels from running away (confirmation bias):

* **class balance**: each round keeps at most the same number of frames per predicted class,
  the most confident first, so one class that the head over-predicts cannot swamp the refit;
* **a curriculum**: the share kept grows over the rounds (``fraction / rounds`` of the pool,
  then twice that, ...), and each round refits from the initialisation, not from the last
  round's weights, so an early mistake is re-judged by a better head.

The pseudo-labelled frames take their weight from the shots' share only: replay keeps the half
it has in the first training, shots and guesses split the other half. Taking it from replay as
well (a third each) shifted a new-classes domain's prior toward its new classes, and the base
frames the router sends there by mistake (shirts among T-shirts and coats) were called a new
class more often: fashion-drift at 200 labels, base-class frames served by that domain 67% ->
54% right, forgetting 1.3 -> 4.0 points.

This module is the functional core: :func:`select_pseudo` and :func:`with_pseudo` are pure,
:func:`self_train` takes the fitting step as a callable (the executor's init + training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_runtime.errors import InputError

#: The pseudo-labelled frames' part of the shots' weight in the refit.
PSEUDO_SHARE = 0.5


@dataclass(frozen=True)
class SelfTrainingSpec:
    """How a head is refitted on its domain's unlabelled frames.

    ``pool``: frames collected before the refit; ``rounds``: pseudo-label / refit rounds;
    ``fraction``: the share of the pool kept in the last round (class-balanced)."""

    pool: int = 450
    rounds: int = 3
    fraction: float = 0.7

    def __post_init__(self) -> None:
        if self.pool < 1 or self.rounds < 1:
            raise InputError(f"self-training needs pool >= 1 and rounds >= 1, got {self}")
        if not 0.0 < self.fraction <= 1.0:
            raise InputError(f"self-training fraction must be in (0, 1], got {self.fraction}")


def select_pseudo(
    logits: np.ndarray, label_map: list[int], keep: int, classes: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-balanced confident frames: (row indices, global labels, confidences).

    At most ``ceil(keep / len(classes))`` rows per predicted class, most confident first.
    ``classes`` (global ids): the classes the balance is counted over, the shots' classes; a
    head that also knows replayed classes may predict those, under the same per-class cap.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[1] != len(label_map):
        raise InputError(f"logits must have shape (N, {len(label_map)}), got {tuple(logits.shape)}")
    empty = np.zeros(0, np.int64)
    if keep <= 0 or len(logits) == 0:
        return empty, empty, np.zeros(0, np.float32)
    prob = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    local = prob.argmax(1)
    conf = prob[np.arange(len(prob)), local]
    n_cls = len(classes) if classes else len(label_map)
    per = -(-int(keep) // max(n_cls, 1))
    picked = []
    for c in np.unique(local):
        rows = np.flatnonzero(local == c)
        picked.append(rows[np.argsort(-conf[rows], kind="stable")][:per])
    idx = np.sort(np.concatenate(picked)) if picked else empty
    return idx, np.asarray(label_map, np.int64)[local[idx]], conf[idx].astype(np.float32)


def with_pseudo(
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    px: np.ndarray,
    py: np.ndarray,
    shots: int | None = None,
    share: float = PSEUDO_SHARE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labelled rows plus pseudo-labelled ones, which take ``share`` of the weight of the
    last ``shots`` rows (the labelled shots; the rows before them are replay and keep theirs).
    ``shots=None``: every row is a shot."""
    w = np.full(len(y), 1.0 / max(len(y), 1), np.float64) if weight is None else weight
    w = np.asarray(w, np.float64)
    w = w / max(float(w.sum()), 1e-12)
    if len(py) == 0:
        return x, y, w.astype(np.float32)
    first = 0 if not shots else max(0, len(y) - int(shots))
    moved = float(w[first:].sum()) * share
    w = w.copy()
    w[first:] *= 1.0 - share
    w_all = np.concatenate([w, np.full(len(py), moved / len(py))])
    return (
        np.concatenate([x, px.astype(np.float32)]),
        np.concatenate([y, py.astype(np.int64)]),
        w_all.astype(np.float32),
    )


#: fit(x, y, weight) -> a head initialised and trained on those rows
Fit = Callable[[np.ndarray, np.ndarray, np.ndarray | None], Any]


def self_train(
    head: Any,
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    pool: np.ndarray,
    fit: Fit,
    spec: SelfTrainingSpec,
    classes: list[int],
    truth: np.ndarray | None = None,
    shots: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Rounds of pseudo-labelling ``pool`` with the current head and refitting on the labelled
    rows (``x``, ``y``, ``weight``) plus the kept frames; returns the last head and a report.

    ``head``: the head trained on the labelled rows (it labels the first round). ``pool``: the
    unlabelled rows in the head's input space. ``shots``: how many of the last labelled rows
    are shots (see :func:`with_pseudo`). ``truth``: the pool's true labels where a
    benchmark knows them (reported as pseudo-label accuracy, never used to select).
    """
    pool = np.asarray(pool, dtype=np.float32)
    rounds: list[dict[str, Any]] = []
    for r in range(spec.rounds):
        keep = round(len(pool) * spec.fraction * (r + 1) / spec.rounds)
        idx, py, conf = select_pseudo(head.logits(pool), list(head.label_map), keep, classes)
        fx, fy, fw = with_pseudo(x, y, weight, pool[idx], py, shots)
        head = fit(fx, fy, fw)
        row: dict[str, Any] = {
            "kept": len(idx),
            "mean_confidence": round(float(conf.mean()), 4) if len(conf) else None,
        }
        if truth is not None and len(idx):
            row["pseudo_accuracy"] = round(float((py == truth[idx]).mean()), 4)
        rounds.append(row)
    return head, {"pool": len(pool), "rounds": rounds}
