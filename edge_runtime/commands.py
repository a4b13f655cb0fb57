"""Commands from other threads: the runtime's thread contract.

One thread owns a :class:`~edge_runtime.runtime.Runtime`: the first to call ``process`` (or
the one that built it). Every other thread -- the fleet client's network loop, a metrics
endpoint, an operator's console -- talks to it only by submitting a :class:`Command` to its
:class:`CommandQueue`. The owner drains the queue between batches, so a command never runs in
the middle of a batch and the runtime's state needs no lock. ``submit`` returns a
``concurrent.futures.Future`` that holds the handler's result, or the error that refused it.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.adapt.controller import AdaptationController
from edge_runtime.adapt.domains import DomainSet
from edge_runtime.drift import DOMAIN_SHIFT
from edge_runtime.errors import EdgeRuntimeError, InputError
from edge_runtime.events import EventLog

#: Commands the runtime handles, with the arguments each takes.
COMMANDS: dict[str, tuple[str, ...]] = {
    "adapt_now": ("kind",),
    "rollback": ("domain",),
    "set_threshold": ("domain", "threshold"),
    "report_state": (),
}


@dataclass
class Command:
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    future: Future[Any] = field(default_factory=Future)


class CommandQueue:
    """Thread-safe FIFO of commands; bounded, so a flood of commands cannot grow memory."""

    def __init__(self, maxsize: int = 256) -> None:
        self._q: queue.Queue[Command] = queue.Queue(maxsize=maxsize)

    def submit(self, name: str, **args: Any) -> Future[Any]:
        """Queue a command for the owning thread (from any thread); InputError if it is unknown,
        has arguments it does not take, or the queue is full."""
        if name not in COMMANDS:
            raise InputError(f"unknown command {name!r}; known: {', '.join(sorted(COMMANDS))}")
        extra = set(args) - set(COMMANDS[name])
        if extra:
            raise InputError(f"command {name!r} takes no argument(s) {sorted(extra)}")
        cmd = Command(name, dict(args))
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
    to the command's future, and a refusal is also a ``command_refused`` event."""

    def __init__(
        self,
        commands: CommandQueue,
        controller: AdaptationController,
        domains: DomainSet,
        events: EventLog,
        report: Callable[[], dict[str, Any]],
    ) -> None:
        self.commands = commands
        self.controller = controller
        self.domains = domains
        self.events = events
        self.report = report

    def run_queued(self, frame: int) -> None:
        for cmd in self.commands.drain():
            try:
                result = self.run(cmd.name, cmd.args, frame)
            except EdgeRuntimeError as exc:
                self.events.emit("command_refused", frame, command=cmd.name, reason=str(exc))
                cmd.future.set_exception(exc)
            else:
                cmd.future.set_result(result)

    def run(self, name: str, args: dict[str, Any], frame: int) -> Any:
        if name == "adapt_now":
            self.controller.request(str(args.get("kind", DOMAIN_SHIFT)), frame)
            return {"collecting": self.controller.labels.budget}
        if name == "rollback":
            d = self.domains.rollback(int(args["domain"]))
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
        raise InputError(f"unknown command {name!r}")
