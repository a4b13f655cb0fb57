"""Fleet ingest: N simulated devices publishing alerts through Mosquitto into the store.

    python benchmarks/bench_fleet.py --out DIR [--devices 100] [--alerts 100]
        [--store sqlite|postgresql|both] [--pg-url URL] [--rate 500] [--procs 2]

Starts a Mosquitto on loopback (:class:`edge_runtime.fleet.broker.Broker`), a
:class:`~edge_runtime.fleet.controller.FleetController` writing to the store, then ``--devices``
paho clients (threads, spread over ``--procs`` processes so the publishers do not share the
controller's GIL) that each publish ``--alerts`` alerts as envelopes on
``edge/<device>/alerts`` at QoS 1, all at once. Two runs per store:

- ``full``: every device publishes as fast as paho lets it;
- ``paced``: the fleet together publishes ``--rate`` alerts/s, devices interleaved evenly.

Measured per run: rows stored and distinct ``(device_id, seq)`` (each alert must be stored
exactly once), throughput (alerts / (last commit - first publish)), and the latency of each
alert from its publish time (the envelope's ``time``) to the commit of the transaction that
stored it (the controller's ``on_stored`` hook), p50/p99/max. Prints a table, writes
DIR/bench_fleet.json and DIR/bench_fleet_latency.png (latency CDFs).

Acceptance bars (reported pass/fail): >= 2,000 alerts/s into SQLite at full speed on 2 cores,
p99 < 100 ms at 500 alerts/s. PostgreSQL runs reuse the database and tell their rows apart by
a per-run device-id tag, so nothing is deleted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.fleet import payloads as p
from edge_runtime.fleet.broker import Broker, find_mosquitto
from edge_runtime.fleet.controller import FleetController
from edge_runtime.fleet.payloads import Envelope, alert_body
from edge_runtime.fleet.store import open_store

THROUGHPUT_BAR = 2000.0  # alerts/s into SQLite at full speed
P99_BAR_MS = 100.0  # at the paced rate
PREFIX = "edge"


# ------------------------------------------------------------------------------ publishers


def _publisher_proc(
    port: int,
    device_ids: list[str],
    indices: list[int],
    n_devices: int,
    alerts: int,
    rate: float | None,
    ready: Any,
    go: Any,
    t0_box: Any,
) -> None:
    """One process's devices: connect, wait for ``go``, publish, wait for every PUBACK."""
    import paho.mqtt.client as mqtt

    clients = []
    for dev in device_ids:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{dev}")
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", port)
        c.loop_start()
        clients.append(c)
    ready.release()
    go.wait()
    t0 = t0_box.value

    def run(k: int, dev: str, client: mqtt.Client) -> None:
        infos = []
        topic = p.topic(PREFIX, dev, p.ALERTS)
        index = indices[k]  # the device's slot in the fleet-wide schedule
        for seq in range(1, alerts + 1):
            if rate:
                # Devices interleave: the fleet as a whole emits one alert every 1/rate s.
                due = t0 + ((seq - 1) * n_devices + index) / rate
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
            event = {"type": "alert", "frame": seq, "time": float(seq), "details": {"k": seq}}
            env = Envelope(dev, seq, "alert", alert_body(event, f"{dev}-l"), time=time.time())
            infos.append(client.publish(topic, env.to_json(), qos=1))
        for info in infos:
            info.wait_for_publish(60)

    threads = [
        threading.Thread(target=run, args=(k, d, c))
        for k, (d, c) in enumerate(zip(device_ids, clients, strict=True))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.disconnect()
        c.loop_stop()


# ------------------------------------------------------------------------------------ runs


def run_once(
    broker: Broker, store_url: str, mode: str, args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    n, m = args.devices, args.alerts
    total = n * m
    rate = args.rate if mode == "paced" else None
    device_ids = [f"{tag}-{i:04d}" for i in range(n)]
    store = open_store(store_url)
    committed: dict[tuple[str, int], float] = {}
    sent_at: dict[tuple[str, int], float] = {}
    lock = threading.Lock()

    def on_stored(envs: list[Envelope], at: float) -> None:
        with lock:
            for e in envs:
                key = (e.device_id, e.seq)
                committed.setdefault(key, at)
                sent_at.setdefault(key, e.time)

    controller = FleetController(broker.url, store, prefix=PREFIX, on_stored=on_stored)
    controller.start()
    if not controller.wait_ready(10):
        raise RuntimeError("the controller did not connect to the benchmark broker")

    ctx = mp.get_context("spawn")
    procs = max(1, min(args.procs, n))
    ready, go = ctx.Semaphore(0), ctx.Event()
    t0_box = ctx.Value("d", 0.0)
    chunks = [list(range(i, n, procs)) for i in range(procs)]
    workers = []
    for chunk in chunks:
        ids = [device_ids[i] for i in chunk]
        workers.append(
            ctx.Process(
                target=_publisher_proc,
                args=(broker.port, ids, chunk, n, m, rate, ready, go, t0_box),
                daemon=True,
            )
        )
    for w in workers:
        w.start()
    for _ in workers:
        if not ready.acquire(timeout=60):
            raise RuntimeError("publisher processes did not connect within 60 s")
    t0_box.value = time.time() + 0.2
    go.set()

    deadline = time.monotonic() + max(60.0, 3 * total / (rate or 1000.0))
    last_report = 0.0
    while time.monotonic() < deadline:
        done = controller.stored + controller.duplicates
        if done >= total and controller.drained():
            break
        if time.monotonic() - last_report > 2.0:
            print(f"  {mode}: {done}/{total} stored", file=sys.stderr, flush=True)
            last_report = time.monotonic()
        time.sleep(0.02)
    for w in workers:
        w.join(30)
    controller.stop()
    stats = controller.stats()

    rows = [r for r in store.alerts() if r["device_id"].startswith(tag + "-")]
    distinct = {(r["device_id"], r["seq"]) for r in rows}
    store.close()

    keys = [(d, s) for d in device_ids for s in range(1, m + 1)]
    have = [k for k in keys if k in committed]
    lat_ms = np.array([(committed[k] - sent_at[k]) * 1000 for k in have])
    first_pub = min(sent_at[k] for k in have) if have else float("nan")
    last_commit = max(committed[k] for k in have) if have else float("nan")
    span = last_commit - first_pub
    return {
        "mode": mode,
        "rate_target": rate,
        "expected": total,
        "rows": len(rows),
        "distinct": len(distinct),
        "exactly_once": len(rows) == total and len(distinct) == total,
        "duplicates_seen": stats["duplicates"],
        "malformed": stats["malformed"],
        "batches": stats["batches"],
        "seconds": span,
        "throughput": len(have) / span if span > 0 else float("nan"),
        "latency_ms": {
            "p50": float(np.percentile(lat_ms, 50)) if len(lat_ms) else None,
            "p99": float(np.percentile(lat_ms, 99)) if len(lat_ms) else None,
            "max": float(lat_ms.max()) if len(lat_ms) else None,
        },
        "_lat": lat_ms,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        lat = np.sort(r["_lat"])
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{r['store']} {r['mode']}")
    ax.axvline(P99_BAR_MS, color="grey", ls="--", lw=1, label=f"{P99_BAR_MS:.0f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("publish → stored (committed), ms")
    ax.set_ylabel("fraction of alerts")
    ax.set_title("Fleet ingest latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--alerts", type=int, default=100, help="alerts per device")
    ap.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="sqlite")
    ap.add_argument("--pg-url", default=os.environ.get("EDGE_RUNTIME_TEST_PG"))
    ap.add_argument("--rate", type=float, default=500.0, help="fleet-wide alerts/s when paced")
    ap.add_argument("--procs", type=int, default=2, help="publisher processes")
    args = ap.parse_args(argv)
    if find_mosquitto() is None:
        print("mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    backends = ["sqlite", "postgresql"] if args.store == "both" else [args.store]
    if "postgresql" in backends and not args.pg_url:
        print("--pg-url (or $EDGE_RUNTIME_TEST_PG) is needed for PostgreSQL", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir=args.out))

    results: list[dict[str, Any]] = []
    with Broker(kind="mosquitto", workdir=workdir / "broker") as broker:
        for backend in backends:
            for mode in ("full", "paced"):
                tag = f"b{uuid.uuid4().hex[:6]}"
                url = (
                    f"sqlite:///{workdir / f'{backend}-{mode}.sqlite'}"
                    if backend == "sqlite"
                    else args.pg_url
                )
                print(
                    f"{backend} {mode}: {args.devices} devices × {args.alerts} alerts", flush=True
                )
                r = run_once(broker, url, mode, args, tag)
                r["store"] = backend
                results.append(r)

    print()
    head = f"{'store':<11}{'mode':<7}{'stored':>8}{'distinct':>9}{'once':>6}"
    head += f"{'alerts/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    print(head)
    for r in results:
        lat = r["latency_ms"]
        print(
            f"{r['store']:<11}{r['mode']:<7}{r['rows']:>8}{r['distinct']:>9}"
            f"{'yes' if r['exactly_once'] else 'NO':>6}{r['throughput']:>10.0f}"
            f"{lat['p50'] or float('nan'):>9.1f}{lat['p99'] or float('nan'):>9.1f}"
            f"{lat['max'] or float('nan'):>9.1f}"
        )
    checks = []
    for r in results:
        if r["store"] == "sqlite" and r["mode"] == "full":
            checks.append(
                (f"sqlite full >= {THROUGHPUT_BAR:.0f} alerts/s", r["throughput"] >= THROUGHPUT_BAR)
            )
        if r["mode"] == "paced":
            p99 = r["latency_ms"]["p99"]
            checks.append(
                (
                    f"{r['store']} p99 < {P99_BAR_MS:.0f} ms at {args.rate:.0f}/s",
                    p99 is not None and p99 < P99_BAR_MS,
                )
            )
        checks.append((f"{r['store']} {r['mode']} stored exactly once", r["exactly_once"]))
    print()
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")

    plot(results, args.out / "bench_fleet_latency.png")
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": {
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "devices": args.devices,
        "alerts_per_device": args.alerts,
        "publisher_processes": args.procs,
        "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "checks": {name: ok for name, ok in checks},
    }
    (args.out / "bench_fleet.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out / 'bench_fleet.json'} and {args.out / 'bench_fleet_latency.png'}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
