"""ReturnDetector: notices that the stream has gone back to a domain the device already knows.

A frame is a *claim* when the active domain rejects it (calibrated score < 0) while another known
domain accepts it and wins the routing. In control (the stream stays in the active domain) claims
come at about ``p0`` (near-OOD confusion between memories); a return brings them at about the
returning domain's TPR. A Bernoulli CUSUM on the claim indicator raises an alarm; as the drift
monitor does, the alarm is judged on the next ``confirm_frames`` frames, which it did not select.
The judgement counts the frames routed *away*: in-distribution and won by a known domain other
than the active one, whether or not the active domain also accepts them (a returning frame that
the active domain accepts too is no evidence against the return, and the strict claim rate
would fall with every domain that overlaps the returning one):

- ``confirmed``: frames routed away at rate >= ``confirm_rate``, and more than ``share`` of them
  won by one domain. A return: the runtime switches to that domain and asks for no labels;
- ``ambiguous``: routed away at rate >= ``dismiss_rate`` but not confirmed (a lower rate, or no
  clear winner, as near-OOD new classes can look). Labels decide: the planner's return test;
- otherwise the alarm is dismissed and the statistic restarted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.drift.detectors import make_detector
from edge_runtime.errors import InputError

log = logging.getLogger(__name__)

CONFIRMED = "confirmed"
AMBIGUOUS = "ambiguous"

#: In-control claim rate (about 1 - TPR of the neighbouring memories) and the rate tested for.
CLAIM_P0 = 0.05
CLAIM_P1 = 0.9


@dataclass
class ReturnClaim:
    """A confirmed or ambiguous claim by a known domain, at the frame the judgement was made."""

    frame: int
    case: str  # "confirmed" | "ambiguous"
    domain: int  # the domain that claimed most frames
    active_domain: int
    evidence: dict[str, Any] = field(default_factory=dict)


class ReturnDetector:
    """``update`` once per served frame; returns a :class:`ReturnClaim` when one is judged."""

    def __init__(
        self,
        *,
        false_alarm_rate: float = 1e-4,
        confirm_frames: int = 20,
        confirm_rate: float = 0.5,
        share: float = 0.5,
        dismiss_rate: float = 0.3,
        p0: float = CLAIM_P0,
        p1: float = CLAIM_P1,
    ) -> None:
        if confirm_frames < 1:
            raise InputError(f"confirm_frames must be >= 1, got {confirm_frames}")
        if not 0.0 < dismiss_rate <= confirm_rate <= 1.0 or not 0.0 < share <= 1.0:
            raise InputError(
                "need 0 < dismiss_rate <= confirm_rate <= 1 and 0 < share <= 1, got "
                f"{dismiss_rate}, {confirm_rate}, {share}"
            )
        self.confirm_frames = int(confirm_frames)
        self.confirm_rate = float(confirm_rate)
        self.share = float(share)
        self.dismiss_rate = float(dismiss_rate)
        self.detector = make_detector(
            "cusum", false_alarm_rate=false_alarm_rate, min_ood_rate=p1, warmup=0, p0=p0
        )
        self._alarm: int | None = None  # frame of an alarm awaiting confirmation
        self._after: list[int] = []  # winning domain per frame since the alarm (-1: not away)
        self.n_dismissed = 0

    @classmethod
    def from_config(cls, drift_cfg: Any) -> ReturnDetector:
        """Same false-alarm rate and confirmation length as the drift monitor."""
        return cls(
            false_alarm_rate=drift_cfg.false_alarm_rate,
            confirm_frames=max(1, int(drift_cfg.confirm_frames)),
            dismiss_rate=min(drift_cfg.min_ood_rate, 0.5),
        )

    @property
    def pending(self) -> bool:
        return self._alarm is not None

    def reset(self) -> None:
        self.detector.reset()
        self._alarm = None
        self._after = []

    def update(
        self, frame: int, active_domain: int, domain: int, is_ood: bool, active_score: float
    ) -> ReturnClaim | None:
        away = (not is_ood) and domain != active_domain and domain >= 0
        claim = away and active_score < 0
        if self._alarm is not None:
            self._after.append(int(domain) if away else -1)
            if len(self._after) < self.confirm_frames:
                return None
            return self._judge(int(frame), active_domain)
        if self.detector.update(float(claim)):
            self._alarm = int(frame)
            self._after = []
        return None

    def _judge(self, frame: int, active_domain: int) -> ReturnClaim | None:
        after = np.asarray(self._after, dtype=np.int64)
        alarm = self._alarm
        self._alarm, self._after = None, []
        claims = after[after >= 0]
        rate = len(claims) / len(after)
        if rate < self.dismiss_rate or len(claims) == 0:
            self.n_dismissed += 1
            log.info(
                "return alarm at frame %d dismissed: routed-away rate %.2f over %d frames",
                alarm,
                rate,
                len(after),
            )
            self.detector.reset()
            return None
        counts = np.bincount(claims)
        top = int(counts.argmax())
        top_share = float(counts[top]) / len(claims)
        case = CONFIRMED if rate >= self.confirm_rate and top_share > self.share else AMBIGUOUS
        evidence = {
            "alarm_frame": alarm,
            "confirm_frames": len(after),
            "routed_away_rate": round(rate, 4),
            "top_share": round(top_share, 4),
            "claims_by_domain": {int(d): int(c) for d, c in enumerate(counts) if c},
        }
        return ReturnClaim(frame, case, top, int(active_domain), evidence)

    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict(),
            "alarm": self._alarm,
            "after": list(self._after),
            "n_dismissed": self.n_dismissed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        alarm = state.get("alarm")
        self._alarm = None if alarm is None else int(alarm)
        self._after = [int(v) for v in state.get("after", [])]
        self.n_dismissed = int(state.get("n_dismissed", 0))
