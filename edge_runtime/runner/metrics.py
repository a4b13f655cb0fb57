"""Metrics collection for a served stream: what was served, serving gaps, adaptation delays.

:class:`ServedCollector` is a serve-loop observer: it keeps the per-frame decisions (the
``frames.npz`` arrays), the longest serving gap, and the features of frames whose labels were
revealed (for the baselines). The functions below turn the run's events into counts: per run
(:func:`event_counts`), per segment (:func:`add_segment_counts`), and per adaptation, how many
frames after its drift flag the new domain was installed and its trained head arrived
(:func:`adaptation_delays`).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_runtime.runner.loop import ServedBatch
from edge_runtime.scoring import NO_NEW_DOMAIN_ACTIONS, ServedFrames

Event = dict[str, Any]


def _creates_domain(e: Event) -> bool:
    return e.get("type") == "adaptation_finished" and e.get("action") not in NO_NEW_DOMAIN_ACTIONS


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if os.uname().sysname != "Darwin" else peak / 2**20


class ServedCollector:
    """Per-frame decisions of a stream of ``n`` frames, filled batch by batch.

    ``keep_features`` also keeps every served frame's encoder features (``features``; zeros
    for rejected frames), for baselines that train on the whole stream.
    """

    def __init__(self, n: int, feature_dim: int, *, keep_features: bool = False) -> None:
        self.prediction = np.full(n, -1, np.int64)
        self.ood_score = np.full(n, np.nan, np.float32)
        self.domain = np.full(n, -1, np.int64)
        self.is_ood = np.zeros(n, bool)
        self.rejected = np.zeros(n, bool)
        self.served = 0
        self.max_gap_s = 0.0
        self.max_gap_frame = -1
        self.feature_dim = int(feature_dim)
        self._asked: dict[int, np.ndarray] = {}  # features of frames asked about, not answered
        self._revealed: dict[int, np.ndarray] = {}  # features of frames whose label came
        self.features: np.ndarray | None = (
            np.zeros((n, self.feature_dim), np.float32) if keep_features else None
        )

    def __call__(self, item: ServedBatch) -> None:
        b, dec = item.batch, item.decisions
        sl = slice(b.start, b.stop)
        self.prediction[sl], self.ood_score[sl], self.domain[sl] = (
            dec.prediction,
            dec.ood_score,
            dec.domain,
        )
        self.is_ood[sl], self.rejected[sl] = dec.is_ood, dec.rejected
        self.served = max(self.served, b.stop)
        if item.latency_s > self.max_gap_s:
            self.max_gap_s, self.max_gap_frame = item.latency_s, b.start
        if dec.features is not None:
            if self.features is not None:
                self.features[sl] = dec.features
            for j in np.flatnonzero(dec.label_request):
                self._asked[int(b.start + j)] = dec.features[j]
        for i in item.answered.indices.tolist():
            x = self._asked.pop(int(i), None)
            if x is not None:
                self._revealed[int(i)] = x

    def served_frames(self) -> ServedFrames:
        n = self.served
        return ServedFrames(
            self.prediction[:n],
            self.ood_score[:n],
            self.domain[:n],
            self.is_ood[:n],
            self.rejected[:n],
        )

    def features_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Features of frames whose labels were revealed, in the order given (rows of frames
        whose features were not kept are left out)."""
        rows = [self._revealed[int(i)] for i in indices if int(i) in self._revealed]
        if not rows:
            return np.zeros((0, self.feature_dim), np.float32)
        return np.stack(rows).astype(np.float32, copy=False)

    def has_features(self, index: int) -> bool:
        return int(index) in self._revealed

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict[str, Any]:
        """The decisions served so far and the features kept, for a run checkpoint: a resumed
        run's ``frames.npz`` then holds every frame once, whichever process served it."""
        n = self.served

        def rows(d: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
            keys = sorted(d)
            x = np.stack([d[k] for k in keys]) if keys else np.zeros((0, self.feature_dim))
            return {"index": np.asarray(keys, np.int64), "features": x.astype(np.float32)}

        return {
            "served": n,
            "prediction": self.prediction[:n].copy(),
            "ood_score": self.ood_score[:n].copy(),
            "domain": self.domain[:n].copy(),
            "is_ood": self.is_ood[:n].copy(),
            "rejected": self.rejected[:n].copy(),
            "max_gap_s": float(self.max_gap_s),
            "max_gap_frame": int(self.max_gap_frame),
            "asked": rows(self._asked),
            "revealed": rows(self._revealed),
            "features": None if self.features is None else self.features[:n].copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["served"])
        if not 0 <= n <= len(self.prediction):
            raise ValueError(f"{n} frames served does not fit a stream of {len(self.prediction)}")
        for name in ("prediction", "ood_score", "domain", "is_ood", "rejected"):
            arr = np.asarray(state[name])
            if arr.shape != (n,):
                raise ValueError(f"served {name} has shape {arr.shape}, expected ({n},)")
            getattr(self, name)[:n] = arr
        self.served = n
        self.max_gap_s = float(state["max_gap_s"])
        self.max_gap_frame = int(state["max_gap_frame"])
        for attr in ("asked", "revealed"):
            rec = state[attr]
            idx, x = np.asarray(rec["index"], np.int64), np.asarray(rec["features"], np.float32)
            if len(idx) and x.shape != (len(idx), self.feature_dim):
                raise ValueError(f"{attr} features have shape {x.shape}")
            setattr(self, f"_{attr}", {int(i): x[k] for k, i in enumerate(idx.tolist())})
        feats = state.get("features")
        if self.features is not None:
            if feats is None or np.shape(feats) != (n, self.feature_dim):
                raise ValueError("the checkpoint has no features for the baselines")
            self.features[:n] = feats


def event_counts(events: Sequence[Event]) -> dict[str, int]:
    """Adaptors created, versions added, returns, rejected frames and errors, from events."""

    def count(etype: str) -> int:
        return sum(1 for e in events if e["type"] == etype)

    return {
        "adaptors_created": sum(1 for e in events if _creates_domain(e)),
        "adaptor_versions_added": sum(
            1 for e in events if e["type"] == "adaptation_finished" and e.get("action") == "extend"
        ),
        "returns": count("domain_returned"),
        "rejected_events": count("frame_rejected"),
        "errors": count("error"),
    }


def add_segment_counts(segments: list[dict[str, Any]], events: Sequence[Event]) -> None:
    """Per segment: ``new_adaptors``, adaptations creating a domain whose flag fell inside it
    (kept as scoring computed it where it did)."""
    for seg in segments:
        lo, hi = seg["start"], seg["start"] + seg["frames"]
        seg.setdefault(
            "new_adaptors",
            sum(
                1
                for e in events
                if _creates_domain(e) and lo <= int(e.get("trigger_frame", -1)) < hi
            ),
        )


def _flag_frame(e: Event) -> int:
    """The flag an adaptation answers: its ``trigger_frame``; for a return confirmed without
    labels, the return alarm's frame (``evidence.alarm_frame``), else the event's own frame."""
    if "trigger_frame" in e:
        return int(e["trigger_frame"])
    evidence = e.get("evidence")
    if isinstance(evidence, dict) and "alarm_frame" in evidence:
        return int(evidence["alarm_frame"])
    return int(e["frame"])


def adaptation_delays(events: Sequence[Event]) -> list[dict[str, Any]]:
    """Per adaptation, in frames after its flag (``trigger_frame``; see :func:`_flag_frame`):

    * ``installed_after``: until the new domain (or new adaptor version) was installed and
      served: the ``adaptation_finished`` event's frame; for a return to a known domain, the
      ``domain_returned`` event's frame;
    * ``trained_after``: until its trained head arrived: the first ``adaptor_trained`` event
      for that domain emitted after the install and before that domain's next adaptation.
      A synchronous runtime installs a trained head at once (``trained_after`` equals
      ``installed_after``); a return trains nothing (None); None too when the head never
      arrived (an interrupted run).

    Both include the label collection: ``labelled_frame`` is where the last requested label
    came in (the ``adaptation_started`` event's frame, ``label_budget`` served frames or so
    after the flag, whatever the frame rate); ``installed_after_labels`` and
    ``trained_after_labels`` count from there: the part that depends on how fast frames
    arrive while the job runs.
    """
    out: list[dict[str, Any]] = []
    order = list(events)
    started: dict[int, int] = {}  # trigger frame -> frame its collection ended
    for k, e in enumerate(order):
        etype = e.get("type")
        if etype == "adaptation_started":
            started[int(e.get("trigger_frame", e["frame"]))] = int(e["frame"])
        if etype not in ("adaptation_finished", "domain_returned"):
            continue
        trigger = _flag_frame(e)
        labelled = started.get(trigger) if "trigger_frame" in e else None
        installed = int(e["frame"])
        domain = e.get("domain", e.get("returned_to"))
        trained: int | None = None
        if etype == "adaptation_finished":
            action = str(e.get("action", "new"))
            for later in order[k + 1 :]:
                if later.get("domain") != domain:
                    continue
                if later.get("type") == "adaptor_trained":
                    trained = int(later["frame"])
                    break
                if later.get("type") in ("adaptation_finished", "domain_returned"):
                    break
            if trained is None and int((e.get("train") or {}).get("steps", 0) or 0) > 0:
                trained = installed  # trained before it was installed (synchronous job)
        else:
            action = "return"
        out.append(
            {
                "trigger_frame": trigger,
                "domain": None if domain is None else int(domain),
                "action": action,
                "case": e.get("case"),  # a return: "confirmed" (no labels) or "labelled"
                "labelled_frame": labelled,
                "installed_frame": installed,
                "trained_frame": trained,
                "installed_after": installed - trigger,
                "trained_after": None if trained is None else trained - trigger,
                "installed_after_labels": None if labelled is None else installed - labelled,
                "trained_after_labels": None
                if trained is None or labelled is None
                else trained - labelled,
            }
        )
    return out


def _median(values: Sequence[int | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def delay_metrics(events: Sequence[Event], rate: float | None) -> dict[str, Any]:
    """``adaptation_delay_frames``, the medians of both delays over the adaptations that
    installed an adaptor (returns excluded: they install nothing), and ``rate_fps`` (None when
    the replay ran unpaced, as fast as it could)."""
    delays = adaptation_delays(events)
    built = [d for d in delays if d["action"] != "return"]
    return {
        "rate_fps": None if rate is None else float(rate),
        "adaptation_delay_frames": delays,
        "median_installed_after_frames": _median([d["installed_after"] for d in built]),
        "median_trained_after_frames": _median([d["trained_after"] for d in built]),
        "median_trained_after_labels_frames": _median([d["trained_after_labels"] for d in built]),
    }
