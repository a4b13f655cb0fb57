"""Acceptance checks: None is never a pass, labels are counted, returns are found by metadata."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from scoring_cases import score_served

from edge_runtime.acceptance import CHECKS, acceptance_checks
from edge_runtime.scoring import ServedFrames


def _segment(i: int, *, adaptor: int, labels: int, new: int, shift: bool) -> dict[str, Any]:
    return {
        "id": i,
        "served": 100,
        "frames": 100,
        "is_shift": shift,
        "detected": True if shift else None,
        "adaptor": adaptor,
        "labels": labels,
        "new_adaptors": new,
    }


def _passing() -> dict[str, Any]:
    """A metrics dict on which every check passes: a base, one shift, a free return."""
    return {
        "segments": [
            _segment(0, adaptor=0, labels=0, new=0, shift=False),
            _segment(1, adaptor=1, labels=200, new=1, shift=True),
            _segment(2, adaptor=0, labels=0, new=0, shift=True),
        ],
        "return_segments": {"2": 0},
        "median_detection_delay": 25.0,
        "false_alarms_per_5000_id_frames": 0.0,
        "forgetting": 0.5,
        "mean_final_accuracy": 80.0,
        "baselines": {
            "naive_finetune_mean_final_accuracy": 40.0,
            "joint_mean_final_accuracy": 84.0,
        },
        "labels_per_drift": [200],
        "label_budget": 200,
        "labels_used": 200,
        "labels_revealed": 200,
        "labels_unattributed": 0,
        "max_serving_gap_s": 0.1,
    }


def test_all_pass_only_when_every_check_is_measured_and_true() -> None:
    checks = acceptance_checks(_passing())
    assert all(checks[k] is True for k in CHECKS)
    assert checks["all_pass"] is True and checks["failed"] == [] and checks["not_measured"] == []
    # An unmeasured check is reported as such and is not a pass.
    m = _passing()
    del m["max_serving_gap_s"]
    checks = acceptance_checks(m)
    assert checks["max_serving_gap_le_1s"] is None
    assert checks["not_measured"] == ["max_serving_gap_le_1s"] and checks["failed"] == []
    assert checks["all_pass"] is False
    m = _passing()
    m["forgetting"] = 3.0
    checks = acceptance_checks(m)
    assert checks["failed"] == ["forgetting_le_1"] and checks["all_pass"] is False


def test_joint_gap_is_measured_against_the_upper_bound() -> None:
    m = _passing()
    m["baselines"]["joint_mean_final_accuracy"] = 88.8
    assert acceptance_checks(m)["within_5_of_joint"] is False
    del m["baselines"]
    checks = acceptance_checks(m)
    assert checks["within_5_of_joint"] is None and checks["gain_over_naive_ge_10"] is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"labels_per_drift": [240]}, False),  # a flag revealed more than its budget
        ({"labels_used": 400, "labels_revealed": 400}, False),  # counts not what was revealed
        ({"labels_unattributed": 5}, False),  # labels revealed outside every collection
        ({"labels_per_drift": [240], "labels_used": None, "labels_revealed": None}, False),
        ({"labels_used": None, "labels_revealed": None}, None),  # nothing to cross-check
        ({"labels_per_drift": [120], "labels_used": 120, "labels_revealed": 120}, True),
    ],
)
def test_labels_within_budget_is_measured(change: dict[str, Any], expected: bool | None) -> None:
    m = _passing()
    m.update(change)
    assert acceptance_checks(m)["labels_within_budget"] is expected


def test_a_return_served_by_a_new_adaptor_or_with_labels_fails() -> None:
    m = _passing()
    m["segments"][2].update(adaptor=2, new_adaptors=1)
    checks = acceptance_checks(m)
    assert checks["returns_route_to_known_domain"] is False
    m = _passing()
    m["segments"][2]["adaptor"] = 1  # routed to a known domain, but the wrong one
    assert acceptance_checks(m)["returns_route_to_known_domain"] is False
    m = _passing()
    m["segments"][2]["labels"] = 200
    assert acceptance_checks(m)["returns_cost_no_labels"] is False
    # The return is not assumed to be the last segment, nor to go to the base domain.
    m = _passing()
    m["segments"].append(_segment(3, adaptor=2, labels=200, new=1, shift=True))
    m["segments"][1].update(adaptor=1)
    m["return_segments"] = {"2": 0}
    assert acceptance_checks(m)["returns_route_to_known_domain"] is True
    m["return_segments"] = {"2": 0, "3": 1}
    assert acceptance_checks(m)["returns_route_to_known_domain"] is False
    assert acceptance_checks(m, returns={2: 0})["returns_route_to_known_domain"] is True


def test_returns_are_unmeasured_without_metadata() -> None:
    m = _passing()
    m["return_segments"] = None
    checks = acceptance_checks(m)
    assert checks["returns_route_to_known_domain"] is None
    assert checks["returns_cost_no_labels"] is None and checks["all_pass"] is False
    # Described, but the stream never returns: nothing was shown either.
    m["return_segments"] = {}
    assert acceptance_checks(m)["returns_route_to_known_domain"] is None


def test_checks_on_a_scored_run_with_a_new_adaptor_in_the_return() -> None:
    # Base, fog, then back to the base distribution; the runtime grew a domain for the return.
    seg = np.repeat(np.arange(3), 100)
    labels = np.zeros(300, np.int64)
    domain = np.r_[np.zeros(100), np.ones(100), np.full(100, 2)].astype(np.int64)
    events: list[dict[str, Any]] = []
    for trigger, new in ((110, 1), (210, 2)):
        done = trigger + 25
        events += [
            {"type": "drift", "frame": trigger},
            {"type": "labels_requested", "frame": trigger, "labels": 20},
            {"type": "adaptation_started", "frame": done, "trigger_frame": trigger, "labels": 20},
            {"type": "adaptation_finished", "frame": done, "trigger_frame": trigger, "domain": new},
        ]
    meta = {
        "segments": [
            {"id": 0, "source": "fashion", "corruption": None, "severity": 0},
            {"id": 1, "source": "fashion", "corruption": "fog", "severity": 4},
            {"id": 2, "source": "fashion", "corruption": None, "severity": 0},
        ]
    }
    m = score_served(
        ServedFrames(
            labels, np.ones(300, np.float32), domain, np.zeros(300, bool), np.zeros(300, bool)
        ),
        labels=labels,
        segment=seg,
        segment_is_shift=np.array([False, True, True]),
        is_novel=np.r_[np.zeros(100, bool), np.ones(100, bool), np.zeros(100, bool)],
        events=events,
        label_budget=20,
        stream_meta=meta,
        labels_revealed=40,
    )
    checks = acceptance_checks(m)
    assert checks["returns_route_to_known_domain"] is False
    assert checks["returns_cost_no_labels"] is False
    assert checks["labels_within_budget"] is True
    # The same run, had the return been recognised: served by domain 0, nothing grown.
    fixed = copy.deepcopy(m)
    fixed["segments"][2].update(adaptor=0, new_adaptors=0, labels=0)
    assert acceptance_checks(fixed)["returns_route_to_known_domain"] is True
