"""Sequential change detectors (river-style: ``update(x) -> bool``, ``reset()``).

Two detectors, selectable by name through :data:`DETECTORS` / :func:`make_detector`:

* ``"cusum"`` -- :class:`BernoulliCUSUM` on the per-frame OOD indicator. Page's CUSUM on the
  log-likelihood ratio of Bernoulli(p1) against Bernoulli(p0). ``p0`` (the in-control OOD rate,
  about ``1 - TPR`` of the HDC threshold) is estimated during ``warmup`` frames with a floor;
  ``p1`` is the smallest OOD rate worth detecting (``min_ood_rate``). The threshold ``h`` is
  solved so that the average run length between false alarms on in-control frames is
  ``1 / false_alarm_rate``.
* ``"page_hinkley"`` -- :class:`PageHinkley` on the OOD score (higher = more in-distribution),
  detecting a drop of the mean. The score's mean and spread are learned during warm-up and the
  threshold follows Siegmund's ARL approximation for a normal CUSUM.

Both learn nothing after warm-up: a detector that kept adapting its in-control level would slowly
absorb a persistent shift instead of flagging it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol, runtime_checkable

from edge_runtime.errors import ConfigError


@runtime_checkable
class ChangeDetector(Protocol):
    """One observation at a time; ``update`` returns True on the step a change is detected."""

    #: What the detector consumes: ``"indicator"`` (0/1 per frame) or ``"score"`` (a float).
    input: ClassVar[str]

    def update(self, x: float) -> bool: ...

    def reset(self) -> None: ...

    @property
    def drift_detected(self) -> bool: ...

    @property
    def statistic(self) -> float: ...

    @property
    def threshold(self) -> float: ...

    @property
    def ready(self) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def _check_rate(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ConfigError(f"drift.{name}: must be in (0, 1), got {value}")
    return value


def cusum_threshold_for_arl(arl0: float, kl_in_control: float) -> float:
    """Threshold ``h`` of a log-likelihood-ratio CUSUM with in-control ARL ``arl0``.

    Wald/Siegmund: ``ARL0 ~ (exp(h) - h - 1) / I0`` with ``I0 = KL(f0 || f1)``, the mean
    downward drift of the statistic in control. Solved for ``h`` by Newton's method (the left
    side is convex and increasing for h > 0).
    """
    if arl0 <= 1.0 or kl_in_control <= 0.0:
        raise ConfigError(f"drift: cannot size a CUSUM for ARL0={arl0}, I0={kl_in_control}")
    target = arl0 * kl_in_control
    h = max(1.0, math.log(target + 1.0))
    for _ in range(100):
        f = math.exp(h) - h - 1.0 - target
        step = f / (math.exp(h) - 1.0)
        h -= step
        if abs(step) < 1e-10:
            break
    return h


class BernoulliCUSUM:
    """CUSUM for a rise of a Bernoulli rate from ``p0`` (learned) to at least ``p1``.

    The statistic ``S_t = max(0, S_{t-1} + llr(x_t))`` uses
    ``llr(1) = log(p1/p0)`` and ``llr(0) = log((1-p1)/(1-p0))``; a change is flagged when
    ``S_t >= h``. After a flag the statistic restarts from zero (river semantics), so a detector
    left running flags again only on fresh evidence.
    """

    input: ClassVar[str] = "indicator"

    def __init__(
        self,
        false_alarm_rate: float = 1e-4,
        min_ood_rate: float = 0.3,
        warmup: int = 200,
        p0_floor: float = 0.05,
        p0: float | None = None,
    ) -> None:
        self.false_alarm_rate = _check_rate("false_alarm_rate", false_alarm_rate)
        self.min_ood_rate = _check_rate("min_ood_rate", min_ood_rate)
        self.p0_floor = _check_rate("p0_floor", p0_floor)
        if warmup < 0:
            raise ConfigError(f"drift.warmup: must be >= 0, got {warmup}")
        self.warmup = int(warmup)
        self._fixed_p0 = None if p0 is None else _check_rate("p0", p0)
        self._warm_n = 0
        self._warm_k = 0
        self.p0 = float("nan")
        self.p1 = float("nan")
        self._h = float("inf")
        self._up = 0.0
        self._down = 0.0
        self._s = 0.0
        self._detected = False
        self.alarm_statistic = float("nan")  # the statistic's value at the last flag
        self.n_seen = 0
        # Updates seen when the statistic was last zero: the CUSUM's own change-point estimate.
        self.run_start = 0
        if self._fixed_p0 is not None or self.warmup == 0:
            self._calibrate(self._fixed_p0 if self._fixed_p0 is not None else self.p0_floor)

    # -- calibration -------------------------------------------------------------------------
    def _calibrate(self, p0: float) -> None:
        """Fix p0, p1, the LLR increments and the threshold."""
        p0 = min(max(p0, self.p0_floor), 0.9)
        # The alternative must sit clearly above the in-control rate; when the in-control rate is
        # itself high (a noisy detector), demand at least twice it rather than an impossible p1.
        p1 = min(max(self.min_ood_rate, 2.0 * p0), 0.99)
        self.p0, self.p1 = p0, p1
        self._up = math.log(p1 / p0)
        self._down = math.log((1.0 - p1) / (1.0 - p0))
        kl0 = p0 * math.log(p0 / p1) + (1.0 - p0) * math.log((1.0 - p0) / (1.0 - p1))
        self._h = cusum_threshold_for_arl(1.0 / self.false_alarm_rate, kl0)

    @property
    def ready(self) -> bool:
        return math.isfinite(self._h)

    # -- river-like interface ------------------------------------------------------------------
    def update(self, x: float) -> bool:
        """Feed one indicator (truthy = out-of-distribution). True when a change is flagged."""
        self.n_seen += 1
        self._detected = False
        hit = bool(x)
        if not self.ready:
            self._warm_n += 1
            self._warm_k += int(hit)
            if self._warm_n >= self.warmup:
                # Half-count shrinkage keeps a warm-up with zero OOD frames from giving p0 = 0.
                self._calibrate((self._warm_k + 0.5) / (self._warm_n + 1.0))
            return False
        self._s = max(0.0, self._s + (self._up if hit else self._down))
        if self._s == 0.0:
            self.run_start = self.n_seen  # the change, if any, started after this update
        if self._s >= self._h:
            self._detected = True
            self.alarm_statistic = self._s
            self._s = 0.0
            return True
        return False

    def reset(self, relearn: bool = False) -> None:
        """Restart the statistic; with ``relearn`` also forget p0 and warm up again."""
        self._s = 0.0
        self.run_start = self.n_seen
        self._detected = False
        if relearn and self._fixed_p0 is None and self.warmup > 0:
            self._warm_n = self._warm_k = 0
            self._h = float("inf")
            self.p0 = self.p1 = float("nan")

    @property
    def drift_detected(self) -> bool:
        return self._detected

    @property
    def statistic(self) -> float:
        return self._s

    @property
    def threshold(self) -> float:
        return self._h

    def expected_delay(self, ood_rate: float) -> float:
        """Approximate frames to detect a step to ``ood_rate`` (h / mean LLR increment)."""
        drift = ood_rate * self._up + (1.0 - ood_rate) * self._down
        return self._h / drift if drift > 0 else float("inf")

    def describe(self) -> dict[str, Any]:
        return {
            "method": "cusum",
            "p0": self.p0,
            "p1": self.p1,
            "threshold": self._h,
            "false_alarm_rate": self.false_alarm_rate,
            "warmup": self.warmup,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "false_alarm_rate": self.false_alarm_rate,
            "min_ood_rate": self.min_ood_rate,
            "warmup": self.warmup,
            "p0_floor": self.p0_floor,
            "fixed_p0": self._fixed_p0,
            "warm_n": self._warm_n,
            "warm_k": self._warm_k,
            "calibrated_p0": self.p0 if self.ready else None,
            "s": self._s,
            "n_seen": self.n_seen,
            "run_start": self.run_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            false_alarm_rate=state["false_alarm_rate"],
            min_ood_rate=state["min_ood_rate"],
            warmup=state["warmup"],
            p0_floor=state["p0_floor"],
            p0=state["fixed_p0"],
        )
        self._warm_n = int(state["warm_n"])
        self._warm_k = int(state["warm_k"])
        if state.get("calibrated_p0") is not None:
            self._calibrate(float(state["calibrated_p0"]))
        self._s = float(state["s"])
        self.n_seen = int(state["n_seen"])
        self.run_start = int(state.get("run_start", self.n_seen))


class PageHinkley:
    """Page-Hinkley test for a drop in the mean OOD score (higher score = in-distribution).

    During warm-up it learns the in-control mean ``mu`` and standard deviation ``sigma`` of the
    score. Afterwards it accumulates ``m_t = max(0, m_{t-1} + (mu - x_t)/sigma - delta)`` and
    flags when ``m_t >= lambda``, with ``delta`` half the smallest drop worth detecting (in
    sigmas) and ``lambda`` from Siegmund's approximation of a normal CUSUM's ARL:
    ``ARL0 ~ (exp(2 delta (h + 1.166)) - 2 delta (h + 1.166) - 1) / (2 delta^2)``.
    Scores are clipped to ``mu +- clip * sigma`` so a single wild frame cannot trigger it.
    """

    input: ClassVar[str] = "score"

    def __init__(
        self,
        false_alarm_rate: float = 1e-4,
        min_shift_sigma: float = 1.0,
        warmup: int = 200,
        clip_sigma: float = 4.0,
    ) -> None:
        self.false_alarm_rate = _check_rate("false_alarm_rate", false_alarm_rate)
        if min_shift_sigma <= 0:
            raise ConfigError(f"drift.min_shift_sigma: must be > 0, got {min_shift_sigma}")
        self.min_shift_sigma = float(min_shift_sigma)
        self.warmup = max(int(warmup), 2)  # a spread needs at least two frames
        self.clip_sigma = float(clip_sigma)
        self.delta = self.min_shift_sigma / 2.0
        self._h = self._solve_threshold()
        self._n = 0
        self._mean = 0.0
        self._m2 = 0.0
        self.mu = float("nan")
        self.sigma = float("nan")
        self._m = 0.0
        self._detected = False
        self.alarm_statistic = float("nan")  # the statistic's value at the last flag
        self.n_seen = 0
        # Updates seen when the statistic was last zero: the CUSUM's own change-point estimate.
        self.run_start = 0

    def _solve_threshold(self) -> float:
        arl0 = 1.0 / self.false_alarm_rate
        k = self.delta

        def arl(h: float) -> float:
            b = 2.0 * k * (h + 1.166)
            return (math.exp(b) - b - 1.0) / (2.0 * k * k)

        lo, hi = 0.0, 1.0
        while arl(hi) < arl0:
            hi *= 2.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if arl(mid) < arl0 else (lo, mid)
        return hi

    @property
    def ready(self) -> bool:
        return math.isfinite(self.sigma)

    def update(self, x: float) -> bool:
        self.n_seen += 1
        self._detected = False
        x = float(x)
        if not math.isfinite(x):
            return False  # a rejected frame carries no score evidence
        if not self.ready:
            # Welford's running mean/variance over the warm-up frames.
            self._n += 1
            d = x - self._mean
            self._mean += d / self._n
            self._m2 += d * (x - self._mean)
            if self._n >= self.warmup:
                self.mu = self._mean
                self.sigma = max(math.sqrt(self._m2 / (self._n - 1)), 1e-6)
            return False
        z = (self.mu - x) / self.sigma
        z = min(max(z, -self.clip_sigma), self.clip_sigma)
        self._m = max(0.0, self._m + z - self.delta)
        if self._m == 0.0:
            self.run_start = self.n_seen  # the change, if any, started after this update
        if self._m >= self._h:
            self._detected = True
            self.alarm_statistic = self._m
            self._m = 0.0
            return True
        return False

    def reset(self, relearn: bool = False) -> None:
        self._m = 0.0
        self.run_start = self.n_seen
        self._detected = False
        if relearn:
            self._n, self._mean, self._m2 = 0, 0.0, 0.0
            self.mu = self.sigma = float("nan")

    @property
    def drift_detected(self) -> bool:
        return self._detected

    @property
    def statistic(self) -> float:
        return self._m

    @property
    def threshold(self) -> float:
        return self._h

    def describe(self) -> dict[str, Any]:
        return {
            "method": "page_hinkley",
            "mu": self.mu,
            "sigma": self.sigma,
            "delta": self.delta,
            "threshold": self._h,
            "false_alarm_rate": self.false_alarm_rate,
            "warmup": self.warmup,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "false_alarm_rate": self.false_alarm_rate,
            "min_shift_sigma": self.min_shift_sigma,
            "warmup": self.warmup,
            "clip_sigma": self.clip_sigma,
            "n": self._n,
            "mean": self._mean,
            "m2": self._m2,
            "mu": self.mu if self.ready else None,
            "sigma": self.sigma if self.ready else None,
            "m": self._m,
            "n_seen": self.n_seen,
            "run_start": self.run_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            false_alarm_rate=state["false_alarm_rate"],
            min_shift_sigma=state["min_shift_sigma"],
            warmup=state["warmup"],
            clip_sigma=state["clip_sigma"],
        )
        self._n, self._mean, self._m2 = int(state["n"]), float(state["mean"]), float(state["m2"])
        if state.get("sigma") is not None:
            self.mu, self.sigma = float(state["mu"]), float(state["sigma"])
        self._m = float(state["m"])
        self.n_seen = int(state["n_seen"])
        self.run_start = int(state.get("run_start", self.n_seen))


#: Detector classes by the name used in ``drift.method``.
DETECTORS: dict[str, type] = {"cusum": BernoulliCUSUM, "page_hinkley": PageHinkley}


def make_detector(name: str, **params: Any) -> ChangeDetector:
    """Build a detector by registry name; unknown names or parameters raise ConfigError."""
    cls = DETECTORS.get(name)
    if cls is None:
        raise ConfigError(
            f"drift.method: unknown detector {name!r}; choose one of {sorted(DETECTORS)}"
        )
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"drift.method={name}: bad parameter ({exc})") from exc


def register_detector(name: str, cls: type) -> None:
    """Add a detector class (anything satisfying :class:`ChangeDetector`) to the registry."""
    DETECTORS[name] = cls
