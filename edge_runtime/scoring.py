"""Metrics of a run, computed from what the runtime served and the stream's ground truth.

The runtime never sees ``segment``, ``segment_is_shift`` or ``is_novel``; this module
is the only place that reads them. Definitions follow DESIGN.md ("Scoring"):

* the first drift flag inside a shift segment is its detection; the frames from the
  segment's start to it are the detection delay; every other flag is a false alarm;
* ``ood_auroc`` / ``ood_fpr95`` compare the OOD scores of ``is_novel`` frames served
  before the runtime had adapted to their segment (negatives) with the scores of frames
  without ``is_novel`` (positives: in-distribution is the positive class, as OpenOOD);
* ``forgetting`` = accuracy on segment 0's eval frames at the first drift flag (before
  any adaptation) minus the final accuracy on them, in points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Event types that are drift flags for scoring (a novel-class flag is a drift flag too).
DRIFT_EVENT_TYPES = frozenset({"drift", "novel_class"})


@dataclass
class ServedFrames:
    """Per-frame decisions for the first ``n`` stream frames, as served."""

    prediction: np.ndarray  # int64, -1 if rejected
    ood_score: np.ndarray  # float32, higher = more in-distribution
    domain: np.ndarray  # int64, -1 if none
    is_ood: np.ndarray  # bool
    rejected: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.prediction)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve for scores where ``pos`` should score higher (ties count 1/2)."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv), dtype=np.float64)
    sorted_v = allv[order]
    # Average ranks over ties (Mann-Whitney U).
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def fpr_at_tpr(pos: np.ndarray, neg: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of negatives scoring at or above the threshold that keeps ``tpr`` of positives."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    threshold = np.quantile(pos, 1.0 - tpr, method="lower")
    return float(np.mean(neg >= threshold))


def adapted_mask(
    segment: np.ndarray,
    segment_is_shift: np.ndarray,
    events: Sequence[dict[str, Any]],
) -> np.ndarray:
    """Per frame: had the runtime adapted to a distribution covering this frame's segment?

    Known from the runtime's own events: a shift segment counts as adapted from the frame at
    which an adaptation triggered by a flag inside it finished (or a flag inside it was judged
    a return to a known domain). Non-shift segments are covered by the domains that served
    the preceding distribution (segment 0 by the base domain), so they count as adapted.
    """
    n = len(segment)
    out = np.ones(n, dtype=bool)
    for s in np.flatnonzero(np.asarray(segment_is_shift, dtype=bool)):
        idx = np.flatnonzero(segment == s)
        if len(idx) == 0:
            continue
        start, stop = int(idx[0]), int(idx[-1]) + 1
        done = [
            int(e["frame"])
            for e in events
            if e.get("type") in ("adaptation_finished", "domain_returned")
            and start <= int(e.get("trigger_frame", -1)) < stop
        ]
        ready_at = min(done) if done else n
        out[start:stop] = np.arange(start, stop) >= ready_at
    return out


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float | None:
    if len(labels) == 0:
        return None
    return float(100.0 * np.mean(np.asarray(pred) == np.asarray(labels)))


def _round(x: float | None, nd: int = 3) -> float | None:
    if x is None or not np.isfinite(x):
        return None
    return round(float(x), nd)


def score_run(
    served: ServedFrames,
    *,
    labels: np.ndarray,
    segment: np.ndarray,
    segment_is_shift: np.ndarray,
    is_novel: np.ndarray,
    eval_labels: np.ndarray,
    eval_segment: np.ndarray,
    eval_prediction: np.ndarray,
    eval_prediction_before_drift: np.ndarray | None,
    events: Sequence[dict[str, Any]],
    label_budget: int,
) -> dict[str, Any]:
    """All quality metrics of a run over the frames served so far (see the module docstring).

    ``eval_prediction_before_drift`` are the eval predictions at the first drift flag (None
    when no flag was raised: then nothing changed and forgetting is 0).
    """
    n = len(served)
    labels = labels[:n]
    novel = is_novel[:n]
    adapted = adapted_mask(segment, segment_is_shift, events)[:n]
    correct = served.prediction == labels

    flags = sorted(
        int(e["frame"]) for e in events if e.get("type") in DRIFT_EVENT_TYPES and "frame" in e
    )
    flags = [f for f in flags if 0 <= f < n]
    detection_flags: set[int] = set()
    segments: list[dict[str, Any]] = []
    num_segments = len(segment_is_shift)
    adaptors_by_frame = served.domain
    for s in range(num_segments):
        idx = np.flatnonzero(segment == s)
        start = int(idx[0]) if len(idx) else n
        stop = int(idx[-1]) + 1 if len(idx) else n
        served_stop = min(stop, n)
        is_shift = bool(segment_is_shift[s])
        in_seg = [f for f in flags if start <= f < stop]
        detected: bool | None = None
        delay: int | None = None
        if is_shift:
            detected = bool(in_seg)
            if in_seg:
                delay = in_seg[0] - start
                detection_flags.add(in_seg[0])
        ev_mask = eval_segment == s
        dom = adaptors_by_frame[start:served_stop]
        dom = dom[dom >= 0]
        # The adaptor that served the segment: the most frequent domain over its last half,
        # i.e. after any adaptation to it had landed.
        tail = adaptors_by_frame[start + (served_stop - start) // 2 : served_stop]
        tail = tail[tail >= 0]
        adaptor = int(np.bincount(tail).argmax()) if len(tail) else None
        segments.append(
            {
                "id": s,
                "start": start,
                "frames": stop - start,
                "served": max(0, served_stop - start),
                "is_shift": is_shift,
                "detected": detected,
                "detection_delay": delay,
                "flags": len(in_seg),
                "prequential_accuracy": _round(
                    _accuracy(served.prediction[start:served_stop], labels[start:served_stop])
                ),
                "final_accuracy": _round(_accuracy(eval_prediction[ev_mask], eval_labels[ev_mask])),
                "eval_frames": int(ev_mask.sum()),
                "adaptor": adaptor,
                "domains_used": sorted({int(d) for d in np.unique(dom)}),
                "ood_rate": _round(float(served.is_ood[start:served_stop].mean()))
                if served_stop > start
                else None,
            }
        )
    false_alarm_frames = [f for f in flags if f not in detection_flags]
    id_frames = int(np.count_nonzero(~novel))

    pos = served.ood_score[~novel & ~served.rejected]
    neg = served.ood_score[novel & ~adapted & ~served.rejected]

    base_eval = eval_segment == 0
    final_base = _accuracy(eval_prediction[base_eval], eval_labels[base_eval])
    if eval_prediction_before_drift is not None:
        before_base = _accuracy(eval_prediction_before_drift[base_eval], eval_labels[base_eval])
    else:
        before_base = final_base
    forgetting = (
        before_base - final_base if before_base is not None and final_base is not None else None
    )

    shift_segs = [s for s in segments if s["is_shift"] and s["served"] > 0]
    delays = [s["detection_delay"] for s in shift_segs if s["detection_delay"] is not None]
    finals = [s["final_accuracy"] for s in segments if s["final_accuracy"] is not None]
    drift_budgets = [
        int(e.get("labels", 0)) for e in events if e.get("type") == "adaptation_started"
    ]
    return {
        "frames": len(segment),
        "frames_served": int(n),
        "prequential_accuracy": _round(100.0 * float(correct.mean()) if n else None),
        "false_alarms": len(false_alarm_frames),
        "false_alarm_frames": false_alarm_frames,
        "false_alarms_per_5000_id_frames": _round(5000.0 * len(false_alarm_frames) / id_frames)
        if id_frames
        else None,
        "drift_flags": len(flags),
        "all_shifts_detected": bool(all(s["detected"] for s in shift_segs)) if shift_segs else None,
        "median_detection_delay": _round(float(np.median(delays))) if delays else None,
        "ood_auroc": _round(auroc(pos, neg), 4),
        "ood_fpr95": _round(fpr_at_tpr(pos, neg, 0.95), 4),
        "ood_negatives": len(neg),
        "accuracy_base_before_drift": _round(before_base),
        "accuracy_base_final": _round(final_base),
        "forgetting": _round(forgetting),
        "mean_final_accuracy": _round(float(np.mean(finals)) if finals else None),
        "labels_used": int(sum(drift_budgets)),
        "labels_per_drift": drift_budgets,
        "label_budget": int(label_budget),
        "rejected_frames": int(served.rejected.sum()),
        "segments": segments,
    }


# ------------------------------------------------------------------------------- baselines


def _eval_mean_final(
    predict: Any, eval_x: np.ndarray, eval_labels: np.ndarray, eval_segment: np.ndarray
) -> tuple[float, list[float | None]]:
    pred = predict(eval_x)
    per = [
        _round(_accuracy(pred[eval_segment == s], eval_labels[eval_segment == s]))
        for s in np.unique(eval_segment)
    ]
    vals = [v for v in per if v is not None]
    return float(np.mean(vals)) if vals else float("nan"), per


def baseline_accuracies(
    train_x: np.ndarray,
    train_y: np.ndarray,
    labelled: Sequence[tuple[np.ndarray, np.ndarray]],
    eval_x: np.ndarray,
    eval_labels: np.ndarray,
    eval_segment: np.ndarray,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean final accuracy over segments of two single-head baselines on the same labels.

    * naive fine-tuning: one head trained on the base set, then fine-tuned in turn on each
      drift's labelled frames (its output layer grows with new labels), with nothing kept
      from earlier data: it forgets;
    * joint upper bound: one head trained on the base set and every drift's labelled frames
      together, as if all labels were available at once.

    Both use the same adaptor family (a linear head on normalised features) as the runtime's
    default, so the comparison isolates growth and routing.
    """
    import torch

    from edge_runtime.adapt.adaptor import AdaptorArch, build_adaptor, train_adaptor

    arch = AdaptorArch(kind="linear", in_dim=int(train_x.shape[1]))
    # Naive fine-tuning.
    seen = sorted({int(v) for v in train_y})
    head = build_adaptor(arch, seen, seed=seed)
    train_adaptor(head, train_x, train_y, steps=steps, lr=lr, seed=seed)
    for k, (x, y) in enumerate(labelled):
        labels = sorted(set(seen) | {int(v) for v in y})
        grown = build_adaptor(arch, labels, seed=seed + k + 1)
        with torch.no_grad():
            grown.feat_mean.copy_(head.feat_mean)
            grown.feat_std.copy_(head.feat_std)
            rows = [labels.index(c) for c in head.label_map]
            grown.head.weight[rows] = head.head.weight
            grown.head.bias[rows] = head.head.bias
        train_adaptor(grown, x, y, steps=steps, lr=lr, seed=seed + k + 1, fit_normalizer=False)
        head, seen = grown, labels
    naive, naive_per = _eval_mean_final(head.predict, eval_x, eval_labels, eval_segment)
    # Joint upper bound.
    xs = [train_x, *[x for x, _ in labelled]]
    ys = [np.asarray(train_y), *[np.asarray(y) for _, y in labelled]]
    jx, jy = np.concatenate(xs), np.concatenate(ys)
    joint_head = build_adaptor(arch, sorted({int(v) for v in jy}), seed=seed)
    train_adaptor(joint_head, jx, jy, steps=steps, lr=lr, seed=seed)
    joint, joint_per = _eval_mean_final(joint_head.predict, eval_x, eval_labels, eval_segment)
    return {
        "naive_finetune_mean_final_accuracy": _round(naive),
        "naive_finetune_per_segment": naive_per,
        "joint_mean_final_accuracy": _round(joint),
        "joint_per_segment": joint_per,
        "labelled_sets": [len(y) for _, y in labelled],
    }
