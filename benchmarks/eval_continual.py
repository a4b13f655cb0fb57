"""Continual learning side by side on one stream and one label budget.

Every method sees the base training set and then, for each shift segment in order, the labels of
that segment's first ``--label-budget`` frames (200 by default: what an operator labels after a
drift flag). All methods work on the same frozen MobileNetV2 features (cached on disk).

* none      -- the base head only (trained on the base training set, never updated);
* naive-ft  -- one shared linear head over the whole label space, fine-tuned on each segment's
               labels in turn;
* replay    -- like naive-ft, plus a reservoir buffer (``--buffer`` frames) of everything seen
               before, mixed into every fine-tuning set;
* ewc       -- like naive-ft with an elastic-weight-consolidation penalty (diagonal Fisher of the
               previous tasks) on the head;
* joint     -- upper bound: one head trained on the base set plus every segment's labels at once;
* ours      -- per-domain adaptors + oracle-free routing through the HDC ``DomainMemoryBank``
               (calibrated k-NN scores, argmax). A labelled set mostly claimed by a known domain
               whose adaptor already labels it well is a return: no new adaptor. Encoder and
               bank are the runtime's, built from the runtime config by its own factories
               (``build_encoder``, ``make_bank``); it differs from the runtime in: no drift
               detector (labels are taken at the segment start for every method, so all
               compare on the same shots), no base replay in the new heads, and each linear
               head (the default architecture) trained from ``build_adaptor``'s start rather
               than the runtime's prototype initialiser.
* runtime   -- with ``--runtime``: the real ``edge-runtime run`` on the stream (drift detection,
               labels after its own flags), final per-segment accuracy from its metrics.json.

Every method works on the runtime config's encoder features (``--config`` / ``--profile``,
the built-in defaults otherwise); label budget, training steps and learning rate default to
the config's ``adapt`` section.

Metrics: final accuracy per segment on its held-out eval frames, their mean, and forgetting on
segment 0 (accuracy after base training minus final accuracy, in points).

    python benchmarks/eval_continual.py [--quick] [--stream S.npz] [--runtime] [--out DIR]
                                        [--config C.yaml | --profile NAME]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from eval_setup import (
    add_config_args,
    build_encoder,
    config_source,
    encoder_line,
    make_bank,
    runtime_config,
)
from torch import nn

from edge_runtime.adapt import AdaptorArch, DomainRegistry, Router, build_adaptor, train_adaptor
from edge_runtime.data import load_stream
from edge_runtime.data.scenario import build_scenario
from edge_runtime.encoder.cache import cached_features

# One line per method for the printed table; "ours" says where it differs from the runtime.
METHOD_NOTES = {
    "none": "base head only",
    "naive-ft": "one shared head fine-tuned on each segment's labels",
    "replay": "naive-ft + reservoir replay buffer",
    "ewc": "naive-ft + online EWC",
    "joint": "one shared head on all labels at once",
    "ours": (
        "per-domain adaptors + HDC routing, runtime config's encoder and bank; differs from "
        "the runtime in: no drift detector (labels at segment start), no base replay, "
        "no prototype initialiser"
    ),
    "runtime": "edge-runtime run on the same stream and config",
}
RETURN_FRACTION = 0.5  # same rule as the runtime: a labelled set mostly claimed by a domain ...
RETURN_ACCURACY = 0.6  # ... whose adaptor labels it this well is a return, not a new domain


def _acc(pred: np.ndarray, y: np.ndarray) -> float:
    return float((pred == y).mean()) if len(y) else float("nan")


def _train_head(head, x, y, steps, lr, seed, fisher=None, anchor=None, lam=0.0):
    """Full-batch Adam on a shared head; optional EWC penalty towards ``anchor``."""
    torch.manual_seed(seed)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(xt), yt)
        if fisher is not None:
            for n, p in head.named_parameters():
                loss = loss + lam * (fisher[n] * (p - anchor[n]).pow(2)).sum()
        loss.backward()
        opt.step()


def _fisher(head, x, y) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the head's log-likelihood on (x, y), per-sample averaged."""
    fisher = {n: torch.zeros_like(p) for n, p in head.named_parameters()}
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for i in range(0, len(xt), 1):
        head.zero_grad()
        nn.functional.cross_entropy(head(xt[i : i + 1]), yt[i : i + 1]).backward()
        for n, p in head.named_parameters():
            fisher[n] += p.grad.detach() ** 2
    return {n: f / len(xt) for n, f in fisher.items()}


