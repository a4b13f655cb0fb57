"""The acceptance checks of a run, evaluated on its metrics dict (``metrics["checks"]``).

Each check is True (measured and met), False (measured and missed) or None (not
measurable on this run: the metric is missing, the stream has no such case, or its
metadata cannot tell). The rule for the verdict:

* ``all_pass`` is True only when every check is True. A None is never a pass, so one
  unmeasured check makes ``all_pass`` False even when nothing failed;
* ``failed`` lists the checks that are False, ``not_measured`` those that are None, so a
  reader can tell "missed" from "could not be measured".

Inputs come from :func:`edge_runtime.scoring.score_run` (segments, labels per flag, return
segments) plus what the runner adds (``baselines``, ``max_serving_gap_s``, the feedback
count in ``labels_used``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edge_runtime.scoring import return_segments

__all__ = ["CHECKS", "acceptance_checks", "return_segments"]

MAX_MEDIAN_DELAY = 100  # frames
MAX_FALSE_ALARMS_PER_5000 = 1.0
MAX_FORGETTING = 1.0  # points
MIN_GAIN_OVER_NAIVE = 10.0  # points
MAX_GAP_TO_JOINT = 5.0  # points
MAX_SERVING_GAP_S = 1.0

CHECKS = (
    "all_shifts_detected",
    "median_delay_le_100",
    "false_alarms_le_1_per_5000",
    "forgetting_le_1",
    "gain_over_naive_ge_10",
    "within_5_of_joint",
    "labels_within_budget",
    "returns_route_to_known_domain",
    "returns_cost_no_labels",
    "max_serving_gap_le_1s",
)


def _all(values: list[bool | None]) -> bool | None:
    """False if any is False, else None if any is None (or there are none), else True."""
    if any(v is False for v in values):
        return False
    if not values or any(v is None for v in values):
        return None
    return True


def _at_most(value: Any, bound: float) -> bool | None:
    return None if value is None else bool(value <= bound)


def _labels_within_budget(m: Mapping[str, Any]) -> bool | None:
    """Every flag got at most the budget, counted from what was revealed, and the counts agree.

    ``labels_per_drift`` must account for every label: its sum has to equal the runtime's
    feedback count (``labels_used``) and, where the runner reports it, the number of labels
    its label source revealed (``labels_revealed``), with nothing ``labels_unattributed``.
    A flag over budget fails even when the totals cannot be cross-checked.
    """
    per = m.get("labels_per_drift")
    budget = m.get("label_budget")
    if per is None or budget is None:
        return None
    if any(int(v) > int(budget) for v in per):
        return False
    totals = [int(m[k]) for k in ("labels_used", "labels_revealed") if m.get(k) is not None]
    unattributed = m.get("labels_unattributed")
    if not totals or unattributed is None:
        return None
    return int(unattributed) == 0 and all(sum(int(v) for v in per) == t for t in totals)


def _return_pairs(
    m: Mapping[str, Any], returns: Mapping[int, int] | None
) -> list[tuple[dict[str, Any], dict[str, Any]]] | None:
    """(return segment, the segment it returns to) for every return that was served.

    None when returns are unknown (no stream metadata) or the stream served none.
    """
    if returns is None:
        raw = m.get("return_segments")
        if raw is None:
            return None
        returns = {int(k): int(v) for k, v in raw.items()}
    segs = {int(s["id"]): s for s in m.get("segments", []) if "id" in s}
    pairs = [
        (segs[s], segs[j])
        for s, j in sorted(returns.items())
        if s in segs and j in segs and segs[s].get("served", segs[s].get("frames", 0)) > 0
    ]
    return pairs or None


def _routes_to_known(seg: Mapping[str, Any], earlier: Mapping[str, Any]) -> bool | None:
    adaptor, known, new = seg.get("adaptor"), earlier.get("adaptor"), seg.get("new_adaptors")
    if adaptor is None or known is None or new is None:
        return None
    return bool(adaptor == known and new == 0)


def _costs_no_labels(seg: Mapping[str, Any]) -> bool | None:
    labels = seg.get("labels")
    return None if labels is None else bool(labels == 0)


def acceptance_checks(
    metrics: Mapping[str, Any], *, returns: Mapping[int, int] | None = None
) -> dict[str, Any]:
    """The checks of :data:`CHECKS` plus ``all_pass``, ``failed`` and ``not_measured``.

    ``returns`` (``{return segment: earlier segment}``, from :func:`return_segments` on the
    stream's meta) overrides ``metrics["return_segments"]``. A return must be served by
    the adaptor that served the segment it returns to, with no new adaptor created in it
    (``returns_route_to_known_domain``), and must receive no labels
    (``returns_cost_no_labels``). See the module docstring for the verdict rule.
    """
    m = metrics
    segs = m.get("segments", [])
    shift = [s for s in segs if s.get("is_shift") and s.get("served", 0) > 0]
    b = m.get("baselines") or {}
    mfa = m.get("mean_final_accuracy")
    naive = b.get("naive_finetune_mean_final_accuracy")
    joint = b.get("joint_mean_final_accuracy")
    pairs = _return_pairs(m, returns)
    checks: dict[str, Any] = {
        "all_shifts_detected": _all([bool(s.get("detected")) for s in shift]),
        "median_delay_le_100": _at_most(m.get("median_detection_delay"), MAX_MEDIAN_DELAY),
        "false_alarms_le_1_per_5000": _at_most(
            m.get("false_alarms_per_5000_id_frames"), MAX_FALSE_ALARMS_PER_5000
        ),
        "forgetting_le_1": _at_most(m.get("forgetting"), MAX_FORGETTING),
        "gain_over_naive_ge_10": None
        if mfa is None or naive is None
        else bool(mfa - naive >= MIN_GAIN_OVER_NAIVE),
        "within_5_of_joint": None
        if mfa is None or joint is None
        else bool(joint - mfa <= MAX_GAP_TO_JOINT),
        "labels_within_budget": _labels_within_budget(m),
        "returns_route_to_known_domain": None
        if pairs is None
        else _all([_routes_to_known(s, j) for s, j in pairs]),
        "returns_cost_no_labels": None
        if pairs is None
        else _all([_costs_no_labels(s) for s, _ in pairs]),
        "max_serving_gap_le_1s": _at_most(m.get("max_serving_gap_s"), MAX_SERVING_GAP_S),
    }
    failed = [k for k in CHECKS if checks[k] is False]
    not_measured = [k for k in CHECKS if checks[k] is None]
    checks["all_pass"] = not failed and not not_measured
    checks["failed"] = failed
    checks["not_measured"] = not_measured
    return checks
