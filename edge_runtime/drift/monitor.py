"""DriftMonitor: one change detector on the served stream, plus the event it emits.

The runtime feeds every served frame in stream order. The monitor forwards the right quantity to
its detector (the OOD indicator for ``cusum``, the score for ``page_hinkley``), keeps a short window
of recent frames for the event's evidence, and -- when a :class:`NoveltyClassifier` is attached and
the runtime passes a low-level descriptor as ``extra`` -- labels the flag ``novel_class`` or
``domain_shift``. While paused (labels being collected, an adaptation running) it neither flags
nor accumulates evidence, so the flag that follows an adaptation is about fresh frames.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edge_runtime.drift.detectors import ChangeDetector, make_detector
from edge_runtime.drift.novelty import NoveltyClassifier
from edge_runtime.errors import InputError

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


class DriftMonitor:
    """Wraps one :class:`ChangeDetector`; ``update`` returns a :class:`DriftEvent` on a flag."""

    def __init__(
        self,
        detector: ChangeDetector | None = None,
        *,
        novelty: NoveltyClassifier | None = None,
        window: int = 100,
        min_novelty_frames: int = 5,
    ) -> None:
        self.detector: ChangeDetector = detector if detector is not None else make_detector("cusum")
        self.novelty = novelty
        if window < 1:
            raise InputError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self.min_novelty_frames = int(min_novelty_frames)
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
        self._recent.append((int(frame_index), is_ood, score, extra))
        x: float = float(is_ood) if self.detector.input == "indicator" else score
        if not self.detector.update(x):
            return None
        self.n_flags += 1
        # Frames since the statistic last left zero: the detector's estimate of the change point.
        run = self.detector.n_seen - getattr(self.detector, "run_start", self.detector.n_seen - 1)
        since = list(self._recent)[-max(1, min(run, len(self._recent))) :]
        event = DriftEvent(
            frame=int(frame_index), kind=DOMAIN_SHIFT, evidence=self._evidence(since)
        )
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
        """JSON-able state (the window's descriptors are not kept: they are transient evidence)."""
        return {
            "detector_name": self.detector.describe().get("method"),
            "detector": self.detector.state_dict(),
            "paused": self._paused,
            "n_flags": self.n_flags,
            "last_frame": self.last_frame,
            "window": self.window,
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
        if state.get("novelty") is not None:
            self.novelty = NoveltyClassifier.from_state_dict(state["novelty"])
