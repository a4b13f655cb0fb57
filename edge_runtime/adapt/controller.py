"""AdaptationController: what follows a flag, from the label request to the installed domain.

The runtime loop hands it each drift flag and return claim; the controller asks the planner,
runs the label protocol, has the executor carry out the plan, installs what the executor
finished (between batches), pauses and re-arms the detectors, and reports every step as an
event. It decides nothing itself: the planner decides, the executor builds.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.adapt.domains import BASE_DOMAIN, DomainSet
from edge_runtime.adapt.executor import AdaptationExecutor
from edge_runtime.adapt.jobs import DomainBuilt, Finished, HeadTrained, JobFailed, TrainSet
from edge_runtime.adapt.planner import EXTEND, KNOWN_DOMAIN, REFUSE, RETURN, AdaptationPlanner
from edge_runtime.adapt.unlabelled import UnlabelledPool
from edge_runtime.drift import DOMAIN_SHIFT, NOVEL_CLASS, DriftMonitor
from edge_runtime.drift.returns import CONFIRMED, ReturnClaim, ReturnDetector
from edge_runtime.drift.signature import DomainSignature
from edge_runtime.errors import InputError
from edge_runtime.events import EventLog
from edge_runtime.labels import LabelProtocol, Shots, Trigger

if TYPE_CHECKING:
    from edge_runtime.adapt.adaptor import Adaptor
    from edge_runtime.adapt.bundle import DomainBundle

log = logging.getLogger(__name__)

#: An adopted bundle's memory must accept (calibrated score >= 0) at least this share of the
#: recent OOD frames: the receiving device's own evidence that the domain is the one it sees.
MIN_COVERAGE = 0.5
#: How many of the newest buffered OOD frames an adopted bundle's memory is checked against
#: (fashion-drift seed 1 MNIST frames against seed 0's MNIST memory: 38% of the 64-frame window,
#: which still held the previous segment's OOD frames, at the frame the offer arrived).
COVERAGE_FRAMES = 32
# A shared domain is registered as "fleet" once the registry knows that origin; until then as
# "drift" (it was grown from a drift, on another device), with its source in the metadata.
FLEET_ORIGIN = "fleet"


class AdaptationController:
    def __init__(
        self,
        domains: DomainSet,
        labels: LabelProtocol,
        monitor: DriftMonitor,
        returns: ReturnDetector,
        planner: AdaptationPlanner,
        executor: AdaptationExecutor,
        events: EventLog,
        signature: DomainSignature | None = None,
        pool: UnlabelledPool | None = None,
    ) -> None:
        self.domains = domains
        self.labels = labels
        self.monitor = monitor
        self.returns = returns
        self.planner = planner
        self.executor = executor
        self.events = events
        # the recent OOD frames: a flag's signature and an adopted bundle's coverage check
        self.signature = signature if signature is not None else DomainSignature()
        # A new domain's own unlabelled frames, for its head's self-training refit (None: off).
        self.pool = pool
        self.adapting = False  # a grow/extend plan is built but not yet installed
        self.position = 0  # the next stream index (set by the runtime loop)

    def report(self) -> dict[str, Any]:
        """Domains with their adaptor versions, the active one, the labels, the jobs."""
        return {
            "active_domain": self.domains.active,
            "domains": [
                {
                    "id": d.id,
                    "name": d.name,
                    "kind": d.kind,
                    "version": d.version,
                    "labels": list(d.labels),
                }
                for d in self.domains.registry
            ],
            "labels": self.labels.summary(),
            "adapting": self.adapting,
            "training_jobs": len(self.executor.pending_training()),
            "self_training": None
            if self.pool is None or self.pool.domain_id is None
            else {"domain": self.pool.domain_id, "frames": len(self.pool), "of": self.pool.size},
        }

    # -- flags ---------------------------------------------------------------------------------
    def on_flag(self, frame: int, kind: str, evidence: dict[str, Any]) -> None:
        etype = "novel_class" if kind == NOVEL_CLASS else "drift"
        if "signature" not in evidence:
            # what the fleet matches against the domains other devices learned
            evidence = {**evidence, "signature": self.current_signature()}
        self.events.emit(etype, frame, kind=kind, evidence=evidence)
        self.events.emit("alert", frame, reason=etype, kind=kind, domains=len(self.domains))
        plan = self.planner.admit(kind, self.domains)
        if plan.action == REFUSE:
            self._refuse(frame, plan.reason)
            return
        self.monitor.pause()
        self.labels.start(Trigger(frame, kind, evidence))
        self.events.emit("labels_requested", frame, labels=self.labels.budget, kind=kind)

    def on_claim(self, claim: ReturnClaim) -> None:
        """Frames the active domain rejects are claimed by another known domain."""
        if claim.case == CONFIRMED:
            self._return_to(
                claim.frame,
                claim.domain,
                labels=0,
                case=CONFIRMED,
                from_domain=claim.active_domain,
                evidence=claim.evidence,
            )
            return
        # Ambiguous: near-OOD new classes can look like a return, so labels decide.
        evidence = {
            "case": claim.case,
            "claimed_by": claim.domain,
            "active_domain": claim.active_domain,
            **claim.evidence,
        }
        self.on_flag(claim.frame, KNOWN_DOMAIN, evidence)

    def request(self, kind: str = DOMAIN_SHIFT, frame: int | None = None) -> None:
        """Start collecting labels now, as if the monitor had flagged ``kind``."""
        if kind not in (DOMAIN_SHIFT, NOVEL_CLASS):
            raise InputError(f"kind must be {DOMAIN_SHIFT!r} or {NOVEL_CLASS!r}, got {kind!r}")
        if self.labels.collecting or self.adapting:
            raise InputError("an adaptation is already under way")
        self.on_flag(self.position if frame is None else int(frame), kind, {"requested": True})

    def _refuse(self, frame: int, reason: str) -> None:
        log.warning("frame %d: adaptation refused: %s", frame, reason)
        self.events.emit("adaptation_refused", frame, reason=reason)
        self.monitor.resume(reset=True)
        self.returns.reset()

    def _return_to(self, frame: int, domain_id: int, **details: Any) -> None:
        self.domains.activate(domain_id)
        self.events.emit("domain_returned", frame, domain=domain_id, **details)
        self.events.emit(
            "alert", frame, reason="returned", domain=domain_id, domains=len(self.domains)
        )
        self._settle()

    def _settle(self) -> None:
        """What is known changed, so the in-control OOD rate did too: warm up again (a few-shot
        domain's threshold covers its own frames less tightly than the base's). The buffered OOD
        frames may be known now, so the signature starts over."""
        self.monitor.resume(reset=False)
        self.monitor.reset(relearn=True)
        self.returns.reset()
        self.signature.reset()

    def current_signature(self) -> str | None:
        """Hex HDC prototype of the recent OOD frames (None before any)."""
        return self.signature.signature(self.domains.bank.encoder)

    # -- shared domains ------------------------------------------------------------------------
    def adopt(
        self,
        bundle: DomainBundle,
        frame: int,
        *,
        source_device: str | None = None,
        source_domain: int | None = None,
    ) -> dict[str, Any]:
        """Install a domain another device learned: check it covers what this device sees, install
        it as a new domain, and report (``adaptor_installed``, or ``adaptor_refused`` and an
        InputError with the reason).

        Coverage: the bundle's memory must accept at least :data:`MIN_COVERAGE` of the recent
        OOD frames. With none seen, the domain is installed without being activated. A label
        collection under way is cancelled: the bundle is what its labels would have grown.
        """
        ds = self.domains
        src = {
            "source_device": source_device,
            "source_domain": source_domain
            if source_domain is not None
            else bundle.domain.get("id"),
            "sha256": bundle.sha256,
        }
        refused = self._adopt_refusal() or self.executor.serving_refusal(bundle.adaptor.arch)
        new_id = ds.registry.next_id()
        bank = ds.bank_copy()
        if refused is None:
            try:
                bank.add_packed_domain(
                    new_id, bundle.packed, bundle.labels, bundle.exact, bundle.threshold
                )
            except InputError as exc:
                refused = f"the bundle's memory does not fit this device's: {exc}"
        # The newest OOD frames only: an offer comes a batch or two after the flag, so these
        # are the drift's own; older buffered ones may be the previous domain's.
        recent = self.signature.recent()[-COVERAGE_FRAMES:]
        coverage: float | None = None
        if refused is None and len(recent):
            col = bank.domain_ids.index(new_id)
            scores = np.asarray(bank.calibrated_scores(recent))[:, col]
            coverage = float(np.mean(scores >= 0.0))
            if coverage < MIN_COVERAGE:
                refused = (
                    f"the bundle's memory accepts {coverage:.0%} of the {len(recent)} recent OOD "
                    f"frames; at least {MIN_COVERAGE:.0%} needed"
                )
        if refused is not None:
            log.warning("frame %d: adaptor refused: %s", frame, refused)
            self.events.emit("adaptor_refused", frame, reason=refused, coverage=coverage, **src)
            raise InputError(f"adaptor refused: {refused}")
        activate = coverage is not None
        cancelled = activate and self.labels.collecting
        if cancelled:
            self.labels.cancel()
        d = bundle.domain
        ds.install_new(
            new_id,
            bundle.adaptor,
            bank,
            frame=frame,
            kind=str(d.get("kind", DOMAIN_SHIFT)),
            origin=FLEET_ORIGIN,
            metadata={
                "origin": "fleet",
                **src,
                "source_name": d.get("name"),
                "source_version": d.get("version"),
                "signature": bundle.signature,
            },
            activate=activate,
        )
        report = {
            "domain": new_id,
            "labels": 0,
            "coverage": coverage,
            "activated": activate,
            "cancelled_collection": cancelled,
            **src,
        }
        self.events.emit("adaptor_installed", frame, **report)
        self.events.emit("alert", frame, reason="installed", domain=ds.active, domains=len(ds))
        if not self.labels.collecting:  # a collection still under way keeps the monitor paused
            self._settle()
        return report

    def _adopt_refusal(self) -> str | None:
        if self.adapting:
            return "an adaptation is under way on this device"
        return self.planner.growth_refusal(self.domains)

    # -- self-training -------------------------------------------------------------------------
    def _collect_unlabelled(
        self, domain_id: int, rows: TrainSet | None, head: Adaptor | None
    ) -> None:
        """Start collecting the frames a new domain serves, for its head's refit (``head``: the
        head trained on ``rows``, if there is one yet)."""
        if self.pool is None or rows is None or rows.arch is None or domain_id == BASE_DOMAIN:
            return
        if domain_id not in self.domains.registry:
            return
        self.pool.open(domain_id, self.domains.get(domain_id).version, rows, head)

    def wants_unlabelled(self, domain: int) -> bool:
        """A frame served (and accepted) by ``domain`` would go into the self-training pool."""
        return self.pool is not None and self.pool.wants(domain)

    def unlabelled(self, frame: int, features: np.ndarray, image: np.ndarray | None) -> None:
        """One such frame; when the pool is full, its refit is queued on the worker."""
        if self.pool is None or not self.pool.update(features, image):
            return
        pool = self.pool.take()
        if pool is not None:
            log.info(
                "self-training: %d unlabelled frames of domain %d in by frame %d, refit queued",
                len(pool.features),
                pool.domain_id,
                frame,
            )
            self.executor.refine(pool)

    # -- labels --------------------------------------------------------------------------------
    def feedback(self, indices: np.ndarray, labels: np.ndarray) -> int:
        accepted = self.labels.feedback(indices, labels)
        shots = self.labels.take()
        if shots is not None:
            self._adapt(shots)
        return accepted

    def finish(self, wait: bool, timeout_s: float | None) -> None:
        """End of stream: adapt on the labels collected so far, then (``wait``) let training
        finish, at most ``timeout_s``, and install it."""
        collecting = self.labels.collecting
        self.labels.stop_requesting()
        shots = self.labels.take()
        if shots is not None:
            self._adapt(shots)
        elif collecting:  # the stream ended before any requested label came
            self.monitor.resume(reset=True)
        if wait:
            self.executor.wait(timeout_s)
        self.install(self.position)

    def expire(
        self, frame: int, reason: str, *, trigger_frame: int | None = None
    ) -> dict[str, Any] | None:
        """End a label collection whose missing labels will never come (an operator's deadline
        passed): stop requesting, then adapt on the labels already in, as the end of a stream
        does; with none, cancel it and watch the stream again, so a later drift is flagged.

        ``trigger_frame`` names the flag the caller means; a newer collection is left alone.
        Returns what was done (also a ``label_collection_expired`` event), or None when no
        such collection is under way."""
        t = self.labels.trigger
        if t is None or (trigger_frame is not None and int(trigger_frame) != t.frame):
            return None
        missing = self.labels.summary()
        self.labels.stop_requesting()
        shots = self.labels.take()
        outcome = {
            "trigger_frame": t.frame,
            "kind": t.kind,
            "reason": str(reason),
            "labels": 0 if shots is None else len(shots),
            "missing": missing["awaiting"] + missing["to_request"],
            "adapted": shots is not None,
        }
        self.events.emit("label_collection_expired", frame, **outcome)
        if shots is not None:
            self._adapt(shots)
        else:
            self.labels.cancel()
            self.monitor.resume(reset=True)
            self.returns.reset()
        return outcome

    # -- plans ---------------------------------------------------------------------------------
    def _adapt(self, shots: Shots) -> None:
        t = shots.trigger
        new_id = self.domains.registry.next_id()
        last = shots.frames[-1] if shots.frames else t.frame
        self.events.emit(
            "adaptation_started",
            last,
            trigger_frame=t.frame,
            kind=t.kind,
            labels=len(shots),
            label_frames=[shots.frames[0], shots.frames[-1]] if shots.frames else [],
            classes=sorted({int(v) for v in shots.labels}),
            domain=new_id,
        )
        inputs = self.executor.shot_inputs(shots.features, shots.images)
        plan = self.planner.plan(shots, self.domains, new_id, inputs)
        if plan.action == RETURN:
            self._return_to(
                self.position,
                plan.domain_id,
                labels=len(shots),
                case="labelled",
                from_domain=self.domains.active,
                trigger_frame=t.frame,
                evidence=plan.report,
            )
        elif plan.action == REFUSE:
            self._refuse(self.position, plan.reason)
        else:
            self.adapting = True
            self.executor.execute(plan, shots, self.domains)

    def install(self, frame: int) -> None:
        """Install whatever the executor finished (between batches, on the serving thread)."""
        for done in self.executor.poll():
            self._install_one(done, frame)

    def _install_one(self, done: Finished, frame: int) -> None:
        ds = self.domains
        if isinstance(done, HeadTrained):
            if done.refit_of is not None and (
                done.domain_id not in ds.registry or ds.get(done.domain_id).version != done.refit_of
            ):
                log.info(
                    "self-training refit of domain %d dropped: the domain changed since its "
                    "frames were collected",
                    done.domain_id,
                )
                return
            if ds.swap_head(done.domain_id, done.adaptor):
                self.events.emit("adaptor_trained", frame, **done.report)
            return
        if isinstance(done, JobFailed):
            self.events.emit(
                "error",
                frame,
                where=f"adaptation:{done.where}",
                message=done.error,
                domain=done.domain_id,
            )
            if done.where == "build":  # no domain came of it: watch the stream again
                self.adapting = False
                self.monitor.resume(reset=True)
                self.returns.reset()
            return
        assert isinstance(done, DomainBuilt)
        t = done.trigger
        if done.plan.action == EXTEND:
            ds.install_version(
                done.domain_id,
                done.adaptor,
                done.bank,
                replay=done.replay,
                replay_images=done.replay_images,
            )
        else:
            evicted = ds.install_new(
                done.domain_id,
                done.adaptor,
                done.bank,
                frame=frame,
                kind=t.kind,
                metadata={"trigger_frame": t.frame},
                replay=done.replay,
                replay_images=done.replay_images,
            )
            for ev in evicted:
                self.events.emit(
                    "domain_evicted",
                    frame,
                    domain=ev.evicted.id,
                    name=ev.evicted.name,
                    served=ev.evicted.served,
                    reason=ev.reason,
                )
        self.adapting = False
        # Its frames are collected from now on: at an unpaced replay's speed a segment is over
        # before the first training job is; the refit trains its own first head if need be.
        trained = done.adaptor if done.train_set is None else None  # phase one trained it
        self._collect_unlabelled(done.domain_id, done.rows, trained)
        self.events.emit(
            "adaptation_finished", frame, trigger_frame=t.frame, kind=t.kind, **done.report
        )
        self.events.emit("alert", frame, reason="adapted", domain=ds.active, domains=len(ds))
        self._settle()
