"""The fleet protocol's topics and payloads, versioned: one place that both ends import.

Every message is a JSON object with the same envelope (:class:`Envelope`): ``schema`` (the
payload schema version, :data:`SCHEMA_VERSION`), ``device_id``, ``seq`` (per device, strictly
increasing across restarts, so a store can de-duplicate on ``(device_id, seq)``), ``time`` (Unix
seconds), ``type`` and ``body``. A reader refuses a payload whose schema it does not know rather
than guessing, as paho-mqtt 2.x refuses an unversioned callback.

Topics live under a configurable prefix (lowercase, no leading slash)::

    <prefix>/<device_id>/status          retained birth payload; "offline" as the Last Will
    <prefix>/<device_id>/alerts          every runtime event, QoS 1, through the outbox
    <prefix>/<device_id>/telemetry       heartbeats
    <prefix>/<device_id>/labels/request  frames the device wants labelled, with PNG thumbnails
    <prefix>/<device_id>/adaptors        a trained adaptor bundle, for the fleet to share
    <prefix>/<device_id>/cmd             commands from the controller (:class:`CommandMessage`)

Alerts carry a lifecycle id and phase (``new`` / ``update`` / ``end``) so a controller can group
a drift flag with the label request, adaptation and result that follow it, as Frigate's
``events`` topic does.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.errors import InputError

#: Version of every payload below; bump it when a field changes meaning or goes away.
SCHEMA_VERSION = 1

STATUS, ALERTS, TELEMETRY, LABEL_REQUEST, ADAPTORS, CMD = (
    "status",
    "alerts",
    "telemetry",
    "labels/request",
    "adaptors",
    "cmd",
)
CHANNELS = (STATUS, ALERTS, TELEMETRY, LABEL_REQUEST, ADAPTORS, CMD)

#: Envelope types on the status topic.
BIRTH, DEATH = "birth", "death"
#: Default cap on one command's JSON (an adaptor bundle travels inside one).
MAX_COMMAND_BYTES = 4 * 1024 * 1024

#: Lifecycle phase of each runtime event type that opens, continues or closes a drift episode.
#: Event types not listed are one-off alerts (phase ``end`` with their own lifecycle).
LIFECYCLE_PHASE: dict[str, str] = {
    "drift": "new",
    "novel_class": "new",
    "alert": "update",
    "labels_requested": "update",
    "adaptation_started": "update",
    "adaptor_trained": "update",
    "adaptation_finished": "end",
    "adaptation_refused": "end",
    "domain_returned": "end",
    "adaptor_installed": "end",
    "adaptor_refused": "end",
}


class PayloadError(InputError):
    """A payload that is not valid JSON, has the wrong shape, or an unknown schema version."""


def topic(prefix: str, device_id: str, channel: str) -> str:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; known: {', '.join(CHANNELS)}")
    return f"{prefix}/{device_id}/{channel}"


def parse_topic(prefix: str, name: str) -> tuple[str, str] | None:
    """``(device_id, channel)`` of a topic under ``prefix``, or None if it is not one of ours."""
    head = prefix + "/"
    if not name.startswith(head):
        return None
    device, _, channel = name[len(head) :].partition("/")
    if not device or channel not in CHANNELS:
        return None
    return device, channel


def _finite(obj: Any) -> Any:
    """NaN/Inf -> None: payloads are strict JSON, readable by any consumer."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _loads(raw: bytes | str, max_bytes: int, what: str) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise PayloadError(f"{what} is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PayloadError(f"{what} must be a JSON object, got {type(obj).__name__}")
    schema = obj.get("schema")
    if schema != SCHEMA_VERSION:
        raise PayloadError(f"{what} has schema {schema!r}; this device speaks {SCHEMA_VERSION}")
    return obj


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = obj.get(name)
    # bool is an int in Python; a JSON true is never a valid sequence number or time.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
        shown = "/".join(k.__name__ for k in _tuple(kind))
        raise PayloadError(f"{what}: field {name!r} must be {shown}, got {value!r:.80}")
    return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


@dataclass(frozen=True)
class Envelope:
    """One device -> controller message (alerts, status, telemetry, label requests)."""

    device_id: str
    seq: int
    type: str
    body: dict[str, Any]
    time: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(_finite(asdict(self)), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, raw: bytes | str, max_bytes: int = 16 * 1024 * 1024) -> Envelope:
        obj = _loads(raw, max_bytes, "payload")
        what = "payload"
        return cls(
            device_id=_field(obj, "device_id", str, what),
            seq=_field(obj, "seq", int, what),
            type=_field(obj, "type", str, what),
            body=_field(obj, "body", dict, what),
            time=float(_field(obj, "time", (int, float), what)),
        )


