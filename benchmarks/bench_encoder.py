"""Encoder benchmark: latency p50/p99 and throughput per available backend, one command on a
Jetson as on a laptop.

    python benchmarks/bench_encoder.py            # batches 1, 8, 32; input 64 and 128
    python benchmarks/bench_encoder.py --quick    # smoke run

Backends that cannot run here are listed with the reason. Backends are timed
round-robin (one call each per iteration) so load from other processes hits
them alike. Each backend's features are compared with the torch reference.
The INT8 section measures what quantisation costs (feature error, linear-probe
accuracy, OOD AUROC on Fashion-MNIST with classes 8-9 held out as novel).
Writes JSON and a PNG under --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.encoder import Encoder, TorchBackend, preprocess
from edge_runtime.encoder.export import relative_error
from edge_runtime.encoder.onnx_backend import OnnxRuntimeBackend, cached_onnx, physical_cores
from edge_runtime.encoder.quantize import cached_quantized
from edge_runtime.encoder.select import backend_report, parity_error
from edge_runtime.encoder.tensorrt_backend import TensorRTBackend

FASHION = Path("/usr/share/datasets/fashion-mnist")
log = logging.getLogger("bench_encoder")


def idx_images(name: str) -> np.ndarray:
    with gzip.open(FASHION / name) as f:
        data = f.read()
    if "labels" in name:
        return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28).copy()


def build_backends(
    size: int, args: argparse.Namespace, calibration: np.ndarray
) -> tuple[dict[str, Any], dict[str, str]]:
    """Every backend that runs here for this input size, and why the others do not."""
    report = backend_report()
    backends: dict[str, Any] = {"torch-cpu": TorchBackend.mobilenet(size)}
    skipped: dict[str, str] = {}
    path, _ = cached_onnx(size, cache_dir=args.cache_dir)
    backends["onnxruntime-cpu"] = OnnxRuntimeBackend.from_file(path, threads=args.threads)
    if not args.no_int8:
        qpath = cached_quantized(path, "static", preprocess(calibration, size).numpy())
        backends["onnxruntime-cpu-int8"] = OnnxRuntimeBackend.from_file(qpath, threads=args.threads)
    gpu = {
        "torch-cuda": lambda: TorchBackend.mobilenet(size, device="cuda"),
        "onnxruntime-cuda": lambda: OnnxRuntimeBackend.from_file(path, device="cuda"),
        "tensorrt": lambda: TensorRTBackend.mobilenet(
            size, precision="fp16", batch_shapes=(1, 8, max(args.batches))
        ),
    }
    for name, make in gpu.items():
        if report[name] != "available":
            skipped[name] = report[name]
            continue
        try:
            backends[name if name != "tensorrt" else "tensorrt-fp16"] = make()
        except Exception as exc:  # report, keep benchmarking the rest
            skipped[name] = f"failed: {str(exc).splitlines()[0]}"
    return backends, skipped


def time_round_robin(
    backends: dict[str, Any], x: torch.Tensor, iters: int, warmup: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {n: [] for n in backends}
    for i in range(warmup + iters):
        for name, b in backends.items():
            t0 = time.perf_counter()
            b.encode(x)  # returns numpy: GPU work is synchronised by the copy
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return times


def latency_rows(
    args: argparse.Namespace, test_images: np.ndarray, calibration: np.ndarray
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for size in args.sizes:
        backends, skipped = build_backends(size, args, calibration)
        probe = preprocess(test_images[:32], size)
        ref = backends["torch-cpu"].encode(probe)
        parity = {}
        for name, b in backends.items():
            precision = "int8" if "int8" in name else "fp16" if "fp16" in name else "fp32"
            parity[name] = (parity_error(b.encode(probe), ref, precision), precision)
        for batch in args.batches:
            x = preprocess(test_images[:batch], size)
            iters = max(5, args.iters // max(1, batch // 8))  # fewer iterations for big batches
            times = time_round_robin(backends, x, iters, args.warmup)
            for name, ts in times.items():
                arr = np.asarray(ts) * 1e3
                p50 = float(np.median(arr))
                rows.append(
                    {
                        "backend": name,
                        "input_size": size,
                        "batch": batch,
                        "iters": len(ts),
                        "p50_ms": p50,
                        "p99_ms": float(np.percentile(arr, 99)),
                        "throughput_fps": batch / (p50 / 1e3),
                        "precision": parity[name][1],
                        "rel_err_vs_torch": parity[name][0],
                    }
                )
    return rows, skipped


def int8_quality(args: argparse.Namespace) -> dict[str, Any]:
    """Linear-probe accuracy and OOD AUROC, fp32 ONNX vs static INT8, same frames."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    n_train, n_test = (600, 400) if args.quick else (3000, 2000)
    train_x, train_y = (
        idx_images("train-images-idx3-ubyte.gz"),
        idx_images("train-labels-idx1-ubyte.gz"),
    )
    test_x, test_y = (
        idx_images("t10k-images-idx3-ubyte.gz"),
        idx_images("t10k-labels-idx1-ubyte.gz"),
    )
    known = train_y < 8
    tr_x, tr_y = train_x[known][:n_train], train_y[known][:n_train]
    te_x, te_y = test_x[:n_test], test_y[:n_test]
    calibration = train_x[-256:]  # disjoint from the probe's training frames
    size = args.sizes[0]
    path, _ = cached_onnx(size, cache_dir=args.cache_dir)
    qpath = cached_quantized(path, "static", preprocess(calibration, size).numpy())
    out: dict[str, Any] = {
        "input_size": size,
        "train_frames": int(n_train),
        "test_frames": int(n_test),
        "novel_classes": [8, 9],
    }
    feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, model in (("fp32", path), ("int8", qpath)):
        enc = Encoder(OnnxRuntimeBackend.from_file(model, threads=args.threads), batch_size=64)
        ftr, fte = enc.features(tr_x), enc.features(te_x)
        feats[name] = (ftr, fte)
        mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
        probe = LogisticRegression(max_iter=300).fit((ftr - mu) / sd, tr_y)
        id_mask = te_y < 8
        acc = float(probe.score(((fte - mu) / sd)[id_mask], te_y[id_mask]))
        protos = np.stack([ftr[tr_y == c].mean(0) for c in range(8)])
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        score = (fte / np.linalg.norm(fte, axis=1, keepdims=True)) @ protos.T
        auroc = float(roc_auc_score(id_mask, score.max(1)))  # in-distribution positive
        out[name] = {"probe_accuracy": acc, "ood_auroc_prototype_cosine": auroc}
    out["feature_rel_err_fro"] = parity_error(feats["int8"][1], feats["fp32"][1], "int8")
    out["feature_rel_err_max"] = relative_error(feats["int8"][1], feats["fp32"][1])
    out["accuracy_cost"] = out["fp32"]["probe_accuracy"] - out["int8"]["probe_accuracy"]
    out["auroc_cost"] = (
        out["fp32"]["ood_auroc_prototype_cosine"] - out["int8"]["ood_auroc_prototype_cosine"]
    )
    return out


