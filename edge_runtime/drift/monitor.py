"""DriftMonitor: one change detector on the served stream, plus the event it emits.

The runtime feeds every served frame in stream order. The monitor forwards the right quantity to
its detector (the OOD indicator for ``cusum``, the score for ``page_hinkley``), keeps a short window
of recent frames for the event's evidence, and -- when a :class:`NoveltyClassifier` is attached and
the runtime passes a low-level descriptor as ``extra`` -- labels the flag ``novel_class`` or
``domain_shift``. While paused (labels being collected, an adaptation running) it neither flags
nor accumulates evidence, so the flag that follows an adaptation is about fresh frames.

With ``confirm_frames`` > 0 a detector alarm is only a candidate: the flag is raised when the
next ``confirm_frames`` frames reach an OOD rate of ``confirm_rate``, and the alarm is dismissed
(statistic restarted) otherwise -- the warning/drift two-level scheme of DDM (Gama et al. 2004),
with the confirmation judged on frames the alarm did not select.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edge_runtime.drift.detectors import ChangeDetector, make_detector
from edge_runtime.drift.novelty import NoveltyClassifier
from edge_runtime.errors import InputError

log = logging.getLogger(__name__)

DOMAIN_SHIFT = "domain_shift"
NOVEL_CLASS = "novel_class"


@dataclass
class DriftEvent:
    """A drift flag: the stream index it fired at, its kind and the evidence behind it."""

    frame: int
    kind: str  # "domain_shift" | "novel_class"
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Candidate:
    """A detector alarm waiting for ``confirm_frames`` more frames."""

    frame: int
    since: list[tuple[int, bool, float, np.ndarray | None]]
    after: list[tuple[int, bool, float, np.ndarray | None]]


class DriftMonitor:
    """Wraps one :class:`ChangeDetector`; ``update`` returns a :class:`DriftEvent` on a flag."""

    def __init__(
        self,
        detector: ChangeDetector | None = None,
        *,
        novelty: NoveltyClassifier | None = None,
        window: int = 100,
        min_novelty_frames: int = 5,
        confirm_frames: int = 0,
        confirm_rate: float = 0.3,
    ) -> None:
        self.detector: ChangeDetector = detector if detector is not None else make_detector("cusum")
        self.novelty = novelty
        if window < 1:
            raise InputError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self.min_novelty_frames = int(min_novelty_frames)
        if confirm_frames < 0 or not 0.0 < confirm_rate <= 1.0:
            raise InputError(
                f"confirm_frames must be >= 0 and confirm_rate in (0, 1], "
                f"got {confirm_frames}, {confirm_rate}"
            )
        self.confirm_frames, self.confirm_rate = int(confirm_frames), float(confirm_rate)
        # An alarm awaiting confirmation: its frame, the frames it rests on, the frames since.
        self._candidate: _Candidate | None = None
        self.n_dismissed = 0
        self._recent: deque[tuple[int, bool, float, np.ndarray | None]] = deque(maxlen=self.window)
        self._paused = False
        self.n_flags = 0
        self.last_frame = -1

    @classmethod
    def from_config(cls, drift_cfg: Any, *, p0_floor: float = 0.05, **kwargs: Any) -> DriftMonitor:
        """Build from a ``DriftConfig`` (method, warmup, false_alarm_rate, min_ood_rate).

        ``p0_floor`` should be ``1 - hdc.tpr``: the HDC thresholds are calibrated so that about that
        fraction of in-distribution frames score as OOD, so a lower warm-up estimate is luck.
        """
        method = getattr(drift_cfg, "method", "cusum")
        params: dict[str, Any] = {
            "false_alarm_rate": drift_cfg.false_alarm_rate,
            "warmup": drift_cfg.warmup,
        }
        if method == "cusum":
            params.update(min_ood_rate=drift_cfg.min_ood_rate, p0_floor=p0_floor)
        kwargs.setdefault("confirm_frames", getattr(drift_cfg, "confirm_frames", 0))
        kwargs.setdefault("confirm_rate", drift_cfg.min_ood_rate)
        return cls(make_detector(method, **params), **kwargs)

    # -- control -------------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Stop flagging (labels are being collected or an adaptation runs)."""
        self._paused = True

    def resume(self, reset: bool = True) -> None:
        """Flag again; by default from a fresh statistic (the old evidence is stale)."""
        self._paused = False
        if reset:
            self.reset()

    def reset(self, relearn: bool = False) -> None:
        """Restart the detector's statistic (``relearn``: also its in-control level) and window."""
        self.detector.reset(relearn=relearn)  # type: ignore[call-arg]
        self._recent.clear()
        self._candidate = None

    # -- the per-frame step --------------------------------------------------------------------
    def update(
        self, frame_index: int, is_ood: bool, score: float, extra: np.ndarray | None = None
    ) -> DriftEvent | None:
        """Feed one served frame. Returns the event on the frame a drift is flagged."""
        self.last_frame = int(frame_index)
        if self._paused:
            return None
        is_ood = bool(is_ood)
        score = float(score)
        if extra is not None:
            extra = np.asarray(extra, dtype=np.float32).reshape(-1)
        row = (int(frame_index), is_ood, score, extra)
        self._recent.append(row)
        if self._candidate is not None:
            return self._confirm(row)
        x: float = float(is_ood) if self.detector.input == "indicator" else score
        if not self.detector.update(x):
            return None
        # Frames since the statistic last left zero: the detector's estimate of the change point.
        run = self.detector.n_seen - getattr(self.detector, "run_start", self.detector.n_seen - 1)
        since = list(self._recent)[-max(1, min(run, len(self._recent))) :]
        if self.confirm_frames:
            self._candidate = _Candidate(int(frame_index), since, [])
            return None
        return self._flag(int(frame_index), since)

    def _confirm(self, row: tuple[int, bool, float, np.ndarray | None]) -> DriftEvent | None:
        c = self._candidate
        assert c is not None
        c.after.append(row)
        if len(c.after) < self.confirm_frames:
            return None
        self._candidate = None
        rate = float(np.mean([r[1] for r in c.after]))
        if rate < self.confirm_rate:
            self.n_dismissed += 1
            log.info(
                "drift alarm at frame %d dismissed: OOD rate %.2f over the next %d frames "
                "(needs %.2f)",
                c.frame,
                rate,
                len(c.after),
                self.confirm_rate,
            )
            self.detector.reset()
            return None
        event = self._flag(int(row[0]), c.since + c.after)
        event.evidence.update(
            alarm_frame=c.frame, confirm_frames=len(c.after), confirm_ood_rate=rate
        )
        return event

    def _flag(
        self, frame_index: int, since: list[tuple[int, bool, float, np.ndarray | None]]
    ) -> DriftEvent:
        self.n_flags += 1
        event = DriftEvent(frame=frame_index, kind=DOMAIN_SHIFT, evidence=self._evidence(since))
        event.kind, why = self._classify(since)
        event.evidence["kind_reason"] = why
        return event

    def update_batch(
        self,
        frame_indices: np.ndarray,
        is_ood: np.ndarray,
        scores: np.ndarray,
        extras: np.ndarray | None = None,
    ) -> list[DriftEvent]:
        """Frame-by-frame :meth:`update` over a batch (in order); all events it produced."""
        events = []
        for j in range(len(frame_indices)):
            ev = self.update(
                int(frame_indices[j]),
                bool(is_ood[j]),
                float(scores[j]),
                None if extras is None else extras[j],
            )
            if ev is not None:
                events.append(ev)
        return events

    def _evidence(self, since: list[tuple[int, bool, float, np.ndarray | None]]) -> dict[str, Any]:
        oods = [r[1] for r in self._recent]
        scores = [r[2] for r in self._recent if math.isfinite(r[2])]
        ev: dict[str, Any] = {
            "estimated_change_frame": since[0][0],
            "ood_rate_since_change": float(np.mean([r[1] for r in since])),
            "method": self.detector.describe().get("method"),
            "statistic": float(getattr(self.detector, "alarm_statistic", float("nan"))),
            "threshold": float(self.detector.threshold),
            "window": len(oods),
            "window_start": self._recent[0][0] if self._recent else -1,
            "ood_rate_window": float(np.mean(oods)) if oods else 0.0,
            "mean_score_window": float(np.mean(scores)) if scores else float("nan"),
        }
        ev.update(
            {f"detector_{k}": v for k, v in self.detector.describe().items() if k != "method"}
        )
        return ev

    def _classify(self, since: list[tuple[int, bool, float, np.ndarray | None]]) -> tuple[str, str]:
        if self.novelty is None or not self.novelty.fitted:
            return DOMAIN_SHIFT, "no novelty classifier"
        # The OOD frames since the estimated change point; the whole window if that is too few.
        extras = [r[3] for r in since if r[1] and r[3] is not None]
        if len(extras) < self.min_novelty_frames:
            extras = [r[3] for r in self._recent if r[1] and r[3] is not None]
        if not extras:
            return DOMAIN_SHIFT, "no low-level descriptors for the OOD frames"
        decision = self.novelty.classify(np.stack(extras))
        return decision.kind, decision.reason

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the detector, counters, the recent-frame window (evidence for the next
        flag's kind and change point) and an alarm awaiting confirmation."""
        rows = list(self._recent)
        extras = [r[3] for r in rows]
        keep_extras = bool(rows) and all(e is not None for e in extras)
        return {
            "recent": {
                "frames": [int(r[0]) for r in rows],
                "ood": [bool(r[1]) for r in rows],
                "score": [float(r[2]) for r in rows],
                "extras": [[float(v) for v in e] for e in extras] if keep_extras else None,
            },
            "detector_name": self.detector.describe().get("method"),
            "detector": self.detector.state_dict(),
            "paused": self._paused,
            "n_flags": self.n_flags,
            "last_frame": self.last_frame,
            "window": self.window,
            "n_dismissed": self.n_dismissed,
            "confirm_frames": self.confirm_frames,
            "confirm_rate": self.confirm_rate,
            # a pending alarm keeps its frame and the OOD flags seen since (not descriptors)
            "candidate": None
            if self._candidate is None
            else {
                "frame": self._candidate.frame,
                "after_ood": [bool(r[1]) for r in self._candidate.after],
            },
            "novelty": None if self.novelty is None else self.novelty.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = state["detector_name"]
        if self.detector.describe().get("method") != name:
            self.detector = make_detector(name)
        self.detector.load_state_dict(state["detector"])
        self._paused = bool(state["paused"])
        self.n_flags = int(state["n_flags"])
        self.last_frame = int(state["last_frame"])
        self.window = int(state["window"])
        self._recent = deque(maxlen=self.window)
        recent = state.get("recent")
        if recent is not None:
            frames = np.asarray(recent["frames"], dtype=np.int64)
            ood = np.asarray(recent["ood"], dtype=bool)
            score = np.asarray(recent["score"], dtype=np.float32)
            ex = recent.get("extras")
            ex = None if ex is None else np.asarray(ex, dtype=np.float32)
            if not len(frames) == len(ood) == len(score) or (
                ex is not None and len(ex) != len(frames)
            ):
                raise InputError("drift monitor state: recent-frame window arrays disagree")
            for k in range(len(frames)):
                self._recent.append(
                    (int(frames[k]), bool(ood[k]), float(score[k]), None if ex is None else ex[k])
                )
        self.n_dismissed = int(state.get("n_dismissed", 0))
        self.confirm_frames = int(state.get("confirm_frames", 0))
        self.confirm_rate = float(state.get("confirm_rate", self.confirm_rate))
        cand = state.get("candidate")
        self._candidate = (
            None
            if cand is None
            else _Candidate(
                int(cand["frame"]),
                [],
                [(int(cand["frame"]), bool(o), float("nan"), None) for o in cand["after_ood"]],
            )
        )
        if state.get("novelty") is not None:
            self.novelty = NoveltyClassifier.from_state_dict(state["novelty"])
