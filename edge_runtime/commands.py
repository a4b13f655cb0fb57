"""Commands from other threads: the runtime's thread contract.

One thread owns a :class:`~edge_runtime.runtime.Runtime`: the first to call ``process`` (or
the one that built it). Every other thread -- the fleet client's network loop, a metrics
endpoint, an operator's console -- talks to it only by submitting a :class:`Command` to its
:class:`CommandQueue`. The owner drains the queue between batches, so a command never runs in
the middle of a batch and the runtime's state needs no lock. ``submit`` returns a
``concurrent.futures.Future`` that holds the handler's result, or the error that refused it.

Each command has an ``id`` (the caller's, e.g. the fleet's command id, or a fresh one). Its
outcome is also an event: ``command_done`` (with a small JSON-able view of the result: bytes
appear as their length, the future alone holds them) or ``command_refused`` with the reason.
"""

from __future__ import annotations

import base64
import binascii
import math
import queue
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.adapt.bundle import BundleError, export_bundle, hdc_fingerprint, read_bundle
from edge_runtime.adapt.controller import AdaptationController
from edge_runtime.adapt.domains import DomainSet
from edge_runtime.drift import DOMAIN_SHIFT
from edge_runtime.errors import EdgeRuntimeError, InputError
from edge_runtime.events import EventLog

#: Commands the runtime handles, with the arguments each takes.
COMMANDS: dict[str, tuple[str, ...]] = {
    "adapt_now": ("kind",),
    "rollback": ("domain", "version"),
    "set_threshold": ("domain", "threshold"),
    "report_state": (),
    "labels": ("request_id", "frames", "labels"),
    "install_adaptor": ("bundle", "sha256", "encoder_hash", "source_device", "source_domain"),
    "export_domain": ("domain",),
    "expire_labels": ("reason", "trigger_frame"),
}
#: Arguments a command may leave out; every other one is required.
OPTIONAL_ARGS: dict[str, frozenset[str]] = {
    "adapt_now": frozenset({"kind"}),
    "rollback": frozenset({"version"}),
    "labels": frozenset({"request_id"}),
    "install_adaptor": frozenset({"source_device", "source_domain"}),
    "expire_labels": frozenset({"reason", "trigger_frame"}),
}


@dataclass
class Command:
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    future: Future[Any] = field(default_factory=Future)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # False for a part's own bookkeeping (the fleet client's exports and state snapshots):
    # answered through the future only, so events.jsonl holds what happened to the device.
    report: bool = True

    @property
    def command_id(self) -> str:
        """:attr:`id` under the name ``submit`` and the events give it."""
        return self.id


class CommandQueue:
    """Thread-safe FIFO of commands; bounded, so a flood of commands cannot grow memory."""

    def __init__(self, maxsize: int = 256) -> None:
        self._q: queue.Queue[Command] = queue.Queue(maxsize=maxsize)

    def submit(
        self, name: str, *, command_id: str | None = None, report: bool = True, **args: Any
    ) -> Future[Any]:
        """Queue a command for the owning thread (from any thread); InputError if it is unknown,
        lacks an argument it needs, has one it does not take, or the queue is full. With
        ``report=False`` its outcome is not an event (see :class:`Command`)."""
        if name not in COMMANDS:
            raise InputError(f"unknown command {name!r}; known: {', '.join(sorted(COMMANDS))}")
        extra = set(args) - set(COMMANDS[name])
        if extra:
            raise InputError(f"command {name!r} takes no argument(s) {sorted(extra)}")
        missing = set(COMMANDS[name]) - OPTIONAL_ARGS.get(name, frozenset()) - set(args)
        if missing:
            raise InputError(f"command {name!r} needs argument(s) {sorted(missing)}")
        cmd = Command(name, dict(args), report=report)
        if command_id is not None:
            cmd.id = str(command_id)
        try:
            self._q.put_nowait(cmd)
        except queue.Full:
            raise InputError(f"command queue full ({self._q.maxsize}); {name!r} refused") from None
        return cmd.future

    def drain(self) -> list[Command]:
        out: list[Command] = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out

    def __len__(self) -> int:
        return self._q.qsize()


