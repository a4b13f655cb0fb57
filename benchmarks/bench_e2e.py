"""End to end per frame: the whole runtime against the encoder alone, same machine, same run.

    python benchmarks/bench_e2e.py [--quick] [--out benchmarks/out] [--batches 1 32]

For each batch size it times, interleaved round-robin so machine noise hits all alike:
  encoder   Encoder.features(frames)               (the frozen encoder, preprocessing included)
  hdc       bank.calibrated_scores + Router.route  (HDC scoring of every domain + routing, on
                                                    the features the encoder just produced)
  runtime   Runtime.process(frames)                (everything: encoder, HDC, routing, adaptor,
                                                    drift monitor, events)
and reports p50/p99 latency per call, frames/s, the HDC + routing overhead over the encoder
(the issue asks <= 15% at batch 1), the whole runtime's overhead, peak RSS and, where a
Jetson power rail is readable,
energy per frame. The runtime serves a base domain fitted on Fashion-MNIST plus a second
domain, so routing really scores two memories. Writes ``e2e.json`` and ``e2e.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from edge_runtime.adapt import Router
from edge_runtime.config import load_config
from edge_runtime.data import corrupt, load_fashion_mnist
from edge_runtime.runner import peak_rss_mb
from edge_runtime.runtime import Runtime, build_encoder
from edge_runtime.telemetry import TelemetrySampler


def _percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def build_runtime(cfg, n_train: int) -> Runtime:  # type: ignore[no-untyped-def]
    """A runtime that has gone through one real drift: base domain plus a grown fog domain."""
    images, labels = load_fashion_mnist("train")
    base = np.flatnonzero(labels < 6)
    rt = Runtime(cfg, build_encoder(cfg), background=False)
    rt.fit_base(images[base[:n_train]], labels[base[:n_train]])
    # Serve clean frames then fog-corrupted ones under the test-then-train protocol, revealing
    # labels when asked, so the second domain is grown exactly as in a run.
    rest = base[n_train : n_train + 1400]
    frames = np.concatenate([images[rest[:400]], corrupt(images[rest[400:]], "fog", 4, seed=1)])
    ys = labels[rest]
    for lo in range(0, len(frames), 32):
        d = rt.process(frames[lo : lo + 32], np.arange(lo, min(lo + 32, len(frames))))
        asked = d.indices[d.label_request]
        if len(asked):
            rt.feedback(asked, ys[asked])
    rt.finish(wait=True)
    return rt


def time_batch(rt: Runtime, frames: np.ndarray, batch: int, iters: int) -> dict:
    enc_t: list[float] = []
    hdc_t: list[float] = []
    run_t: list[float] = []
    router = Router()
    n = len(frames)
    for it in range(iters + 3):
        lo = (it * batch) % (n - batch)
        x = frames[lo : lo + batch]
        t0 = time.perf_counter()
        f = rt.encoder.features(x)
        t1 = time.perf_counter()
        router.route(rt.bank.calibrated_scores(f), rt.bank.domain_ids)
        t2 = time.perf_counter()
        rt.process(x)
        t3 = time.perf_counter()
        if it >= 3:  # warm-up calls excluded
            enc_t.append(t1 - t0)
            hdc_t.append(t2 - t1)
            run_t.append(t3 - t2)
    enc, hdc, run = _percentiles(enc_t), _percentiles(hdc_t), _percentiles(run_t)
    return {
        "batch": batch,
        "encoder": enc | {"frames_per_s": batch / float(np.median(enc_t))},
        "hdc_routing": hdc,
        "runtime": run | {"frames_per_s": batch / float(np.median(run_t))},
        "hdc_overhead_p50": hdc["p50_ms"] / enc["p50_ms"],
        "overhead_p50": run["p50_ms"] / enc["p50_ms"] - 1.0,
        "iters": iters,
    }


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = np.arange(len(rows))
    ax.bar(xs - 0.27, [r["encoder"]["p50_ms"] for r in rows], 0.27, label="encoder alone")
    ax.bar(xs, [r["hdc_routing"]["p50_ms"] for r in rows], 0.27, label="HDC + routing")
    ax.bar(xs + 0.27, [r["runtime"]["p50_ms"] for r in rows], 0.27, label="whole runtime")
    ax.set_xticks(xs, [f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("p50 latency per call (ms)")
    ax.set_yscale("log")
    for x, r in zip(xs, rows, strict=True):
        ax.text(
            x + 0.27,
            r["runtime"]["p50_ms"],
            f"+{100 * r['overhead_p50']:.0f}%",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.legend()
    ax.set_title("end to end: runtime vs encoder")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small base set and few iterations")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--config", default=None, help="runtime config YAML (default: built-in)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    iters = args.iters or (30 if args.quick else 300)
    rt = build_runtime(cfg, 600 if args.quick else 6000)
    images, _ = load_fashion_mnist("test")
    sampler = TelemetrySampler(interval_s=0.5).start()
    rows = []
    try:
        for b in args.batches:
            t0 = time.time()
            row = time_batch(rt, images, b, iters if b == 1 else max(5, iters // 10))
            row["wall_s"] = time.time() - t0
            rows.append(row)
    finally:
        sampler.stop()
    power = [s.total_power_w for s in sampler.history() if s.total_power_w is not None]
    fps1 = rows[0]["runtime"]["frames_per_s"]
    energy = (
        {
            "mean_power_w": float(np.mean(power)),
            "mj_per_frame_batch1": 1e3 * float(np.mean(power)) / fps1,
        }
        if power
        else None
    )
    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        },
        "backend": rt.encoder.backend.name,
        "domains": len(rt.bank.domain_ids),
        "exemplars": len(rt.bank.packed),
        "hdc_dim": rt.bank.dim,
        "rows": rows,
        "peak_rss_mb": peak_rss_mb(),
        "energy": energy,
    }
    print(
        f"backend {result['backend']}, HDC D={result['hdc_dim']}, {result['domains']} domains, "
        f"{result['exemplars']} exemplars"
    )
    print(
        f"{'batch':>5} | {'encoder p50':>11} {'p99':>8} | {'hdc+route p50':>13} | "
        f"{'runtime p50':>11} {'p99':>8} | {'runtime fps':>11} | hdc+route | runtime"
    )
    for r in rows:
        e, u = r["encoder"], r["runtime"]
        enc_s = f"{e['p50_ms']:>9.3f}ms {e['p99_ms']:>6.2f}ms"
        run_s = f"{u['p50_ms']:>9.3f}ms {u['p99_ms']:>6.2f}ms"
        print(
            f"{r['batch']:>5} | {enc_s} | {r['hdc_routing']['p50_ms']:>11.3f}ms | {run_s} | "
            f"{u['frames_per_s']:>11.1f} | {100 * r['hdc_overhead_p50']:+8.1f}% | "
            f"{100 * r['overhead_p50']:+.1f}%"
        )
    energy_s = energy or "no power rail readable here"
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB; energy: {energy_s}")
    b1 = next((r for r in rows if r["batch"] == 1), None)
    if b1 is not None:
        ok = b1["hdc_overhead_p50"] <= 0.15
        pct = 100 * b1["hdc_overhead_p50"]
        print(f"{'PASS' if ok else 'FAIL'}: HDC + routing add {pct:.1f}% at batch 1 (<= 15%)")
    (out / "e2e.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "e2e.png")
    print(f"wrote {out / 'e2e.json'} and {out / 'e2e.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
