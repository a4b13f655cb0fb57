"""Metrics of a run, computed from what the runtime served and the stream's ground truth.

The runtime never sees ``segment``, ``segment_is_shift`` or ``is_novel``; this module
is the only place that reads them. Definitions follow docs/ARCHITECTURE.md ("Scoring"):

* the first drift flag inside a shift segment is its detection; the frames from the
  segment's start to it are the detection delay; every other flag is a false alarm;
* ``ood_auroc`` / ``ood_fpr95`` compare the OOD scores of ``is_novel`` frames served
  before the runtime had adapted to their segment (negatives) with the scores of frames
  without ``is_novel`` (positives: in-distribution is the positive class, as OpenOOD);
* ``forgetting`` = accuracy on segment 0's eval frames at the first drift flag (before
  any adaptation) minus the final accuracy on them, in points;
* ``labels_per_drift`` counts the labels revealed for each flag (not the budget it asked
  for): what each ``adaptation_started`` event trained on, plus what a collection still open
  at the end of the run had received;
* a segment *returns* to an earlier one when the stream's metadata describes both with the
  same distribution (see :func:`return_segments`); without such metadata returns are unknown.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Event types that are drift flags for scoring (a novel-class flag is a drift flag too).
DRIFT_EVENT_TYPES = frozenset({"drift", "novel_class"})
# ``adaptation_finished`` actions that add no domain: a new version of a known domain's
# adaptor, or a return to one. Any other action ("new", "grow", a name added later) counts as
# a new adaptor, so a renamed action cannot make a return look free.
NO_NEW_DOMAIN_ACTIONS = frozenset({"extend", "return"})


def flag_frame(event: Mapping[str, Any]) -> int:
    """The frame of the flag an event answers: its ``trigger_frame``, else its own frame.

    A return confirmed without labels (``domain_returned`` with no ``trigger_frame``) is its
    own flag: no ``drift`` event precedes it.
    """
    return int(event.get("trigger_frame", event.get("frame", -1)))


def flag_frames(events: Sequence[Mapping[str, Any]]) -> list[int]:
    """Sorted frames of every drift flag: drift and novel-class events, and confirmed returns.

    A return that answers an earlier flag (it carries that flag's ``trigger_frame``) is not a
    second flag. A confirmed return counts at its own frame, the point where the return was
    confirmed, as a drift event's frame is the point where its alarm was confirmed.
    """
    out = [
        int(e["frame"])
        for e in events
        if "frame" in e
        and (
            e.get("type") in DRIFT_EVENT_TYPES
            or (e.get("type") == "domain_returned" and "trigger_frame" not in e)
        )
    ]
    return sorted(out)


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
            and start <= flag_frame(e) < stop
        ]
        ready_at = min(done) if done else n
        out[start:stop] = np.arange(start, stop) >= ready_at
    return out


# Segment metadata keys that describe a distribution. A name or free-text description does
# not: "clean" and "clean-return" name the same distribution.
_DOMAIN_KEYS = ("source", "corruption", "severity")


def _domain_of(info: Mapping[str, Any]) -> str | None:
    """A comparable description of a segment's input distribution, or None if it has none."""
    if "domain" in info:
        return json.dumps(info["domain"], sort_keys=True)
    if not any(k in info for k in _DOMAIN_KEYS):
        return None
    dom = {k: info.get(k) for k in _DOMAIN_KEYS}
    if dom["corruption"] is None:
        # A severity means nothing without a corruption; scenarios write 0 or leave it out.
        dom["severity"] = 0
    return json.dumps(dom, sort_keys=True)


def return_segments(
    meta: Mapping[str, Any] | None,
    n_segments: int,
    *,
    segment_labels: Sequence[Sequence[int]] | None = None,
) -> dict[int, int] | None:
    """Segments that return to a distribution seen before: ``{return segment: earlier segment}``.

    Segment ``s`` returns to the earliest segment ``j < s`` whose metadata names the same
    domain (``meta["segments"][i]["domain"]``, or its ``source``/``corruption``/``severity``)
    and whose labels include all of ``s``'s, unless ``s`` merely continues segment ``s - 1``
    (same distribution, no change to return from). Labels are part of the distribution: new
    classes of a known domain are not a return. They come from ``segment_labels`` (the
    stream's ground truth, one collection per segment) or else the metadata's ``labels``.

    Returns None when the metadata cannot tell: no per-segment entries, an entry without a
    domain description, or no labels from either place. ``{}`` means "described, no returns".
    """
    entries = meta.get("segments") if isinstance(meta, Mapping) else None
    if not isinstance(entries, Sequence) or n_segments <= 0:
        return None
    by_id: dict[int, Mapping[str, Any]] = {}
    for pos, info in enumerate(entries):
        if isinstance(info, Mapping):
            by_id[int(info.get("id", pos))] = info
    described: list[tuple[str, frozenset[int]]] = []
    for s in range(n_segments):
        info = by_id.get(s)
        dom = _domain_of(info) if info is not None else None
        if segment_labels is not None and s < len(segment_labels):
            labels: Sequence[int] | None = segment_labels[s]
        else:
            labels = info.get("labels") if info is not None else None
        if dom is None or labels is None:
            return None
        described.append((dom, frozenset(int(v) for v in labels)))
    out: dict[int, int] = {}
    for s in range(1, n_segments):
        dom, labels = described[s]
        prev_dom, prev_labels = described[s - 1]
        if dom == prev_dom and labels <= prev_labels:
            continue
        for j in range(s):
            if described[j][0] == dom and labels <= described[j][1]:
                out[s] = j
                break
    return out


def segment_domains(
    segment_is_shift: Sequence[bool] | np.ndarray, returns: Mapping[int, int] | None
) -> list[int]:
    """Per segment, the segment that first showed its distribution (its domain's id here).

    Segment 0 is the base domain; a return joins the segment it returns to; a segment that
    does not shift continues its predecessor; every other shift opens a domain of its own.
    """
    shifts = [bool(v) for v in np.asarray(segment_is_shift, dtype=bool)]
    back = dict(returns or {})
    out: list[int] = []
    for s, is_shift in enumerate(shifts):
        if s == 0:
            out.append(0)
        elif s in back:
            out.append(out[back[s]])
        elif not is_shift:
            out.append(out[s - 1])
        else:
            out.append(s)
    return out


@dataclass(frozen=True)
class LabelAccount:
    """Labels revealed per flag, as the events and the label source's count tell it."""

    flags: list[int]  # trigger frame of each flag that collected labels, in order
    per_flag: list[int]  # labels revealed for each of them
    unattributed: int  # revealed labels that no flag accounts for (0 when consistent)


def label_account(
    events: Sequence[Mapping[str, Any]], labels_revealed: int | None = None
) -> LabelAccount:
    """Count the labels each flag actually received.

    A flag is a ``labels_requested`` event (its ``frame``) or the ``trigger_frame`` of an
    ``adaptation_started`` event; the latter's ``labels`` is what the job trained on. A
    collection that ended without an adaptation (an interrupted run) leaves no such event, so
    when ``labels_revealed`` (how many labels the label source handed over in all) is given,
    whatever the adaptations do not explain goes to the last flag still collecting, and
    anything left is ``unattributed``: a label revealed outside every collection.
    """
    counts: dict[int, int] = {}
    started: set[int] = set()
    for e in events:
        etype = e.get("type")
        if etype == "labels_requested" and "frame" in e:
            counts.setdefault(int(e["frame"]), 0)
        elif etype == "adaptation_started":
            trigger = int(e.get("trigger_frame", e.get("frame", -1)))
            counts[trigger] = counts.get(trigger, 0) + int(e.get("labels", 0))
            started.add(trigger)
    flags = sorted(counts)
    unattributed = 0
    if labels_revealed is not None:
        rest = int(labels_revealed) - sum(counts.values())
        open_flags = [f for f in flags if f not in started]
        if rest > 0 and open_flags:
            counts[open_flags[-1]] += rest
        else:
            unattributed = rest
    return LabelAccount(flags, [counts[f] for f in flags], unattributed)


def _in_segment(
    events: Sequence[Mapping[str, Any]], start: int, stop: int
) -> list[Mapping[str, Any]]:
    """Adaptations (``adaptation_finished``) triggered by a flag in ``[start, stop)``."""
    return [
        e
        for e in events
        if e.get("type") == "adaptation_finished"
        and start <= int(e.get("trigger_frame", -1)) < stop
    ]


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
    stream_meta: Mapping[str, Any] | None = None,
    labels_revealed: int | None = None,
) -> dict[str, Any]:
    """All quality metrics of a run over the frames served so far (see the module docstring).

    ``eval_prediction_before_drift`` are the eval predictions at the first drift flag (None
    when no flag was raised: then nothing changed and forgetting is 0). ``stream_meta`` is
    the stream file's metadata, the only way to know which segments are returns.
    ``labels_revealed`` is how many labels the label source revealed in all; without it a
    collection that never reached an adaptation counts 0 and ``labels_used`` is the sum of
    what the adaptations trained on.
    """
    n = len(served)
    labels_all = np.asarray(labels)
    labels = labels_all[:n]
    novel = is_novel[:n]
    adapted = adapted_mask(segment, segment_is_shift, events)[:n]
    correct = served.prediction == labels

    flags = [f for f in flag_frames(events) if 0 <= f < n]
    detection_flags: set[int] = set()
    segments: list[dict[str, Any]] = []
    num_segments = len(segment_is_shift)
    adaptors_by_frame = served.domain
    account = label_account(events, labels_revealed)
    seg_labels = [np.unique(labels_all[segment == s]).tolist() for s in range(num_segments)]
    returns = return_segments(stream_meta, num_segments, segment_labels=seg_labels)
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
        adaptations = _in_segment(events, start, stop)
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
                "returns_to": None if returns is None else returns.get(s),
                "labels": sum(
                    k
                    for f, k in zip(account.flags, account.per_flag, strict=True)
                    if start <= f < stop
                ),
                "adaptations": len(adaptations),
                "new_adaptors": sum(
                    1 for e in adaptations if e.get("action") not in NO_NEW_DOMAIN_ACTIONS
                ),
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
        "labels_used": int(labels_revealed)
        if labels_revealed is not None
        else int(sum(account.per_flag)),
        "labels_revealed": None if labels_revealed is None else int(labels_revealed),
        "labels_per_drift": account.per_flag,
        "label_flags": account.flags,
        "labels_unattributed": account.unattributed,
        "label_budget": int(label_budget),
        # JSON object keys are strings; acceptance.acceptance_checks reads them back.
        "return_segments": None if returns is None else {str(k): v for k, v in returns.items()},
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
    stream_x: np.ndarray,
    stream_labels: np.ndarray,
    stream_segment: np.ndarray,
    segment_is_shift: Sequence[bool] | np.ndarray,
    returns: Mapping[int, int] | None,
    steps: int = 300,
    lr: float = 1e-2,
    schedule: str = "cosine",
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Mean final accuracy over segments of three reference predictors.

    * ``naive_finetune``: one head trained on the base set, then fine-tuned in turn on each
      drift's labelled frames (``labelled``; its output layer grows with new labels), with
      nothing kept from earlier data: it forgets;
    * ``single_head_on_budget_labels``: one head trained on the base set and every drift's
      labelled frames together. It sees the runtime's labels, no more, and has no routing,
      so a runtime with per-domain adaptors can beat it: it bounds nothing;
    * ``joint`` (the upper bound): one head per domain, trained on every frame of that
      domain with its true label (the base domain: the training set plus the stream frames
      of its segments; every other domain: all stream frames of its segments), and oracle
      routing: each eval frame goes to its own segment's head. Domains come from
      :func:`segment_domains` over ``segment_is_shift`` and ``returns``; with ``returns``
      None a return gets a head of its own, trained on its own frames.

    ``stream_x``/``stream_labels``/``stream_segment`` are the features, true labels and
    segment ids of the stream frames served (rejected frames left out). A domain none of
    whose frames were served has no head; its eval frames go to the base head, as they would
    on a device that never adapted. Every predictor is a linear head on normalised features,
    the runtime's default adaptor family, so the comparison isolates growth and routing.
    ``threads`` goes to :func:`~edge_runtime.adapt.adaptor.train_adaptor` (None: the calling
    thread's torch thread count).
    """
    import torch

    from edge_runtime.adapt.adaptor import Adaptor, AdaptorArch, build_adaptor, train_adaptor

    arch = AdaptorArch(kind="linear", in_dim=int(train_x.shape[1]))

    def fit(x: np.ndarray, y: np.ndarray, k: int) -> Adaptor:
        head = build_adaptor(arch, sorted({int(v) for v in y}), seed=seed + k)
        train_adaptor(
            head, x, y, steps=steps, lr=lr, seed=seed + k, threads=threads, schedule=schedule
        )
        return head

    # Naive fine-tuning.
    head = fit(train_x, np.asarray(train_y), 0)
    seen = list(head.label_map)
    for k, (x, y) in enumerate(labelled):
        labels = sorted(set(seen) | {int(v) for v in y})
        grown = build_adaptor(arch, labels, seed=seed + k + 1)
        with torch.no_grad():
            grown.feat_mean.copy_(head.feat_mean)
            grown.feat_std.copy_(head.feat_std)
            rows = [labels.index(c) for c in head.label_map]
            grown.head.weight[rows] = head.head.weight
            grown.head.bias[rows] = head.head.bias
        train_adaptor(
            grown,
            x,
            y,
            steps=steps,
            lr=lr,
            schedule=schedule,
            seed=seed + k + 1,
            fit_normalizer=False,
            threads=threads,
        )
        head, seen = grown, labels
    naive, naive_per = _eval_mean_final(head.predict, eval_x, eval_labels, eval_segment)

    # One head on the runtime's labels.
    jx = np.concatenate([train_x, *[x for x, _ in labelled]])
    jy = np.concatenate([np.asarray(train_y), *[np.asarray(y) for _, y in labelled]])
    single, single_per = _eval_mean_final(fit(jx, jy, 0).predict, eval_x, eval_labels, eval_segment)

    # Upper bound: per-domain heads on every frame of their domain, oracle routing.
    domain_of = segment_domains(segment_is_shift, returns)
    stream_segment = np.asarray(stream_segment)
    stream_labels = np.asarray(stream_labels)
    heads: dict[int, Adaptor] = {}
    frames_per_domain: dict[int, int] = {}
    for d in sorted(set(domain_of)):
        members = [s for s, ds in enumerate(domain_of) if ds == d]
        rows = np.isin(stream_segment, members)
        x, y = stream_x[rows], stream_labels[rows]
        if d == 0:
            x = np.concatenate([train_x, x])
            y = np.concatenate([np.asarray(train_y), y])
        frames_per_domain[d] = len(y)
        if len(y):
            heads[d] = fit(x, y, d)

    def oracle(features: np.ndarray) -> np.ndarray:
        pred = np.full(len(features), -1, dtype=np.int64)
        for s in np.unique(eval_segment):
            m = eval_segment == s
            d = domain_of[int(s)] if int(s) < len(domain_of) else 0
            pred[m] = heads.get(d, heads[0]).predict(features[m])
        return pred

    joint, joint_per = _eval_mean_final(oracle, eval_x, eval_labels, eval_segment)
    return {
        "naive_finetune_mean_final_accuracy": _round(naive),
        "naive_finetune_per_segment": naive_per,
        "single_head_on_budget_labels_mean_final_accuracy": _round(single),
        "single_head_on_budget_labels_per_segment": single_per,
        "joint_mean_final_accuracy": _round(joint),
        "joint_per_segment": joint_per,
        "joint_domain_of_segment": domain_of,
        "joint_frames_per_domain": {str(d): v for d, v in frames_per_domain.items()},
        "labelled_sets": [len(y) for _, y in labelled],
    }
