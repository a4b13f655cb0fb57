"""The fleet controller: subscribes to every device's topics, stores what they say, shares
adaptors between devices and sends them commands.

Threads: paho's network thread only queues raw messages (``on_message`` must return quickly,
or the broker's keepalive and every other device's delivery wait on it). One writer thread
drains the queue in batches (up to ``batch_size`` messages or ``batch_interval_s`` after the
first) and writes each batch of alerts in one transaction: a commit per message would cap a
SQLite store at a few hundred alerts per second, a commit per batch reaches thousands.

Several controllers can split one fleet: give them the same ``shared_group`` and they
subscribe with MQTT v5 shared subscriptions (``$share/<group>/<prefix>/+/<channel>``), the
broker hands each message to one of them, and they write into one PostgreSQL. The store's
``(device_id, seq)`` key makes a redelivery to a second controller harmless.

Adaptor sharing ("adapt once, share with the fleet"): a ``drift`` or ``novel_class`` alert whose
``evidence.signature`` (hex of a packed binary hypervector of the new data) is close, by
normalised Hamming similarity, to the signature of an adaptor another device trained on the
same encoder is answered with one ``install_adaptor`` command per drift episode
(:func:`best_adaptor` is the pure matching rule).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_runtime.errors import InputError
from edge_runtime.fleet import payloads as p
from edge_runtime.fleet.payloads import CommandMessage, Envelope, PayloadError
from edge_runtime.fleet.store import DRIFT_TYPES, FleetStore

log = logging.getLogger(__name__)

#: Channels the controller listens to (never ``cmd``: that is its own output).
SUBSCRIBED = (p.STATUS, p.ALERTS, p.TELEMETRY, p.LABEL_REQUEST, p.ADAPTORS)

#: Normalised Hamming similarity above which the best-matching stored adaptor is offered for a
#: drift. Chance is 0.5, but MobileNetV2 features are not centred, so signatures of *different*
#: domains agree far more than chance. Measured, 32 px encoder (tests' config), hdc.dim 2,048,
#: 64 frames per signature: one corruption on two disjoint sample sets 0.90-0.94; different
#: corruptions 0.65-0.82, the closest pair (inversion vs brightness) 0.86-0.88. Default config
#: (64 px), fashion-drift seed 1 drifts against seed 0's adaptors
#: (benchmarks/bench_fleet_share.py): the same domain 0.93 (fog), 0.94 (noise), 0.88 (new
#: classes), 0.875 (MNIST); the best wrong domain 0.85 (MNIST vs new classes), others
#: <= 0.80. 0.85 offers every same-domain match measured; where a wrong domain scores that high
#: the receiving device refuses it, because it checks an offer against its own recent OOD frames
#: before installing (a wrong domain's memory accepts 0-39% of them): a wrong offer costs one
#: refused command, never a wrong adaptor.
DEFAULT_MATCH_THRESHOLD = 0.85

#: QoS 1 messages the broker may have in flight to the controller (the MQTT v5 maximum).
RECEIVE_MAXIMUM = 65535
#: How long the broker keeps a persistent controller session (a caller-given client_id).
SESSION_EXPIRY_S = 24 * 3600


class ControllerError(InputError):
    """A broker URL or a controller option that cannot work."""


# -------------------------------------------------------------------------------- matching


def hamming_similarity(a_hex: str, b_hex: str) -> float | None:
    """``1 - hamming / bits`` of two hex-encoded packed bit vectors; None if they are not
    comparable (bad hex, or different lengths: another projection or dimension)."""
    try:
        a, b = bytes.fromhex(a_hex), bytes.fromhex(b_hex)
    except (TypeError, ValueError):
        return None
    if not a or len(a) != len(b):
        return None
    diff = int.from_bytes(a, "little") ^ int.from_bytes(b, "little")
    return 1.0 - diff.bit_count() / (8 * len(a))


@dataclass(frozen=True)
class Match:
    """The adaptor chosen for a drift, and how similar its signature is."""

    adaptor: dict[str, Any]
    similarity: float


def best_adaptor(
    signature: str,
    candidates: Iterable[dict[str, Any]],
    *,
    encoder_hash: str,
    exclude_device: str,
    threshold: float = DEFAULT_MATCH_THRESHOLD,
) -> Match | None:
    """The most similar adaptor (``signature``, ``encoder_hash``, ``device_id`` keys) from
    another device on the same encoder, if it reaches ``threshold``. Ties go to the first
    candidate, so pass them newest first to prefer the latest version."""
    best: Match | None = None
    for cand in candidates:
        if cand.get("device_id") == exclude_device or cand.get("encoder_hash") != encoder_hash:
            continue
        sim = hamming_similarity(signature, str(cand.get("signature", "")))
        if sim is None or sim < threshold:
            continue
        if best is None or sim > best.similarity:
            best = Match(cand, sim)
    return best


# ------------------------------------------------------------------------------ controller


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of ``mqtt://host[:1883]`` or ``mqtts://host[:8883]``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except (TypeError, ValueError) as exc:
        raise ControllerError(f"broker URL {url!r}: {exc}") from None
    schemes = {
        "mqtt": (1883, False),
        "tcp": (1883, False),
        "mqtts": (8883, True),
        "ssl": (8883, True),
    }
    if parts.scheme not in schemes or not parts.hostname:
        raise ControllerError(
            f"broker URL {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
        )
    default_port, tls = schemes[parts.scheme]
    return parts.hostname, port or default_port, tls


class FleetController:
    """Subscribes to a fleet's topics, stores every message, shares adaptors, sends commands."""

    def __init__(
        self,
        broker_url: str,
        store: FleetStore,
        *,
        prefix: str = "edge",
        shared_group: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        client_id: str | None = None,
        match_threshold: float = DEFAULT_MATCH_THRESHOLD,
        batch_size: int = 500,
        batch_interval_s: float = 0.02,
        keepalive_s: int = 30,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 30,
        on_stored: Callable[[list[Envelope], float], None] | None = None,
    ) -> None:
        self.host, self.port, wants_tls = parse_broker_url(broker_url)
        if not prefix or prefix.startswith("/") or "+" in prefix or "#" in prefix:
            raise ControllerError(f"topic prefix {prefix!r}: no leading '/', no wildcards")
        if shared_group is not None and (not shared_group or any(c in shared_group for c in "/+#")):
            raise ControllerError(f"shared group {shared_group!r}: a non-empty name without / + #")
        if not 0.0 < match_threshold <= 1.0:
            raise ControllerError(f"match_threshold {match_threshold}: must be in (0, 1]")
        if batch_size < 1 or batch_interval_s < 0:
            raise ControllerError("batch_size must be >= 1 and batch_interval_s >= 0")
        self.broker_url = broker_url
        self.store = store
        self.prefix = prefix
        self.shared_group = shared_group
        self.match_threshold = match_threshold
        self.batch_size = batch_size
        self.batch_interval_s = batch_interval_s
        self.keepalive_s = keepalive_s
        self.on_stored = on_stored

        # Counters: `received` is written by paho's thread only, the rest by the writer thread
        # only, so each has one writer and needs no lock.
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.malformed = 0
        self.store_errors = 0
        self.offers = 0
        self.commands_sent = 0
        self.connects = 0
        self.batches = 0
        # Status, telemetry, label and adaptor messages handled (for drained()).
        self._other_handled = 0

        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None
        self._sub_mid: int | None = None
        self._started = False

        # A stable client id given by the caller means "resume my session": the broker keeps
        # the subscriptions and queues QoS 1 messages while this controller is away. A random
        # id would leave such a session behind on every restart, so it gets a clean one.
        self._persistent = client_id is not None
        self.client_id = client_id or f"edge-controller-{uuid.uuid4().hex[:12]}"
        # MQTT v5 always, not only for shared subscriptions: its Receive Maximum (sent in
        # CONNECT) lets the broker keep up to RECEIVE_MAXIMUM QoS 1 messages in flight to us.
        # Under 3.1.1 Mosquitto allows 20 in flight and queues at most max_queued_messages
        # (1,000 by default) behind them, then drops; a burst from a fleet overflowed that in
        # the benchmark while the PUBACKs had already gone back to the devices.
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set_context(tls)
        elif wants_tls:
            self._client.tls_set_context(ssl.create_default_context())
        self._client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -------------------------------------------------------------------------- lifecycle

    def topics(self) -> list[str]:
        head = f"$share/{self.shared_group}/" if self.shared_group else ""
        return [f"{head}{self.prefix}/+/{channel}" for channel in SUBSCRIBED]

    def start(self) -> FleetController:
        """Start the writer and the network loop; connects, and reconnects, in the background
        (capped exponential backoff), so a broker that is down now is not an error."""
        if self._started:
            return self
        self._started = True
        self._stopping.clear()
        self._writer = threading.Thread(target=self._write_loop, name="fleet-writer", daemon=True)
        self._writer.start()
        properties = mqtt.Properties(mqtt.PacketTypes.CONNECT)
        properties.ReceiveMaximum = RECEIVE_MAXIMUM
        if self._persistent:
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(
            self.host,
            self.port,
            keepalive=self.keepalive_s,
            # A persistent session is resumed on every connect; a clean one starts fresh.
            clean_start=not self._persistent,
            properties=properties,
        )
        self._client.loop_start()
        return self

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """True once connected and subscribed (the broker acknowledged the subscriptions)."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect, then write what is already queued and stop the writer."""
        if not self._started:
            return
        self._started = False
        self._client.disconnect()
        self._client.loop_stop()
        self._ready.clear()
        self._stopping.set()
        self._queue.put(None)
        if self._writer is not None:
            self._writer.join(timeout)
            self._writer = None

    def __enter__(self) -> FleetController:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "malformed": self.malformed,
            "store_errors": self.store_errors,
            "offers": self.offers,
            "commands_sent": self.commands_sent,
            "connects": self.connects,
            "batches": self.batches,
            "queued": self._queue.qsize(),
            "connected": self.connected,
        }

    @staticmethod
    def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
        """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def drained(self) -> bool:
        """True when every message received so far has been handled by the writer."""
        handled = self.stored + self.duplicates + self.malformed + self._other_handled
        return self._queue.qsize() == 0 and handled >= self.received

    # ---------------------------------------------------------------------------- commands

    def send(self, device_id: str, command: str, args: dict[str, Any] | None = None) -> str:
        """Publish a command to ``<prefix>/<device>/cmd`` at QoS 1; returns its id. Validated
        the way the device will validate it, so a bad command fails here, not there. While
        disconnected paho queues it and sends it after the reconnect."""
        if not device_id or any(c in device_id for c in "/+#"):
            raise ControllerError(f"device id {device_id!r}: a non-empty name without / + #")
        msg = CommandMessage(command, dict(args or {}))
        raw = msg.to_json()
        CommandMessage.from_json(raw)
        info = self._client.publish(p.topic(self.prefix, device_id, p.CMD), raw, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publishing {command!r} to {device_id!r} failed: rc={info.rc}")
        self.commands_sent += 1
        return msg.id

    # -------------------------------------------------------------------- paho callbacks

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("broker %s refused the connection: %s", self.broker_url, reason)
            return
        self.connects += 1
        log.info("connected to %s as %s", self.broker_url, self.client_id)
        # Subscribing on every connect (not once) restores the subscriptions after a broker
        # restart that lost its sessions, as a broker without persistence does.
        subs = [(t, SubscribeOptions(qos=1)) for t in self.topics()]
        _, self._sub_mid = client.subscribe(subs)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            log.error("broker %s refused subscriptions: %s", self.broker_url, failed)
            return
        if mid == self._sub_mid:
            self._ready.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._ready.clear()
        if not self._stopping.is_set() and self._started:
            log.warning("disconnected from %s (%s); reconnecting", self.broker_url, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        self._queue.put((msg.topic, msg.payload))

    # ------------------------------------------------------------------------- the writer

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                if self._stopping.is_set() and self._queue.empty():
                    return
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_interval_s
            done = False
            while len(batch) < self.batch_size:
                # Past the deadline, take only what is already queued.
                remaining = max(0.0, deadline - time.monotonic())
                try:
                    item = self._queue.get(timeout=remaining or None, block=remaining > 0)
                except queue.Empty:
                    break
                if item is None:
                    done = self._stopping.is_set()
                    break
                batch.append(item)
            try:
                self._handle_batch(batch)
            except Exception:  # the writer must outlive any one bad batch
                log.exception("fleet writer: a batch of %d messages failed", len(batch))
            if done and self._queue.empty():
                return

    def _parse(self, raw_topic: str, payload: bytes) -> tuple[str, Envelope] | None:
        # A shared subscription's messages arrive on the plain topic: no "$share/" to strip.
        where = p.parse_topic(self.prefix, raw_topic)
        if where is None:
            log.warning("ignoring a message on %r: not a fleet topic", raw_topic)
            self.malformed += 1
            return None
        device, channel = where
        try:
            env = Envelope.from_json(payload)
        except PayloadError as exc:
            log.warning("malformed payload on %s: %s", raw_topic, exc)
            self.malformed += 1
            return None
        if env.device_id != device:
            # A device may only speak for itself: the broker's ACL authorises the topic, and
            # the envelope must agree with it.
            log.warning("payload on %s claims device %r; ignored", raw_topic, env.device_id)
            self.malformed += 1
            return None
        return channel, env

    def _handle_batch(self, batch: list[tuple[str, bytes]]) -> None:
        self.batches += 1
        alerts: list[Envelope] = []
        for raw_topic, payload in batch:
            parsed = self._parse(raw_topic, payload)
            if parsed is None:
                continue
            channel, env = parsed
            if channel == p.ALERTS:
                alerts.append(env)
                continue
            # Status, heartbeats, label requests and adaptors are rare next to alerts; they are
            # applied in arrival order, before the batch's alerts, so a birth that came with a
            # drift is known when the drift is matched.
            try:
                self._handle_other(channel, env)
            except PayloadError as exc:
                log.warning("malformed %s message from %s: %s", channel, env.device_id, exc)
                self.malformed += 1
            except Exception:
                log.exception("storing a %s message from %s failed", channel, env.device_id)
                self.store_errors += 1
                self._other_handled += 1
            else:
                self._other_handled += 1
        if alerts:
            self._store_alerts(alerts)

    def _handle_other(self, channel: str, env: Envelope) -> None:
        if channel == p.STATUS:
            state = env.body.get("state")
            if env.type == p.DEATH or state == "offline":
                bd_seq = env.body.get("bd_seq")
                if not self.store.set_death(
                    env.device_id, bd_seq if isinstance(bd_seq, int) else None
                ):
                    log.info("stale Last Will from %s (bd_seq %r) ignored", env.device_id, bd_seq)
            else:
                self.store.set_birth(env)
        elif channel == p.TELEMETRY:
            self.store.set_heartbeat(env)
        elif channel == p.LABEL_REQUEST:
            self.store.add_label_request(env)
        elif channel == p.ADAPTORS:
            _check_bundle(env)
            self.store.add_adaptor(env)

    def _store_alerts(self, alerts: list[Envelope]) -> None:
        for attempt in range(3):
            try:
                inserted = self.store.add_alerts(alerts)
                break
            except Exception:  # a store hiccup is retried, then counted
                log.exception("storing %d alerts failed (attempt %d)", len(alerts), attempt + 1)
                time.sleep(0.2 * (attempt + 1))
        else:
            self.store_errors += len(alerts)
            self._other_handled += len(alerts)
            return
        committed = time.time()
        self.stored += inserted
        self.duplicates += len(alerts) - inserted
        if self.on_stored is not None:
            try:
                self.on_stored(alerts, committed)
            except Exception:
                log.exception("on_stored callback failed")
        for env in alerts:
            if env.body.get("type", env.type) in DRIFT_TYPES:
                try:
                    self._offer_adaptor(env)
                except Exception:  # sharing is best effort; the alert is stored
                    log.exception("offering an adaptor to %s failed", env.device_id)

    def _offer_adaptor(self, env: Envelope) -> None:
        evidence = env.body.get("evidence")
        signature = evidence.get("signature") if isinstance(evidence, dict) else None
        if not isinstance(signature, str) or not signature:
            return
        device = self.store.device(env.device_id)
        encoder_hash = device.get("encoder_hash") if device else None
        if not encoder_hash:
            log.info("drift from %s before its birth: no encoder hash to match", env.device_id)
            return
        match = best_adaptor(
            signature,
            self.store.adaptors(encoder_hash),
            encoder_hash=encoder_hash,
            exclude_device=env.device_id,
            threshold=self.match_threshold,
        )
        if match is None:
            return
        src = match.adaptor
        lifecycle = str(env.body.get("lifecycle") or f"seq:{env.seq}")
        if not self.store.record_offer(
            env.device_id,
            lifecycle,
            src["device_id"],
            int(src["domain"]),
            int(src["version"]),
            similarity=match.similarity,
        ):
            return
        full = self.store.adaptor(src["device_id"], int(src["domain"]), int(src["version"]))
        if full is None:
            return
        self.send(
            env.device_id,
            "install_adaptor",
            {
                "bundle": full["bundle"],
                "sha256": full["sha256"],
                "encoder_hash": full["encoder_hash"],
                "source_device": full["device_id"],
                "source_domain": int(full["domain"]),
            },
        )
        self.offers += 1
        log.info(
            "offered %s's adaptor (domain %s v%s, similarity %.3f) to %s for %s",
            src["device_id"],
            src["domain"],
            src["version"],
            match.similarity,
            env.device_id,
            lifecycle,
        )


def _check_bundle(env: Envelope) -> None:
    """Refuse an adaptor whose bundle does not hash to its ``sha256``: a corrupt bundle must not
    be offered to the rest of the fleet."""
    bundle, digest = env.body.get("bundle"), env.body.get("sha256")
    if not isinstance(bundle, str) or not isinstance(digest, str):
        raise PayloadError("adaptor: body needs 'bundle' (base64) and 'sha256'")
    try:
        raw = base64.b64decode(bundle, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError("adaptor: 'bundle' is not valid base64") from None
    if hashlib.sha256(raw).hexdigest() != digest.lower():
        raise PayloadError("adaptor: 'bundle' does not match its sha256")


def send_command(
    broker_url: str,
    prefix: str,
    device_id: str,
    msg: CommandMessage,
    *,
    username: str | None = None,
    password: str | None = None,
    tls: ssl.SSLContext | None = None,
    timeout_s: float = 10.0,
) -> None:
    """Publish one command and return once the broker has acknowledged it (``fleet send`` and
    ``fleet label``, which need no subscription or store)."""
    host, port, wants_tls = parse_broker_url(broker_url)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"edge-send-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv5,
    )
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls)
    elif wants_tls:
        client.tls_set_context(ssl.create_default_context())
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise ControllerError(f"cannot reach the broker at {broker_url}: {exc}") from None
    client.loop_start()
    try:
        if not connected.wait(timeout_s):
            raise ControllerError(f"the broker at {broker_url} did not answer in {timeout_s} s")
        if refused:
            raise ControllerError(f"the broker at {broker_url} refused us: {refused[0]}")
        info = client.publish(p.topic(prefix, device_id, p.CMD), msg.to_json(), qos=1)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise ControllerError(f"the broker did not acknowledge the command in {timeout_s} s")
    finally:
        client.disconnect()
        client.loop_stop()
