"""Scoring: detection, delay, false alarms, OOD metrics and forgetting on hand-built runs."""

from __future__ import annotations

import numpy as np
import pytest
from scoring_cases import score_served

from edge_runtime.scoring import (
    ServedFrames,
    adapted_mask,
    auroc,
    baseline_accuracies,
    fpr_at_tpr,
    label_account,
    return_segments,
    score_run,
    segment_domains,
)


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


def _seg_meta(*domains: tuple[str, str | None, list[int]]) -> dict:
    return {
        "segments": [
            {"id": i, "name": f"s{i}", "source": src, "corruption": c, "severity": 3 if c else 0}
            | {"labels": labels}
            for i, (src, c, labels) in enumerate(domains)
        ]
    }


def test_return_segments_from_metadata_not_layout() -> None:
    # fashion-drift's layout: the clean return is the last segment; new classes of the base
    # source are not a return (new labels), nor is a continuation of the same distribution.
    base, new = [0, 1, 2], [6, 7]
    meta = _seg_meta(
        ("fashion", None, base),
        ("fashion", "fog", base),
        ("fashion", "fog", base),  # continues segment 1
        ("fashion", None, new),
        ("fashion", None, base),
    )
    assert return_segments(meta, 5) == {4: 0}
    # A return that is not the last segment, and one to a shift segment.
    meta = _seg_meta(
        ("fashion", None, base),
        ("fashion", "fog", base),
        ("fashion", None, base[:2]),
        ("fashion", "fog", base),
        ("mnist", None, [10]),
    )
    assert return_segments(meta, 5) == {2: 0, 3: 1}
    # The stream's own labels win over the metadata's.
    assert return_segments(meta, 5, segment_labels=[base, base, new, base, [10]]) == {3: 1}
    assert return_segments(_seg_meta(("fashion", None, base), ("mnist", None, [10])), 2) == {}
    # Nothing to tell a return by: unknown, not "no returns".
    assert return_segments({}, 3) is None
    assert return_segments(None, 3) is None
    assert return_segments({"segments": [{"name": "a"}, {"name": "a"}]}, 2) is None
    assert segment_domains([False, True, False, True], {3: 0}) == [0, 1, 1, 0]


def test_labels_per_drift_counts_revealed_labels_not_the_budget() -> None:
    events = [
        {"type": "labels_requested", "frame": 10, "labels": 20},
        {"type": "adaptation_started", "frame": 30, "trigger_frame": 10, "labels": 20},
        # The run ended while the second collection had received 7 of its 20 labels.
        {"type": "labels_requested", "frame": 50, "labels": 20},
    ]
    acc = label_account(events, labels_revealed=27)
    assert acc.flags == [10, 50] and acc.per_flag == [20, 7] and acc.unattributed == 0
    # Labels revealed outside every collection are not hidden in a flag's count.
    acc = label_account(events[:2], labels_revealed=25)
    assert acc.per_flag == [20] and acc.unattributed == 5
    seg = np.repeat(np.arange(2), 40)
    served = ServedFrames(
        np.zeros(80, np.int64),
        np.ones(80, np.float32),
        np.zeros(80, np.int64),
        np.zeros(80, bool),
        np.zeros(80, bool),
    )
    m = score_served(
        served,
        labels=np.zeros(80, np.int64),
        segment=seg,
        segment_is_shift=np.array([False, True]),
        is_novel=np.zeros(80, bool),
        events=events,
        label_budget=20,
        labels_revealed=27,
    )
    assert m["labels_per_drift"] == [20, 7] and m["labels_used"] == 27
    assert [s["labels"] for s in m["segments"]] == [20, 7]
    assert m["return_segments"] is None  # no metadata


def test_score_run_marks_returns_and_new_adaptors_per_segment() -> None:
    seg = np.repeat(np.arange(3), 50)
    labels = np.tile(np.arange(2), 75).astype(np.int64)
    domain = np.r_[np.zeros(50), np.ones(50), np.full(50, 2)].astype(np.int64)
    served = ServedFrames(
        labels, np.ones(150, np.float32), domain, np.zeros(150, bool), np.zeros(150, bool)
    )
    events = [
        {"type": "adaptation_started", "frame": 70, "trigger_frame": 60, "labels": 10},
        {"type": "adaptation_finished", "frame": 75, "trigger_frame": 60, "action": "new"},
        {"type": "adaptation_started", "frame": 120, "trigger_frame": 110, "labels": 10},
        # The runtime names growth "grow" (it once said "new"); both create an adaptor.
        {"type": "adaptation_finished", "frame": 125, "trigger_frame": 110, "action": "grow"},
        {"type": "adaptation_finished", "frame": 130, "trigger_frame": 110, "action": "extend"},
    ]
    m = score_served(
        served,
        labels=labels,
        segment=seg,
        segment_is_shift=np.array([False, True, True]),
        is_novel=np.r_[np.zeros(50, bool), np.ones(50, bool), np.zeros(50, bool)],
        events=events,
        label_budget=10,
        stream_meta=_seg_meta(("a", None, [0, 1]), ("a", "fog", [0, 1]), ("a", None, [0, 1])),
    )
    assert m["return_segments"] == {"2": 0}
    segs = m["segments"]
    assert [s["returns_to"] for s in segs] == [None, None, 0]
    assert [s["new_adaptors"] for s in segs] == [0, 1, 1]
    assert [s["adaptations"] for s in segs] == [0, 1, 2]
    assert [s["adaptor"] for s in segs] == [0, 1, 2]


