"""Self-training on a new domain's unlabelled frames vs training on the labels alone.

``python benchmarks/bench_self_training.py --out DIR [--quick] [--segments a,b] [--archs ...]``

What a user would do instead of self-training is ask for more labels, or train on the few they
have. So, side by side in one run, for each shift segment of ``benchmarks/bench_nas.py`` (the
fashion-drift shifts plus three low-level ones) and each adaptor family the runtime grows most
(a linear head on pooled features; conv@13 1x32, the search's usual pick on fashion-drift):

* ``labelled``: PrototypeInit + ``train_adaptor`` (the config's steps, step size and schedule)
  on L labelled frames (20, 50 or 200);
* ``self-trained``: that head, then :func:`edge_runtime.adapt.self_training.self_train` with
  the config's ``adapt.self_training_*`` on ``pool`` unlabelled frames of the same segment
  (the code the runtime's refit job runs);
* ``labelled @ 200``: the default label budget, labels only (the reference the issue's bar is
  stated against).

Isolated adaptors: no base replay, no routing (the runtime's refit also weighs replay; its
effect is measured by ``edge-runtime run``, in RESULTS.md). The pool is drawn class-balanced,
where a device's pool is whatever the router sent to the domain. Accuracy is on 1,000 held-out
frames of the segment, the mean over ``--seeds`` draws. Reports each gain, the share of the gap
to 200 labels that self-training closes, the pseudo-labels' accuracy and the refit's wall time
(one thread).

Writes ``DIR/bench_self_training.json`` and ``DIR/bench_self_training.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_nas as bn
from eval_setup import add_config_args, build_encoder, config_source, machine_name, runtime_config

from edge_runtime.adapt.adaptor import Adaptor, AdaptorArch, build_adaptor, train_adaptor
from edge_runtime.adapt.init import PrototypeInit
from edge_runtime.adapt.self_training import self_train
from edge_runtime.adapt.space import conv_arch
from edge_runtime.encoder.backend import TAP_BLOCKS
from edge_runtime.encoder.cache import cached_encoded
from edge_runtime.runtime import self_training_spec

SEGMENTS = ("fog", "noise", "new-classes", "mnist", "digits-block+impulse", "fashion-impulse")
LABELS = (20, 50, 200)
REFERENCE = 200
N_EVAL = 1000


def _arch(name: str, dim: int, input_size: int) -> AdaptorArch:
    if name == "linear":
        return AdaptorArch("linear", dim)
    if name == "conv13":
        return conv_arch(13, input_size, 32, 1)
    raise SystemExit(f"unknown arch {name!r}: linear, conv13")


def _rows(arch: AdaptorArch, enc: Any) -> np.ndarray:
    if arch.tap is None:
        return np.asarray(enc.features, np.float32)
    m = enc.maps[arch.tap]
    return np.asarray(m, np.float32).reshape(len(m), -1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(ap)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--segments", default=",".join(SEGMENTS))
    ap.add_argument("--archs", default="linear,conv13")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--quick", action="store_true", help="two segments, one seed, linear only")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.segments, args.seeds, args.archs = "fog,mnist", "0", "linear"
    cfg = runtime_config(args)
    a = cfg.adapt
    spec = self_training_spec(cfg)
    encoder = build_encoder(cfg)
    torch.set_num_threads(1)
    segs = {s.name: s for s in bn.segments()}
    names = [s for s in args.segments.split(",") if s]
    unknown = [s for s in names if s not in segs]
    if unknown:
        raise SystemExit(f"unknown segments {unknown}; known: {sorted(segs)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    archs = [_arch(n, encoder.spec.dim, encoder.spec.input_size) for n in args.archs.split(",")]
    arch_names = args.archs.split(",")

    def fit(arch: AdaptorArch, label_map: list[int], seed: int) -> Any:
        def run(x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> Adaptor:
            head = build_adaptor(arch, label_map, seed=seed)
            PrototypeInit().init(head, x, y)
            train_adaptor(
                head,
                x,
                y,
                steps=a.steps,
                lr=a.lr,
                schedule=a.lr_schedule,
                seed=seed,
                fit_normalizer=False,
                sample_weight=w,
            )
            return head

        return run

    cells: list[dict[str, Any]] = []
    todo = [(s, seed) for s in names for seed in seeds]
    bar = tqdm(todo, desc="segments x seeds", disable=args.no_progress)
    for seg_name, seed in bar:
        seg = segs[seg_name]
        n_shots = REFERENCE + spec.pool
        images, labels, _ = bn.draw(seg, n_shots, N_EVAL, seed, {})
        enc = cached_encoded(
            encoder, images, TAP_BLOCKS, "none", f"selftrain-{seg_name}-{seed}-{len(images)}"
        )
        pool_sl = slice(REFERENCE, REFERENCE + spec.pool)
        ev = slice(n_shots, n_shots + N_EVAL)
        label_map = sorted({int(v) for v in labels[:n_shots]})
        for arch, an in zip(archs, arch_names, strict=True):
            rows = _rows(arch, enc)
            run = fit(arch, label_map, seed)
            ref = run(rows[:REFERENCE], labels[:REFERENCE], None)
            ref_acc = float(np.mean(ref.predict(rows[ev]) == labels[ev]))
            for n in LABELS:
                bar.set_postfix_str(f"{seg_name} {an} {n} labels")
                head = run(rows[:n], labels[:n], None) if n != REFERENCE else ref
                before = float(np.mean(head.predict(rows[ev]) == labels[ev]))
                t0 = time.perf_counter()
                refit, report = self_train(
                    head,
                    rows[:n],
                    labels[:n],
                    None,
                    rows[pool_sl],
                    run,
                    spec,
                    sorted({int(v) for v in labels[:n]}),
                    truth=labels[pool_sl],
                )
                wall = time.perf_counter() - t0
                after = float(np.mean(refit.predict(rows[ev]) == labels[ev]))
                cells.append(
                    {
                        "segment": seg_name,
                        "seed": seed,
                        "arch": an,
                        "labels": n,
                        "labelled": before,
                        "self_trained": after,
                        "labelled_at_200": ref_acc,
                        "refit_seconds": wall,
                        "rounds": report["rounds"],
                    }
                )
    summary = _summarise(cells, names, arch_names)
    result = {
        "benchmark": "bench_self_training",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_name(),
        "config": config_source(args),
        "spec": {"pool": spec.pool, "rounds": spec.rounds, "fraction": spec.fraction},
        "train": {"steps": a.steps, "lr": a.lr, "schedule": a.lr_schedule},
        "seeds": seeds,
        "n_eval": N_EVAL,
        "cells": cells,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_self_training.json").write_text(json.dumps(result, indent=1))
    _plot(summary, names, arch_names, args.out / "bench_self_training.png")
    print(_table(summary, names, arch_names))
    print(f"wrote {args.out / 'bench_self_training.json'}, {args.out / 'bench_self_training.png'}")
    return 0


def _summarise(cells: list[dict], names: list[str], archs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for an in archs:
        for n in LABELS:
            rows = {}
            for s in names:
                c = [x for x in cells if x["arch"] == an and x["labels"] == n and x["segment"] == s]
                lab = float(np.mean([x["labelled"] for x in c]))
                st = float(np.mean([x["self_trained"] for x in c]))
                ref = float(np.mean([x["labelled_at_200"] for x in c]))
                pl = [r.get("pseudo_accuracy") for x in c for r in x["rounds"][-1:]]
                rows[s] = {
                    "labelled": lab,
                    "self_trained": st,
                    "labelled_at_200": ref,
                    "gain": st - lab,
                    "gap_closed": (st - lab) / (ref - lab) if n < REFERENCE and ref > lab else None,
                    "pseudo_accuracy_last_round": float(np.mean([p for p in pl if p is not None])),
                    "refit_seconds": float(np.median([x["refit_seconds"] for x in c])),
                }
            mean = {
                k: float(np.mean([r[k] for r in rows.values()]))
                for k in ("labelled", "self_trained", "labelled_at_200", "gain")
            }
            out[f"{an}@{n}"] = {"segments": rows, "mean": mean}
    return out


def _table(summary: dict[str, Any], names: list[str], archs: list[str]) -> str:
    lines = [
        "| arch | labels | segment | labelled | self-trained | gain | labelled @ 200 | gap closed "
        "| pseudo-label acc. (last round) | refit s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for an in archs:
        for n in LABELS:
            block = summary[f"{an}@{n}"]
            for s in [*names, "mean"]:
                r = block["mean"] if s == "mean" else block["segments"][s]
                gap = r.get("gap_closed")
                pl = r.get("pseudo_accuracy_last_round")
                wall = r.get("refit_seconds")
                cols = [
                    an,
                    str(n),
                    "**mean**" if s == "mean" else s,
                    f"{100 * r['labelled']:.1f}",
                    f"{100 * r['self_trained']:.1f}",
                    f"{100 * r['gain']:+.1f}",
                    f"{100 * r['labelled_at_200']:.1f}",
                    "-" if gap is None else f"{100 * gap:.0f}%",
                    "-" if pl is None else f"{100 * pl:.1f}",
                    "-" if wall is None else f"{wall:.1f}",
                ]
                lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _plot(summary: dict[str, Any], names: list[str], archs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 3.8), squeeze=False)
    for ax, an in zip(axes[0], archs, strict=True):
        block = summary[f"{an}@50"]["segments"]
        x = np.arange(len(names))
        for k, (key, label) in enumerate(
            [
                ("labelled", "50 labels"),
                ("self_trained", "50 labels + self-training"),
                ("labelled_at_200", "200 labels"),
            ]
        ):
            ax.bar(x + (k - 1) * 0.27, [100 * block[s][key] for s in names], 0.27, label=label)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{an}: 50 labels per segment")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
