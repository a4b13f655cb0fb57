"""``edge-runtime demo``: build the fashion-drift scenario (cached), run it, plot a timeline."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.cli.run import (
    EXIT_INTERRUPTED,
    add_config_args,
    add_replay_args,
    format_summary,
    resolve_config,
)
from edge_runtime.config import RuntimeConfig
from edge_runtime.data.stream import load_stream
from edge_runtime.errors import StreamFormatError


def scenario_cache_dir() -> Path:
    """``$EDGE_RUNTIME_CACHE/scenarios`` if set, else ``~/.cache/edge_runtime/scenarios``."""
    root = os.environ.get("EDGE_RUNTIME_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "edge_runtime"
    return base / "scenarios"


def cached_scenario(name: str, seed: int = 0, *, rebuild: bool = False) -> Path:
    """Path of the scenario's stream file, building and caching it on first use."""
    from edge_runtime.data.scenario import get_scenario, write_scenario

    get_scenario(name)  # unknown names fail before anything is built
    path = scenario_cache_dir() / (f"{name}.npz" if seed == 0 else f"{name}-seed{seed}.npz")
    if path.is_file() and not rebuild:
        try:
            load_stream(path)
            return path
        except StreamFormatError:
            pass  # a damaged cache entry is rebuilt
    print(f"building scenario {name} -> {path}", file=sys.stderr)
    write_scenario(name, path, seed=seed)
    return path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build and run the fashion-drift scenario; print a summary and plot a timeline",
        description=(
            "One command: builds the built-in fashion-drift stream (cached under "
            "~/.cache/edge_runtime/scenarios), starts an MQTT broker on loopback (Mosquitto if "
            "installed, else the embedded amqtt broker) and a fleet controller storing into "
            "DIR/fleet.sqlite, serves the stream on a device that reports to it, prints a "
            "per-segment table and the controller's `fleet status`, and writes a PNG timeline "
            "next to metrics.json. Without --rate the replay runs as fast as "
            "it can; --rate 30 serves it as a 30 fps camera would (10,000 frames: ~6 min)."
        ),
    )
    parser.add_argument("--scenario", default="fashion-drift", help="built-in scenario name")
    parser.add_argument("--seed", type=int, default=0, help="scenario seed")
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached scenario")
    parser.add_argument(
        "--no-fleet",
        action="store_true",
        help="serve without the fleet (no broker, controller or MQTT reporting)",
    )
    add_replay_args(parser)
    add_config_args(parser)
    parser.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from edge_runtime.plots import plot_timeline
    from edge_runtime.runner import run_stream

    t0 = time.perf_counter()
    cfg = resolve_config(args)
    path = cached_scenario(args.scenario, args.seed, rebuild=args.rebuild)
    stream = load_stream(path)
    print(stream.summary())
    fleet = None if args.no_fleet else DemoFleet.start(Path(args.out), cfg)
    if fleet is not None:
        cfg = fleet.config
    try:
        result = run_stream(
            stream,
            cfg,
            args.out,
            progress=not args.no_progress and sys.stderr.isatty(),
            stream_path=str(path),
            rate=args.rate,
            max_frames=args.max_frames,
        )
        png = plot_timeline(result.out_dir, stream, title=f"edge-runtime demo: {args.scenario}")
        print(format_summary(result.metrics))
        print(f"outputs: {result.out_dir}/metrics.json, events.jsonl, frames.npz")
        print(f"timeline: {png}")
        if fleet is not None:
            print(fleet.report(len(result.events)))
    finally:
        if fleet is not None:
            fleet.stop()
    print(f"demo wall time: {time.perf_counter() - t0:.1f} s")
    return EXIT_INTERRUPTED if result.interrupted else 0


@dataclass
class DemoFleet:
    """A broker on loopback and a controller storing into DIR/fleet.sqlite, for one demo."""

    broker: Any
    store: Any
    controller: Any
    config: RuntimeConfig
    store_url: str

    @classmethod
    def start(cls, out: Path, cfg: RuntimeConfig) -> DemoFleet | None:
        try:
            import paho.mqtt  # noqa: F401
        except ImportError:
            print("fleet: skipped (paho-mqtt is not installed: pip install -e .[fleet])")
            return None
        from edge_runtime.fleet.broker import Broker
        from edge_runtime.fleet.controller import FleetController
        from edge_runtime.fleet.store import open_store

        out.mkdir(parents=True, exist_ok=True)
        # A fresh store and outbox per demo: the store de-duplicates on (device, sequence),
        # and sequences live in the outbox.
        for stale in (out / "fleet.sqlite", out / "outbox"):
            if stale.is_dir():
                shutil.rmtree(stale)
            for f in stale.parent.glob(stale.name + "*"):
                if f.is_file():
                    f.unlink()
        broker = Broker(workdir=out / "broker").start()
        url = f"sqlite:///{out / 'fleet.sqlite'}"
        store = open_store(url)
        ctl = FleetController(broker.url, store, prefix=cfg.fleet.topic_prefix)
        ctl.start()
        cfg = cfg.with_overrides(
            {
                "fleet.enabled": "true",
                "fleet.host": "127.0.0.1",
                "fleet.port": str(broker.port),
                "fleet.tls": "false",
                "fleet.device_id": "demo-device",
                "fleet.outbox_dir": str(out / "outbox"),
            }
        )
        print(f"fleet: {broker.kind} broker on {broker.url}, controller storing into {url}")
        return cls(broker, store, ctl, cfg, url)

    def report(self, n_events: int, timeout_s: float = 30.0) -> str:
        """The controller's `fleet status` table once it has stored the run's alerts."""
        from edge_runtime.cli.fleet import format_status

        device = self.config.fleet.device_id
        deadline = time.monotonic() + timeout_s
        stored = 0
        while time.monotonic() < deadline:
            stored = len(self.store.alerts(device_id=device))
            if stored >= n_events:
                break
            time.sleep(0.1)
        return (
            f"fleet status ({stored} of {n_events} events stored as alerts; "
            f"`edge-runtime fleet status --store {self.store_url}`):\n"
            + format_status(self.store.devices())
        )

    def stop(self) -> None:
        self.controller.stop()
        self.store.close()
        self.broker.stop()
