"""Scoring: detection, delay, false alarms, OOD metrics and forgetting on hand-built runs."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.scoring import ServedFrames, adapted_mask, auroc, fpr_at_tpr, score_run


def test_auroc_and_fpr_match_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    ref = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[pos, neg])
    assert auroc(pos, neg) == pytest.approx(ref)
    assert fpr_at_tpr(np.arange(100.0), np.array([-1.0, 50.0])) == 0.5


def _run(flags: list[int], finished: list[tuple[int, int]]):
    # Three segments of 100 frames: 0 base, 1 shift, 2 shift.
    seg = np.repeat(np.arange(3), 100)
    labels = np.zeros(300, np.int64)
    pred = labels.copy()
    pred[100:150] = 1  # wrong until adapted
    is_novel = np.zeros(300, bool)
    is_novel[100:200] = True
    score = np.where(is_novel, -1.0, 1.0).astype(np.float32)
    events = [{"type": "drift", "frame": f, "time": 0.0} for f in flags]
    events += [
        {"type": "adaptation_started", "frame": a, "labels": 20, "trigger_frame": t}
        for t, a in finished
    ]
    events += [{"type": "adaptation_finished", "frame": a, "trigger_frame": t} for t, a in finished]
    served = ServedFrames(pred, score, np.zeros(300, np.int64), score < 0, np.zeros(300, bool))
    return score_run(
        served,
        labels=labels,
        segment=seg,
        segment_is_shift=np.array([False, True, True]),
        is_novel=is_novel,
        eval_labels=np.zeros(6, np.int64),
        eval_segment=np.repeat(np.arange(3), 2),
        eval_prediction=np.array([0, 1, 0, 0, 0, 0]),
        eval_prediction_before_drift=np.zeros(6, np.int64),
        events=events,
        label_budget=20,
    )


def test_detection_delay_and_false_alarms() -> None:
    m = _run(flags=[50, 130, 140, 210], finished=[(130, 160)])
    segs = m["segments"]
    assert segs[0]["detected"] is None and segs[1]["detected"] and segs[2]["detected"]
    assert segs[1]["detection_delay"] == 30 and segs[2]["detection_delay"] == 10
    assert m["false_alarms"] == 2 and m["false_alarm_frames"] == [50, 140]
    assert m["median_detection_delay"] == 20
    assert m["forgetting"] == 50.0  # base eval went from 2/2 to 1/2
    assert m["labels_used"] == 20
    assert segs[1]["prequential_accuracy"] == 50.0
    # Novel frames before adaptation (100..159) score -1, ID frames +1: perfectly separated.
    assert m["ood_auroc"] == 1.0 and m["ood_negatives"] == 60


def test_undetected_shift_and_adapted_mask() -> None:
    m = _run(flags=[], finished=[])
    assert m["segments"][1]["detected"] is False and m["all_shifts_detected"] is False
    mask = adapted_mask(
        np.repeat(np.arange(2), 5),
        np.array([False, True]),
        [{"type": "adaptation_finished", "frame": 7, "trigger_frame": 6}],
    )
    assert mask.tolist() == [True] * 5 + [False, False, True, True, True]