class CommandHandler:
    """Runs queued commands on the owning thread, between batches; each result or refusal goes
    to the command's future and to a ``command_done`` or ``command_refused`` event.

    ``encoder_hash`` is this device's (:attr:`Runtime.encoder_hash`): bundles are exported with
    it and an installed bundle must carry it.
    """

    def __init__(
        self,
        commands: CommandQueue,
        controller: AdaptationController,
        domains: DomainSet,
        events: EventLog,
        report: Callable[[], dict[str, Any]],
        *,
        encoder_hash: str,
    ) -> None:
        self.commands = commands
        self.controller = controller
        self.domains = domains
        self.events = events
        self.report = report
        self.encoder_hash = encoder_hash

    def run_queued(self, frame: int) -> None:
        """Run every queued command, then report each outcome in command order: what the
        commands did (a drift flag, an install) comes first in the log, their acknowledgements
        after it."""
        outcomes: list[tuple[Command, Any, EdgeRuntimeError | None]] = []
        with self.events.caused_by("command"):
            try:
                for cmd in self.commands.drain():
                    try:
                        outcomes.append((cmd, self.run(cmd.name, cmd.args, frame), None))
                    except EdgeRuntimeError as exc:
                        outcomes.append((cmd, None, exc))
            finally:  # a bug in one command still answers those that ran before it
                for cmd, result, exc in outcomes:
                    self._answer(cmd, result, exc, frame)

    def _answer(self, cmd: Command, result: Any, exc: EdgeRuntimeError | None, frame: int) -> None:
        if exc is not None:
            if cmd.report:
                self.events.emit(
                    "command_refused", frame, command_id=cmd.id, command=cmd.name, reason=str(exc)
                )
            cmd.future.set_exception(exc)
            return
        if cmd.report:
            self.events.emit(
                "command_done",
                frame,
                command_id=cmd.id,
                command=cmd.name,
                result=event_view(result),
            )
        cmd.future.set_result(result)

    def run(self, name: str, args: dict[str, Any], frame: int) -> Any:
        if name == "adapt_now":
            self.controller.request(str(args.get("kind", DOMAIN_SHIFT)), frame)
            return {"collecting": self.controller.labels.budget}
        if name == "rollback":
            version = args.get("version")
            d = self.domains.rollback(
                int(args["domain"]), None if version is None else int(version)
            )
            self.events.emit("adaptor_rolled_back", frame, domain=d.id, version=d.version)
            return {"domain": d.id, "version": d.version}
        if name == "set_threshold":
            did, thr = int(args["domain"]), float(args["threshold"])
            if not math.isfinite(thr):
                raise InputError(f"threshold must be finite, got {thr}")
            self.domains.set_threshold(did, thr)
            self.events.emit("threshold_set", frame, domain=did, threshold=thr)
            return {"domain": did, "threshold": thr}
        if name == "report_state":
            return self.report()
        if name == "labels":
            frames, labels = np.asarray(args["frames"]), np.asarray(args["labels"])
            accepted = self.controller.feedback(frames, labels)
            return {"accepted": accepted, "request_id": args.get("request_id")}
        if name == "expire_labels":
            trigger = args.get("trigger_frame")
            return self.controller.expire(
                frame,
                str(args.get("reason", "expired")),
                trigger_frame=None if trigger is None else int(trigger),
            )
        if name == "install_adaptor":
            return self._install(args, frame)
        if name == "export_domain":
            out = export_bundle(self.domains, int(args["domain"]), self.encoder_hash)
            d = out.manifest["domain"]
            return {
                "bundle": out.data,
                "sha256": out.sha256,
                "domain": d["id"],
                "version": d["version"],
                "signature": out.manifest["signature"],
            }
        raise InputError(f"unknown command {name!r}")

    def _install(self, args: dict[str, Any], frame: int) -> dict[str, Any]:
        device, domain = args.get("source_device"), args.get("source_domain")
        source = {
            "source_device": None if device is None else str(device),
            "source_domain": None if domain is None else int(domain),
        }
        try:
            claimed = str(args["encoder_hash"])
            if claimed != self.encoder_hash:
                raise BundleError(
                    f"bundle was trained for encoder {claimed}, this device runs "
                    f"{self.encoder_hash}"
                )
            bundle = read_bundle(
                _bundle_bytes(args["bundle"]),
                sha256=str(args["sha256"]),
                encoder_hash=self.encoder_hash,
                hdc_fingerprint=hdc_fingerprint(self.domains.bank),
            )
        except EdgeRuntimeError as exc:
            # refused before the controller saw it: the same event as the controller's refusals
            self.events.emit("adaptor_refused", frame, reason=str(exc), coverage=None, **source)
            raise
        return self.controller.adopt(bundle, frame, **source)


def _bundle_bytes(value: Any) -> bytes:
    """A bundle as bytes; a string is the base64 a JSON command carries."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BundleError(f"adaptor bundle is not valid base64: {exc}") from None
    raise BundleError(f"adaptor bundle must be bytes or base64 text, got {type(value).__name__}")


def event_view(result: Any) -> Any:
    """``result`` for an event: bytes become ``{"bytes": length}`` (events stay small; the
    command's future holds the bytes)."""
    if isinstance(result, (bytes, bytearray, memoryview)):
        return {"bytes": len(result)}
    if isinstance(result, dict):
        return {str(k): event_view(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return [event_view(v) for v in result]
    return result
