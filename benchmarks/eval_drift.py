"""Drift detection and novelty classification on real encoder-feature streams.

Every row is built from one runtime config (``--config FILE`` / ``--profile NAME``, the built-in
defaults otherwise) the way the runtime builds it: the encoder from ``build_encoder``, the HDC
memory bank from ``make_bank`` (base domain = Fashion-MNIST classes 0-5, train split, threshold
at ``hdc.tpr`` calibrated leave-one-out), the monitor from ``DriftMonitor.from_config`` with
``p0_floor = 1 - hdc.tpr``. The row labelled ``runtime config`` is that config as it is; every
other row's label lists the dotted overrides it applies (a row with fewer ``encoder.layers``
reads those columns of the runtime encoder's output). Streams are served test frames:
``drift.warmup`` + 200 in-distribution frames, then a change to one of: fog (severity 4),
Gaussian noise (3), rotation (3) of classes 0-5, or new classes 6-9. Every row sees the same
trials.

Measured per row:
* false alarms per 5,000 in-distribution frames (shuffled passes over the ID test frames, the
  warm-up of each pass not counted);
* the post-change OOD rate and the detection delay (median / p90 / max, misses) per change type;
* novelty-classifier accuracy (novel class vs domain shift) from the OOD frames seen up to the
  flag, and from 50 OOD frames (a label budget's worth), for three low-level descriptors: raw
  pixel statistics and MobileNetV2 blocks 3 and 6 (torch backend; the runtime uses the first of
  its ``encoder.layers``).

    python benchmarks/eval_drift.py [--quick] [--config C.yaml | --profile NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from eval_setup import (
    add_config_args,
    backend_name,
    bank_settings,
    build_encoder,
    config_source,
    encoder_line,
    make_bank,
    make_monitor,
    override_label,
    runtime_config,
    select_layers,
)

from edge_runtime.config import RuntimeConfig
from edge_runtime.data import load_fashion_mnist
from edge_runtime.data.corruptions import corrupt
from edge_runtime.drift import NoveltyClassifier, pixel_statistics
from edge_runtime.encoder import Encoder, TorchBackend
from edge_runtime.encoder.cache import cached_features

BASE = (0, 1, 2, 3, 4, 5)
SHIFTS = {"fog": ("fog", 4), "noise": ("gaussian_noise", 3), "rotation": ("rotation", 3)}
CHANGES = ("fog", "noise", "rotation", "new-classes")
DESCRIPTOR_LAYERS = (3, 6)
# In-distribution frames after the warm-up and before the change: the detector is armed and
# has seen enough ID frames for an early false alarm to show.
ARMED = 200
POST = 300


def row_overrides(cfg: RuntimeConfig) -> list[dict[str, Any]]:
    """The rows: the runtime config, then one change each that says what it buys."""
    return [
        {},
        {"drift.confirm_frames": 0},
        {"drift.method": "page_hinkley"},
        {"drift.method": "page_hinkley", "drift.confirm_frames": 0},
        # The bank this benchmark used before it was built from the config (HDFF-style).
        {
            "encoder.layers": [cfg.encoder.layers[-1]],
            "hdc.dim": 10_000,
            "hdc.projection": "gaussian",
            "hdc.rerank": 0,
        },
    ]


@dataclass
class Scored:
    """One bank's view of every frame set: calibrated base-domain score and OOD flag."""

    settings: dict[str, Any]
    scores: dict[str, np.ndarray]
    ood: dict[str, np.ndarray]


