"""The runtime loop: the one place that wires encoder, HDC memories, router, drift and adaptation.

Per batch (:meth:`Runtime.process`), in stream order:

1. frames that cannot be served (NaN/Inf in a float frame) are rejected: prediction -1,
   domain -1, ``is_ood`` True and a ``frame_rejected`` event; the rest go on;
2. the frozen encoder turns frames into features;
3. every domain's HDC memory scores them (calibrated: 0 = that domain's threshold); the
   router picks the domain that claims a frame best; a frame is in-distribution iff its
   best calibrated score is >= 0;
4. the routed domain's adaptor predicts (also for OOD frames: a best guess still counts);
5. the drift monitor sees every frame in order. A flag asks for the labels of the next
   ``adapt.label_budget`` frames (test-then-train: the caller reveals them through
   :meth:`Runtime.feedback` after the frames were predicted). A second, small detector
   watches routing: when frames the active domain rejects are claimed by another known
   domain, the stream has returned to that domain (no labels, no new adaptor);
6. with the labels in, adaptation runs in two phases. First, on the serving thread and in
   tens of milliseconds: the return check, the new domain's HDC memory with a calibrated
   threshold and a head from the architecture and initialisation plug points (untrained),
   installed at the start of the next batch, so routing and the drift monitor know the
   domain at once however fast frames arrive. Then a worker thread trains the head (serving
   goes on) and the serving thread swaps the trained head in.

Growth policy (measured on the fashion-drift stream; table in the runtime report): every
new head is trained on its shots plus the BASE domain's class-balanced replay buffer (shots
up-weighted to the same total), so base frames the router sends to a new domain by mistake
(near-OOD confusion of the frozen features) still get the right label. With
``novel_policy="separate"`` (default) new classes get a new domain like a domain shift; with
``"extend"`` they join the known domain their shots are nearest to as a new adaptor version
over the union of labels (the previous version stays in the registry for a rollback, the shots
join that domain's HDC memory). Extending lowers that domain's threshold, so it then claims
far-OOD frames too: on the full fashion-drift stream it measured mean final accuracy 73.3,
forgetting 12.0 points and a 368-frame delay on the next shift, against 78.9 / 0.7 / 4 frames
for the default.
Domains live in :class:`~edge_runtime.adapt.registry.DomainRegistry`; routing is
:class:`~edge_runtime.adapt.router.Router`.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from edge_runtime.adapt.adaptor import Adaptor, build_adaptor, train_adaptor
from edge_runtime.adapt.init import Initializer, PrototypeInit
from edge_runtime.adapt.registry import DomainRegistry
from edge_runtime.adapt.replay import PER_CLASS, balanced_sample, merge_replay
from edge_runtime.adapt.router import Router
from edge_runtime.adapt.search import ArchitectureSearch, FixedArchitecture
from edge_runtime.adapt.worker import AdaptationWorker, JobResult
from edge_runtime.config.schema import RuntimeConfig, validate_config
from edge_runtime.drift import (
    DOMAIN_SHIFT,
    NOVEL_CLASS,
    DriftMonitor,
    NoveltyClassifier,
    make_detector,
    pixel_statistics,
)
from edge_runtime.encoder import Encoder, FeatureSpec, TorchBackend
from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.hdc.bank import DomainMemoryBank
from edge_runtime.state import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "edge_runtime.runtime"
BASE_DOMAIN = 0
#: Kind of a flag raised by the routing detector (frames claimed by another known domain).
KNOWN_DOMAIN = "known_domain"
# A collected label set mostly claimed (in-distribution) by one known domain, whose adaptor
# still labels it well, is a return to that domain: no new adaptor.
RETURN_FRACTION = 0.5
RETURN_ACCURACY = 0.6
# Routing detector: in-control rate of "the active domain rejects a frame that another domain
# claims" (about 1 - TPR), and the rate it tests for. A return brings ~TPR of such frames; new
# classes near a known domain bring far fewer, and the OOD monitor flags those first.
ROUTE_P0 = 0.05
ROUTE_P1 = 0.9
#: Growth policies for a ``novel_class`` flag: extend the nearest known domain, or grow a
#: separate domain (as for a domain shift).
NOVEL_POLICIES = ("extend", "separate")
#: Base-domain features kept for replay, per class. Every new head is trained on its shots plus
#: this sample (shots up-weighted to the same total), which is what keeps base frames that the
#: router sends to a new domain correctly labelled (measured: 50/class forgets 4.7 points of
#: base accuracy, 500/class 0.3; see the runtime report).
BASE_REPLAY_PER_CLASS = 500
#: Compute bound of an adaptation job's training: steps x rows. Full-batch steps cost one pass
#: over shots + replay; on 2 busy cores 3,200 rows x 300 steps took ~14 s (2,300 frames served
#: meanwhile, so the next shift went undetected). 50 steps on 3,200 rows cost ~1 s alone and
#: measured 78.5 mean final accuracy vs 79.1 at 300 steps.
JOB_ROW_STEPS = 160_000
MIN_JOB_STEPS = 50


# ------------------------------------------------------------------------------------ results


@dataclass
class Decisions:
    """What the runtime decided for one batch, one entry per frame (stream order)."""

    indices: np.ndarray  # int64 stream indices
    prediction: np.ndarray  # int64, -1 if rejected
    ood_score: np.ndarray  # float32, higher = more in-distribution (-inf if rejected)
    domain: np.ndarray  # int64, the domain it was routed to, -1 if none
    is_ood: np.ndarray  # bool
    rejected: np.ndarray  # bool
    label_request: np.ndarray  # bool: the runtime asks for this frame's label
    features: np.ndarray | None = None  # (N,F) float32 (zeros for rejected frames)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class _AdaptResult:
    """What a finished adaptation job hands to the serving thread."""

    trigger_frame: int
    kind: str
    action: str  # "new" (a new domain) | "extend" (new adaptor version) | "return"
    domain_id: int
    report: dict[str, Any]
    adaptor: Adaptor | None = None
    replay: tuple[np.ndarray, np.ndarray] | None = None
    bank: DomainMemoryBank | None = None
    train_set: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None


class Runtime:
    """Serve frames, detect drift, grow adaptors; see the module docstring for the loop.

    ``background=False`` runs adaptation jobs synchronously (deterministic results for tests);
    either way a finished job is installed at the start of the next :meth:`process` call.
    """

    def __init__(
        self,
        config: RuntimeConfig | None = None,
        encoder: Encoder | None = None,
        *,
        background: bool = True,
        search: ArchitectureSearch | None = None,
        initializer: Initializer | None = None,
        clock: Callable[[], float] = time.time,
        novel_policy: str = "separate",
        replay_per_class: int = PER_CLASS,
        base_replay_per_class: int = BASE_REPLAY_PER_CLASS,
    ) -> None:
        if novel_policy not in NOVEL_POLICIES:
            raise InputError(f"novel_policy must be one of {NOVEL_POLICIES}, got {novel_policy!r}")
        self.novel_policy = novel_policy
        self.replay_per_class = int(replay_per_class)
        self.base_replay_per_class = int(base_replay_per_class)
        self.config = config if config is not None else RuntimeConfig()
        self.encoder = encoder if encoder is not None else build_encoder(self.config)
        self.background = background
        # Plug points: zero-shot NAS picks the architecture, a (meta-learned) initialiser the
        # starting weights. Defaults: a linear head started at the class prototypes.
        self.search: ArchitectureSearch = search if search is not None else FixedArchitecture()
        self.initializer: Initializer = initializer if initializer is not None else PrototypeInit()
        self.clock = clock
        self.bank = make_bank(self.config, self.encoder.spec)
        self.registry = DomainRegistry(max_adaptors=self.config.adapt.max_adaptors)
        self.router = Router()
        # Novel class vs domain shift is told from the earliest encoder layer's pooled features
        # (measured right for fog, noise, rotation and new classes); a one-layer encoder falls
        # back to pixel statistics.
        slices = self.encoder.spec.slices()
        self._novelty_slice: slice | None = slices[0] if len(slices) > 1 else None
        self.monitor = DriftMonitor.from_config(
            self.config.drift, p0_floor=1.0 - self.config.hdc.tpr
        )
        self.route_detector = self._make_route_detector()
        self.active_domain = BASE_DOMAIN
        self.frames_seen = 0
        self.labels_used = 0
        self.label_budget = int(self.config.adapt.label_budget)
        # Label collection after a flag.
        self._collect_left = 0  # frames still to request
        self._trigger: tuple[int, str] | None = None  # (flag frame, kind) being served
        self._pending: dict[int, np.ndarray] = {}  # requested frame -> features, awaiting a label
        self._buf_x: list[np.ndarray] = []
        self._buf_y: list[int] = []
        self._buf_i: list[int] = []
        self._adapting = False
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._worker: AdaptationWorker | None = None
        self._future: Future[_AdaptResult] | None = None  # synchronous mode only

    # -------------------------------------------------------------------------------- setup
    def _make_route_detector(self) -> Any:
        d = self.config.drift
        return make_detector(
            "cusum",
            false_alarm_rate=d.false_alarm_rate,
            min_ood_rate=ROUTE_P1,
            warmup=0,
            p0=ROUTE_P0,
        )

    @property
    def feature_dim(self) -> int:
        return self.encoder.spec.dim

    @property
    def domains(self) -> dict[int, Any]:
        """Registered domains by id (:class:`~edge_runtime.adapt.registry.Domain` records)."""
        return {d.id: d for d in self.registry}

    @property
    def next_domain_id(self) -> int:
        return self.registry.next_id()

    def fit_base(
        self,
        images: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        *,
        features: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Fit the base domain (id 0) from the labelled training set (frames or features)."""
        if self.domains:
            raise InputError("the base domain is already fitted")
        if labels is None:
            raise InputError("fit_base needs labels")
        if features is None:
            if images is None:
                raise InputError("fit_base needs images or features")
            features = self.encoder.features(images)
        features = np.ascontiguousarray(features, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        if features.ndim != 2 or len(features) != len(labels) or len(labels) == 0:
            raise InputError(
                f"fit_base: features {features.shape} and labels {labels.shape} do not match"
            )
        t0 = time.perf_counter()
        adaptor, report = self._train_head(features, labels, BASE_DOMAIN)
        report["threshold"] = float(self.bank.add_domain(BASE_DOMAIN, features, labels))
        replay = balanced_sample(features, labels, self.base_replay_per_class, self.config.hdc.seed)
        self.registry.add(
            adaptor, domain_id=BASE_DOMAIN, name="base", origin="base", kind="base", replay=replay
        )
        if self._novelty_slice is not None:
            self.monitor.novelty = NoveltyClassifier().fit(features[:, self._novelty_slice])
        elif images is not None:
            self.monitor.novelty = NoveltyClassifier().fit(pixel_statistics(images))
        report["seconds"] = time.perf_counter() - t0
        return report

    # -------------------------------------------------------------------------------- serving
    def process(self, frames: np.ndarray, indices: np.ndarray | None = None) -> Decisions:
        """Serve a batch of frames (stream order); see the module docstring."""
        if not self.domains:
            raise InputError("the runtime has no domain yet: call fit_base() first")
        frames = _check_batch(frames, self.encoder.spec)
        n = len(frames)
        if indices is None:
            indices = np.arange(self.frames_seen, self.frames_seen + n, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        if indices.shape != (n,):
            raise InputError(f"indices must have shape ({n},), got {indices.shape}")
        self._install_finished_job(int(indices[0]))

        ok = _finite_frames(frames)
        rejected = ~ok
        feats = np.zeros((n, self.feature_dim), dtype=np.float32)
        prediction = np.full(n, -1, dtype=np.int64)
        domain = np.full(n, -1, dtype=np.int64)
        score = np.full(n, -np.inf, dtype=np.float32)
        active_score = np.full(n, -np.inf, dtype=np.float32)
        extras = None
        if ok.any():
            good = frames[ok] if not ok.all() else frames
            f = self.encoder.features(good)
            feats[ok] = f
            d, s, a = self._route(f)
            domain[ok], score[ok], active_score[ok] = d, s, a
            prediction[ok] = self._predict(f, d)
            if self.monitor.novelty is not None and self._novelty_slice is not None:
                extras = feats[:, self._novelty_slice]
            elif self.monitor.novelty is not None and good.dtype == np.uint8:
                extras = np.zeros((n, 4 + 16), dtype=np.float32)
                extras[ok] = pixel_statistics(good)
        is_ood = score < 0.0
        for j in np.flatnonzero(rejected):
            self._emit("frame_rejected", int(indices[j]), reason="frame has NaN or Inf values")

        label_request = np.zeros(n, dtype=bool)
        for j in range(n):
            i = int(indices[j])
            if self._collect_left > 0 and not rejected[j]:
                label_request[j] = True
                self._pending[i] = feats[j].copy()
                self._collect_left -= 1
            if rejected[j]:
                continue
            if self.monitor.paused:
                continue
            ev = self.monitor.update(
                i, bool(is_ood[j]), float(score[j]), None if extras is None else extras[j]
            )
            if ev is not None:
                self._on_drift(i, ev.kind, ev.evidence)
                continue
            # Routing: claimed by another known domain while the active one rejects it.
            hit = (not is_ood[j]) and domain[j] != self.active_domain and active_score[j] < 0
            if self.route_detector.update(float(hit)):
                self._on_route_change(i, domain[: j + 1], is_ood[: j + 1])
        self.frames_seen = max(self.frames_seen, int(indices[-1]) + 1)
        events, self._events = self._events, []
        return Decisions(
            indices=indices,
            prediction=prediction,
            ood_score=score,
            domain=domain,
            is_ood=is_ood,
            rejected=rejected,
            label_request=label_request,
            features=feats,
            events=events,
        )

    def _route(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Best domain, its calibrated score and the active domain's score, per frame."""
        with self._lock:
            scores = np.asarray(self.bank.calibrated_scores(features), dtype=np.float32)
            ids = np.asarray(self.bank.domain_ids, dtype=np.int64)
        dec = self.router.route(scores, ids)
        col = np.flatnonzero(ids == self.active_domain)
        active = scores[:, col[0]] if len(col) else np.full(len(scores), -np.inf, np.float32)
        return dec.domain, dec.score, active

    def _predict(self, features: np.ndarray, domain: np.ndarray) -> np.ndarray:
        out = np.full(len(features), -1, dtype=np.int64)
        with self._lock:
            adaptors = {d.id: d.adaptor for d in self.registry}
        for d in np.unique(domain):
            if int(d) in adaptors:
                m = domain == d
                out[m] = adaptors[int(d)].predict(features[m])
        return out

    def predict_eval(
        self, frames: np.ndarray | None = None, *, features: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, ood_score, domain) for frames or features, with no side effects."""
        if features is None:
            if frames is None:
                raise InputError("predict_eval needs frames or features")
            features = self.encoder.features(_check_batch(frames, self.encoder.spec))
        features = np.ascontiguousarray(features, dtype=np.float32)
        if len(features) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
        d, s, _ = self._route(features)
        return self._predict(features, d), s, d

    # -------------------------------------------------------------------------------- drift
    def _on_drift(self, frame: int, kind: str, evidence: dict[str, Any]) -> None:
        etype = "novel_class" if kind == NOVEL_CLASS else "drift"
        self._emit(etype, frame, kind=kind, evidence=_jsonable(evidence))
        self._emit("alert", frame, reason=etype, kind=kind, domains=len(self.domains))
        # Extending a known domain with new classes needs no new adaptor slot.
        grows = kind != KNOWN_DOMAIN and not (kind == NOVEL_CLASS and self.novel_policy == "extend")
        refused = None
        if grows and self.registry.full:
            refused = f"adapt.max_adaptors={self.config.adapt.max_adaptors} reached"
        elif grows:
            refused = self._memory_refusal()
        if refused is not None:
            log.warning("frame %d: adaptation refused: %s", frame, refused)
            self._emit("adaptation_refused", frame, reason=refused)
            self.monitor.reset()
            self.route_detector.reset()
            return
        self.monitor.pause()
        self._trigger = (frame, kind)
        self._collect_left = self.label_budget
        self._emit("labels_requested", frame, labels=self.label_budget)

    def _memory_refusal(self) -> str | None:
        """Why growing one more domain would break ``device.memory_budget_mb``, or None.

        The process's resident memory now plus what a new domain adds: its exemplar codes and
        re-ranking vectors for ``label_budget`` shots, and a head over the encoder features
        (bounded by every known class plus ``label_budget`` new ones).
        """
        budget = float(self.config.device.memory_budget_mb)
        rss = psutil.Process().memory_info().rss / 2**20
        per_shot = self.bank.nbytes / max(1, len(self.bank.labels))
        n_classes = len(self.registry.all_labels())
        head = 4 * (self.encoder.spec.dim + 1) * (n_classes + self.label_budget)
        need = (per_shot * self.label_budget + head) / 2**20
        if rss + need <= budget:
            return None
        return (
            f"device.memory_budget_mb={budget:g} would be exceeded: resident {rss:.0f} MB "
            f"+ {need:.1f} MB for the new domain"
        )

    def request_adaptation(self, kind: str = DOMAIN_SHIFT, frame: int | None = None) -> None:
        """Start collecting labels now, as if the monitor had flagged ``kind`` (an operator's
        or the fleet controller's "adapt now" command)."""
        if kind not in (DOMAIN_SHIFT, NOVEL_CLASS):
            raise InputError(f"kind must be {DOMAIN_SHIFT!r} or {NOVEL_CLASS!r}, got {kind!r}")
        if self._trigger is not None or self._adapting:
            raise InputError("an adaptation is already under way")
        at = self.frames_seen if frame is None else int(frame)
        self._on_drift(at, kind, {"requested": True})

    def _on_route_change(self, frame: int, domain: np.ndarray, is_ood: np.ndarray) -> None:
        """Frames the active domain rejects are claimed by another known domain.

        Probably a return to that domain, but near-OOD new classes can look the same, so it
        is handled like any drift flag: labels are collected and the adaptation job decides
        (a return re-activates the old domain's adaptor and creates nothing).
        """
        w = self.monitor.window
        recent = domain[-w:][~is_ood[-w:]]
        recent = recent[recent != self.active_domain]
        target = int(np.bincount(recent).argmax()) if len(recent) else self.active_domain
        self._on_drift(
            frame, KNOWN_DOMAIN, {"claimed_by": target, "active_domain": self.active_domain}
        )

    # -------------------------------------------------------------------------------- labels
    def wants_labels(self) -> bool:
        """True while the runtime collects labels after a drift flag."""
        return self._collect_left > 0 or bool(self._pending)

    def label_budget_state(self) -> dict[str, int]:
        return {
            "budget": self.label_budget,
            "to_request": self._collect_left,
            "awaiting": len(self._pending),
            "collected": len(self._buf_y),
            "used": self.labels_used,
        }

    def feedback(self, indices: np.ndarray, labels: np.ndarray) -> int:
        """Reveal labels of requested frames; returns how many were accepted."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        labels = np.asarray(labels).reshape(-1)
        if len(indices) != len(labels):
            raise InputError(f"feedback: {len(indices)} indices but {len(labels)} labels")
        if len(labels) and not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"feedback labels must be integers, got dtype {labels.dtype}")
        if len(labels) and labels.min() < 0:
            raise InputError("feedback labels must be >= 0")
        accepted = 0
        for i, y in zip(indices.tolist(), labels.tolist(), strict=True):
            x = self._pending.pop(int(i), None)
            if x is None:
                continue
            self._buf_x.append(x)
            self._buf_y.append(int(y))
            self._buf_i.append(int(i))
            accepted += 1
        self.labels_used += accepted
        if self._trigger is not None and self._collect_left == 0 and not self._pending:
            self._start_adaptation()
        return accepted

    def finish(self, wait: bool = True) -> None:
        """End of stream: adapt on whatever labels were collected, then wait for the worker."""
        self._collect_left = 0
        self._pending.clear()
        if self._trigger is not None and self._buf_y:
            self._start_adaptation()
        if wait:
            self._drain_worker(self.frames_seen)

    # -------------------------------------------------------------------------------- adaptation
    def _start_adaptation(self) -> None:
        assert self._trigger is not None
        trigger, kind = self._trigger
        x = np.stack(self._buf_x).astype(np.float32)
        y = np.asarray(self._buf_y, dtype=np.int64)
        frames = list(self._buf_i)
        self._buf_x, self._buf_y, self._buf_i = [], [], []
        self._trigger = None
        self._adapting = True
        new_id = self.next_domain_id
        self._emit(
            "adaptation_started",
            frames[-1] if frames else trigger,
            trigger_frame=trigger,
            kind=kind,
            labels=len(y),
            label_frames=[frames[0], frames[-1]] if frames else [],
            classes=sorted({int(v) for v in y}),
            domain=new_id,
        )
        if self.background:
            # Two phases. Now, on the serving thread, the cheap part: the return check, the new
            # domain's HDC memory and an initialised (untrained) head, installed at the next batch,
            # so routing and the drift monitor know the domain however fast frames arrive. Then
            # the worker trains the head off the serving path and swaps it in.
            self._drain_worker(frames[-1])  # a head still training from the last drift
            res = self._future_of(lambda: self._adapt_job(x, y, trigger, kind, new_id, False))
            if res is not None and res.train_set is not None:
                if self._worker is None:
                    self._worker = AdaptationWorker(torch_threads=1)
                domain_id, (hx, hy, hw) = res.domain_id, res.train_set
                self._worker.submit(
                    lambda cancel: self._train_job(domain_id, hx, hy, hw),
                    name=f"train-domain-{domain_id}",
                )
        else:
            self._future_of(lambda: self._adapt_job(x, y, trigger, kind, new_id))

    def _future_of(self, job: Callable[[], _AdaptResult]) -> _AdaptResult | None:
        """Run ``job`` now; its result (or error) is installed at the start of the next batch."""
        fut: Future[_AdaptResult] = Future()
        try:
            fut.set_result(job())
        except Exception as exc:  # surfaced as an error event, like the threaded path
            fut.set_exception(exc)
        self._future = fut
        return fut.result() if fut.exception() is None else None

    def _train_job(
        self, domain_id: int, x: np.ndarray, y: np.ndarray, w: np.ndarray | None
    ) -> _AdaptResult:
        """Runs on the worker thread: the trained head for a domain installed in phase one."""
        t0 = time.perf_counter()
        adaptor, report = self._train_head(x, y, domain_id, w, job=True)
        report.update(domain=domain_id, seconds=time.perf_counter() - t0)
        return _AdaptResult(-1, "", "trained", domain_id, report, adaptor)

    def _drain_worker(self, frame: int) -> None:
        """Wait for a training job in flight and install what has finished (at most two results:
        a phase-one domain and a trained head)."""
        self.wait_idle()
        for _ in range(2):
            self._install_finished_job(frame)

    def _adapt_job(
        self, x: np.ndarray, y: np.ndarray, trigger: int, kind: str, new_id: int, train: bool = True
    ) -> _AdaptResult:
        """Return check, new domain's memory and head (trained unless ``train=False``).

        Never touches serving state except through the lock; the result is installed by the
        serving thread at the start of the next batch.
        """
        t0 = time.perf_counter()
        d, s, _ = self._route(x)
        claimed = d[s >= 0]
        if len(claimed):
            top = int(np.bincount(claimed).argmax())
            frac = float(np.count_nonzero(claimed == top)) / len(x)
            acc = float(np.mean(self.registry.get(top).adaptor.predict(x) == y))
            if frac >= RETURN_FRACTION and acc >= RETURN_ACCURACY:
                report = {
                    "returned_to": top,
                    "claimed_fraction": frac,
                    "old_adaptor_accuracy": acc,
                    "seconds": time.perf_counter() - t0,
                }
                return _AdaptResult(trigger, kind, "return", top, report)
        if kind == NOVEL_CLASS and self.novel_policy == "extend":
            # New classes join the known domain their shots are nearest to (by routing; the
            # active domain when nothing routes), not necessarily the active one: new objects
            # seen by the clean camera belong to the clean domain even after a noisy spell.
            parent = int(np.bincount(d[d >= 0]).argmax()) if (d >= 0).any() else self.active_domain
            res = self._grow("extend", parent, x, y, trigger, kind, train)
        else:
            res = self._grow("new", new_id, x, y, trigger, kind, train)
        res.report["seconds"] = time.perf_counter() - t0
        return res

    def _replay_of(self, domain_id: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            replay = self.registry.get(domain_id).replay
        if replay is None:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros(0, np.int64)
        return replay

    def _grow(
        self,
        action: str,
        domain_id: int,
        x: np.ndarray,
        y: np.ndarray,
        trigger: int,
        kind: str,
        train: bool = True,
    ) -> _AdaptResult:
        """``"new"``: a new domain, head on the shots + the base domain's replay, memory of the
        shots. ``"extend"``: new classes in a known domain, a new adaptor version over the union
        of labels, trained with that domain's own replay, its memory extended by the shots."""
        extend = action == "extend"
        rx, ry = self._replay_of(domain_id if extend else BASE_DOMAIN)
        hx, hy, hw = _with_replay(x, y, rx, ry)
        adaptor, report = self._train_head(hx, hy, domain_id, hw, job=True, train=train)
        # The memory changes in a copy of the bank: serving keeps scoring the old one until
        # the serving thread swaps the copy in (no half-added domain is ever seen).
        with self._lock:
            bank = copy.deepcopy(self.bank)
        grow = bank.extend_domain if extend else bank.add_domain
        report["threshold"] = float(grow(domain_id, x, y))
        report.update(domain=domain_id, shots=len(y), replay=len(ry), action=action)
        seed = self.config.hdc.seed + domain_id
        if extend:
            with self._lock:
                report["version"] = self.registry.get(domain_id).version + 1
            replay = merge_replay((rx, ry), (x, y), self.replay_per_class, seed)
        else:
            replay = balanced_sample(x, y, self.replay_per_class, seed)
        return _AdaptResult(
            trigger, kind, action, domain_id, report, adaptor, replay, bank, (hx, hy, hw)
        )

    def _train_head(
        self,
        x: np.ndarray,
        y: np.ndarray,
        domain_id: int,
        weight: np.ndarray | None = None,
        *,
        job: bool = False,
        train: bool = True,
    ) -> tuple[Adaptor, dict[str, Any]]:
        """Architecture (NAS plug point), initialisation (meta-init plug point), training."""
        cfg = self.config
        label_map = sorted({int(v) for v in y})
        found = self.search.search(x, y, label_map)
        adaptor = build_adaptor(found.arch, label_map, seed=cfg.hdc.seed + domain_id)
        self.initializer.init(adaptor, x, y)
        report = {
            "arch": found.arch.to_dict(),
            "search": found.method,
            "init": self.initializer.name,
            "labels": label_map,
        }
        if not train:  # the initialised head serves until the trained one replaces it
            return adaptor, report | {"train": {"steps": 0}}
        steps = int(cfg.adapt.steps)
        if job:  # off the serving path but sharing its cores: bound the job's compute
            steps = min(steps, max(MIN_JOB_STEPS, JOB_ROW_STEPS // max(len(y), 1)))
        tr = train_adaptor(
            adaptor,
            x,
            y,
            steps=steps,
            lr=cfg.adapt.lr,
            seed=cfg.hdc.seed + domain_id,
            fit_normalizer=False,
            sample_weight=weight,
        )
        return adaptor, report | {"train": tr.to_dict()}

    def _poll_job(self) -> tuple[_AdaptResult | None, str | None] | None:
        """(result, error) of a finished job, or None while none has finished."""
        if self._future is not None:
            fut, self._future = self._future, None
            try:
                return fut.result(), None
            except Exception as exc:
                return None, f"{type(exc).__name__}: {exc}"
        if self._worker is None:
            return None
        done: JobResult | None = self._worker.poll()
        if done is None:
            return None
        if done.ok:
            return done.value, None
        if done.traceback:
            log.error("adaptation job failed:\n%s", done.traceback)
        return None, done.error or done.status

    def _install_finished_job(self, frame: int) -> None:
        polled = self._poll_job()
        if polled is None:
            return
        res, error = polled
        if res is not None and res.action == "trained":
            with self._lock:
                if res.domain_id in self.registry.ids():
                    self.registry.get(res.domain_id).adaptor = res.adaptor
            self._emit("adaptor_trained", frame, **_jsonable(res.report))
            return
        self._adapting = False
        if res is None:
            self._emit("error", frame, where="adaptation", message=error)
            self.monitor.resume(reset=True)
            self.route_detector.reset()
            return
        if res.action == "return":
            self.active_domain = res.domain_id
            self._emit(
                "domain_returned",
                frame,
                trigger_frame=res.trigger_frame,
                domain=res.domain_id,
                **_jsonable(res.report),
            )
        else:
            assert res.adaptor is not None and res.bank is not None
            with self._lock:
                if res.action == "extend":
                    self.registry.update_adaptor(res.domain_id, res.adaptor, replay=res.replay)
                else:
                    self.registry.add(
                        res.adaptor,
                        domain_id=res.domain_id,
                        created_at_frame=frame,
                        origin="drift",
                        kind=res.kind,
                        metadata={"trigger_frame": res.trigger_frame},
                        replay=res.replay,
                    )
                self.bank = res.bank
            self.active_domain = res.domain_id
            self._emit(
                "adaptation_finished",
                frame,
                trigger_frame=res.trigger_frame,
                kind=res.kind,
                **_jsonable(res.report),
            )
        self._emit(
            "alert", frame, reason="adapted", domain=self.active_domain, domains=len(self.domains)
        )
        # The set of memories changed, so the in-control OOD rate did too: warm up again
        # (a few-shot domain's threshold covers its own frames less tightly than the base's).
        self.monitor.resume(reset=False)
        self.monitor.reset(relearn=True)
        self.route_detector.reset()

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until a running adaptation job is done (it is installed on the next batch)."""
        if self._worker is not None:
            self._worker.wait(timeout)

    @property
    def adapting(self) -> bool:
        return self._adapting

    def close(self) -> None:
        if self._worker is not None:
            self._worker.wait()
            self._worker = None

    # -------------------------------------------------------------------------------- events
    def _emit(self, etype: str, frame: int, **details: Any) -> None:
        self._events.append({"type": etype, "frame": int(frame), "time": self.clock(), **details})

    def drain_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The whole state; an adaptation in flight is finished and installed first."""
        self._drain_worker(self.frames_seen)
        pending_i = sorted(self._pending)
        reg_tensors, reg_meta = self.registry.to_state()
        return {
            "config": self.config.model_dump(mode="json"),
            "encoder_spec": self.encoder.spec.to_dict(),
            "registry": {"tensors": reg_tensors, "meta": reg_meta},
            "bank": self.bank.state_dict(),
            "monitor": self.monitor.state_dict(),
            "route_detector": self.route_detector.state_dict(),
            "active_domain": self.active_domain,
            "frames_seen": self.frames_seen,
            "labels_used": self.labels_used,
            "label_budget": self.label_budget,
            "collect_left": self._collect_left,
            "trigger": list(self._trigger) if self._trigger is not None else None,
            "pending_frames": np.asarray(pending_i, dtype=np.int64),
            "pending_features": np.stack([self._pending[i] for i in pending_i])
            if pending_i
            else np.zeros((0, self.feature_dim), np.float32),
            "buffer_frames": np.asarray(self._buf_i, dtype=np.int64),
            "buffer_labels": np.asarray(self._buf_y, dtype=np.int64),
            "buffer_features": np.stack(self._buf_x)
            if self._buf_x
            else np.zeros((0, self.feature_dim), np.float32),
        }

    def save(self, path: str | Path) -> Path:
        """Checkpoint the whole runtime atomically (see :mod:`edge_runtime.state`)."""
        return save_checkpoint(path, self.state_dict(), kind=CHECKPOINT_KIND)

    @classmethod
    def load(
        cls,
        path: str | Path,
        encoder: Encoder | None = None,
        *,
        background: bool = True,
        **kwargs: Any,
    ) -> Runtime:
        """Rebuild a runtime saved by :meth:`save`; CheckpointError if corrupt or mismatched."""
        state = load_checkpoint(path, kind=CHECKPOINT_KIND)
        try:
            config = validate_config(state["config"])
            saved_spec = FeatureSpec.from_dict(state["encoder_spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: bad config or encoder spec ({exc})") from exc
        rt = cls(config, encoder, background=background, **kwargs)
        if rt.encoder.spec.to_dict() != saved_spec.to_dict():
            raise CheckpointError(
                f"checkpoint {path} was made with encoder {saved_spec.to_dict()}, "
                f"but this runtime's encoder is {rt.encoder.spec.to_dict()}"
            )
        try:
            rt._load_state(state)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this build: {exc}") from exc
        return rt

    def _load_state(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        reg = state["registry"]
        self.registry = DomainRegistry.from_state(reg["tensors"], reg["meta"])
        if self.registry.ids() != sorted(int(i) for i in self.bank.domain_ids):
            raise CheckpointError("checkpoint domains and HDC memories disagree")
        self.monitor.load_state_dict(state["monitor"])
        self.route_detector.load_state_dict(state["route_detector"])
        self.active_domain = int(state["active_domain"])
        self.frames_seen = int(state["frames_seen"])
        self.labels_used = int(state["labels_used"])
        self.label_budget = int(state["label_budget"])
        self._collect_left = int(state["collect_left"])
        trig = state["trigger"]
        self._trigger = (int(trig[0]), str(trig[1])) if trig is not None else None
        pf = np.asarray(state["pending_frames"])
        px = np.asarray(state["pending_features"], dtype=np.float32)
        self._pending = {int(i): px[k].copy() for k, i in enumerate(pf.tolist())}
        bx = np.asarray(state["buffer_features"], dtype=np.float32)
        self._buf_x = [bx[k].copy() for k in range(len(bx))]
        self._buf_y = [int(v) for v in np.asarray(state["buffer_labels"]).tolist()]
        self._buf_i = [int(v) for v in np.asarray(state["buffer_frames"]).tolist()]


# ------------------------------------------------------------------------------------ helpers


def _with_replay(
    x: np.ndarray, y: np.ndarray, rx: np.ndarray, ry: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shots + replay, with row weights so both halves weigh the same in training (a few
    hundred shots would otherwise drown under thousands of replayed features)."""
    w = np.concatenate(
        [np.full(len(ry), 0.5 / max(len(ry), 1)), np.full(len(y), 0.5 / max(len(y), 1))]
    )
    if len(ry) == 0:
        w = np.full(len(y), 1.0 / max(len(y), 1))
    return np.concatenate([rx, x]), np.concatenate([ry, y]), w.astype(np.float32)


def make_bank(config: RuntimeConfig, spec: FeatureSpec) -> DomainMemoryBank:
    """An empty HDC memory bank sized by ``config.hdc`` for the encoder's layers."""
    h = config.hdc
    return DomainMemoryBank(
        dim=h.dim,
        k=h.k,
        max_exemplars=h.max_exemplars,
        tpr=h.tpr,
        layer_dims=tuple(spec.dims),
        early_weight=h.early_weight,
        projection=h.projection,
        seed=h.seed,
        rerank=h.rerank,
    )


def build_encoder(config: RuntimeConfig) -> Encoder:
    """The encoder the config asks for (backend selection when available, else torch)."""
    enc = config.encoder
    try:
        from edge_runtime.encoder.select import select_backend  # type: ignore[attr-defined]
    except ImportError:
        select_backend = None
    if enc.threads:
        torch.set_num_threads(int(enc.threads))
    if select_backend is not None:
        backend = select_backend(config)
    else:
        backend = TorchBackend.mobilenet(
            input_size=enc.input_size, layers=tuple(enc.layers), weights=enc.weights
        )
    return Encoder(backend, batch_size=enc.batch_size)


def _check_batch(frames: Any, spec: FeatureSpec) -> np.ndarray:
    """Rank/dtype check of a batch; NaN frames pass (they are rejected one by one)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise InputError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.ndim not in (3, 4):
        raise InputError(
            f"frames must have rank 3 (N,H,W) or 4 (N,H,W,C), got shape {tuple(frames.shape)}"
        )
    if len(frames) == 0:
        raise InputError("frames is an empty batch (zero frames)")
    if frames.ndim == 4 and frames.shape[3] not in (1, 3, 4):
        raise InputError(f"frames must have 1, 3 or 4 channels last, got {tuple(frames.shape)}")
    if frames.dtype != np.uint8 and not np.issubdtype(frames.dtype, np.floating):
        raise InputError(f"frames must be uint8 or float, got dtype {frames.dtype}")
    return frames


def _finite_frames(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return np.ones(len(frames), dtype=bool)
    return np.isfinite(frames.reshape(len(frames), -1)).all(axis=1)


def _jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays inside event details -> plain Python (NaN stays a float)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
