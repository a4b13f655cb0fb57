"""Adapt once, share with the fleet: a second device meets the same domains and adapts from the
first device's adaptors instead of from an operator's labels.

Three runs of the built-in scenario, side by side:

* ``device A`` serves seed ``--seed-a`` with the stream's labels and reports to a controller;
* ``device B`` serves seed ``--seed-b`` (the same domains, other frames) with labels from the
  fleet's label loop: a scripted operator answers each label request from ground truth, but
  only ``--operator-delay-s`` after it was stored, as a person would, so an adaptor the
  controller offers (matched by domain signature) can arrive first;
* ``B alone`` serves seed ``--seed-b`` with the stream's labels and no fleet: what device B
  would learn on its own, the peer a user would otherwise have.

It reports, per segment: detection, the adaptor B served with and where it came from, labels
B spent against B alone, and final accuracy; writes a table, ``DIR/bench_fleet_share.json``
and ``DIR/bench_fleet_share.png``.

    python benchmarks/bench_fleet_share.py --out runs/bench_fleet_share
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.cli.demo import cached_scenario
from edge_runtime.config import RuntimeConfig, load_config
from edge_runtime.data import load_stream
from edge_runtime.fleet.broker import Broker
from edge_runtime.fleet.controller import FleetController
from edge_runtime.fleet.store import FleetStore, open_store
from edge_runtime.runner import run_stream


class DelayedOperator:
    """Answers each stored label request from ground truth ``delay_s`` after it was stored."""

    def __init__(
        self, ctl: FleetController, url: str, device: str, labels: np.ndarray, delay_s: float
    ) -> None:
        self.ctl, self.url, self.device, self.labels = ctl, url, device, labels
        self.delay_s = delay_s
        self.answered = 0
        self._stop = threading.Event()
        self._first_seen: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        store = open_store(self.url)
        try:
            while not self._stop.wait(0.02):
                now = time.monotonic()
                for req in store.label_requests(self.device, unanswered=True):
                    rid = str(req["request_id"])
                    if now - self._first_seen.setdefault(rid, now) < self.delay_s:
                        continue
                    frames = [int(f) for f in req["frames"]]
                    self.ctl.send(
                        self.device,
                        "labels",
                        {
                            "request_id": rid,
                            "frames": frames,
                            "labels": [int(self.labels[f]) for f in frames],
                        },
                    )
                    store.mark_answered(self.device, rid)
                    self.answered += len(frames)
        finally:
            store.close()

    def __enter__(self) -> DelayedOperator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _fleet_config(cfg: RuntimeConfig, port: int, device: str, out: Path) -> RuntimeConfig:
    return cfg.with_overrides(
        {
            "fleet.enabled": "true",
            "fleet.host": "127.0.0.1",
            "fleet.port": str(port),
            "fleet.tls": "false",
            "fleet.device_id": device,
            "fleet.outbox_dir": str(out / "outbox"),
        }
    )


def _segments(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return list(metrics["segments"])


def _installed(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(e["domain"]): e for e in events if e["type"] == "adaptor_installed"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = load_config(args.config)
    stream_a = load_stream(cached_scenario(args.scenario, args.seed_a))
    stream_b = load_stream(cached_scenario(args.scenario, args.seed_b))
    broker = Broker(workdir=out / "broker").start()
    url = f"sqlite:///{out / 'fleet.sqlite'}"
    store: FleetStore = open_store(url)
    ctl = FleetController(broker.url, store)
    ctl.start()
    ctl.wait_ready(10)
    t0 = time.perf_counter()
    try:
        print(f"device A: {args.scenario} seed {args.seed_a}, stream labels")
        a = run_stream(
            stream_a,
            _fleet_config(cfg, broker.port, "dev-a", out / "a"),
            out / "a",
            progress=True,
            baselines=False,
        )
        ctl.wait_for(lambda: len(store.adaptors()) >= a.metrics["adaptors"] - 1, 30)
        delay = args.operator_delay_s
        print(f"device B: seed {args.seed_b}, fleet labels (operator after {delay} s)")
        with DelayedOperator(ctl, url, "dev-b", stream_b.labels, args.operator_delay_s) as op:
            b = run_stream(
                stream_b,
                _fleet_config(cfg, broker.port, "dev-b", out / "b"),
                out / "b",
                progress=True,
                baselines=False,
                labels_from="fleet",
                rate=args.rate,
            )
        print(f"B alone: seed {args.seed_b}, stream labels, no fleet")
        alone = run_stream(stream_b, cfg, out / "alone", progress=True, baselines=False)
        offers = store.offers("dev-b")
    finally:
        ctl.stop()
        store.close()
        broker.stop()
    installed = _installed(b.events)
    rows = []
    for sa, sb, so in zip(
        _segments(a.metrics), _segments(b.metrics), _segments(alone.metrics), strict=True
    ):
        dom = sb["adaptor"]
        rows.append(
            {
                "segment": sb["id"],
                "is_shift": sb["is_shift"],
                "detected_b": sb["detected"],
                "b_adaptor": dom,
                "b_adaptor_from": "dev-a"
                if dom in installed
                else ("base" if dom == 0 else "labels"),
                "b_labels": sb.get("labels", 0),
                "alone_labels": so.get("labels", 0),
                "a_final": sa["final_accuracy"],
                "b_final": sb["final_accuracy"],
                "alone_final": so["final_accuracy"],
            }
        )
    result = {
        "benchmark": "bench_fleet_share",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "scenario": args.scenario,
        "seeds": {"a": args.seed_a, "b": args.seed_b},
        "operator_delay_s": args.operator_delay_s,
        "rate_fps_b": args.rate,
        "segments": rows,
        "installed_from_fleet": len(installed),
        "offers": len(offers),
        "labels": {
            "a": a.metrics["labels_used"],
            "b": b.metrics["labels_used"],
            "alone": alone.metrics["labels_used"],
            "operator_answered_b": op.answered,
        },
        "mean_final_accuracy": {
            "a": a.metrics["mean_final_accuracy"],
            "b": b.metrics["mean_final_accuracy"],
            "alone": alone.metrics["mean_final_accuracy"],
        },
        "labels_ratio_b_over_alone": round(
            b.metrics["labels_used"] / max(1, alone.metrics["labels_used"]), 3
        ),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return result


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"{'seg':>3} {'shift':>5} {'det.B':>5} {'B adaptor':>12} {'B labels':>8} "
        f"{'alone labels':>12} {'A final':>7} {'B final':>7} {'alone final':>11}"
    ]

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    for r in result["segments"]:
        lines.append(
            f"{r['segment']:>3} {f(r['is_shift']):>5} {f(r['detected_b']):>5} "
            f"{str(r['b_adaptor']) + ' ' + r['b_adaptor_from']:>12} {f(r['b_labels']):>8} "
            f"{f(r['alone_labels']):>12} {f(r['a_final']):>7} {f(r['b_final']):>7} "
            f"{f(r['alone_final']):>11}"
        )
    lab, acc = result["labels"], result["mean_final_accuracy"]
    lines.append(
        f"labels: A {lab['a']}, B {lab['b']}, B alone {lab['alone']} "
        f"(ratio B/alone {result['labels_ratio_b_over_alone']}); adaptors installed from the "
        f"fleet: {result['installed_from_fleet']} ({result['offers']} offers)"
    )
    lines.append(f"mean final accuracy: A {acc['a']}, B {acc['b']}, B alone {acc['alone']}")
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["segments"] if r["b_final"] is not None]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (key, name) in enumerate(
        (("a_final", "device A"), ("b_final", "device B (fleet)"), ("alone_final", "B alone"))
    ):
        ax1.bar(x + (k - 1) * 0.27, [r[key] or 0 for r in rows], 0.27, label=name)
    ax1.set_xticks(x, [str(r["segment"]) for r in rows])
    ax1.set(xlabel="segment", ylabel="final accuracy (%)", title="final accuracy per segment")
    ax1.legend()
    ax2.bar(x - 0.2, [r["b_labels"] or 0 for r in rows], 0.4, label="device B (fleet)")
    ax2.bar(x + 0.2, [r["alone_labels"] or 0 for r in rows], 0.4, label="B alone")
    ax2.set_xticks(x, [str(r["segment"]) for r in rows])
    ax2.set(xlabel="segment", ylabel="labels spent", title="labels per segment")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (replaced)")
    parser.add_argument("--scenario", default="fashion-drift")
    parser.add_argument("--seed-a", type=int, default=0)
    parser.add_argument("--seed-b", type=int, default=1)
    parser.add_argument("--config", help="runtime config YAML (default: built-in)")
    parser.add_argument("--operator-delay-s", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=200.0, help="device B's frames/s")
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out)
    (out / "bench_fleet_share.json").write_text(json.dumps(result, indent=1))
    _plot(result, out / "bench_fleet_share.png")
    print(_table(result))
    print(f"wrote {out / 'bench_fleet_share.json'} and bench_fleet_share.png")


if __name__ == "__main__":
    main()