def _two_domains(rng: np.random.Generator, n: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    # Domain B puts each class where domain A has the other one: one head cannot serve both.
    y = rng.integers(0, 2, n).astype(np.int64)
    centre = np.where((y == 1) ^ flip, 1.0, -1.0)[:, None]
    x = centre * np.ones((n, 8)) + rng.normal(0, 0.3, (n, 8))
    return x.astype(np.float32), y


def test_joint_is_an_upper_bound_with_per_domain_heads_and_oracle_routing() -> None:
    rng = np.random.default_rng(0)
    train_x, train_y = _two_domains(rng, 200, flip=False)
    seg_x, seg_y = zip(
        *[_two_domains(rng, 100, flip) for flip in (False, True, False)], strict=True
    )
    stream_x, stream_y = np.concatenate(seg_x), np.concatenate(seg_y)
    stream_seg = np.repeat(np.arange(3), 100)
    ev = [_two_domains(rng, 40, flip) for flip in (False, True, False)]
    eval_x = np.concatenate([x for x, _ in ev])
    eval_y = np.concatenate([y for _, y in ev])
    eval_seg = np.repeat(np.arange(3), 40)
    # The runtime's labels: a few frames after each flag (segment 1 and the return, 2).
    labelled = [(seg_x[1][:6], seg_y[1][:6]), (seg_x[2][:6], seg_y[2][:6])]
    b = baseline_accuracies(
        train_x,
        train_y,
        labelled,
        eval_x,
        eval_y,
        eval_seg,
        stream_x=stream_x,
        stream_labels=stream_y,
        stream_segment=stream_seg,
        segment_is_shift=np.array([False, True, True]),
        returns={2: 0},
        steps=60,
        lr=5e-2,
    )
    assert b["joint_domain_of_segment"] == [0, 1, 0]
    assert b["joint_frames_per_domain"] == {"0": 400, "1": 100}
    joint = b["joint_per_segment"]
    for weaker in ("single_head_on_budget_labels", "naive_finetune"):
        assert all(j >= w for j, w in zip(joint, b[f"{weaker}_per_segment"], strict=True))
    # The single head cannot fit both mappings; oracle-routed per-domain heads can.
    assert b["single_head_on_budget_labels_per_segment"][1] < 50.0
    assert b["joint_mean_final_accuracy"] > b["single_head_on_budget_labels_mean_final_accuracy"]
    assert min(joint) >= 95.0


def test_a_return_confirmed_without_labels_is_a_detection_and_costs_nothing() -> None:
    # Segment 2 returns to the base; the runtime confirms it with no drift event and no labels.
    seg = np.repeat(np.arange(3), 50)
    events = [
        {"type": "drift", "frame": 60},
        {"type": "labels_requested", "frame": 60, "labels": 10},
        {"type": "adaptation_started", "frame": 70, "trigger_frame": 60, "labels": 10},
        {"type": "adaptation_finished", "frame": 72, "trigger_frame": 60, "action": "new"},
        {"type": "domain_returned", "frame": 108, "domain": 0, "labels": 0, "case": "confirmed"},
    ]
    served = ServedFrames(
        np.zeros(150, np.int64),
        np.ones(150, np.float32),
        np.r_[np.zeros(50), np.ones(50), np.zeros(50)].astype(np.int64),
        np.zeros(150, bool),
        np.zeros(150, bool),
    )
    m = score_served(
        served,
        labels=np.zeros(150, np.int64),
        segment=seg,
        segment_is_shift=np.array([False, True, True]),
        is_novel=np.zeros(150, bool),
        events=events,
        label_budget=10,
        labels_revealed=10,
    )
    ret = m["segments"][2]
    assert ret["detected"] and ret["detection_delay"] == 8 and m["false_alarms"] == 0
    assert ret["labels"] == 0 and ret["new_adaptors"] == 0 and m["labels_per_drift"] == [10]
    mask = adapted_mask(seg, np.array([False, True, True]), events)
    assert not mask[100:108].any() and mask[108:].all()
