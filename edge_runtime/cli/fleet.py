"""``edge-runtime fleet``: the fleet controller and the operator's commands.

``fleet serve`` subscribes to every device under a topic prefix and stores what they report
(SQLite by default, PostgreSQL for a fleet that outgrows one controller); ``status`` and
``events`` read that store; ``send`` sends one command to a device; ``label`` answers a device's
label request from a CSV file or at an interactive prompt.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from edge_runtime.errors import InputError

BROKER_HELP = "broker URL, mqtt://HOST:PORT (mqtts:// for TLS)"
STORE_HELP = "store URL: sqlite:///PATH (default: under the user's data folder) or postgresql://..."
CREDENTIALS_HELP = (
    "YAML/JSON file with username and password (else $EDGE_RUNTIME_MQTT_USERNAME and "
    "$EDGE_RUNTIME_MQTT_PASSWORD; never on the command line)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fleet",
        help="fleet controller: serve, status, events, send commands, answer label requests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    serve = sub.add_parser(
        "serve",
        help="run the controller: subscribe to every device and store what it reports",
        description=(
            "Subscribes to <prefix>/+/{status,alerts,telemetry,labels/request,adaptors} and "
            "stores devices, alerts (de-duplicated by device and sequence number), label "
            "requests and adaptors. With --shared several controllers split the devices "
            "through an MQTT 5 shared subscription and may write one PostgreSQL store. When a "
            "device reports a drift whose domain signature matches an adaptor another device "
            "already trained, the controller offers it that adaptor. Runs until Ctrl-C/SIGTERM."
        ),
    )
    _broker_args(serve)
    serve.add_argument("--store", metavar="URL", help=STORE_HELP)
    serve.add_argument("--shared", metavar="GROUP", help="MQTT 5 shared subscription group")
    serve.add_argument(
        "--client-id",
        metavar="ID",
        help=(
            "MQTT client id; a stable id keeps a persistent session, so the broker queues "
            "alerts for this controller while it is away (default: edge-controller-HOSTNAME; "
            "with --shared, a random id, since the group's other members take the load)"
        ),
    )
    serve.add_argument("--ready-file", metavar="PATH", help="write this file once subscribed")
    serve.set_defaults(func=_cmd_serve)

    status = sub.add_parser("status", help="table of devices from the store")
    status.add_argument("--store", metavar="URL", help=STORE_HELP)
    status.add_argument("--json", action="store_true", help="print a JSON list instead")
    status.set_defaults(func=_cmd_status)

    events = sub.add_parser("events", help="stored alerts, oldest first per device")
    events.add_argument("--store", metavar="URL", help=STORE_HELP)
    events.add_argument("--device", metavar="ID", help="only this device")
    events.add_argument("--limit", type=int, metavar="N", help="at most N alerts")
    events.add_argument(
        "--json", action="store_true", help="print a JSON list (device_id, seq, type, frame, ...)"
    )
    events.set_defaults(func=_cmd_events)

    send = sub.add_parser(
        "send",
        help="send a command to a device",
        description=(
            "Sends one command on <prefix>/DEVICE/cmd. Arguments are KEY=VALUE, the value read "
            "as JSON when it parses (numbers) and as a string otherwise. Examples: "
            "`fleet send dev-1 adapt_now`, `fleet send dev-1 rollback domain=1`, "
            "`fleet send dev-1 set_threshold domain=1 threshold=-0.05`, "
            "`fleet send dev-1 report_state`. The device replies on its alerts topic "
            "(command_done or command_refused, with the command id printed here)."
        ),
    )
    send.add_argument("device", metavar="DEVICE")
    send.add_argument("command", metavar="COMMAND")
    send.add_argument("args", nargs="*", metavar="KEY=VALUE")
    _broker_args(send)
    send.set_defaults(func=_cmd_send)

    label = sub.add_parser(
        "label",
        help="answer a device's label request from a CSV or an interactive prompt",
        description=(
            "Reads the label request REQUEST of DEVICE from the store, writes its frames as "
            "PNG files into --frames-dir, and sends the labels as a `labels` command: from "
            "--from labels.csv (columns frame_id,label; frames the request did not ask for are "
            "an error) or, without --from, asked one frame at a time at the terminal."
        ),
    )
    label.add_argument("device", metavar="DEVICE")
    label.add_argument("request", metavar="REQUEST", help="request id ('latest': the newest)")
    label.add_argument("--from", dest="csv", metavar="labels.csv", help="frame_id,label rows")
    label.add_argument(
        "--frames-dir", default="label-frames", metavar="DIR", help="where the PNGs go"
    )
    label.add_argument("--store", metavar="URL", help=STORE_HELP)
    _broker_args(label)
    label.set_defaults(func=_cmd_label)


def _broker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883", help=BROKER_HELP)
    parser.add_argument("--prefix", default="edge", help="topic prefix (default: edge)")
    parser.add_argument("--credentials", metavar="FILE", help=CREDENTIALS_HELP)


def _store(url: str | None) -> Any:
    from edge_runtime.fleet.store import default_store_url, open_store

    return open_store(url or default_store_url())


def _controller(args: argparse.Namespace, store: Any, **kw: Any) -> Any:
    from edge_runtime.fleet.controller import FleetController
    from edge_runtime.fleet.credentials import credentials_from

    username, password = credentials_from(args.credentials)
    return FleetController(
        args.broker, store, prefix=args.prefix, username=username, password=password, **kw
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    store = _store(args.store)
    client_id = args.client_id
    if client_id is None and args.shared is None:
        client_id = f"edge-controller-{socket.gethostname()}"
    ctl = _controller(args, store, shared_group=args.shared, client_id=client_id)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ctl.start()
    if args.ready_file:
        ctl.wait_ready(30.0)
        Path(args.ready_file).write_text(json.dumps({"broker": args.broker}) + "\n")
    print(f"fleet controller on {args.broker} (prefix {args.prefix}), storing in {store.url}")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        ctl.stop()
        print(json.dumps(ctl.stats()))
        store.close()
    return 0


def format_status(devices: list[dict[str, Any]]) -> str:
    """The devices table of ``fleet status`` (also printed at the end of the demo)."""
    head = f"{'device':<14} {'online':<7} {'bdSeq':>5} {'heartbeat':>9} {'domains':<18} "
    head += f"{'last drift':>10} {'adaptors':>8}"
    lines = [head]
    now = time.time()
    for d in devices:
        hb = d.get("last_heartbeat")
        ago = "-" if not hb else f"{now - float(hb):.0f}s ago"
        doms = ",".join(f"{x['id']}v{x.get('version', 1)}" for x in d.get("domains") or []) or "-"
        last = d.get("last_drift") or {}
        drift = f"{now - float(last['time']):.0f}s ago" if last.get("time") else None
        lines.append(
            f"{d['device_id']:<14} {'yes' if d.get('online') else 'no':<7} "
            f"{d.get('bd_seq') if d.get('bd_seq') is not None else '-':>5} {ago:>9} "
            f"{doms:<18} {'-' if drift is None else drift:>10} {d.get('adaptors', 0):>8}"
        )
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    store = _store(args.store)
    try:
        devices = store.devices()
    finally:
        store.close()
    print(json.dumps(devices, indent=1) if args.json else format_status(devices))
    return 0


def _cmd_events(args: argparse.Namespace) -> int:
    store = _store(args.store)
    try:
        rows = store.alerts(device_id=args.device, limit=args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'device':<14} {'seq':>6} {'frame':>7} {'type':<22} {'phase':<6} lifecycle")
    for r in rows:
        print(
            f"{r['device_id']:<14} {r['seq']:>6} {r['frame'] if r['frame'] is not None else '-':>7}"
            f" {r['type']:<22} {r.get('phase') or '-':<6} {r.get('lifecycle') or ''}"
        )
    return 0


def parse_command_args(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"command argument must be KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _send(args: argparse.Namespace, device: str, command: str, cargs: dict[str, Any]) -> str:
    from edge_runtime.fleet.controller import send_command
    from edge_runtime.fleet.credentials import credentials_from
    from edge_runtime.fleet.payloads import CommandMessage

    msg = CommandMessage(command, cargs)
    # Validate here exactly as the device will, so a typo is caught before it is sent.
    CommandMessage.from_json(msg.to_json())
    username, password = credentials_from(args.credentials)
    send_command(
        args.broker, args.prefix, device, msg, username=username, password=password, timeout_s=10
    )
    return msg.id


def _cmd_send(args: argparse.Namespace) -> int:
    cid = _send(args, args.device, args.command, parse_command_args(args.args))
    print(f"sent {args.command} to {args.device}: command id {cid}")
    return 0


def read_label_csv(path: str | Path) -> dict[int, int]:
    """``frame_id,label`` rows (a header row is allowed) -> {frame: label}."""
    out: dict[int, int] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or (n == 1 and not row[0].strip().lstrip("-").isdigit()):
                continue
            if len(row) < 2:
                raise InputError(f"{path}:{n}: expected frame_id,label, got {row!r}")
            try:
                out[int(row[0])] = int(row[1])
            except ValueError:
                raise InputError(f"{path}:{n}: frame_id and label must be integers") from None
    return out


def _cmd_label(args: argparse.Namespace) -> int:
    from edge_runtime.fleet.thumbnails import decode_png

    store = _store(args.store)
    try:
        if args.request == "latest":
            waiting = store.label_requests(args.device, unanswered=True)
            req = waiting[-1] if waiting else None
        else:
            req = store.label_request(args.device, args.request)
    finally:
        store.close()
    if req is None:
        raise InputError(f"no label request {args.request!r} from {args.device} in the store")
    frames = [int(f) for f in req["frames"]]
    out = Path(args.frames_dir)
    out.mkdir(parents=True, exist_ok=True)
    for frame, png in zip(frames, req.get("thumbnails") or [], strict=False):
        data = base64.b64decode(png)
        (out / f"{args.device}-{frame}.png").write_bytes(data)
    if args.csv:
        given = read_label_csv(args.csv)
        unknown = sorted(set(given) - set(frames))
        if unknown:
            raise InputError(
                f"{args.csv}: frames {unknown[:5]} were not asked for by request "
                f"{req['request_id']}"
            )
        answer = {f: given[f] for f in frames if f in given}
    else:
        answer = {}
        print(f"{len(frames)} frames written to {out}/ ({args.device}-FRAME.png); empty = skip")
        for frame in frames:
            png = out / f"{args.device}-{frame}.png"
            shape = decode_png(png.read_bytes()).shape if png.exists() else None
            text = input(f"frame {frame} ({png}, {shape}): label? ").strip()
            if text:
                answer[frame] = int(text)
    if not answer:
        print("no labels to send")
        return 1
    cid = _send(
        args,
        args.device,
        "labels",
        {
            "request_id": str(req["request_id"]),
            "frames": list(answer),
            "labels": list(answer.values()),
        },
    )
    store = _store(args.store)
    try:
        store.mark_answered(args.device, str(req["request_id"]))
    finally:
        store.close()
    print(f"sent {len(answer)} labels for request {req['request_id']}: command id {cid}")
    return 0