class SharedHead(nn.Module):
    """A linear head over the whole label space with a fixed feature normaliser."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, n_labels: int):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(mean))
        self.register_buffer("sd", torch.as_tensor(std))
        self.fc = nn.Linear(len(mean), n_labels)

    def forward(self, x):
        return self.fc((x - self.mu) / self.sd)

    @torch.no_grad()
    def predict(self, x):
        return self(torch.as_tensor(x)).argmax(1).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stream", help="stream .npz (default: build the fashion-drift scenario)")
    ap.add_argument("--quick", action="store_true", help="fashion-drift-mini, fewer steps")
    ap.add_argument("--label-budget", type=int, help="default: adapt.label_budget")
    ap.add_argument("--buffer", type=int, default=200, help="replay buffer size")
    ap.add_argument("--ewc-lambda", type=float, default=100.0)
    ap.add_argument("--steps", type=int, help="default: adapt.steps")
    ap.add_argument("--lr", type=float, help="default: adapt.lr")
    ap.add_argument("--runtime", action="store_true", help="also run the real edge-runtime")
    ap.add_argument("--out", default="benchmarks/out")
    add_config_args(ap)
    args = ap.parse_args(argv)
    cfg = runtime_config(args)
    if args.label_budget is None:
        args.label_budget = cfg.adapt.label_budget
    if args.lr is None:
        args.lr = cfg.adapt.lr
    steps = 100 if args.quick else (cfg.adapt.steps if args.steps is None else args.steps)
    if args.stream:
        stream = load_stream(args.stream)
        name = Path(args.stream).stem
    else:
        name = "fashion-drift-mini" if args.quick else "fashion-drift"
        stream = build_scenario(name, seed=0)

    enc = build_encoder(cfg)
    torch.set_num_threads(1)  # tiny heads: one thread is fastest and leaves a core free
    t0 = time.time()
    f_train = cached_features(enc, stream.train_images, f"{name}-train", progress="train")
    f_stream = cached_features(enc, stream.images, f"{name}-stream", progress="stream")
    f_eval = cached_features(enc, stream.eval_images, f"{name}-eval", progress="eval")
    print(
        f"features ready in {time.time() - t0:.0f}s; runtime config = {config_source(args)}: "
        f"{encoder_line(enc)}"
    )
    y_train = stream.train_labels.astype(np.int64)
    n_seg = stream.num_segments
    # Labelled shots: the first label_budget frames of each shift segment.
    shots = []
    for s in range(n_seg):
        if not stream.segment_is_shift[s]:
            continue
        idx = np.flatnonzero(stream.segment == s)[: args.label_budget]
        shots.append((s, f_stream[idx], stream.labels[idx].astype(np.int64)))
    all_labels = sorted(
        set(y_train) | set(stream.labels.tolist()) | set(stream.eval_labels.tolist())
    )
    n_labels = max(all_labels) + 1
    mean, std = f_train.mean(0), f_train.std(0) + 1e-3 * f_train.std() + 1e-6
    seg0 = stream.eval_segment == 0

    def per_segment(pred: np.ndarray) -> list[float]:
        return [
            _acc(pred[stream.eval_segment == s], stream.eval_labels[stream.eval_segment == s])
            for s in range(n_seg)
        ]

    results: dict[str, dict] = {}

    def record(method: str, pred: np.ndarray, seg0_before: float, seconds: float) -> None:
        accs = per_segment(pred)
        results[method] = {
            "final_accuracy": accs,
            "mean": float(np.nanmean(accs)),
            "forgetting_seg0": 100.0 * (seg0_before - accs[0]),
            "seconds": seconds,
        }
        print(f"  {method:9} mean={results[method]['mean']:.3f} ({seconds:.1f}s)")

    # -- shared-head baselines -----------------------------------------------------------------
    def base_head(seed: int = 0) -> SharedHead:
        torch.manual_seed(seed)
        head = SharedHead(mean, std, n_labels)
        _train_head(head, f_train, y_train, steps, args.lr, seed)
        return head

    t = time.time()
    head = base_head()
    seg0_before = _acc(head.predict(f_eval[seg0]), stream.eval_labels[seg0])
    record("none", head.predict(f_eval), seg0_before, time.time() - t)

    t = time.time()
    head = base_head()
    for _, x, y in shots:
        _train_head(head, x, y, steps, args.lr, 0)
    record("naive-ft", head.predict(f_eval), seg0_before, time.time() - t)

    t = time.time()
    rng = np.random.default_rng(0)
    head = base_head()
    # Reservoir sampling over everything labelled so far (base set first).
    buf_x, buf_y, seen = [], [], 0
    for xi, yi in zip(f_train, y_train, strict=True):
        seen += 1
        if len(buf_x) < args.buffer:
            buf_x.append(xi), buf_y.append(yi)
        elif (j := rng.integers(seen)) < args.buffer:
            buf_x[j], buf_y[j] = xi, yi
    for _, x, y in shots:
        bx, by = np.stack(buf_x), np.asarray(buf_y)
        _train_head(head, np.concatenate([x, bx]), np.concatenate([y, by]), steps, args.lr, 0)
        for xi, yi in zip(x, y, strict=True):
            seen += 1
            if (j := rng.integers(seen)) < args.buffer:
                buf_x[j], buf_y[j] = xi, yi
    record("replay", head.predict(f_eval), seg0_before, time.time() - t)

    t = time.time()
    head = base_head()
    sub = np.random.default_rng(1).choice(len(f_train), min(500, len(f_train)), replace=False)
    fisher = _fisher(head, f_train[sub], y_train[sub])
    for _, x, y in shots:
        anchor = {n: p.detach().clone() for n, p in head.named_parameters()}
        _train_head(head, x, y, steps, args.lr, 0, fisher, anchor, args.ewc_lambda)
        new_f = _fisher(head, x, y)
        fisher = {n: fisher[n] + new_f[n] for n in fisher}  # online EWC: accumulate
    record("ewc", head.predict(f_eval), seg0_before, time.time() - t)

    t = time.time()
    xj = np.concatenate([f_train] + [x for _, x, _ in shots])
    yj = np.concatenate([y_train] + [y for _, _, y in shots])
    torch.manual_seed(0)
    head = SharedHead(mean, std, n_labels)
    _train_head(head, xj, yj, steps, args.lr, 0)
    record("joint", head.predict(f_eval), seg0_before, time.time() - t)

    # -- ours: per-domain adaptors + HDC routing -----------------------------------------------
    t = time.time()
    arch = AdaptorArch("linear", f_train.shape[1])
    reg = DomainRegistry(max_adaptors=16)
    bank = make_bank(cfg, enc.spec)
    base = build_adaptor(arch, sorted(set(y_train.tolist())))
    train_adaptor(base, f_train, y_train, steps, args.lr)
    dom, _ = reg.add(base, name="base", origin="base", kind="base")
    bank.add_domain(dom.id, f_train, y_train)
    router = Router()
    decisions = []
    for s, x, y in shots:
        dec = router.route(bank.calibrated_scores(x), bank.domain_ids)
        claimed = dec.domain[~dec.is_ood]
        if len(claimed) >= RETURN_FRACTION * len(x):
            best = int(np.bincount(claimed).argmax())
            d = reg.get(best)
            known = np.isin(y, d.labels)
            acc = float((d.adaptor.predict(x[known]) == y[known]).sum() / len(y))
            if acc >= RETURN_ACCURACY:
                decisions.append({"segment": s, "action": "return", "domain": best, "acc": acc})
                continue
        ad = build_adaptor(arch, sorted(set(y.tolist())), seed=s)
        train_adaptor(ad, x, y, steps, args.lr, seed=s)
        dom, _ = reg.add(ad, created_at_frame=int(np.flatnonzero(stream.segment == s)[0]))
        bank.add_domain(dom.id, x, y)
        decisions.append({"segment": s, "action": "new", "domain": dom.id})
    route = router.route(bank.calibrated_scores(f_eval), bank.domain_ids)
    pred = np.full(len(f_eval), -1, dtype=np.int64)
    for d in reg:
        m = route.domain == d.id
        if m.any():
            pred[m] = d.adaptor.predict(f_eval[m])
    record("ours", pred, seg0_before, time.time() - t)
    results["ours"]["decisions"] = decisions
    results["ours"]["routing_accuracy_hint"] = "domain per eval frame from HDC scores, no oracle"

    if args.runtime:
        results.update(_run_runtime(stream, name, Path(args.out), seg0_before, args))

    # -- report --------------------------------------------------------------------------------
    seg_names = [s.get("name", str(i)) for i, s in enumerate(stream.meta.get("segments", []))]
    if len(seg_names) != n_seg:
        seg_names = [f"seg{i}" for i in range(n_seg)]
    print(f"\nfinal accuracy per segment ({name}, {args.label_budget} labels per shift segment)")
    print(
        f"{'method':10}"
        + "".join(f"{s[:12]:>13}" for s in seg_names)
        + f"{'mean':>8}{'forget0':>9}"
    )
    for method, r in results.items():
        row = "".join(f"{a:13.3f}" for a in r["final_accuracy"])
        print(f"{method:10}{row}{r['mean']:8.3f}{r['forgetting_seg0']:9.1f}")
    print(
        "\n| method | what it is | "
        + " | ".join(seg_names)
        + " | mean | forgetting seg 0 |\n"
        + "| --- " * (len(seg_names) + 4)
        + "|"
    )
    for method, r in results.items():
        cells = " | ".join(f"{a:.3f}" for a in r["final_accuracy"])
        print(
            f"| {method} | {METHOD_NOTES.get(method, '')} | {cells} | {r['mean']:.3f} "
            f"| {r['forgetting_seg0']:.1f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "stream": name,
        "segments": seg_names,
        "label_budget": args.label_budget,
        "steps": steps,
        "methods": results,
    }
    (out / "eval_continual.json").write_text(json.dumps(payload, indent=2))
    _plot(results, seg_names, out / "eval_continual.png")
    print(f"wrote {out / 'eval_continual.json'} and {out / 'eval_continual.png'}")
    return 0


def _run_runtime(
    stream, name: str, out: Path, seg0_before: float, args: argparse.Namespace
) -> dict:
    """The real runtime through its CLI on the same stream and config; final accuracy from
    metrics.json."""
    from edge_runtime.cli import main as cli_main
    from edge_runtime.data import save_stream

    path = out / f"{name}.npz"
    save_stream(stream, path)
    run_dir = out / f"runtime-{name}"
    t = time.time()
    config = ["--config", args.config] if args.config else []
    config += ["--profile", args.profile] if args.profile else []
    rc = cli_main(["run", "--stream", str(path), "--out", str(run_dir), *config])
    if rc != 0:
        print(f"  runtime: edge-runtime run exited {rc}")
        return {}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    accs = [
        float("nan") if s["final_accuracy"] is None else float(s["final_accuracy"])
        for s in metrics["segments"]
    ]
    if np.nanmax(accs) > 1.0:  # the runtime reports accuracies in percent
        accs = [a / 100.0 for a in accs]
    print(f"  runtime   mean={np.nanmean(accs):.3f} ({time.time() - t:.1f}s)")
    return {
        "runtime": {
            "final_accuracy": accs,
            "mean": float(np.nanmean(accs)),
            "forgetting_seg0": float(metrics.get("forgetting", float("nan"))),
            "labels_used": metrics.get("labels_used"),
            "seconds": time.time() - t,
        }
    }


def _plot(results: dict, seg_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(seg_names)), 4))
    xs = np.arange(len(seg_names))
    for i, m in enumerate(methods):
        ax.bar(
            xs + i * width,
            results[m]["final_accuracy"],
            width,
            label=f"{m} (mean {results[m]['mean']:.2f})",
        )
    ax.set_xticks(xs + 0.4 - width / 2, seg_names)
    ax.set_ylabel("final accuracy on eval frames")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("Continual adaptation: final accuracy per segment")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
