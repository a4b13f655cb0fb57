"""AdaptationExecutor: carries out a plan in two phases, off the serving path where it costs.

Phase one runs at once, on the serving thread, in tens of milliseconds: the new (or extended)
domain's HDC memory with a calibrated threshold, in a copy of the bank, and a head from the
architecture and initialisation plug points, untrained. The result is a :class:`DomainBuilt`
that the runtime installs at the start of the next batch, so routing and the drift monitor know
the domain however fast frames arrive. Phase two trains the head on a worker thread and hands
back a :class:`HeadTrained` that the runtime swaps in.

Training jobs queue (:class:`~edge_runtime.adapt.jobs.JobQueue`): a drift that comes while a
head is still training never makes the serving thread wait; its job starts when the worker is
free. Each job has a timeout, honours cancellation between optimiser steps, and a failure comes
back as a :class:`JobFailed` with its traceback logged; nothing a job raises reaches the
serving thread. With ``background=False`` both phases run at once (deterministic results for
tests and benchmarks).

Self-training (:meth:`AdaptationExecutor.refine`): once a new domain has served enough frames,
a third kind of job refits its head on them, pseudo-labelled (:mod:`.self_training`).

Training rows: every new head is trained on its shots plus the base domain's class-balanced
replay buffer (shots up-weighted to the same total), so base frames the router sends to a new
domain by mistake (near-OOD confusion of the frozen features) still get the right label.

Architecture: the search runs once, in phase one, on the shots in every candidate family's input
space (pooled features, or an intermediate tap of the encoder, optionally after an input
filter: :class:`~edge_runtime.adapt.search.CandidateInputs` encodes the shots' frames lazily, one
encoder pass per tap and filter). The chosen architecture travels with the training job, so
phase two trains what phase one installed. An adaptor below the last layer trains on replay
rows of its own input space: a smaller class-balanced sample of the replay buffer's frames
(``TAP_REPLAY_PER_CLASS``), encoded at the tap.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.adapt.adaptor import Adaptor, AdaptorArch, build_adaptor, train_adaptor
from edge_runtime.adapt.domains import BASE_DOMAIN, DomainSet
from edge_runtime.adapt.init import Initializer, WeightedInitializer, ran
from edge_runtime.adapt.jobs import (
    BuildContext,
    DomainBuilt,
    Finished,
    HeadTrained,
    Job,
    JobFailed,
    JobQueue,
    TrainSet,
)
from edge_runtime.adapt.planner import EXTEND, GROW, Plan
from edge_runtime.adapt.replay import balanced_indices
from edge_runtime.adapt.search import (
    ArchitectureSearch,
    ArrayInputs,
    CandidateInputs,
    EncodedInputs,
    FixedArchitecture,
    SearchBudget,
)
from edge_runtime.adapt.self_training import SelfTrainingSpec, self_train
from edge_runtime.errors import InputError
from edge_runtime.hdc.bank import DomainMemoryBank
from edge_runtime.labels import Shots, Trigger
from edge_runtime.meta.detector import ThresholdCorrection, domain_threshold

if TYPE_CHECKING:
    from edge_runtime.adapt.unlabelled import Pool

log = logging.getLogger(__name__)

#: Compute bound of a background training job: steps x rows. Full-batch steps cost one pass over
#: shots + replay, and the job shares the serving thread's cores, so a job over many rows takes
#: fewer steps (at least ``MIN_JOB_STEPS``).
JOB_ROW_STEPS = 160_000
MIN_JOB_STEPS = 50
#: The same bound in multiply-accumulates (rows x the adaptor's MACs per row x steps): a conv
#: adaptor on a tap costs up to a few million MACs a row where a linear head costs 13 thousand,
#: so its job takes fewer steps (about ten seconds on one core at most, not minutes).
JOB_MAC_STEPS = 40_000_000_000
#: How long a checkpoint (or an unpaced replay) waits for a domain build in flight: the search
#: and the memory, seconds.
BUILD_WAIT_S = 120.0
#: Replay frames per class re-encoded for an adaptor on an intermediate tap (each costs an
#: encoder pass and a conv adaptor's training MACs, and a tap row is up to 6,144 floats where a
#: pooled one is 1,304).
TAP_REPLAY_PER_CLASS = 100


@dataclass(frozen=True)
class GrowthBudget:
    """The profile's limits on a new adaptor: each one's parameters, MACs and latency per frame,
    and all adaptors' parameters together."""

    max_params: int | None = None
    max_macs: int | None = None
    max_latency_ms: float | None = None
    max_total_params: int | None = None

    def for_domains(self, domains: DomainSet, replacing: int | None = None) -> SearchBudget:
        """What the next adaptor may use given those held (``replacing``: a domain whose
        adaptor the new one replaces, as an extension does)."""
        cap = self.max_params
        if self.max_total_params is not None:
            held = sum(
                sum(p.numel() for p in d.adaptor.parameters())
                for d in domains.registry
                if d.id != replacing
            )
            left = max(0, self.max_total_params - held)
            cap = left if cap is None else min(cap, left)
        return SearchBudget(
            max_params=cap, max_macs=self.max_macs, max_latency_ms=self.max_latency_ms
        )