def _take(
    images: np.ndarray,
    labels: np.ndarray,
    classes: tuple[int, ...],
    n: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(np.isin(labels, classes))
    idx = rng.choice(idx, size=min(n, len(idx)), replace=False)
    return np.ascontiguousarray(images[idx]), labels[idx]


def score_sets(
    cfg: RuntimeConfig,
    f_train: np.ndarray,
    train_labels: np.ndarray,
    feats: dict[str, np.ndarray],
    enc: Encoder,
) -> Scored:
    """Fit the config's bank on the base domain and score every set."""
    layers = cfg.encoder.layers
    x_train, spec = select_layers(f_train, enc.spec, layers)
    bank = make_bank(cfg, spec)
    bank.add_domain(0, x_train, train_labels)
    scores = {
        k: bank.calibrated_scores(select_layers(v, enc.spec, layers)[0])[:, 0]
        for k, v in feats.items()
    }
    return Scored(
        settings=bank_settings(bank, spec, backend_name(enc)),
        scores=scores,
        ood={k: v < 0 for k, v in scores.items()},
    )


def run_row(
    cfg: RuntimeConfig,
    scored: Scored,
    desc: dict[str, dict[str, np.ndarray]],
    novelty: dict[str, NoveltyClassifier],
    passes: int,
    trials: int,
) -> dict[str, Any]:
    """False alarms and detection delays of one config's monitor on one bank's scores."""
    warmup = cfg.drift.warmup
    scores, ood = scored.scores, scored.ood
    n_id = len(scores["id"])
    # Seeded per row, so every row sees the same passes and trials.
    rng = np.random.default_rng(1)
    fa, frames = 0, 0
    for _ in range(passes):
        order = rng.permutation(n_id)
        mon = make_monitor(cfg)
        fa += len(mon.update_batch(np.arange(n_id), ood["id"][order], scores["id"][order]))
        frames += len(order) - warmup
    row: dict[str, Any] = {
        "false_alarms": fa,
        "id_frames": frames,
        "fa_per_5000": 5000 * fa / frames,
    }
    pre_n = warmup + ARMED
    for change in CHANGES:
        delays: list[float] = []
        correct: dict[str, list[bool]] = {k: [] for k in desc}
        truth = "novel_class" if change == "new-classes" else "domain_shift"
        for _ in range(trials):
            pre = rng.choice(n_id, pre_n, replace=False)
            post = rng.choice(len(scores[change]), POST, replace=False)
            o = np.concatenate([ood["id"][pre], ood[change][post]])
            s = np.concatenate([scores["id"][pre], scores[change][post]])
            mon = make_monitor(cfg)
            ev = None
            for i in range(len(o)):
                ev = mon.update(i, o[i], s[i])
                if ev is not None:
                    break
            if ev is None or ev.frame < pre_n:
                delays.append(np.inf if ev is None else -1)
                continue
            delays.append(ev.frame - pre_n)
            seen = post[: ev.frame - pre_n + 1]
            seen_ood = seen[ood[change][seen]]
            if len(seen_ood) == 0:
                continue
            for k, clf in novelty.items():
                correct[k].append(clf.classify(desc[k][change][seen_ood]).kind == truth)
        d = np.asarray(delays, dtype=float)
        hit = d[np.isfinite(d) & (d >= 0)]
        row[change] = {
            "post_ood_rate": float(ood[change].mean()),
            "median_delay": float(np.median(hit)) if len(hit) else None,
            "p90_delay": float(np.percentile(hit, 90)) if len(hit) else None,
            "max_delay": float(hit.max()) if len(hit) else None,
            "missed": int(np.isinf(d).sum()),
            "early_false_alarm": int((d < 0).sum()),
            "trials": trials,
            "novelty_accuracy": {k: float(np.mean(v)) for k, v in correct.items() if v},
        }
    return row


def novelty_with_budget(
    ood: dict[str, np.ndarray],
    desc: dict[str, dict[str, np.ndarray]],
    novelty: dict[str, NoveltyClassifier],
    frames: int = 50,
    draws: int = 100,
) -> dict[str, dict[str, float]]:
    """Novelty accuracy from ``frames`` random OOD frames (what the runtime has once labels
    are in), ``draws`` draws per change."""
    rng = np.random.default_rng(2)
    out: dict[str, dict[str, float]] = {}
    for k, clf in novelty.items():
        out[k] = {}
        for change in CHANGES:
            pool = np.flatnonzero(ood[change])
            truth = "novel_class" if change == "new-classes" else "domain_shift"
            ok = [
                clf.classify(
                    desc[k][change][rng.choice(pool, min(frames, len(pool)), replace=False)]
                ).kind
                == truth
                for _ in range(draws)
            ]
            out[k][change] = float(np.mean(ok))
        out[k]["mean"] = float(np.mean(list(out[k].values())))
    return out


def _delay_cell(r: dict[str, Any]) -> str:
    if r["median_delay"] is None:
        return "–"
    return f"{r['median_delay']:.0f} / {r['p90_delay']:.0f} / {r['max_delay']:.0f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| detector | false alarms per 5,000 ID frames | "
        + " | ".join(f"{c} median/p90/max" for c in CHANGES)
        + " | missed | early alarms |"
    )
    print("| --- " * (len(CHANGES) + 4) + "|")
    for r in rows:
        cells = [_delay_cell(r[c]) for c in CHANGES]
        missed = sum(r[c]["missed"] for c in CHANGES)
        early = sum(r[c]["early_false_alarm"] for c in CHANGES)
        print(
            f"| {r['label']} | {r['fa_per_5000']:.3f} ({r['false_alarms']}) | "
            + " | ".join(cells)
            + f" | {missed} | {early} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--trials", type=int, default=200)
    add_config_args(ap)
    args = ap.parse_args(argv)
    cfg = runtime_config(args)
    rng = np.random.default_rng(0)
    n_train, n_id, n_ood, passes = (600, 600, 300, 4) if args.quick else (1800, 2000, 1000, 25)
    trials = 40 if args.quick else args.trials

    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    train_img, train_lab = _take(xtr, ytr, BASE, n_train, rng)
    id_img, _ = _take(xte, yte, BASE, n_id, rng)
    novel_img, _ = _take(xte, yte, (6, 7, 8, 9), n_ood, rng)
    shift_src, _ = _take(xte, yte, BASE, n_ood, rng)
    sets = {"id": id_img, "new-classes": novel_img}
    for name, (corr, sev) in SHIFTS.items():
        sets[name] = corrupt(shift_src, corr, sev, seed=1)

    t0 = time.time()
    enc = build_encoder(cfg)
    desc_enc = Encoder(
        TorchBackend.mobilenet(
            input_size=cfg.encoder.input_size, layers=DESCRIPTOR_LAYERS, weights=cfg.encoder.weights
        )
    )
    f_train = cached_features(enc, train_img, "drift-train", progress="train")
    feats = {k: cached_features(enc, v, f"drift-{k}", progress=k) for k, v in sets.items()}
    d_train = cached_features(desc_enc, train_img, "drift-desc-train", progress="train")
    d_feats = {
        k: cached_features(desc_enc, v, f"drift-desc-{k}", progress=k) for k, v in sets.items()
    }
    print(f"features: {time.time() - t0:.0f}s; runtime encoder: {encoder_line(enc)}")

    # Low-level descriptors and their novelty classifiers (fitted on base train frames).
    l3, l6 = desc_enc.spec.slices()
    desc_train = {"pixels": pixel_statistics(train_img), "layer3": d_train[:, l3]}
    desc_train["layer6"] = d_train[:, l6]
    desc = {
        "pixels": {k: pixel_statistics(v) for k, v in sets.items()},
        "layer3": {k: v[:, l3] for k, v in d_feats.items()},
        "layer6": {k: v[:, l6] for k, v in d_feats.items()},
    }
    novelty = {k: NoveltyClassifier().fit(v) for k, v in desc_train.items()}

    rows: list[dict[str, Any]] = []
    banks: dict[str, Scored] = {}
    t0 = time.time()
    for overrides in row_overrides(cfg):
        row_cfg = cfg.with_overrides(overrides)
        # Rows that differ in drift settings only share one bank's scores.
        key = json.dumps([row_cfg.encoder.layers, row_cfg.hdc.model_dump()], sort_keys=True)
        if key not in banks:
            banks[key] = score_sets(row_cfg, f_train, train_lab, feats, enc)
        scored = banks[key]
        row = run_row(row_cfg, scored, desc, novelty, passes, trials)
        mon = make_monitor(row_cfg)
        row.update(
            label=override_label(overrides),
            overrides=overrides,
            bank=scored.settings,
            drift=row_cfg.drift.model_dump(),
            p0_floor=getattr(mon.detector, "p0_floor", None),
            ood_rate={k: float(v.mean()) for k, v in scored.ood.items()},
        )
        rows.append(row)
        rates = ", ".join(f"{k}={v:.3f}" for k, v in row["ood_rate"].items())
        print(f"{row['label']}: OOD rate per set {rates}", flush=True)
    print(f"detector rows: {time.time() - t0:.0f}s")

    runtime = rows[0]
    big = novelty_with_budget(banks[next(iter(banks))].ood, desc, novelty)
    b, dcfg = runtime["bank"], runtime["drift"]
    print(
        f"\nruntime config ({config_source(args)}): encoder {encoder_line(enc)}; "
        f"HDC D={b['dim']} {b['projection']}, "
        f"k={b['k']}, rerank={b['rerank']}, early_weight={b['early_weight']}, "
        f"tpr={cfg.hdc.tpr}; drift {dcfg['method']}, warmup {dcfg['warmup']}, "
        f"false_alarm_rate {dcfg['false_alarm_rate']:g}, min_ood_rate {dcfg['min_ood_rate']}, "
        f"confirm_frames {dcfg['confirm_frames']}, p0_floor {runtime['p0_floor']:.3f}"
    )
    print(f"{trials} trials per change, delays in frames after the change\n")
    print_table(rows)
    print(f"\nnovelty classifier accuracy at the flag ({runtime['label']}), per descriptor:")
    for k in desc:
        accs = {c: runtime[c]["novelty_accuracy"].get(k) for c in CHANGES}
        print(f"  {k:7} " + "  ".join(f"{c}={v:.2f}" for c, v in accs.items() if v is not None))
    print("novelty classifier accuracy with 50 OOD frames (label budget collected):")
    for k, v in big.items():
        print(f"  {k:7} " + "  ".join(f"{c}={a:.2f}" for c, a in v.items()))
    print(f"the runtime's novelty descriptor: encoder layer {cfg.encoder.layers[0]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "config": cfg.model_dump(mode="json"),
        "encoder": encoder_line(enc),
        "trials": trials,
        "rows": rows,
        "novelty_50_frames": big,
    }
    (out / "eval_drift.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out / 'eval_drift.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
