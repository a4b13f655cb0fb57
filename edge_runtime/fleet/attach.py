"""Plug a runtime into the fleet: its outbox and MQTT client as an event sink and a command
source, and (``labels="fleet"``) the operator's label loop as its label source.

This is the one place that knows both sides; the runtime sees only an
:class:`~edge_runtime.events.EventSink` and its own :class:`~edge_runtime.commands.CommandQueue`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_runtime import __version__
from edge_runtime.config.schema import FleetConfig

if TYPE_CHECKING:
    from edge_runtime.fleet.client import FleetClient
    from edge_runtime.fleet.labels import FleetLabels
    from edge_runtime.runtime import Runtime

log = logging.getLogger(__name__)

#: How long the end of a run waits for the outbox to reach the broker; what is left is sent
#: by the next start on this outbox.
FLUSH_TIMEOUT_S = 30.0


@dataclass
class FleetLink:
    """A runtime's connection to the fleet; ``close`` flushes what it can and disconnects."""

    runtime: Runtime
    client: FleetClient
    labels: FleetLabels | None = None
    observers: list[Any] = field(default_factory=list)

    def close(self, flush_timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        rt = self.runtime
        rt.run_commands()  # answer what arrived after the last batch (exports, labels)
        rt.events.remove_sink(self.client)
        flushed = self.client.stop(flush_timeout_s)
        if not flushed:
            log.warning(
                "fleet: the broker did not take every alert within %.0f s; they stay in the "
                "outbox and go out on the next start",
                flush_timeout_s,
            )


def attach(runtime: Runtime, config: FleetConfig, *, labels: bool = False) -> FleetLink:
    """Start the fleet client for ``runtime`` (``config.enabled`` must be true).

    The client begins serving offline when the broker is unreachable: alerts queue in the
    outbox and go out once it connects.
    """
    from edge_runtime.fleet.client import FleetClient
    from edge_runtime.fleet.labels import FleetLabels
    from edge_runtime.fleet.outbox import Outbox

    outbox = Outbox(
        config.outbox_dir / f"{config.device_id}.sqlite",
        config.device_id,
        max_messages=config.outbox_max_messages,
    )
    rt = runtime
    client = FleetClient(
        config,
        events=rt.events,
        commands=rt.commands,
        position=lambda: rt.frames_seen,
        outbox=outbox,
        software_version=__version__,
        encoder_hash=rt.encoder_hash,
    )
    client.set_state(rt.report())
    rt.events.add_sink(client, first=True)
    client.start()
    link = FleetLink(rt, client)
    if labels:
        link.labels = FleetLabels(client, config.thumbnail_px, config.label_request_frames)
        link.observers.append(link.labels)
    return link
