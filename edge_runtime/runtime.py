"""The runtime loop: builds the parts and passes frames through them; it holds no policy.

Per batch (:meth:`Runtime.process`), in stream order:

1. between batches: commands from other threads run (:mod:`edge_runtime.commands`), then
   finished adaptation work is installed;
2. the serving pipeline (:mod:`edge_runtime.pipeline`) encodes, scores every domain, routes and
   predicts; frames that cannot be served are rejected one by one;
3. the label protocol (:mod:`edge_runtime.labels`) marks the frames whose labels it wants;
4. the drift monitor (:mod:`edge_runtime.drift.monitor`) and the return detector
   (:mod:`edge_runtime.drift.returns`) see every served frame in order. A drift flag passes the
   planner (:mod:`edge_runtime.adapt.planner`), which starts a label collection or refuses; a
   confirmed return switches to the known domain with no labels; an ambiguous one is a flag;
5. with the labels in (:meth:`Runtime.feedback`), the planner makes one plan -- return, grow,
   extend or refuse -- and the executor (:mod:`edge_runtime.adapt.executor`) carries it out in
   two phases, the second on a worker thread.

Everything that happens is an event in :attr:`Runtime.events` (:mod:`edge_runtime.events`);
sinks carry them to ``events.jsonl`` or the fleet. The state codec (:mod:`edge_runtime.state.codec`)
saves and loads the whole runtime. ``docs/ARCHITECTURE.md`` maps the rooms.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.adapt.bundle import export_domain, hdc_fingerprint
from edge_runtime.adapt.controller import AdaptationController
from edge_runtime.adapt.domains import BASE_DOMAIN, DomainSet
from edge_runtime.adapt.executor import BUILD_WAIT_S, AdaptationExecutor, GrowthBudget
from edge_runtime.adapt.init import Initializer, MetaInit, PrototypeInit, StandardInit
from edge_runtime.adapt.planner import (
    KNOWN_DOMAIN,
    AdaptationPlanner,
    Budgets,
)
from edge_runtime.adapt.registry import DomainRegistry
from edge_runtime.adapt.replay import PER_CLASS
from edge_runtime.adapt.search import ArchitectureSearch, FixedArchitecture
from edge_runtime.adapt.self_training import SelfTrainingSpec
from edge_runtime.adapt.unlabelled import UnlabelledPool
from edge_runtime.commands import CommandHandler, CommandQueue
from edge_runtime.config.schema import RuntimeConfig
from edge_runtime.drift import DOMAIN_SHIFT, DriftMonitor, NoveltyClassifier
from edge_runtime.drift.returns import ReturnDetector
from edge_runtime.drift.signature import DomainSignature
from edge_runtime.encoder import Encoder, FeatureSpec
from edge_runtime.encoder.export import spec_digest
from edge_runtime.errors import InputError
from edge_runtime.events import EventLog
from edge_runtime.hdc.bank import DomainMemoryBank
from edge_runtime.labels import LabelProtocol
from edge_runtime.pipeline import ServingPipeline, check_batch, compact_image
from edge_runtime.state import load_checkpoint, save_checkpoint
from edge_runtime.state.codec import CHECKPOINT_KIND, StateParts, decode, encode, read_header

log = logging.getLogger(__name__)

__all__ = [
    "BASE_DOMAIN",
    "KNOWN_DOMAIN",
    "Decisions",
    "Runtime",
    "build_encoder",
    "make_bank",
    "make_monitor",
    "make_registry",
]

#: Base-domain features kept per class for replay in every new head's training set.
BASE_REPLAY_PER_CLASS = 500


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


class Runtime:
    """Serve frames, detect drift, grow adaptors; see the module docstring for the loop.

    ``background=False`` runs adaptation jobs synchronously (deterministic results for tests);
    either way a finished job is installed at the start of the next :meth:`process` call.

    Thread contract: one thread owns the runtime (the first to call :meth:`process` or
    :meth:`feedback`); any other thread submits commands through :attr:`commands`.
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
        novel_policy: str | None = None,
        replay_per_class: int = PER_CLASS,
        base_replay_per_class: int = BASE_REPLAY_PER_CLASS,
    ) -> None:
        self.config = config if config is not None else RuntimeConfig()
        cfg = self.config
        self.encoder = encoder if encoder is not None else build_encoder(cfg)
        self.background = background
        self.events = EventLog(clock)
        self.commands = CommandQueue()
        # The HDC scan runs where the encoder does (CUDA/Triton kernels beside a GPU encoder);
        # on a CPU the bank takes numpy straight to its C++ path.
        device = self.encoder.device if self.encoder.device.type != "cpu" else None
        self.domains_set = DomainSet(
            make_bank(cfg, self.encoder.spec, device=device), make_registry(cfg)
        )
        self.pipeline = ServingPipeline(self.encoder, self.domains_set)
        init = initializer if initializer is not None else make_initializer(cfg, self.encoder_hash)
        self.labels = LabelProtocol(label_budget_for(cfg, init), self.encoder.spec.dim)
        self.monitor = make_monitor(cfg)
        self.returns = ReturnDetector.from_config(cfg.drift)
        self.signature = DomainSignature()
        self.planner = AdaptationPlanner(
            Budgets.from_config(cfg, self.encoder.spec.dim),
            novel_policy=novel_policy if novel_policy is not None else cfg.adapt.novel_policy,
        )
        # Self-training: a new domain's head refitted on the frames it serves (None: off).
        spec = self_training_spec(cfg) if cfg.adapt.self_training else None
        # Plug points: zero-shot NAS picks the architecture, a (meta-learned) initialiser the
        # starting weights. Defaults: a linear head started at the class prototypes.
        self.executor = AdaptationExecutor(
            search if search is not None else make_search(cfg, self.encoder),
            init,
            steps=cfg.adapt.steps,
            lr=cfg.adapt.lr,
            lr_schedule=cfg.adapt.lr_schedule,
            seed=cfg.hdc.seed,
            threads=cfg.encoder.threads,
            background=background,
            timeout_s=cfg.adapt.job_timeout_s,
            replay_per_class=replay_per_class,
            base_replay_per_class=base_replay_per_class,
            encoder=self.encoder,
            budget=GrowthBudget(
                max_params=cfg.adapt.max_adaptor_params,
                max_macs=cfg.adapt.max_adaptor_macs,
                max_latency_ms=cfg.adapt.max_adaptor_latency_ms,
                max_total_params=cfg.adapt.max_total_params,
            ),
            correction=init.detector_correction() if isinstance(init, MetaInit) else None,
            self_training=spec,
        )
        self.controller = AdaptationController(
            self.domains_set,
            self.labels,
            self.monitor,
            self.returns,
            self.planner,
            self.executor,
            self.events,
            self.signature,
            pool=None if spec is None else UnlabelledPool(spec.pool),
        )
        self.command_handler = CommandHandler(
            self.commands,
            self.controller,
            self.domains_set,
            self.events,
            self.report,
            encoder_hash=self.encoder_hash,
        )
        self._owner: int | None = None

    # -------------------------------------------------------------------------------- views
    @property
    def frames_seen(self) -> int:
        """The next stream index: one past the last frame served."""
        return self.controller.position

    @frames_seen.setter
    def frames_seen(self, value: int) -> None:
        self.controller.position = int(value)

    @property
    def feature_dim(self) -> int:
        return self.encoder.spec.dim

    @property
    def encoder_hash(self) -> str:
        """Stable hash of the encoder (its feature spec, weights SHA included): a shared domain
        is only valid on a device whose encoder has the same hash."""
        return spec_digest(self.encoder.spec)

    @property
    def hdc_fingerprint(self) -> dict[str, Any]:
        """The HDC settings a shared domain's memory must have been built with (see
        :func:`edge_runtime.adapt.bundle.hdc_fingerprint`)."""
        return hdc_fingerprint(self.bank)

    @property
    def domains(self) -> dict[int, Any]:
        """Registered domains by id (:class:`~edge_runtime.adapt.registry.Domain` records)."""
        return {d.id: d for d in self.domains_set.registry}

    @property
    def bank(self) -> DomainMemoryBank:
        return self.domains_set.bank

    @property
    def registry(self) -> DomainRegistry:
        return self.domains_set.registry

    @property
    def active_domain(self) -> int:
        return self.domains_set.active

    @property
    def labels_used(self) -> int:
        return self.labels.used

    @property
    def label_budget(self) -> int:
        return self.labels.budget

    @property
    def adapting(self) -> bool:
        return self.controller.adapting

    def wants_labels(self) -> bool:
        """True while the runtime collects labels after a drift flag."""
        return self.labels.wants_labels

    def label_budget_state(self) -> dict[str, int]:
        return self.labels.summary()

    def _claim_thread(self) -> None:
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise InputError(
                "this Runtime is owned by another thread; from this one, submit commands "
                "through runtime.commands"
            )

    # -------------------------------------------------------------------------------- setup
    def fit_base(
        self,
        images: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        *,
        features: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Fit the base domain (id 0) from the labelled training set (frames or features)."""
        if len(self.domains_set):
            raise InputError("the base domain is already fitted")
        features, labels = self.pipeline.labelled_features(images, labels, features)
        kept = check_batch(images, self.encoder.spec) if images is not None else None
        built = self.executor.build_base(features, labels, self.domains_set.bank, kept)
        if built.replay_images is not None:
            size = self.encoder.spec.input_size
            built.replay_images = np.stack([compact_image(f, size) for f in built.replay_images])
        self.domains_set.install_new(
            BASE_DOMAIN,
            built.adaptor,
            built.bank,
            frame=-1,
            kind="base",
            origin="base",
            name="base",
            replay=built.replay,
            replay_images=built.replay_images,
        )
        descriptors = self.pipeline.descriptors_of(features, images)
        if descriptors is not None:
            self.monitor.novelty = NoveltyClassifier().fit(descriptors)
        return built.report

    # -------------------------------------------------------------------------------- serving
    def process(self, frames: np.ndarray, indices: np.ndarray | None = None) -> Decisions:
        """Serve a batch of frames (stream order); see the module docstring."""
        self._claim_thread()
        if not len(self.domains_set):
            raise InputError("the runtime has no domain yet: call fit_base() first")
        frames = check_batch(frames, self.encoder.spec)
        n = len(frames)
        if indices is None:
            indices = np.arange(self.frames_seen, self.frames_seen + n, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        if indices.shape != (n,):
            raise InputError(f"indices must have shape ({n},), got {indices.shape}")
        self._between_batches(int(indices[0]))

        served = self.pipeline.serve(frames, descriptors=self.monitor.novelty is not None)
        is_ood = served.is_ood
        # The whole batch before its frames' flags: a flag's signature includes the rest of its
        # batch, a few frames later than the flag, of the same drift.
        ok = ~served.rejected
        self.signature.update(served.features[ok], is_ood[ok])
        self.domains_set.registry.count_served(served.domain[ok])
        for j in np.flatnonzero(served.rejected):
            self.events.emit(
                "frame_rejected", int(indices[j]), reason="frame has NaN or Inf values"
            )
        label_request = np.zeros(n, dtype=bool)
        desc = served.descriptors
        for j in range(n):
            if served.rejected[j]:
                continue
            i = int(indices[j])
            label_request[j] = (
                self.labels.request(
                    i, served.features[j], compact_image(frames[j], self.encoder.spec.input_size)
                )
                if self.labels.wants_more
                else False
            )
            d = int(served.domain[j])
            if not is_ood[j] and self.controller.wants_unlabelled(d):
                self.controller.unlabelled(
                    i, served.features[j], compact_image(frames[j], self.encoder.spec.input_size)
                )
            if self.monitor.paused:
                continue
            ev = self.monitor.update(
                i, bool(is_ood[j]), float(served.ood_score[j]), None if desc is None else desc[j]
            )
            if ev is not None:
                self.controller.on_flag(i, ev.kind, ev.evidence)
                continue
            claim = self.returns.update(
                i,
                self.domains_set.active,
                int(served.domain[j]),
                bool(is_ood[j]),
                float(served.active_score[j]),
            )
            if claim is not None:
                self.controller.on_claim(claim)
        self.frames_seen = max(self.frames_seen, int(indices[-1]) + 1)
        return Decisions(
            indices=indices,
            prediction=served.prediction,
            ood_score=served.ood_score,
            domain=served.domain,
            is_ood=is_ood,
            rejected=served.rejected,
            label_request=label_request,
            features=served.features,
            events=self.events.drain(),
        )

    def predict_eval(
        self, frames: np.ndarray | None = None, *, features: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, ood_score, domain) for frames or features, with no side effects.

        Features alone serve adaptors on pooled features; give the frames too (features, when
        given, skip their encoding) when a domain's adaptor reads an intermediate tap."""
        if features is None:
            if frames is None:
                raise InputError("predict_eval needs frames or features")
            frames = check_batch(frames, self.encoder.spec)
            features = self.encoder.features(frames)
        return self.pipeline.predict(features, frames)

    # -------------------------------------------------------------------------------- labels
    def request_adaptation(self, kind: str = DOMAIN_SHIFT, frame: int | None = None) -> None:
        """Start collecting labels now, as if the monitor had flagged ``kind`` (an operator's
        or the fleet controller's "adapt now" command)."""
        self.controller.request(kind, frame)

    def feedback(self, indices: np.ndarray, labels: np.ndarray) -> int:
        """Reveal labels of requested frames; returns how many were accepted."""
        self._claim_thread()
        return self.controller.feedback(indices, labels)

    def expire_labels(
        self, reason: str = "expired", *, trigger_frame: int | None = None
    ) -> dict[str, Any] | None:
        """End the label collection under way (its labels will not come): adapt on the labels
        already in, else cancel and resume the drift monitor. From another thread, submit the
        ``expire_labels`` command instead. See :meth:`AdaptationController.expire`."""
        self._claim_thread()
        return self.controller.expire(self.frames_seen, reason, trigger_frame=trigger_frame)

    def finish(self, wait: bool = True, timeout_s: float | None = None) -> None:
        """End of stream: adapt on whatever labels were collected, then (``wait``) let the
        training jobs finish, at most ``timeout_s``, and install them."""
        self.controller.finish(wait, timeout_s)

    def _between_batches(self, frame: int) -> None:
        # Commands first: labels that complete a collection build their domain here, and it is
        # installed before the next frame is served, as labels from the stream's replay are.
        self.command_handler.run_queued(frame)
        self.controller.install(frame)

    def run_commands(self) -> None:
        """Install finished work and run the queued commands now (the owning thread, e.g. at
        the end of a stream, so a last export or label reply is answered)."""
        self._claim_thread()
        self._between_batches(self.frames_seen)

    # -------------------------------------------------------------------------------- fleet
    def export_domain(self, domain_id: int) -> bytes:
        """One domain (adaptor and HDC memory) as a safetensors bundle for another device
        (see :mod:`edge_runtime.adapt.bundle`)."""
        return export_domain(self.domains_set, domain_id, self.encoder_hash)

    @property
    def building(self) -> bool:
        """A new domain is being built (its search) on the worker; it installs at a later batch."""
        return self.executor.building

    def wait_builds(self, timeout: float | None = BUILD_WAIT_S) -> bool:
        """Block until every domain build in flight is done (an unpaced replay; a checkpoint).
        True if they all finished."""
        return self.executor.wait(timeout, builds_only=True)

    def wait_idle(self, timeout: float | None = 60.0) -> bool:
        """Block until training jobs are done, at most ``timeout`` s (tests, shutdown; never on
        the serving path). They are installed on the next batch. True if all finished."""
        return self.executor.wait(timeout)

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Cancel queued training, give a running job ``timeout_s`` to stop, close the sinks."""
        self.executor.close(timeout_s)
        self.events.close()

    # -------------------------------------------------------------------------------- reports
    def report(self) -> dict[str, Any]:
        """A JSON-able summary: domains with adaptor versions, the active one, labels, jobs."""
        return {
            "frames_seen": self.frames_seen,
            **self.controller.report(),
        }

    # -------------------------------------------------------------------------------- events
    def drain_events(self) -> list[dict[str, Any]]:
        return self.events.drain()

    # -------------------------------------------------------------------------------- state
    def _parts(self) -> StateParts:
        return StateParts(
            self.config,
            self.encoder.spec,
            self.domains_set,
            self.monitor,
            self.returns,
            self.labels,
            self.executor,
            {"frames_seen": self.frames_seen},
            self.signature,
        )

    def state_dict(self) -> dict[str, Any]:
        """The whole state. Finished work is installed first; training still running is saved
        as a job to re-queue, so saving never waits on it. A domain still being built (the
        search: seconds) is waited for, as it holds the shots its labels paid for."""
        self.wait_builds()
        self.controller.install(self.frames_seen)
        return encode(self._parts())

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
        return cls.from_state(state, str(path), encoder, background=background, **kwargs)

    @classmethod
    def from_state(
        cls,
        state: dict[str, Any],
        source: str,
        encoder: Encoder | None = None,
        *,
        background: bool = True,
        **kwargs: Any,
    ) -> Runtime:
        """Rebuild a runtime from a :meth:`state_dict` (already read from a checkpoint named
        ``source`` in messages); CheckpointError if it does not fit ``encoder``."""
        config, _ = read_header(state, source)
        rt = cls(config, encoder, background=background, **kwargs)
        try:
            parts = rt._parts()
            decode(state, parts, source)
        except BaseException:
            rt.close(timeout_s=0)  # never hand out a half-loaded runtime
            raise
        rt.frames_seen = parts.counters["frames_seen"]
        return rt


# ------------------------------------------------------------------------------------ builders


def make_bank(
    config: RuntimeConfig, spec: FeatureSpec, *, device: str | torch.device | None = None
) -> DomainMemoryBank:
    """An empty HDC memory bank sized by ``config.hdc`` for the encoder's layers, scoring on
    ``device`` (None: where the features are)."""
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
        device=device,
    )


def make_monitor(config: RuntimeConfig) -> DriftMonitor:
    """The drift monitor; its CUSUM's in-control floor is the HDC thresholds' own FPR
    (about ``1 - hdc.tpr`` of in-distribution frames score as OOD by calibration)."""
    return DriftMonitor.from_config(config.drift, p0_floor=1.0 - config.hdc.tpr)


def make_registry(config: RuntimeConfig) -> DomainRegistry:
    return DomainRegistry(max_adaptors=config.adapt.max_adaptors, eviction=config.adapt.eviction)


def make_initializer(config: RuntimeConfig, encoder_hash: str) -> Initializer:
    """The initialiser plug point the config asks for (``adapt.init``)."""
    a = config.adapt
    if a.init == "meta":
        return MetaInit(a.meta_init, encoder_hash)
    if a.meta_init is not None:
        from edge_runtime.errors import ConfigError

        raise ConfigError("adapt.meta_init is set but adapt.init is not 'meta'")
    return StandardInit() if a.init == "standard" else PrototypeInit()


def label_budget_for(config: RuntimeConfig, initializer: Initializer) -> int:
    """Labels per drift: ``adapt.meta_label_budget`` while a meta-init for this encoder is in
    use, else ``adapt.label_budget``; the log says which."""
    a = config.adapt
    if a.meta_label_budget is None:
        return a.label_budget
    if isinstance(initializer, MetaInit) and initializer.available():
        log.info(
            "meta-init in use: %d labels per drift (adapt.meta_label_budget)",
            a.meta_label_budget,
        )
        return a.meta_label_budget
    log.info(
        "no meta-init for this encoder: %d labels per drift (adapt.label_budget; "
        "adapt.meta_label_budget applies only with one)",
        a.label_budget,
    )
    return a.label_budget


def self_training_spec(config: RuntimeConfig) -> SelfTrainingSpec:
    """The refit the config describes (whether or not ``adapt.self_training`` turns it on)."""
    a = config.adapt
    return SelfTrainingSpec(
        pool=a.self_training_pool, rounds=a.self_training_rounds, fraction=a.self_training_fraction
    )


def make_search(config: RuntimeConfig, encoder: Encoder) -> ArchitectureSearch:
    """The architecture plug point the config asks for: the zero-shot search over the default
    space for this encoder (``adapt.nas``), else the fixed linear head."""
    if not config.adapt.nas:
        return FixedArchitecture()
    from edge_runtime.adapt.nas import DEFAULT_PROXY, LatencyTable, ZeroShotSearch

    a = config.adapt
    timed = a.max_adaptor_latency_ms is not None
    if timed:
        from edge_runtime.encoder.backend import encoder_ms_per_frame

    return ZeroShotSearch(
        proxy=a.nas_proxy or DEFAULT_PROXY,
        seed=config.hdc.seed,
        # Latency is measured (once per device, cached) only when the profile limits it; an
        # input filter's candidate also pays a second encoder pass per routed frame.
        latency=LatencyTable() if timed else None,
        encoder_ms_per_frame=encoder_ms_per_frame(encoder) if timed else 0.0,
        input_size=encoder.spec.input_size,
    )


def build_encoder(config: RuntimeConfig) -> Encoder:
    """The encoder the config asks for (backend selection when available, else torch)."""
    from edge_runtime.encoder.select import select_backend  # imports the backends lazily

    enc = config.encoder
    if enc.threads:
        torch.set_num_threads(int(enc.threads))
    return Encoder(select_backend(config), batch_size=enc.batch_size)
