"""Adaptation jobs: the records phase one and phase two hand back, and the two lanes they run in.

:class:`JobQueue` runs builds (phase one of a costly search: the domain's memory, the search,
the initialised head) and training jobs (a new head's first training, a self-training refit)
each on a worker thread of its own, first in, first out, so a build never waits behind a long
training job and a second drift's domain installs while the first head trains. Results come
back from :meth:`JobQueue.poll` on the serving thread, once each, in order; a job that raises
or times out comes back as a :class:`JobFailed` with its traceback logged. The queue decides
nothing about what a job does: the executor hands it the callables.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.adapt.adaptor import Adaptor, AdaptorArch
from edge_runtime.adapt.planner import Plan
from edge_runtime.adapt.search import SearchBudget
from edge_runtime.adapt.worker import AdaptationWorker, JobResult
from edge_runtime.hdc.bank import DomainMemoryBank
from edge_runtime.labels import Shots, Trigger

if TYPE_CHECKING:
    from edge_runtime.adapt.unlabelled import Pool

log = logging.getLogger(__name__)


@dataclass
class TrainSet:
    """Rows a head is trained on (shots plus replay, in the adaptor's input space), with per-row
    weights, and the architecture the search chose (None: a job from an older checkpoint, whose
    rows are pooled features; the search runs again on them)."""

    features: np.ndarray
    labels: np.ndarray
    weight: np.ndarray | None
    arch: AdaptorArch | None = None
    # How many of the last rows are the labelled shots (the rest: replay); None: not known.
    shots: int | None = None

    def shot_classes(self) -> list[int]:
        """The classes the operator labelled (all the rows' classes when that is not known)."""
        y = self.labels if not self.shots else self.labels[-self.shots :]
        return sorted({int(v) for v in y})


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
    replay_images: np.ndarray | None = None
    # The rows the head is (to be) trained on: a self-training refit adds to them.
    rows: TrainSet | None = None


@dataclass
class HeadTrained:
    domain_id: int
    adaptor: Adaptor
    report: dict[str, Any]
    rows: TrainSet | None = None  # what it was trained on (None: not known, an older job)
    # A self-training refit: the domain version its pool was collected under (a domain extended
    # since then has other classes, and the refit is dropped); None for a first training.
    refit_of: int | None = None


@dataclass
class JobFailed:
    where: str  # "build" | "train" | "refit"
    error: str  # "ExcType: message"
    domain_id: int = -1


Finished = DomainBuilt | HeadTrained | JobFailed


@dataclass
class Job:
    """A queued training job: a first training on ``train``, or a refit on ``pool`` too."""

    domain_id: int
    train: TrainSet
    pool: Pool | None = None


@dataclass
class BuildContext:
    """A grow/extend plan with what its build needs from the serving state (see _prepare)."""

    plan: Plan
    shots: Shots
    replay: tuple[np.ndarray, np.ndarray]
    replay_images: np.ndarray | None
    budget: SearchBudget
    bank: DomainMemoryBank
    version: int


#: build(ctx) -> DomainBuilt, run on the build lane
BuildFn = Callable[[BuildContext], DomainBuilt]
#: train(job, cancel) -> HeadTrained, run on the training lane
TrainFn = Callable[[Job, Any], HeadTrained]


class JobQueue:
    def __init__(self, build: BuildFn, train: TrainFn, timeout_s: float | None = None) -> None:
        self._build_fn, self._train_fn = build, train
        self.timeout_s = timeout_s
        self._ready: deque[Finished] = deque()
        self._queue: deque[Job] = deque()
        self._builds: deque[BuildContext] = deque()  # before any training: they install domains
        self._running: Job | None = None
        self._building: BuildContext | None = None
        self._worker: AdaptationWorker | None = None  # training
        self._builder: AdaptationWorker | None = None  # builds

    # -- submitting ----------------------------------------------------------------------------
    def put(self, done: Finished) -> None:
        """A result made at once, on the serving thread: it comes back in order with the rest."""
        self._ready.append(done)

    def build(self, ctx: BuildContext) -> None:
        self._builds.append(ctx)
        self._start_next()

    def train(self, job: Job) -> None:
        self._queue.append(job)
        self._start_next()

    def _start_next(self) -> None:
        if self._building is None and self._builds:
            if self._builder is None:
                self._builder = AdaptationWorker(torch_threads=1, default_timeout_s=self.timeout_s)
            ctx = self._builds.popleft()
            self._building = ctx
            build = self._build_fn
            self._builder.submit(
                lambda cancel: build(ctx), name=f"build-domain-{ctx.plan.domain_id}"
            )
        if self._running is None and self._queue:
            if self._worker is None:
                self._worker = AdaptationWorker(torch_threads=1, default_timeout_s=self.timeout_s)
            job = self._queue.popleft()
            self._running = job
            train = self._train_fn
            self._worker.submit(
                lambda cancel: train(job, cancel),
                name=f"{'refit' if job.pool else 'train'}-domain-{job.domain_id}",
            )

    # -- results -------------------------------------------------------------------------------
    def _collect(self) -> None:
        if self._builder is not None and self._building is not None:
            done = self._builder.poll()
            if done is not None:
                domain_id = self._building.plan.domain_id
                self._building = None
                if done.ok:
                    self._ready.append(done.value)
                    if done.value.train_set is not None:
                        self._queue.append(Job(domain_id, done.value.train_set))
                else:
                    self._failed("build", domain_id, done)
        if self._worker is not None and self._running is not None:
            done = self._worker.poll()
            if done is not None:
                job = self._running
                self._running = None
                if done.ok:
                    self._ready.append(done.value)
                else:
                    self._failed("refit" if job.pool else "train", job.domain_id, done)
        self._start_next()

    def _failed(self, where: str, domain_id: int, done: JobResult) -> None:
        what = {"build": "adaptation (phase one)", "refit": "self-training refit"}.get(
            where, "training job"
        )
        if done.traceback:
            log.error("%s for domain %d failed:\n%s", what, domain_id, done.traceback)
        else:
            log.error("%s for domain %d: %s", what, domain_id, done.error or done.status)
        self._ready.append(JobFailed(where, done.error or done.status, domain_id))

    def poll(self) -> list[Finished]:
        """Everything finished since the last poll, in order; starts the next queued job."""
        self._collect()
        out = list(self._ready)
        self._ready.clear()
        return out

    @property
    def busy(self) -> bool:
        return (
            self._running is not None
            or self._building is not None
            or bool(self._queue)
            or bool(self._builds)
        )

    @property
    def building(self) -> bool:
        """A domain is being built on the worker (its install is still to come)."""
        return self._building is not None or bool(self._builds)

    def wait(self, timeout_s: float | None = None, *, builds_only: bool = False) -> bool:
        """Block until queued and running jobs are done, at most ``timeout_s`` in all;
        ``builds_only``: until every queued build is. True if done."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def pending() -> bool:
            if builds_only:
                return self.building
            return self._running is not None or self._building is not None

        while pending():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            worker = self._builder if self._building is not None else self._worker
            assert worker is not None
            if not worker.wait(left):
                return False
            self._collect()
        return True

    def cancel(self) -> None:
        """Drop queued jobs and ask the running ones to stop (reported as failed: cancelled)."""
        self._queue.clear()
        self._builds.clear()
        if self._worker is not None and self._running is not None:
            self._worker.cancel()
        if self._builder is not None and self._building is not None:
            self._builder.cancel()

    def pending(self) -> list[Job]:
        """Training jobs not yet finished, the running one first."""
        jobs = list(self._queue)
        if self._running is not None:
            jobs.insert(0, self._running)
        return jobs

    def close(self, timeout_s: float | None = 30.0) -> None:
        self.cancel()
        for worker in (self._worker, self._builder):
            if worker is not None:
                worker.wait(timeout_s)
        self._worker = self._builder = None
        self._running = self._building = None