def speedup_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ORT CPU vs torch eager at batch 1, same run: must be >= 1.5x with parity <= 1e-4."""
    checks = []
    for r in rows:
        if r["backend"] != "onnxruntime-cpu" or r["batch"] != 1:
            continue
        base = next(
            t
            for t in rows
            if t["backend"] == "torch-cpu"
            and t["batch"] == 1
            and t["input_size"] == r["input_size"]
        )
        speedup = base["p50_ms"] / r["p50_ms"]
        checks.append(
            {
                "input_size": r["input_size"],
                "speedup_vs_torch": speedup,
                "rel_err": r["rel_err_vs_torch"],
                "pass": speedup >= 1.5 and r["rel_err_vs_torch"] <= 1e-4,
            }
        )
    return checks


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["input_size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for name in dict.fromkeys(r["backend"] for r in rows):
            pts = [r for r in rows if r["backend"] == name and r["input_size"] == size]
            ax.plot([p["batch"] for p in pts], [p["p50_ms"] for p in pts], marker="o", label=name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="batch",
            ylabel="p50 latency (ms)",
            title=f"MobileNetV2 encoder, input {size}",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument(
        "--sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=None,
        help="input sizes, comma-separated (default 64,128; quick: 64)",
    )
    p.add_argument(
        "--batches",
        type=lambda s: [int(v) for v in s.split(",")],
        default=None,
        help="batch sizes (default 1,8,32; quick: 1,8)",
    )
    p.add_argument("--iters", type=int, default=None, help="timed iterations at batch <= 8")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ORT intra-op and torch threads (default: physical cores)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="ONNX cache (default ~/.cache)")
    p.add_argument("--no-int8", action="store_true", help="skip the INT8 backend and its quality")
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([64] if args.quick else [64, 128])
    args.batches = args.batches or ([1, 8] if args.quick else [1, 8, 32])
    args.iters = args.iters or (15 if args.quick else 100)
    args.threads = args.threads or physical_cores()
    torch.set_num_threads(args.threads)  # torch and ORT get the same cores: a fair comparison
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)

    test_images = idx_images("t10k-images-idx3-ubyte.gz")[:64]
    calibration = idx_images("train-images-idx3-ubyte.gz")[-256:]
    rows, skipped = latency_rows(args, test_images, calibration)
    checks = speedup_checks(rows)
    quality = None if args.no_int8 else int8_quality(args)

    print(
        f"\nencoder latency ({platform.node()}, {args.threads} threads, torch {torch.__version__})"
    )
    print(
        f"{'backend':<22}{'size':>5}{'batch':>6}{'p50 ms':>10}{'p99 ms':>10}{'frames/s':>10}"
        f"{'rel err':>10}"
    )
    for r in rows:
        print(
            f"{r['backend']:<22}{r['input_size']:>5}{r['batch']:>6}{r['p50_ms']:>10.2f}"
            f"{r['p99_ms']:>10.2f}{r['throughput_fps']:>10.1f}{r['rel_err_vs_torch']:>10.1e}"
        )
    for name, why in skipped.items():
        print(f"{name:<22} skipped: {why}")
    for c in checks:
        print(
            f"check: onnxruntime-cpu batch 1 @ {c['input_size']}: {c['speedup_vs_torch']:.2f}x "
            f"torch eager, rel err {c['rel_err']:.1e} -> {'PASS' if c['pass'] else 'FAIL'} "
            f"(need >= 1.5x, <= 1e-4)"
        )
    if quality:
        print(
            f"int8 (static, input {quality['input_size']}): probe accuracy "
            f"{quality['fp32']['probe_accuracy']:.4f} -> {quality['int8']['probe_accuracy']:.4f}, "
            f"OOD AUROC {quality['fp32']['ood_auroc_prototype_cosine']:.4f} -> "
            f"{quality['int8']['ood_auroc_prototype_cosine']:.4f}, feature rel err (fro) "
            f"{quality['feature_rel_err_fro']:.3f}"
        )

    result = {
        "benchmark": "encoder",
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": {
            "node": platform.node(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "threads": args.threads,
            "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "backends_skipped": skipped,
        "rows": rows,
        "checks": checks,
        "int8_quality": quality,
    }
    (args.out / "bench_encoder.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / "bench_encoder.png")
    print(f"wrote {args.out / 'bench_encoder.json'} and {args.out / 'bench_encoder.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
