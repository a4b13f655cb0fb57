"""Commands from other threads: the runtime's thread contract.

One thread owns a :class:`~edge_runtime.runtime.Runtime`: the first to call ``process`` (or
the one that built it). Every other thread -- the fleet client's network loop, a metrics
endpoint, an operator's console -- talks to it only by submitting a :class:`Command` to its
:class:`CommandQueue`. The owner drains the queue between batches, so a command never runs in
the middle of a batch and the runtime's state needs no lock. ``submit`` returns a
``concurrent.futures.Future`` that holds the handler's result, or the error that refused it.
"""

from __future__ import annotations

import queue
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.errors import InputError

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