def alert_body(event: dict[str, Any], lifecycle: str) -> dict[str, Any]:
    """An alert's body: the runtime event (type, frame, time and details) plus its lifecycle."""
    phase = LIFECYCLE_PHASE.get(str(event.get("type")), "end")
    return {**event, "lifecycle": lifecycle, "phase": phase}


# -------------------------------------------------------------------------------- commands

#: Commands a device accepts on its ``cmd`` topic: argument name -> accepted JSON types.
COMMAND_ARGS: dict[str, dict[str, tuple[type, ...]]] = {
    "adapt_now": {"kind": (str,)},
    "rollback": {"domain": (int,), "version": (int,)},
    "set_threshold": {"domain": (int,), "threshold": (int, float)},
    "report_state": {},
    "labels": {"request_id": (str,), "frames": (list,), "labels": (list,)},
    "install_adaptor": {
        "bundle": (str,),  # base64 of the safetensors bundle
        "sha256": (str,),
        "encoder_hash": (str,),
        "source_device": (str,),
        "source_domain": (int,),
    },
    # End the label collection under way (an operator's deadline passed): adapt on the labels
    # already in, else resume watching. ``trigger_frame`` names the flag meant (a newer
    # collection is left alone); ``reason`` is reported in the event.
    "expire_labels": {"reason": (str,), "trigger_frame": (int,)},
}
#: Arguments a command may leave out.
OPTIONAL_ARGS: dict[str, frozenset[str]] = {
    "adapt_now": frozenset({"kind"}),
    "rollback": frozenset({"version"}),
    "install_adaptor": frozenset({"source_device", "source_domain"}),
    "expire_labels": frozenset({"reason", "trigger_frame"}),
}
#: Longest ``reason`` an ``expire_labels`` command may carry (it goes into an event).
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class CommandMessage:
    """One controller -> device command; ``id`` comes back in the reply so it can be matched."""

    command: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, raw: bytes | str, max_bytes: int = MAX_COMMAND_BYTES) -> CommandMessage:
        """Parse and validate a command; PayloadError says exactly what is wrong."""
        obj = _loads(raw, max_bytes, "command")
        name = _field(obj, "command", str, "command")
        if name not in COMMAND_ARGS:
            raise PayloadError(
                f"unknown command {name!r}; known: {', '.join(sorted(COMMAND_ARGS))}"
            )
        cid = _field(obj, "id", str, "command")
        args = obj.get("args", {})
        if not isinstance(args, dict):
            raise PayloadError(f"command {name!r}: 'args' must be an object")
        spec = COMMAND_ARGS[name]
        extra = sorted(set(args) - set(spec))
        if extra:
            raise PayloadError(f"command {name!r} takes no argument(s) {extra}")
        for arg, kinds in spec.items():
            if arg not in args:
                if arg in OPTIONAL_ARGS.get(name, frozenset()):
                    continue
                raise PayloadError(f"command {name!r} needs argument {arg!r}")
            _field(args, arg, kinds, f"command {name!r}")
        t = obj.get("time", time.time())
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise PayloadError("command: field 'time' must be a number")
        if name == "labels":
            _check_labels(args)
        if name == "expire_labels":
            _check_expire_labels(args)
        return cls(name, dict(args), cid, float(t))


def _check_expire_labels(args: dict[str, Any]) -> None:
    trigger = args.get("trigger_frame")
    if trigger is not None and trigger < 0:
        raise PayloadError(
            f"command 'expire_labels': trigger_frame must be a non-negative frame, got {trigger}"
        )
    reason = args.get("reason")
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise PayloadError(
            f"command 'expire_labels': reason is {len(reason)} characters; "
            f"the limit is {MAX_REASON_CHARS}"
        )


def _check_labels(args: dict[str, Any]) -> None:
    frames, labels = args["frames"], args["labels"]
    if len(frames) != len(labels):
        raise PayloadError(f"command 'labels': {len(frames)} frames but {len(labels)} labels")
    for name, values in (("frames", frames), ("labels", labels)):
        bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise PayloadError(
                f"command 'labels': {name} must be non-negative integers, got {bad[0]!r}"
            )
