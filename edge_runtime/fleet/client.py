"""The device's fleet link: an :class:`~edge_runtime.events.EventSink` that sends every runtime
event to the controller, and a command source that feeds the runtime's
:class:`~edge_runtime.commands.CommandQueue` from the ``cmd`` topic.

Threads and what each may block on:

* the serving thread calls :meth:`FleetClient.write` (under the event log's lock): one SQLite
  insert into the :class:`~edge_runtime.fleet.outbox.Outbox` and a wake-up, never the network;
* the publisher thread (ours) publishes outbox rows in seq order, births and heartbeats, and
  deletes rows the broker acknowledged;
* paho's network thread runs the callbacks: ``on_publish`` only records the PUBACK,
  ``on_message`` validates a command and submits it (``CommandQueue.submit`` never blocks).

Delivery: a row leaves the outbox only after the broker's PUBACK for it. paho keeps QoS 1
messages that were in flight when the connection dropped and re-sends them itself after the
reconnect, so the client does not republish those (that would send each twice); new rows wait
until the re-sent ones are acknowledged, which keeps the per-device order. After a restart the
publisher starts again from the oldest row. A PUBACK lost to a disconnect means the broker got
the message twice; the controller de-duplicates on ``(device_id, seq)``: at-least-once delivery
plus de-dup is exactly-once in its store.

Status (Sparkplug style): each connection gets a persisted ``bd_seq``; the birth (retained,
QoS 1) and the Last Will ``death`` (retained) carry the same one, so the controller can tell a
stale death from the current session's. paho sends the will registered at the time of each
(re)connect, so the next will is set in ``on_disconnect``, before paho reconnects. Status and
heartbeat envelopes are not outbox rows: their ``seq`` is the outbox's high-water mark (the last
seq assigned), which lets the controller notice a gap, and the controller de-dups alerts only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge_runtime.commands import CommandQueue
from edge_runtime.config.schema import FleetConfig
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.events import Event, EventLog
from edge_runtime.fleet.credentials import load_credentials, tls_context
from edge_runtime.fleet.outbox import Outbox
from edge_runtime.fleet.payloads import (
    ADAPTORS,
    ALERTS,
    BIRTH,
    CMD,
    DEATH,
    LIFECYCLE_PHASE,
    STATUS,
    TELEMETRY,
    CommandMessage,
    Envelope,
    PayloadError,
    alert_body,
    topic,
)

log = logging.getLogger(__name__)

#: Outbox rows handed to paho and not yet acknowledged, at most.
DEFAULT_WINDOW = 100
#: Events after which the adaptor is exported and published on ``adaptors``.
EXPORT_ON = frozenset({"adaptation_finished", "adaptor_trained"})
#: Events after which the birth snapshot (domains, active domain) is refreshed.
REFRESH_ON = EXPORT_ON | {"domain_returned", "adaptor_rolled_back", "adaptor_installed"}
#: Meta key of the open lifecycle in the outbox DB (a restart continues the episode).
LIFECYCLE_KEY = "lifecycle"
#: Command ids remembered to drop QoS 1 redeliveries.
SEEN_COMMAND_IDS = 1024


class FleetClient:
    """MQTT link of one device; see the module docstring for threads and delivery.

    ``position`` returns the runtime's current stream position (frames seen), used as the
    ``frame`` of events the client emits itself and in heartbeats.
    """

    def __init__(
        self,
        config: FleetConfig,
        *,
        events: EventLog,
        commands: CommandQueue,
        position: Callable[[], int],
        outbox: Outbox | None = None,
        software_version: str,
        encoder_hash: str,
        clock: Callable[[], float] = time.time,
        window: int = DEFAULT_WINDOW,
        readings: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.device_id = config.device_id
        self.events = events
        self.commands = commands
        self.position = position
        self.software_version = software_version
        self.encoder_hash = encoder_hash
        self.clock = clock
        self.window = max(1, int(window))
        self._own_outbox = outbox is None
        # "is None", not "or": an empty Outbox is falsy (it has __len__).
        self.outbox = (
            outbox
            if outbox is not None
            else Outbox(
                Path(config.outbox_dir).expanduser() / f"{self.device_id}.sqlite",
                self.device_id,
                max_messages=config.outbox_max_messages,
                clock=clock,
            )
        )
        self._readings = readings
        self._reader: Any = None  # PsutilReader, built on first heartbeat
        # Whether the CommandQueue already takes command_id= (the runtime's handler then puts it
        # on command_done / command_refused); until then the client reports completion itself.

        self._cond = threading.Condition()
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        self._inflight: dict[int, int | None] = {}  # mid -> outbox seq (None: status message)
        self._barrier: set[int] = set()  # mids paho re-sends after a reconnect; new rows wait
        self._qos0: set[int] = set()  # QoS 0 mids (heartbeats); on_publish just forgets them
        self._early: set[int] = set()  # PUBACKs that came before publish() returned the mid
        self._to_ack: list[int] = []  # seqs acknowledged, deleted in batches by the publisher
        self._sent_upto = 0  # highest outbox seq handed to paho in this process
        self._epoch = 0  # bumped when _sent_upto is rewound (QoS 0 only)
        self._kick = True  # rows may be waiting (a previous run's, or new ones)
        self._connected = False
        self._birth_due = False
        self._bd_seq = 0
        self._bd_used = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._closed = False
        self._flushed_at_stop = False
        self._state: dict[str, Any] = {}
        self._lifecycle: str | None = self.outbox.get_meta(LIFECYCLE_KEY)
        self._ended: str | None = None  # the episode that ended last (its outcome alert)
        self.last_error: str | None = None  # the last refused connection, for status/tests

        self._mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        # Two extra slots so a birth or death never queues behind a full window of rows.
        self._mqtt.max_inflight_messages_set(self.window + 2)
        self._mqtt.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)  # type: ignore[arg-type]
        user, password = load_credentials(config)
        if user is not None:
            self._mqtt.username_pw_set(user, password)
        ctx = tls_context(config)
        if ctx is not None:
            self._mqtt.tls_set_context(ctx)
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_disconnect = self._on_disconnect
        self._mqtt.on_publish = self._on_publish
        self._mqtt.on_message = self._on_message
        self._mqtt.on_connect_fail = self._on_connect_fail

    # ------------------------------------------------------------------------------ topics
    def topic(self, channel: str) -> str:
        return topic(self.config.topic_prefix, self.device_id, channel)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def lifecycle(self) -> str | None:
        """The open drift episode's lifecycle id (None between episodes)."""
        return self._lifecycle

    # ------------------------------------------------------------------------------ life
    def start(self) -> FleetClient:
        """Connect in the background; never raises for an unreachable broker (the device serves
        offline and the outbox fills; paho retries with capped exponential backoff)."""
        if self._thread is not None:
            return self
        if self.outbox.recovered_from is not None:
            self.events.emit(
                "error",
                self.position(),
                where="fleet.outbox",
                message=f"outbox was corrupt; moved to {self.outbox.recovered_from}",
            )
        self._prepare_will()
        self._mqtt.connect_async(self.config.host, self.config.port, keepalive=60)
        self._mqtt.loop_start()
        self._thread = threading.Thread(target=self._run, name="fleet-publisher", daemon=True)
        self._thread.start()
        return self

    def stop(self, flush_timeout_s: float = 5.0) -> bool:
        """Publish what can be published within ``flush_timeout_s``, then publish the offline
        status and disconnect cleanly (a clean disconnect does not fire the Last Will). True if
        the outbox was empty at the end."""
        if self._closed:
            return self._flushed_at_stop
        if self._thread is None:
            return len(self.outbox) == 0
        flushed = self.wait_flushed(flush_timeout_s) if self._connected else False
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        self._thread = None
        if self._connected:
            try:
                info = self._mqtt.publish(
                    self.topic(STATUS), self._death().to_json(), qos=1, retain=True
                )
                info.wait_for_publish(timeout=max(1.0, flush_timeout_s))
            except (RuntimeError, ValueError) as exc:  # not connected any more: the will speaks
                log.warning("fleet: offline status not published: %s", exc)
        self._mqtt.disconnect()
        self._mqtt.loop_stop()
        self._connected = False
        self._apply_acks()
        flushed = len(self.outbox) == 0
        if self._own_outbox:
            # Our outbox closes with us: later events could not be stored, so stop taking them
            # (a caller-owned outbox stays open and keeps them for the next start).
            self.events.remove_sink(self)
            self.outbox.close()
            self._closed, self._flushed_at_stop = True, flushed
        return flushed

    def close(self) -> None:
        """EventSink close: stop, giving the outbox a few seconds to drain."""
        self.stop()

    def wait_flushed(self, timeout: float) -> bool:
        """Wait until every outbox row is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                acks_waiting = bool(self._to_ack)
            if not acks_waiting and len(self.outbox) == 0:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._cond:
                self._cond.notify_all()
                self._cond.wait(min(left, 0.05))

    def set_state(self, report: dict[str, Any]) -> None:
        """The runtime's ``report()`` snapshot for the birth payload (owner thread). While
        connected the retained birth is re-published, so it shows the current domains."""
        with self._cond:
            self._state = dict(report)
            if self._connected:
                self._birth_due = True
            self._cond.notify_all()

    # ------------------------------------------------------------------------------ sink
    def write(self, event: Event) -> None:
        """EventSink: the event becomes an alert row (serving thread, under the log's lock)."""
        etype = str(event.get("type"))
        phase = LIFECYCLE_PHASE.get(etype)
        current = self._lifecycle
        meta: dict[str, str | None] = {}
        if phase == "new":
            lifecycle: str | None = f"{self.device_id}:{event.get('frame')}"
            meta[LIFECYCLE_KEY] = lifecycle
            self._ended = None
        elif phase is not None and current is not None:
            lifecycle = current
            if phase == "end":
                meta[LIFECYCLE_KEY] = None
                self._ended = current
        elif phase == "update" and self._ended is not None:
            # The alert that reports an episode's outcome follows the event that ended it.
            lifecycle = self._ended
        else:
            lifecycle = None  # a one-off: its own id, which names its seq

        def body(seq: int) -> dict[str, Any]:
            return alert_body(event, lifecycle or f"{self.device_id}:{etype}:{seq}")

        env = self.outbox.put(ALERTS, etype, body, meta=meta)
        if LIFECYCLE_KEY in meta:
            self._lifecycle = meta[LIFECYCLE_KEY]
        self._wake()
        if etype in EXPORT_ON and event.get("domain") is not None:
            self._request_export(int(event["domain"]), event, str(env.body["lifecycle"]))
        if etype in REFRESH_ON:
            self._refresh_state()

    def put(self, channel: str, etype: str, body: dict[str, Any]) -> Envelope:
        """Queue a non-alert message (label requests) through the outbox."""
        env = self.outbox.put(channel, etype, body)
        self._wake()
        return env

    def _wake(self) -> None:
        with self._cond:
            self._kick = True
            self._cond.notify_all()

    # ------------------------------------------------------------------------------ exports
    def _submit_internal(self, name: str, **args: Any) -> Future[Any] | None:
        try:
            return self.commands.submit(name, command_id=uuid.uuid4().hex, report=False, **args)
        except EdgeRuntimeError as exc:
            log.warning("fleet: could not queue %s: %s", name, exc)
            return None

    def _request_export(self, domain: int, event: Event, lifecycle: str) -> None:
        fut = self._submit_internal("export_domain", domain=domain)
        if fut is None:
            return

        def done(f: Future[Any]) -> None:
            # Runs on the owner thread (the command handler sets the result).
            if f.exception() is not None:
                log.warning("fleet: export of domain %d failed: %s", domain, f.exception())
                return
            try:
                self.put(ADAPTORS, "adaptor", self._adaptor_body(domain, event, lifecycle, f))
            except Exception:  # a failed export must not break the owner thread
                log.exception("fleet: adaptor of domain %d not queued", domain)

        fut.add_done_callback(done)

    def _adaptor_body(
        self, domain: int, event: Event, lifecycle: str, fut: Future[Any]
    ) -> dict[str, Any]:
        result = fut.result()
        if isinstance(result, (bytes, bytearray)):
            result = {"bundle": bytes(result)}
        if not isinstance(result, dict) or not isinstance(result.get("bundle"), (bytes, bytearray)):
            raise TypeError(f"export_domain returned {type(result).__name__}, not bundle bytes")
        bundle = bytes(result["bundle"])
        return {
            "domain": domain,
            "version": result.get("version", event.get("version")),
            "bundle": base64.b64encode(bundle).decode("ascii"),
            "sha256": result.get("sha256") or hashlib.sha256(bundle).hexdigest(),
            "encoder_hash": self.encoder_hash,
            "signature": result.get("signature"),
            "lifecycle": lifecycle,
        }

    def _refresh_state(self) -> None:
        fut = self._submit_internal("report_state")
        if fut is None:
            return

        def done(f: Future[Any]) -> None:
            if f.exception() is None and isinstance(f.result(), dict):
                self.set_state(f.result())

        fut.add_done_callback(done)

    # ------------------------------------------------------------------------------ status
    def _prepare_will(self) -> None:
        """Take the bd_seq of the next connection and register its death as the will."""
        self._bd_seq = self.outbox.next_birth_seq()
        self._bd_used = False
        self._mqtt.will_set(self.topic(STATUS), self._death().to_json(), qos=1, retain=True)

    def _death(self) -> Envelope:
        body = {"state": "offline", "bd_seq": self._bd_seq}
        return Envelope(self.device_id, self.outbox.last_seq(), DEATH, body, time=self.clock())

    def _birth(self) -> Envelope:
        with self._cond:
            state = dict(self._state)
        body = {
            "state": "online",
            "bd_seq": self._bd_seq,
            "encoder_hash": self.encoder_hash,
            "domains": state.get("domains", []),
            "active_domain": state.get("active_domain"),
            "software_version": self.software_version,
        }
        return Envelope(self.device_id, self.outbox.last_seq(), BIRTH, body, time=self.clock())

    def _heartbeat(self) -> Envelope:
        body = {
            "frames_seen": int(self.position()),
            "outbox": len(self.outbox),
            "readings": self._read(),
        }
        return Envelope(
            self.device_id, self.outbox.last_seq(), "heartbeat", body, time=self.clock()
        )

    def _read(self) -> dict[str, Any]:
        try:
            if self._readings is not None:
                return dict(self._readings())
            if self._reader is None:
                from edge_runtime.telemetry.sampler import PsutilReader

                self._reader = PsutilReader()
            return dict(self._reader.read().to_dict())
        except Exception as exc:  # telemetry is a nicety; a heartbeat goes out regardless
            log.debug("fleet: no readings for the heartbeat: %s", exc)
            return {}

    # ------------------------------------------------------------------------------ paho callbacks
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.error("fleet: %s", self.last_error)
            return
        self.last_error = None
        client.subscribe(self.topic(CMD), qos=1)
        with self._cond:
            self._connected = True
            self._bd_used = True
            self._birth_due = True
            # paho re-sends these itself after this callback; new rows wait for their PUBACKs.
            self._barrier = {m for m, s in self._inflight.items()}
            self._kick = True
            self._cond.notify_all()
        log.info("fleet: connected to %s:%d", self.config.host, self.config.port)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        with self._cond:
            self._connected = False
            self._qos0.clear()  # QoS 0 messages are not re-sent: never expect their callback
            if self.config.qos == 0:
                # Nothing is re-sent at QoS 0: forget the unconfirmed rows and send them again.
                self._inflight.clear()
                self._sent_upto = 0
                self._epoch += 1
            stopping = self._stopping
        if not stopping and self._bd_used:
            # paho reconnects from this thread after this callback: the will set now is the one
            # the next CONNECT carries, matching the birth that follows it.
            self._prepare_will()
        if stopping:
            log.info("fleet: disconnected (%s)", reason)
        else:
            log.warning("fleet: disconnected (%s); reconnecting", reason)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.info("fleet: broker %s:%d unreachable; retrying", self.config.host, self.config.port)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        # Called with paho's message mutex held: take only our lock, never call paho here.
        if reason.is_failure:
            # MQTT 5 only (e.g. not authorised): the broker will never take it; retrying would
            # block every later row, so the row is dropped and the reason logged.
            log.error("fleet: broker refused message mid %d: %s", mid, reason)
        with self._cond:
            if mid in self._inflight:
                self._settle(mid)
            elif mid in self._qos0:
                self._qos0.discard(mid)
            else:
                self._early.add(mid)

    def _settle(self, mid: int) -> None:
        """A mid is acknowledged (holding ``_cond``)."""
        seq = self._inflight.pop(mid)
        self._barrier.discard(mid)
        if seq is not None:
            self._to_ack.append(seq)
        self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle_command(bytes(msg.payload))
        except Exception:  # a callback that raises would kill paho's loop thread
            log.exception("fleet: command handling failed")

    # ------------------------------------------------------------------------------ commands
    def _handle_command(self, payload: bytes) -> None:
        try:
            msg = CommandMessage.from_json(payload, self.config.max_command_bytes)
            args = self._translate(msg)
        except PayloadError as exc:
            cid, name = self._best_effort_ids(payload)
            self._refuse(cid, name, str(exc))
            return
        # QoS 1 may deliver a command twice; running install_adaptor or labels twice would
        # install two domains or count labels twice, so a repeated id is dropped.
        if msg.id in self._seen_ids:
            log.info("fleet: command %s (%s) delivered again; ignored", msg.id, msg.command)
            return
        self._seen_ids[msg.id] = None
        while len(self._seen_ids) > SEEN_COMMAND_IDS:
            self._seen_ids.popitem(last=False)
        try:
            self.commands.submit(msg.command, command_id=msg.id, **args)
        except EdgeRuntimeError as exc:
            self._refuse(msg.id, msg.command, str(exc))

    def _translate(self, msg: CommandMessage) -> dict[str, Any]:
        args = dict(msg.args)
        if msg.command == "install_adaptor":
            try:
                args["bundle"] = base64.b64decode(args["bundle"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise PayloadError(
                    f"command 'install_adaptor': bundle is not base64: {exc}"
                ) from None
        return args

    def _best_effort_ids(self, payload: bytes) -> tuple[str | None, str | None]:
        """The id and name of a refused command, if it is small and JSON enough to read."""
        if len(payload) > self.config.max_command_bytes:
            return None, None
        try:
            obj = json.loads(payload)
        except ValueError:
            return None, None
        if not isinstance(obj, dict):
            return None, None
        cid, name = obj.get("id"), obj.get("command")
        return (
            cid if isinstance(cid, str) else None,
            name if isinstance(name, str) else None,
        )

    def _refuse(self, cid: str | None, name: str | None, reason: str) -> None:
        log.warning("fleet: command %s (%s) refused: %s", name, cid, reason)
        self.events.emit(
            "command_refused", self.position(), command_id=cid, command=name, reason=reason
        )

    # ------------------------------------------------------------------------------ publisher
    def _ready(self) -> bool:
        """Whether the publisher has something to do now (holding ``_cond``)."""
        if self._stopping or self._to_ack:
            return True
        if not self._connected or self._barrier:
            return False
        rows = sum(1 for s in self._inflight.values() if s is not None)
        return self._birth_due or (self._kick and rows < self.window)

    def _run(self) -> None:
        next_beat = time.monotonic() + self.config.heartbeat_s
        while True:
            with self._cond:
                while not self._ready() and time.monotonic() < next_beat:
                    self._cond.wait(max(0.0, min(next_beat - time.monotonic(), 1.0)))
                if self._stopping:
                    break
            try:
                self._apply_acks()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.config.heartbeat_s
                    if self._connected:
                        self._publish(TELEMETRY, self._heartbeat().to_json(), None, qos=0)
                self._publish_due()
            except Exception:  # the publisher must outlive a bad row or a full disk
                log.exception("fleet: publisher step failed")
                time.sleep(0.5)
        self._apply_acks()

    def _apply_acks(self) -> None:
        with self._cond:
            acks, self._to_ack = self._to_ack, []
        if acks:
            self.outbox.ack_many(acks)
            with self._cond:
                self._cond.notify_all()

    def _publish_due(self) -> None:
        with self._cond:
            if not self._connected or self._barrier:
                return
            birth, self._birth_due = self._birth_due, False
            room = self.window - sum(1 for s in self._inflight.values() if s is not None)
            kick, self._kick = self._kick, False
            after, epoch = self._sent_upto, self._epoch
        if birth:
            self._publish(STATUS, self._birth().to_json(), None, qos=1, retain=True)
            # A heartbeat with the birth: the controller has readings from the first second,
            # not only after the first fleet.heartbeat_s.
            self._publish(TELEMETRY, self._heartbeat().to_json(), None, qos=0)
        if not kick or room <= 0:
            with self._cond:
                self._kick = self._kick or kick
            return
        rows = self.outbox.pending(room, after=after)
        for seq, channel, payload in rows:
            with self._cond:
                if self._epoch != epoch:  # rewound meanwhile: start again from the oldest
                    self._kick = True
                    return
            self._publish(channel, payload, seq, qos=self.config.qos)
            with self._cond:
                if self._epoch == epoch:
                    self._sent_upto = seq
        if len(rows) == room:  # the window filled: more may be waiting once PUBACKs come
            with self._cond:
                self._kick = True

    def _publish(
        self, channel: str, payload: str, seq: int | None, qos: int, retain: bool = False
    ) -> None:
        # Called without our lock: paho's publish takes its own mutex, which on_publish holds
        # while it waits for ours.
        info = self._mqtt.publish(self.topic(channel), payload, qos=qos, retain=retain)
        with self._cond:
            if info.mid in self._early:
                self._early.discard(info.mid)
                if seq is not None:
                    self._to_ack.append(seq)
                    self._cond.notify_all()
            elif qos == 0 and seq is None:
                self._qos0.add(info.mid)
            else:
                self._inflight[info.mid] = seq
