"""Drift detection and novelty classification on real encoder-feature streams.

Frozen MobileNetV2 (input 64, layers 3/6/18) features of Fashion-MNIST; the base domain (classes
0-5, train split) goes into the real HDC ``DomainMemoryBank`` (95% TPR threshold calibrated
leave-one-out on the train frames). Streams are served test frames: an in-distribution prefix,
then a change to one of: fog (severity 4), Gaussian noise (3), rotation (3) of classes 0-5,
or new classes 6-9.

Measured, side by side for the CUSUM (indicator) and Page-Hinkley (score) detectors, and for
CUSUM whose alarms the monitor confirms on the next 20 frames (the runtime's default):
* false alarms per 5,000 in-distribution frames (many shuffled passes over the ID test frames);
* the post-change OOD rate and the detection delay (median / p90 / max, misses) per change type;
* novelty-classifier accuracy (novel class vs domain shift) from the OOD frames seen up to the
  flag, for three low-level descriptors: raw pixel statistics, encoder layer 3, encoder layer 6.

    python benchmarks/eval_drift.py [--quick] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edge_runtime.data import load_fashion_mnist
from edge_runtime.data.corruptions import corrupt
from edge_runtime.drift import DriftMonitor, NoveltyClassifier, make_detector, pixel_statistics
from edge_runtime.encoder import Encoder, TorchBackend
from edge_runtime.encoder.cache import cached_features
from edge_runtime.hdc.bank import DomainMemoryBank

BASE = (0, 1, 2, 3, 4, 5)
SHIFTS = {"fog": ("fog", 4), "noise": ("gaussian_noise", 3), "rotation": ("rotation", 3)}


def _take(images, labels, classes, n, rng):
    idx = np.flatnonzero(np.isin(labels, classes))
    idx = rng.choice(idx, size=min(n, len(idx)), replace=False)
    return np.ascontiguousarray(images[idx]), labels[idx]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--false-alarm-rate", type=float, default=1e-4)
    ap.add_argument("--trials", type=int, default=200)
    args = ap.parse_args(argv)
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

    enc = Encoder(TorchBackend.mobilenet(input_size=64, layers=(3, 6, 18)))
    t0 = time.time()
    f_train = cached_features(enc, train_img, "drift-train", progress="train")
    feats = {k: cached_features(enc, v, f"drift-{k}", progress=k) for k, v in sets.items()}
    print(f"features: {time.time() - t0:.0f}s")
    l3, l6, l18 = enc.spec.slices()

    bank = DomainMemoryBank(dim=10_000, k=10, tpr=0.95)
    bank.add_domain(0, f_train[:, l18], train_lab)
    scores = {k: bank.calibrated_scores(v[:, l18])[:, 0] for k, v in feats.items()}
    ood = {k: v < 0 for k, v in scores.items()}
    print("OOD rate per set: " + ", ".join(f"{k}={v.mean():.3f}" for k, v in ood.items()))

    # Low-level descriptors and their novelty classifiers (fitted on base train frames).
    desc_train = {
        "pixels": pixel_statistics(train_img),
        "layer3": f_train[:, l3],
        "layer6": f_train[:, l6],
    }
    desc = {
        "pixels": {k: pixel_statistics(v) for k, v in sets.items()},
        "layer3": {k: v[:, l3] for k, v in feats.items()},
        "layer6": {k: v[:, l6] for k, v in feats.items()},
    }
    novelty = {k: NoveltyClassifier().fit(v) for k, v in desc_train.items()}

    def detector(method: str):
        if method == "cusum":
            return make_detector("cusum", false_alarm_rate=args.false_alarm_rate, warmup=200)
        return make_detector("page_hinkley", false_alarm_rate=args.false_alarm_rate, warmup=200)

    results: dict = {"ood_rate": {k: float(v.mean()) for k, v in ood.items()}, "methods": {}}
    # name -> (detector, frames after an alarm that must confirm it: the runtime's default)
    setups = {
        "cusum": ("cusum", 0),
        "cusum+confirm": ("cusum", 20),
        "page_hinkley": ("page_hinkley", 0),
    }
    for name, (method, confirm) in setups.items():
        # False alarms: shuffled passes over the ID frames (warm-up on the first 200 of each).
        fa, frames = 0, 0
        for _ in range(passes):
            order = rng.permutation(len(id_img))
            mon = DriftMonitor(detector(method), confirm_frames=confirm)
            fa += len(mon.update_batch(order, ood["id"][order], scores["id"][order]))
            frames += len(order) - 200
        row: dict = {"false_alarms": fa, "id_frames": frames, "fa_per_5000": 5000 * fa / frames}
        # Delays: 400 ID frames (200 warm-up), then the change; OOD descriptors at the flag
        # go to each novelty classifier.
        for change in ("fog", "noise", "rotation", "new-classes"):
            delays, correct = [], {k: [] for k in desc}
            for _ in range(trials):
                pre = rng.choice(len(id_img), 400, replace=False)
                post = rng.choice(len(feats[change]), 300, replace=False)
                o = np.concatenate([ood["id"][pre], ood[change][post]])
                s = np.concatenate([scores["id"][pre], scores[change][post]])
                mon = DriftMonitor(detector(method), confirm_frames=confirm)
                ev = None
                for i in range(len(o)):
                    ev = mon.update(i, o[i], s[i])
                    if ev is not None:
                        break
                if ev is None or ev.frame < 400:
                    delays.append(np.inf if ev is None else -1)
                    continue
                delays.append(ev.frame - 400)
                start = max(400, ev.evidence["estimated_change_frame"])
                seen = post[: ev.frame - 400 + 1]
                seen_ood = seen[ood[change][seen]] if start >= 400 else seen
                if len(seen_ood) == 0:
                    continue
                truth = "novel_class" if change == "new-classes" else "domain_shift"
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
        results["methods"][name] = row

    # Novelty accuracy from a full label budget's worth of OOD frames (what the runtime has
    # when the labels are in): 50 random OOD frames per trial.
    big = {k: {} for k in desc}
    for k, clf in novelty.items():
        for change in ("fog", "noise", "rotation", "new-classes"):
            pool = np.flatnonzero(ood[change])
            truth = "novel_class" if change == "new-classes" else "domain_shift"
            ok = [
                clf.classify(
                    desc[k][change][rng.choice(pool, min(50, len(pool)), replace=False)]
                ).kind
                == truth
                for _ in range(100)
            ]
            big[k][change] = float(np.mean(ok))
        big[k]["mean"] = float(np.mean(list(big[k].values())))
    results["novelty_50_frames"] = big

    print(
        f"\nfalse-alarm rate setting {args.false_alarm_rate:g}/frame; delays in frames after change"
    )
    hdr = f"{'method':13} {'FA/5000 ID':>10} | " + " | ".join(
        f"{c:>11} rate  med  p90  max miss" for c in ("fog", "noise", "rotation", "new-classes")
    )
    print(hdr)
    for method, row in results["methods"].items():
        cells = []
        for c in ("fog", "noise", "rotation", "new-classes"):
            r = row[c]
            cells.append(
                f"{'':>11} {r['post_ood_rate']:.2f} {r['median_delay'] or -1:4.0f} "
                f"{r['p90_delay'] or -1:4.0f} {r['max_delay'] or -1:4.0f} {r['missed']:4d}"
            )
        print(f"{method:13} {row['fa_per_5000']:10.3f} | " + " | ".join(cells))
    print("\nnovelty classifier accuracy at the flag (CUSUM), per descriptor:")
    for k in desc:
        accs = {
            c: results["methods"]["cusum"][c]["novelty_accuracy"].get(k)
            for c in ("fog", "noise", "rotation", "new-classes")
        }
        print(f"  {k:7} " + "  ".join(f"{c}={v:.2f}" for c, v in accs.items() if v is not None))
    print("novelty classifier accuracy with 50 OOD frames (label budget collected):")
    for k, v in big.items():
        print(f"  {k:7} " + "  ".join(f"{c}={a:.2f}" for c, a in v.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_drift.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / 'eval_drift.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
