"""AdaptationExecutor: carries out a plan in two phases, off the serving path where it costs.

Phase one runs at once, on the serving thread, in tens of milliseconds: the new (or extended)
domain's HDC memory with a calibrated threshold, in a copy of the bank, and a head from the
architecture and initialisation plug points, untrained. The result is a :class:`DomainBuilt`
that the runtime installs at the start of the next batch, so routing and the drift monitor know
the domain however fast frames arrive. Phase two trains the head on a worker thread and hands
back a :class:`HeadTrained` that the runtime swaps in.

Training jobs queue: a drift that comes while a head is still training never makes the serving
thread wait; its job starts when the worker is free. Each job has a timeout, honours
cancellation between optimiser steps, and a failure comes back as a :class:`JobFailed` with its
traceback logged; nothing a job raises reaches the serving thread. With ``background=False``
both phases run at once (deterministic results for tests and benchmarks).

Training rows: every new head is trained on its shots plus the base domain's class-balanced
replay buffer (shots up-weighted to the same total), so base frames the router sends to a new
domain by mistake (near-OOD confusion of the frozen features) still get the right label.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.adapt.adaptor import Adaptor, build_adaptor, train_adaptor
from edge_runtime.adapt.domains import BASE_DOMAIN, DomainSet
from edge_runtime.adapt.init import Initializer
from edge_runtime.adapt.planner import EXTEND, GROW, Plan
from edge_runtime.adapt.replay import balanced_sample, merge_replay
from edge_runtime.adapt.search import ArchitectureSearch
from edge_runtime.adapt.worker import AdaptationWorker, JobResult
from edge_runtime.errors import InputError
from edge_runtime.hdc.bank import DomainMemoryBank
from edge_runtime.labels import Shots, Trigger

log = logging.getLogger(__name__)

#: Compute bound of a background training job: steps x rows. Full-batch steps cost one pass over
#: shots + replay, and the job shares the serving thread's cores, so a job over many rows takes
#: fewer steps (at least ``MIN_JOB_STEPS``).
JOB_ROW_STEPS = 160_000
MIN_JOB_STEPS = 50


@dataclass
class TrainSet:
    """Rows a head is trained on: shots plus replay, with per-row weights."""

    features: np.ndarray
    labels: np.ndarray
    weight: np.ndarray | None


@dataclass
class DomainBuilt:
    """Phase one of a grow or extend plan, ready to install."""

    plan: Plan
    trigger: Trigger
    domain_id: int
    adaptor: Adaptor
    bank: DomainMemoryBank
    replay: tuple[np.ndarray, np.ndarray]
    report: dict[str, Any]
    train_set: TrainSet | None  # None when the head was trained in phase one


@dataclass
class HeadTrained:
    domain_id: int
    adaptor: Adaptor
    report: dict[str, Any]


@dataclass
class JobFailed:
    where: str  # "build" | "train"
    error: str  # "ExcType: message"
    domain_id: int = -1


Finished = DomainBuilt | HeadTrained | JobFailed


def with_replay(x: np.ndarray, y: np.ndarray, rx: np.ndarray, ry: np.ndarray) -> TrainSet:
    """Shots + replay, weighted so both halves count the same (a few hundred shots would
    otherwise drown under thousands of replayed features)."""
    if len(ry) == 0:
        return TrainSet(x, y, np.full(len(y), 1.0 / max(len(y), 1), np.float32))
    w = np.concatenate(
        [np.full(len(ry), 0.5 / max(len(ry), 1)), np.full(len(y), 0.5 / max(len(y), 1))]
    )
    return TrainSet(np.concatenate([rx, x]), np.concatenate([ry, y]), w.astype(np.float32))


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
    ) -> None:
        self.search = search
        self.initializer = initializer
        self.steps, self.lr, self.seed = int(steps), float(lr), int(seed)
        self.threads = threads
        self.background = background
        self.timeout_s = timeout_s
        self.replay_per_class = int(replay_per_class)
        self.base_replay_per_class = int(base_replay_per_class)
        self._ready: deque[Finished] = deque()
        self._queue: deque[tuple[int, TrainSet]] = deque()
        self._running: tuple[int, TrainSet] | None = None
        self._worker: AdaptationWorker | None = None

    # -- heads ---------------------------------------------------------------------------------
    def train_head(
        self,
        train: TrainSet,
        domain_id: int,
        *,
        steps: int | None = None,
        cancel: Any = None,
        threads: int | None = None,
    ) -> tuple[Adaptor, dict[str, Any]]:
        """Architecture (search plug point), initialisation (init plug point), ``steps`` steps
        of training (0: the initialised head)."""
        x, y = train.features, train.labels
        label_map = sorted({int(v) for v in y})
        found = self.search.search(x, y, label_map)
        adaptor = build_adaptor(found.arch, label_map, seed=self.seed + domain_id)
        self.initializer.init(adaptor, x, y)
        report: dict[str, Any] = {
            "arch": found.arch.to_dict(),
            "search": found.method,
            "init": self.initializer.name,
            "labels": label_map,
        }
        n = self.steps if steps is None else int(steps)
        if n == 0:
            return adaptor, report | {"train": {"steps": 0}}
        tr = train_adaptor(
            adaptor,
            x,
            y,
            steps=n,
            lr=self.lr,
            seed=self.seed + domain_id,
            fit_normalizer=False,
            sample_weight=train.weight,
            cancel=cancel,
            threads=threads,
        )
        return adaptor, report | {"train": tr.to_dict()}

    def job_steps(self, rows: int) -> int:
        """Off the serving path but sharing its cores: bound a job's compute."""
        return min(self.steps, max(MIN_JOB_STEPS, JOB_ROW_STEPS // max(rows, 1)))

    def build_base(
        self, features: np.ndarray, labels: np.ndarray, bank: DomainMemoryBank
    ) -> DomainBuilt:
        """The base domain, trained in full now (it is what serving starts from)."""
        t0 = time.perf_counter()
        train = TrainSet(features, labels, None)
        adaptor, report = self.train_head(train, BASE_DOMAIN, threads=self.threads)
        report["threshold"] = float(bank.add_domain(BASE_DOMAIN, features, labels))
        replay = balanced_sample(features, labels, self.base_replay_per_class, self.seed)
        report["seconds"] = time.perf_counter() - t0
        base = Trigger(-1, "base", {})
        return DomainBuilt(
            Plan(GROW, BASE_DOMAIN), base, BASE_DOMAIN, adaptor, bank, replay, report, None
        )

    # -- plans ---------------------------------------------------------------------------------
    def execute(self, plan: Plan, shots: Shots, domains: DomainSet) -> None:
        """Phase one of a grow/extend plan now (its result waits in :meth:`poll`)."""
        if plan.action not in (GROW, EXTEND):
            raise InputError(f"the executor carries out grow and extend plans, not {plan.action}")
        try:
            built = self._build(plan, shots, domains)
        except Exception as exc:
            log.error("adaptation (phase one) failed:\n%s", traceback.format_exc())
            self._ready.append(JobFailed("build", f"{type(exc).__name__}: {exc}", plan.domain_id))
            return
        self._ready.append(built)
        if built.train_set is not None:
            self._queue.append((built.domain_id, built.train_set))
            self._start_next()

    def _build(self, plan: Plan, shots: Shots, domains: DomainSet) -> DomainBuilt:
        t0 = time.perf_counter()
        extend = plan.action == EXTEND
        did = plan.domain_id
        x, y = shots.features, shots.labels
        rx, ry = domains.replay_of(did if extend else BASE_DOMAIN, x.shape[1])
        train = with_replay(x, y, rx, ry)
        steps = 0 if self.background else self.job_steps(len(train.labels))
        adaptor, report = self.train_head(train, did, steps=steps, threads=self.threads)
        # The memory changes in a copy: serving keeps scoring the old bank until the install.
        bank = domains.bank_copy()
        grow = bank.extend_domain if extend else bank.add_domain
        report["threshold"] = float(grow(did, x, y))
        report.update(domain=did, shots=len(y), replay=len(ry), action=plan.action)
        seed = self.seed + did
        if extend:
            report["version"] = domains.get(did).version + 1
            replay = merge_replay((rx, ry), (x, y), self.replay_per_class, seed)
        else:
            replay = balanced_sample(x, y, self.replay_per_class, seed)
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
        )

    # -- the worker ----------------------------------------------------------------------------
    def _start_next(self) -> None:
        if self._running is not None or not self._queue:
            return
        if self._worker is None:
            self._worker = AdaptationWorker(torch_threads=1, default_timeout_s=self.timeout_s)
        domain_id, train = self._queue.popleft()
        self._running = (domain_id, train)
        self._worker.submit(
            lambda cancel: self._train_job(domain_id, train, cancel),
            name=f"train-domain-{domain_id}",
        )

    def _train_job(self, domain_id: int, train: TrainSet, cancel: Any = None) -> HeadTrained:
        """Phase two: the head trained with the job's bounded steps."""
        t0 = time.perf_counter()
        steps = self.job_steps(len(train.labels))
        adaptor, report = self.train_head(train, domain_id, steps=steps, cancel=cancel)
        report.update(domain=domain_id, seconds=time.perf_counter() - t0)
        return HeadTrained(domain_id, adaptor, report)

    def _collect(self) -> None:
        if self._worker is None or self._running is None:
            return
        done: JobResult | None = self._worker.poll()
        if done is None:
            return
        domain_id = self._running[0]
        self._running = None
        if done.ok:
            self._ready.append(done.value)
        else:
            if done.traceback:
                log.error("training job for domain %d failed:\n%s", domain_id, done.traceback)
            else:
                log.error("training job for domain %d: %s", domain_id, done.error or done.status)
            self._ready.append(JobFailed("train", done.error or done.status, domain_id))
        self._start_next()

    def poll(self) -> list[Finished]:
        """Everything finished since the last poll, in order; starts the next queued job."""
        self._collect()
        out = list(self._ready)
        self._ready.clear()
        return out

    @property
    def busy(self) -> bool:
        return self._running is not None or bool(self._queue)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until queued and running training jobs are done (end of a stream, tests), at
        most ``timeout_s`` in all. Never called on the serving path. True if all finished."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._running is not None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            assert self._worker is not None
            if not self._worker.wait(left):
                return False
            self._collect()
        return True

    def cancel(self) -> None:
        """Drop queued jobs and ask the running one to stop (reported as failed: cancelled)."""
        self._queue.clear()
        if self._worker is not None and self._running is not None:
            self._worker.cancel()

    def pending_training(self) -> list[tuple[int, TrainSet]]:
        """Training jobs not yet installed (running first), for a checkpoint to re-queue."""
        jobs = list(self._queue)
        if self._running is not None:
            jobs.insert(0, self._running)
        return jobs

    def requeue(self, jobs: list[tuple[int, TrainSet]]) -> None:
        self._queue.extend(jobs)
        if self.background:
            self._start_next()
        else:  # synchronous mode trains at once
            while self._queue:
                self._ready.append(self._train_job(*self._queue.popleft()))

    def close(self, timeout_s: float | None = 30.0) -> None:
        self.cancel()
        if self._worker is not None:
            self._worker.wait(timeout_s)
        self._worker = None
        self._running = None