def with_replay(
    x: np.ndarray,
    y: np.ndarray,
    rx: np.ndarray,
    ry: np.ndarray,
    arch: AdaptorArch | None = None,
) -> TrainSet:
    """Shots + replay, weighted so both halves count the same (a few hundred shots would
    otherwise drown under thousands of replayed features)."""
    if len(ry) == 0:
        return TrainSet(x, y, np.full(len(y), 1.0 / max(len(y), 1), np.float32), arch, len(y))
    w = np.concatenate(
        [np.full(len(ry), 0.5 / max(len(ry), 1)), np.full(len(y), 0.5 / max(len(y), 1))]
    )
    return TrainSet(
        np.concatenate([rx, x]), np.concatenate([ry, y]), w.astype(np.float32), arch, len(y)
    )


def _select(images: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if images is None else np.ascontiguousarray(images[idx])


class AdaptationExecutor:
    def __init__(
        self,
        search: ArchitectureSearch,
        initializer: Initializer,
        *,
        steps: int,
        lr: float,
        seed: int,
        threads: int | None = None,
        background: bool = True,
        timeout_s: float | None = None,
        replay_per_class: int = 50,
        base_replay_per_class: int = 500,
        encoder: Any = None,
        budget: GrowthBudget | None = None,
        correction: ThresholdCorrection | None = None,
        lr_schedule: str = "cosine",
        self_training: SelfTrainingSpec | None = None,
    ) -> None:
        self.search = search
        self.initializer = initializer
        # A meta-learned correction of a new domain's OOD threshold (the bank's own is one
        # noisy order statistic of the shots' scores); None: the bank's threshold.
        self.correction = correction
        # Encodes shot and replay frames at a tap for adaptors below the last layer; without it
        # (features-only callers) only pooled-feature families can be trained.
        self.encoder = encoder
        self.budget = budget or GrowthBudget()
        self.steps, self.lr, self.seed = int(steps), float(lr), int(seed)
        self.lr_schedule = lr_schedule
        # Refit a new domain's head on its own pseudo-labelled frames (None: never).
        self.self_training = self_training
        self.threads = threads
        self.background = background
        self.timeout_s = timeout_s
        self.replay_per_class = int(replay_per_class)
        self.base_replay_per_class = int(base_replay_per_class)
        self.jobs = JobQueue(self._build, self._run_job, timeout_s)

    # -- heads ---------------------------------------------------------------------------------
    def shot_inputs(self, features: np.ndarray, images: np.ndarray | None) -> CandidateInputs:
        """Labelled rows in every family's input space (frames encoded lazily at a tap)."""
        if (
            images is None
            or self.encoder is None
            or not getattr(self.encoder.backend, "supports_taps", False)
        ):
            # No frames, or a backend without taps (a user's TorchScript, an ONNX export made
            # before taps): the families on pooled features are all there is.
            return ArrayInputs(np.ascontiguousarray(features, dtype=np.float32))
        return EncodedInputs(self.encoder, images, np.ascontiguousarray(features, np.float32))

    def serving_refusal(self, arch: AdaptorArch) -> str | None:
        """Why this device could not serve an adaptor of ``arch`` (a shipped one), or None."""
        if arch.tap is None:
            return None
        backend = getattr(self.encoder, "backend", None)
        if backend is None or not getattr(backend, "supports_taps", False):
            name = getattr(backend, "name", "none")
            return (
                f"the adaptor reads encoder tap {arch.tap}, which this device's encoder "
                f"backend ({name}) does not export"
            )
        return None

    def choose(
        self,
        inputs: CandidateInputs,
        labels: np.ndarray,
        label_map: list[int],
        budget: SearchBudget | None = None,
    ) -> tuple[AdaptorArch, dict[str, Any]]:
        """The search plug point: an architecture for these shots, and its report."""
        found = self.search.search(inputs, labels, label_map, budget)
        report: dict[str, Any] = {"arch": found.arch.to_dict(), "search": found.method}
        if found.report:
            report["search_report"] = found.report
        return found.arch, report

    def train_head(
        self,
        train: TrainSet,
        domain_id: int,
        *,
        steps: int | None = None,
        cancel: Any = None,
        threads: int | None = None,
    ) -> tuple[Adaptor, dict[str, Any]]:
        """Initialisation (init plug point) and ``steps`` steps of training (0: the initialised
        head) of ``train.arch`` on the train set's rows (which are in that arch's input space).
        A set without an arch (an older checkpoint's job: pooled rows) is searched first."""
        x, y = train.features, train.labels
        label_map = sorted({int(v) for v in y})
        report: dict[str, Any] = {}
        arch = train.arch
        if arch is None:
            arch, report = self.choose(ArrayInputs(x), y, label_map)
        arch = arch.with_in_dim(x.shape[1])
        adaptor = build_adaptor(arch, label_map, seed=self.seed + domain_id)
        if isinstance(self.initializer, WeightedInitializer):
            # A meta-init's fast steps see the shots/replay weighting the training below uses.
            self.initializer.init_weighted(adaptor, x, y, train.weight)
        else:
            self.initializer.init(adaptor, x, y)
        # What actually ran (a meta-init falls back to prototypes for a family without a file).
        done = ran(self.initializer)
        report = {
            "arch": arch.to_dict(),
            **{k: v for k, v in report.items() if k != "arch"},
            "init": done.pop("init"),
            "labels": label_map,
        }
        if done:
            report["init_detail"] = done
        n = self.steps if steps is None else int(steps)
        if n == 0:
            return adaptor, report | {"train": {"steps": 0}}
        tr = train_adaptor(
            adaptor,
            x,
            y,
            steps=n,
            lr=self.lr,
            schedule=self.lr_schedule,
            seed=self.seed + domain_id,
            fit_normalizer=False,
            sample_weight=train.weight,
            cancel=cancel,
            threads=threads,
        )
        return adaptor, report | {"train": tr.to_dict()}

    def job_steps(self, rows: int, arch: AdaptorArch | None = None, n_classes: int = 1) -> int:
        """Off the serving path but sharing its cores: bound a job's compute."""
        bound = JOB_ROW_STEPS // max(rows, 1)
        if arch is not None:
            bound = min(bound, JOB_MAC_STEPS // max(rows * arch.macs(n_classes), 1))
        return min(self.steps, max(MIN_JOB_STEPS, bound))

    def build_base(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        bank: DomainMemoryBank,
        images: np.ndarray | None = None,
    ) -> DomainBuilt:
        """The base domain, trained in full now (it is what serving starts from).

        Its head is always the fixed linear one on pooled features, whatever the search plug
        point: thousands of labels make the linear head strong, and a tap adaptor on the base
        would cost every frame the device serves. ``images`` (the training frames) feed the
        replay that adaptors below the last layer train on."""
        t0 = time.perf_counter()
        label_map = sorted({int(v) for v in labels})
        arch = FixedArchitecture().search(ArrayInputs(features), labels, label_map).arch
        train = TrainSet(features, labels, None, arch)
        adaptor, report = self.train_head(train, BASE_DOMAIN, threads=self.threads)
        report["search"] = "fixed (base)"
        report["threshold"] = float(bank.add_domain(BASE_DOMAIN, features, labels))
        idx = balanced_indices(labels, self.base_replay_per_class, self.seed)
        replay = (np.ascontiguousarray(features[idx]), np.asarray(labels)[idx].copy())
        report["seconds"] = time.perf_counter() - t0
        base = Trigger(-1, "base", {})
        return DomainBuilt(
            Plan(GROW, BASE_DOMAIN),
            base,
            BASE_DOMAIN,
            adaptor,
            bank,
            replay,
            report,
            None,
            _select(images, idx),
        )

    # -- plans ---------------------------------------------------------------------------------
    def execute(self, plan: Plan, shots: Shots, domains: DomainSet) -> None:
        """Phase one of a grow/extend plan now (its result waits in :meth:`poll`)."""
        if plan.action not in (GROW, EXTEND):
            raise InputError(f"the executor carries out grow and extend plans, not {plan.action}")
        try:
            ctx = self._prepare(plan, shots, domains)
            if self.background and getattr(self.search, "costly", False):
                # A search that encodes the shots at taps and scores every candidate takes
                # seconds, not the tens of milliseconds the serving thread can spare: the
                # worker builds, and the domain installs at the first batch after.
                self.jobs.build(ctx)
                return
            built = self._build(ctx, threads=self.threads)
        except Exception as exc:
            log.error("adaptation (phase one) failed:\n%s", traceback.format_exc())
            self.jobs.put(JobFailed("build", f"{type(exc).__name__}: {exc}", plan.domain_id))
            return
        self.jobs.put(built)
        if built.train_set is not None:
            self.jobs.train(Job(built.domain_id, built.train_set))

    def _prepare(self, plan: Plan, shots: Shots, domains: DomainSet) -> BuildContext:
        """What a build reads from the serving state, taken on the serving thread: the
        replay, the budget, and a copy of the bank that the build may change freely."""
        extend = plan.action == EXTEND
        did = plan.domain_id
        source = domains.get(did if extend else BASE_DOMAIN)
        rx, ry = domains.replay_of(source.id, shots.features.shape[1])
        return BuildContext(
            plan=plan,
            shots=shots,
            replay=(rx, ry),
            replay_images=source.replay_images,
            budget=self.budget.for_domains(domains, replacing=did if extend else None),
            bank=domains.bank_copy(),
            version=domains.get(did).version + 1 if extend else 1,
        )

    def _build(self, ctx: BuildContext, threads: int | None = None) -> DomainBuilt:
        """Phase one proper: search, the initialised head, the domain's memory in the bank
        copy. Touches no serving state, so it may run on the worker thread."""
        t0 = time.perf_counter()
        plan, shots = ctx.plan, ctx.shots
        extend = plan.action == EXTEND
        did = plan.domain_id
        x, y = shots.features, shots.labels
        rx, ry = ctx.replay
        rimg = ctx.replay_images
        label_map = sorted({int(v) for v in y} | {int(v) for v in ry})
        inputs = self.shot_inputs(x, shots.images)
        t_search = time.perf_counter()
        arch, search_report = self.choose(inputs, y, label_map, ctx.budget)
        search_s = time.perf_counter() - t_search
        arch = arch.with_in_dim(inputs.get(arch.tap, arch.condition).shape[1])
        r_rows, r_y, r_note = self._replay_rows(arch, rx, ry, rimg, self.seed + did)
        train = with_replay(inputs.get(arch.tap, arch.condition), y, r_rows, r_y, arch)
        n_cls = len(set(train.labels.tolist()))
        steps = 0 if self.background else self.job_steps(len(train.labels), arch, n_cls)
        adaptor, report = self.train_head(train, did, steps=steps, threads=threads)
        report.update(search_report)
        report["search_seconds"] = round(search_s, 4)
        bank = ctx.bank
        if extend:
            report["threshold"] = float(bank.extend_domain(did, x, y))
        elif self.correction is not None:
            # Fitted on new domains' shot sets (meta-train), so only a grown domain takes it;
            # an extended one keeps its frames and the bank's threshold over them all.
            t_bank, t = domain_threshold(bank, did, x, y, self.correction)
            report["threshold"], report["threshold_bank"] = t, t_bank
        else:
            report["threshold"] = float(bank.add_domain(did, x, y))
        report.update(domain=did, shots=len(y), replay=len(r_y), action=plan.action)
        if plan.reason:
            report["why"] = plan.reason
        if plan.report:
            report["evidence"] = plan.report
        if r_note:
            report["replay_note"] = r_note
        seed = self.seed + did
        if extend:
            report["version"] = ctx.version
            mx = np.concatenate([rx, x]).astype(np.float32)
            my = np.concatenate([ry, y]).astype(np.int64)
            mimg = (
                np.concatenate([rimg, shots.images])
                if rimg is not None
                and shots.images is not None
                and rimg.shape[1:] == shots.images.shape[1:]
                and rimg.dtype == shots.images.dtype
                else None
            )
        else:
            mx, my, mimg = x, y, shots.images
        idx = balanced_indices(my, self.replay_per_class, seed)
        replay = (np.ascontiguousarray(mx[idx]), my[idx].copy())
        report["seconds"] = time.perf_counter() - t0
        return DomainBuilt(
            plan,
            shots.trigger,
            did,
            adaptor,
            bank,
            replay,
            report,
            train if self.background else None,
            _select(mimg, idx),
            rows=train,
        )

    def _replay_rows(
        self,
        arch: AdaptorArch,
        rx: np.ndarray,
        ry: np.ndarray,
        images: np.ndarray | None,
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Replay rows in ``arch``'s input space (and a note when there are none)."""
        if arch.tap is None and arch.condition == "none":
            return rx, ry, ""
        empty = np.zeros((0, arch.in_dim), np.float32), np.zeros(0, np.int64)
        if len(ry) == 0:
            return *empty, ""
        if images is None or self.encoder is None:
            return *empty, "no replay frames are kept for this domain: shots only"
        idx = balanced_indices(ry, TAP_REPLAY_PER_CLASS, seed)
        rows = EncodedInputs(self.encoder, images[idx], rx[idx]).get(arch.tap, arch.condition)
        return rows, ry[idx].copy(), ""

    def _run_job(self, job: Job, cancel: Any = None) -> HeadTrained:
        if job.pool is not None:
            return self._refit_job(job.pool, cancel)
        return self._train_job(job.domain_id, job.train, cancel)

    def _train_job(self, domain_id: int, train: TrainSet, cancel: Any = None) -> HeadTrained:
        """Phase two: the head trained with the job's bounded steps."""
        t0 = time.perf_counter()
        n_cls = len(set(train.labels.tolist()))
        steps = self.job_steps(len(train.labels), train.arch, n_cls)
        adaptor, report = self.train_head(train, domain_id, steps=steps, cancel=cancel)
        report.update(domain=domain_id, seconds=time.perf_counter() - t0)
        return HeadTrained(domain_id, adaptor, report, rows=train)

    # -- self-training -------------------------------------------------------------------------
    def refine(self, pool: Pool) -> None:
        """Queue a self-training refit of ``pool.domain_id``'s head on the pool's frames (its
        result comes back from :meth:`poll` as a :class:`HeadTrained` with ``refit_of`` set)."""
        if self.self_training is None:
            raise InputError("self-training is off (adapt.self_training: false)")
        if self.background:
            self.jobs.train(Job(pool.domain_id, pool.train, pool))
            return
        try:
            self.jobs.put(self._refit_job(pool))
        except Exception as exc:
            log.error("self-training refit failed:\n%s", traceback.format_exc())
            self.jobs.put(JobFailed("refit", f"{type(exc).__name__}: {exc}", pool.domain_id))

    def _refit_job(self, pool: Pool, cancel: Any = None) -> HeadTrained:
        """Rounds of pseudo-labelling the pool and refitting (see :mod:`.self_training`)."""
        spec = self.self_training
        assert spec is not None
        t0 = time.perf_counter()
        train, did = pool.train, pool.domain_id
        arch = train.arch
        if arch is None:
            raise InputError("a refit needs the architecture its head was trained with")
        # The pool's frames in the adaptor's input space, as the shots' were (no frames, or no
        # taps: ArrayInputs says which input is missing).
        rows = self.shot_inputs(pool.features, pool.images).get(arch.tap, arch.condition)
        n_cls = len(set(train.labels.tolist()))
        extra = round(len(rows) * spec.fraction)
        steps = self.job_steps(len(train.labels) + extra, arch, n_cls)

        def fit(x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> Adaptor:
            return self.train_head(
                TrainSet(x, y, w, arch), did, steps=steps, cancel=cancel, threads=None
            )[0]

        # The pool opens when the domain is installed, before its first training is (at an
        # unpaced replay's speed, long before): the head that labels round one is trained here.
        first = (
            pool.head if pool.head is not None else fit(train.features, train.labels, train.weight)
        )
        adaptor, st = self_train(
            first,
            train.features,
            train.labels,
            train.weight,
            rows,
            fit,
            spec,
            train.shot_classes(),
            shots=train.shots,
        )
        report = {
            "arch": arch.to_dict(),
            "domain": did,
            "stage": "self_training",
            "self_training": st,
            "train": {"steps": steps, "rounds": spec.rounds},
            "seconds": time.perf_counter() - t0,
        }
        return HeadTrained(did, adaptor, report, rows=train, refit_of=pool.version)

    # -- the job queue -------------------------------------------------------------------------
    def poll(self) -> list[Finished]:
        """Everything finished since the last poll, in order; starts the next queued job."""
        return self.jobs.poll()

    @property
    def busy(self) -> bool:
        return self.jobs.busy

    @property
    def building(self) -> bool:
        """A domain is being built on the worker (its install is still to come)."""
        return self.jobs.building

    def wait(self, timeout_s: float | None = None, *, builds_only: bool = False) -> bool:
        """Block until queued and running jobs are done (end of a stream, tests), at most
        ``timeout_s`` in all; ``builds_only``: until every queued build is (a checkpoint waits
        for those: they hold the shots). Never called on the serving path. True if done."""
        return self.jobs.wait(timeout_s, builds_only=builds_only)

    def cancel(self) -> None:
        """Drop queued jobs and ask the running one to stop (reported as failed: cancelled)."""
        self.jobs.cancel()

    def pending_training(self) -> list[tuple[int, TrainSet]]:
        """Training jobs not yet installed (running first), for a checkpoint to re-queue.
        Refits are not among them: the head they would replace is already trained, and their
        pool is not kept."""
        return [(j.domain_id, j.train) for j in self.jobs.pending() if j.pool is None]

    def requeue(self, jobs: list[tuple[int, TrainSet]]) -> None:
        for did, train in jobs:
            if self.background:
                self.jobs.train(Job(did, train))
            else:  # synchronous mode trains at once
                self.jobs.put(self._train_job(did, train))

    def close(self, timeout_s: float | None = 30.0) -> None:
        self.jobs.close(timeout_s)
