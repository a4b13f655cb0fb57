"""Meta-learned fast adaptation (issue 12) on shifts held out of meta-training.

``python benchmarks/bench_meta.py --out DIR [--quick] [--meta-init PATH] [--families F,...]``

``--families`` as ``edge-runtime meta-train`` takes them: ``linear``, ``mlp``, ``conv`` (every
conv arch of the search space on encoder taps 10 and 13) or one conv arch by its file's name
(e.g. ``conv-t13-96x4x4-2x64``). A conv family reads its tap's map of the same frames (one
cached encoder pass per shift gives the pooled features and the maps). ``--lrs`` narrows the
baselines' learning-rate sweep (a conv cell costs ~20x a linear one).

Held-out shifts (:data:`edge_runtime.meta.episodes.HELD_OUT_SHIFTS`): Fashion-MNIST classes 0-5
under fog 4 and under Gaussian noise 3, the novel classes 6-9, and MNIST digits, all from
images (the test split, or MNIST) and corruptions/classes/sources that no meta-training episode
uses. For each, at 1, 5, 10 and 20 shots per class and 0, 1, 5, 20 and 100 steps:

* ``meta``: the family's meta-init (Proto-MAML head, meta-learned normaliser/gain/body) and
  that many SGD steps with the learned per-layer step sizes (what :class:`MetaInit` does);
* ``prototype``: PrototypeInit and that many Adam steps (train_adaptor), the learning rate
  tuned per (shots, steps) on these very held-out shifts: the most favourable baseline;
* ``random``: torch's default init, normaliser fitted on the shots, Adam steps, lr tuned;
* ``finetune``: a copy of the previous (base) adaptor, its normaliser kept; for a label set it
  does not cover, its head rows come from prototypes; Adam steps, lr tuned.

Accuracy is on the shift's remaining frames, averaged over draws of the shots. The detector
side: the new domain's HDC memory (the runtime's bank, base domain first) from the same shots,
its AUROC against the base and the other shifts' frames, and the TPR on its own held-out frames
at the bank's threshold and at the meta-learned corrected threshold (target: ``hdc.tpr``).
Base-domain accuracy is the base adaptor's on clean held-out frames before and after all of
it. Wall time: last label to trained head (MetaInit with its fast steps, plus the memory and
threshold) at the default label budget.

Writes ``DIR/bench_meta.json``, ``DIR/bench_meta.png`` and ``benchmarks/results_meta.md``.
Wrap the run in ``flock /tmp/edge-bench.lock`` where others benchmark on the same cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_setup import (
    add_config_args,
    build_encoder,
    config_source,
    machine_name,
    make_bank,
    runtime_config,
)

from edge_runtime.adapt.adaptor import Adaptor, AdaptorArch, build_adaptor, train_adaptor
from edge_runtime.adapt.init import MetaInit, PrototypeInit
from edge_runtime.encoder.export import spec_digest
from edge_runtime.hdc.metrics import auroc
from edge_runtime.meta.detector import domain_threshold
from edge_runtime.meta.episodes import (
    BASE_EVAL,
    HELD_OUT_SHIFTS,
    TRAIN_SHIFTS,
    Domain,
    domains_by_tap,
)
from edge_runtime.meta.maml import ProtoMAML, family_name
from edge_runtime.meta.store import MetaInitFile, find_meta_init, load_meta_init
from edge_runtime.meta.train import MetaTrainConfig, family_arch, family_archs, run_meta_train

SHOTS = (1, 5, 10, 20)
STEPS = (0, 1, 5, 20, 100)
LRS = (3e-3, 1e-2, 3e-2, 1e-1)
METHODS = ("meta", "prototype", "random", "finetune")
RESULTS_MD = Path(__file__).resolve().parent / "results_meta.md"


def _split(d: Domain, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``k`` shots per class, and the rest (the evaluation frames)."""
    shots, rest = [], []
    for c in d.classes:
        idx = rng.permutation(np.flatnonzero(d.labels == c))
        shots.append(idx[:k])
        rest.append(idx[k:])
    return np.concatenate(shots), np.concatenate(rest)


def _acc(a: Adaptor, x: np.ndarray, y: np.ndarray) -> float:
    return float((a.predict(x) == y).mean())


def _finetune_start(base: Adaptor, xs: np.ndarray, ys: np.ndarray) -> Adaptor:
    """A copy of the previous adaptor for this label set (its normaliser and body kept)."""
    label_map = sorted({int(v) for v in ys})
    if label_map == base.label_map:
        return copy.deepcopy(base)
    a = build_adaptor(base.arch, label_map)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    a.load_state_dict(state, strict=False)
    # Head rows from prototypes in the previous adaptor's feature space (no refit).
    with torch.no_grad():
        z = a.embed(a._as_tensor(xs))
        y = torch.from_numpy(a.to_local(ys))
        protos = torch.stack([z[y == c].mean(0) for c in range(a.n_classes)])
        scale = 1.0 / float(z.pow(2).sum(1).mean().clamp_min(1e-6))
        a.head.weight.copy_(2 * scale * protos)
        a.head.bias.copy_(-scale * protos.pow(2).sum(1))
    return a


def _run_method(
    method: str,
    arch: AdaptorArch,
    meta: MetaInitFile | None,
    base: Adaptor,
    xs: np.ndarray,
    ys: np.ndarray,
    steps: int,
    lr: float,
) -> tuple[Adaptor, float]:
    t0 = time.perf_counter()
    label_map = sorted({int(v) for v in ys})
    if method == "meta":
        assert meta is not None
        a = build_adaptor(arch, label_map)
        model = ProtoMAML(arch, meta.inner_steps)
        y = torch.from_numpy(a.to_local(ys))
        params, buffers = model.adapt(meta.meta, torch.from_numpy(xs), y, len(label_map), steps)
        model.install(a, params, buffers)
        return a.eval(), time.perf_counter() - t0
    if method == "finetune":
        a = _finetune_start(base, xs, ys)
    else:
        a = build_adaptor(arch, label_map)
        if method == "prototype":
            PrototypeInit().init(a, xs, ys)
        else:
            a.fit_normalizer(a._as_tensor(xs))
    if steps:
        train_adaptor(a, xs, ys, steps=steps, lr=lr, fit_normalizer=False)
    return a.eval(), time.perf_counter() - t0


def accuracy_grid(
    arch: AdaptorArch,
    meta: MetaInitFile | None,
    base: Adaptor,
    held: list[Domain],
    draws: int,
    seed: int,
    lrs: tuple[float, ...] = LRS,
) -> dict[str, Any]:
    """acc[method][shots][steps][lr] -> list over (domain, draw); wall times alike."""
    raw: dict[str, Any] = {}
    for k in SHOTS:
        rng = np.random.default_rng([seed, k])
        for d in held:
            for _ in range(draws):
                s, r = _split(d, k, rng)
                xs, ys, xe, ye = d.features[s], d.labels[s], d.features[r], d.labels[r]
                for method in METHODS:
                    if method == "meta" and meta is None:
                        continue
                    for steps in STEPS:
                        for lr in (0.0,) if method == "meta" or steps == 0 else lrs:
                            a, sec = _run_method(method, arch, meta, base, xs, ys, steps, lr)
                            cell = raw.setdefault(method, {}).setdefault(k, {})
                            cell = cell.setdefault(steps, {}).setdefault(lr, {})
                            cell.setdefault(d.name, []).append(_acc(a, xe, ye))
                            cell.setdefault("_seconds", []).append(sec)
    return raw


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Best lr per (method, shots, steps) by mean accuracy over shifts; per-shift means."""
    out: dict[str, Any] = {}
    for method, by_k in raw.items():
        for k, by_s in by_k.items():
            for steps, by_lr in by_s.items():
                best = None
                for lr, cell in by_lr.items():
                    per = {n: float(np.mean(v)) for n, v in cell.items() if n != "_seconds"}
                    mean = float(np.mean(list(per.values())))
                    if best is None or mean > best["accuracy"]:
                        best = {
                            "accuracy": mean,
                            "per_shift": per,
                            "lr": lr or None,
                            "seconds": float(np.median(cell["_seconds"])),
                        }
                out.setdefault(method, {}).setdefault(str(k), {})[str(steps)] = best
    return out


def detector_side(
    config: Any,
    spec: Any,
    base_train: Domain,
    base_eval: Domain,
    held: list[Domain],
    correction: Any,
    draws: int,
    seed: int,
) -> dict[str, Any]:
    """AUROC and TPR of each held-out shift's memory from few shots (and from 50 shots)."""
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    tpr = float(config.hdc.tpr)
    bank = make_bank(config, spec)
    bank.add_domain(0, base_train.features, base_train.labels)
    did = 1
    for budget in ("50", *[f"{k}/class" for k in SHOTS]):
        rows: dict[str, Any] = {}
        for d in held:
            others = np.concatenate(
                [base_eval.features, *[o.features for o in held if o.name != d.name]]
            )
            res: dict[str, list[float]] = {"auroc": [], "tpr": [], "tpr_corrected": []}
            for _ in range(draws):
                if budget == "50":
                    perm = rng.permutation(len(d.labels))
                    s, r = perm[:50], perm[50:]
                else:
                    s, r = _split(d, int(budget.split("/")[0]), rng)
                if len(s) < 2:
                    continue
                t_bank, t_corr = domain_threshold(bank, did, d.features[s], d.labels[s], correction)
                col = bank.domain_ids.index(did)
                id_scores = bank.scores(d.features[r])[:, col]
                ood_scores = bank.scores(others)[:, col]
                bank.remove_domain(did)
                res["auroc"].append(auroc(id_scores, ood_scores))
                res["tpr"].append(float((id_scores >= t_bank).mean()))
                res["tpr_corrected"].append(float((id_scores >= t_corr).mean()))
            rows[d.name] = {
                "auroc": float(np.mean(res["auroc"])) if res["auroc"] else None,
                "tpr": float(np.mean(res["tpr"])) if res["tpr"] else None,
                "tpr_corrected": float(np.mean(res["tpr_corrected"])) if res["tpr"] else None,
                "tpr_abs_error": float(np.mean(np.abs(np.array(res["tpr"]) - tpr)))
                if res["tpr"]
                else None,
                "tpr_corrected_abs_error": float(
                    np.mean(np.abs(np.array(res["tpr_corrected"]) - tpr))
                )
                if res["tpr"]
                else None,
            }
        out[budget] = rows
    out["target_tpr"] = tpr
    return out


def label_budget(
    config: Any,
    arch: AdaptorArch,
    meta_dir: Path,
    encoder_hash: str,
    held: list[Domain],
    draws: int,
    seed: int,
) -> dict[str, Any]:
    """Adaptor accuracy on each shift from the runtime's default budget without meta-init
    against a quarter of it with meta-init, both followed by the runtime's own training steps
    (adapt.steps Adam at adapt.lr): the adaptor-level part of the end-to-end budget bar."""
    steps, lr, full = (
        int(config.adapt.steps),
        float(config.adapt.lr),
        int(config.adapt.label_budget),
    )
    rows: dict[str, Any] = {}
    rng = np.random.default_rng([seed, 7])
    init = MetaInit(meta_dir, encoder_hash)
    for d in held:
        res: dict[str, list[float]] = {}
        for _ in range(draws):
            perm = rng.permutation(len(d.labels))
            for name, n, how in (
                (f"prototype, {full} labels", full, "prototype"),
                (f"prototype, {full // 4} labels", full // 4, "prototype"),
                (f"meta, {full // 4} labels, fast steps only", full // 4, "meta0"),
                (f"meta, {full // 4} labels", full // 4, "meta"),
                (f"meta, {full // 2} labels", full // 2, "meta"),
                (f"meta, {full} labels", full, "meta"),
            ):
                s, r = perm[:n], perm[n:]
                xs, ys = d.features[s], d.labels[s]
                a = build_adaptor(arch, sorted({int(v) for v in ys}))
                (PrototypeInit() if how == "prototype" else init).init(a, xs, ys)
                if how != "meta0":
                    train_adaptor(a, xs, ys, steps=steps, lr=lr, fit_normalizer=False)
                res.setdefault(name, []).append(_acc(a, d.features[r], d.labels[r]))
        rows[d.name] = {k: float(np.mean(v)) for k, v in res.items()}
    names = list(next(iter(rows.values())))
    rows["mean"] = {k: float(np.mean([rows[d.name][k] for d in held])) for k in names}
    return {"steps": steps, "lr": lr, "label_budget": full, "draws": draws, "rows": rows}


def wall_time(
    config: Any,
    spec: Any,
    encoder_hash: str,
    meta_dir: Path,
    arch: AdaptorArch,
    base_train: Domain,
    d: Domain,
    budget: int,
    repeats: int = 5,
    rows_of: Domain | None = None,
) -> dict[str, float]:
    """Seconds from the last label to the trained head and calibrated memory (median).
    ``rows_of``: the same frames in the adaptor's input space (a tap's maps) when ``d`` holds
    pooled features (which the memory always reads)."""
    init = MetaInit(meta_dir, encoder_hash)
    bank = make_bank(config, spec)
    bank.add_domain(0, base_train.features, base_train.labels)
    rng = np.random.default_rng(0)
    head, total = [], []
    for i in range(repeats):
        rows = rng.permutation(len(d.labels))[:budget]
        x, y = d.features[rows], d.labels[rows]
        xa = (rows_of or d).features[rows]
        t0 = time.perf_counter()
        a = build_adaptor(arch, sorted({int(v) for v in y}))
        init.init(a, xa, y)
        t1 = time.perf_counter()
        corr = init.correction(a)
        domain_threshold(bank, 100 + i, x, y, corr)
        t2 = time.perf_counter()
        bank.remove_domain(100 + i)
        head.append(t1 - t0)
        total.append(t2 - t0)
    return {
        "budget": budget,
        "head_seconds": float(np.median(head)),
        "head_and_memory_seconds": float(np.median(total)),
        "init": init.last.get("init", "?"),
        "torch_threads": torch.get_num_threads(),
    }


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHOTS), figsize=(4 * len(SHOTS), 3.4), sharey=True)
    xs = [s if s else 0.5 for s in STEPS]  # 0 steps drawn at 0.5 on the log axis
    for ax, k in zip(axes, SHOTS, strict=True):
        for method in METHODS:
            if method not in summary:
                continue
            ys = [100 * summary[method][str(k)][str(s)]["accuracy"] for s in STEPS]
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(s) for s in STEPS])
        ax.set_title(f"{k} shot{'s' if k > 1 else ''}/class")
        ax.set_xlabel("steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out shift accuracy (%)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="fewer draws, short meta-training")
    ap.add_argument("--meta-init", type=Path, default=None, help="meta-init folder to use")
    ap.add_argument(
        "--families",
        default="linear",
        help="comma-separated: linear, mlp, conv (taps 10/13) or a conv family's name",
    )
    ap.add_argument(
        "--lrs",
        default=",".join(str(v) for v in LRS),
        help="the baselines' Adam learning rates, tuned per cell (comma-separated)",
    )
    ap.add_argument("--draws", type=int, default=None, help="shot draws per shift and count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--retrain", action="store_true", help="meta-train here even if the cache has files"
    )
    ap.add_argument(
        "--wall-only",
        action="store_true",
        help="wall-time rows only (DIR/bench_meta_wall.json)",
    )
    add_config_args(ap)
    ap.add_argument(
        "--budget-only", action="store_true", help="label-budget rows only (merged on --render)"
    )
    ap.add_argument(
        "--render", type=Path, default=None, help="only re-render the markdown of a bench_meta.json"
    )
    ap.add_argument(
        "--md",
        type=Path,
        default=RESULTS_MD,
        help=f"where a full run writes its markdown (default {RESULTS_MD.name} here)",
    )
    args = ap.parse_args(argv)
    if args.render is not None:
        r = json.loads(args.render.read_text())
        for extra in ("bench_meta_budget.json", "bench_meta_wall.json"):
            p = args.render.parent / extra
            if p.is_file():
                r[extra.split("_")[-1].split(".")[0]] = json.loads(p.read_text())
        text = _markdown(r)
        print(text)
        args.md.write_text(text)
        return 0
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    # The grid is thousands of tiny full-batch steps: one thread each is several times faster
    # than two on shared cores. The wall-time rows below run at the runtime's own count.
    runtime_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = runtime_config(args)
    encoder = build_encoder(config)
    spec = encoder.spec
    ehash = spec_digest(spec)
    draws = args.draws or (2 if args.quick else 5)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    lrs = tuple(float(v) for v in args.lrs.split(",") if v.strip())
    archs = {
        family_name(a): a for f in families for a in family_archs(f, spec.dim, spec.input_size)
    }
    taps = tuple(sorted({a.tap for a in archs.values() if a.tap is not None}))
    # With taps: pooled features and every tap's maps of the same frames, one pass a shift.
    train_by = domains_by_tap(TRAIN_SHIFTS, encoder, taps, 200, 0, progress=True)
    evals_by = domains_by_tap((BASE_EVAL, *HELD_OUT_SHIFTS), encoder, taps, 200, 0, progress=True)
    train, evals = train_by[None], evals_by[None]
    base_train = train[0]
    base_eval, held = evals[0], evals[1:]

    # The meta-init: given, cached for this encoder, or trained now (and timed).
    meta_dir = args.meta_init
    meta_train_info: dict[str, Any] | None = None
    if meta_dir is None:
        found = [find_meta_init(ehash, a) for a in archs.values()]
        if all(p is not None for p in found) and not args.retrain:
            meta_dir = found[0].parent  # type: ignore[union-attr]
        else:
            # Trained here, timed, and kept out of the cache (a quick run must never become
            # the runtime's meta-init).
            cfg = MetaTrainConfig(iterations=150) if args.quick else MetaTrainConfig()
            meta_dir = args.out / "meta-init"
            info = run_meta_train(
                config,
                meta_dir,
                cfg,
                families=families,
                encoder=encoder,
                install=False,
                progress=False,
            )
            meta_train_info = {
                "families": {k: v["seconds"] for k, v in info["families"].items()},
                "iterations": cfg.iterations,
                "seconds": info["seconds"],
            }

    if args.budget_only:
        out = {
            family_name(a): label_budget(
                config, a, meta_dir, ehash, evals_by[a.tap][1:], draws, args.seed
            )
            for a in archs.values()
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_meta_budget.json").write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        return 0

    def walls_for(arch: AdaptorArch, tr: Any, shift: Any, shift_at_tap: Any) -> list[Any]:
        """Wall time from the last of 200 labels (5 fast steps), at 1 thread and the runtime's."""
        return [
            _threads(
                n, wall_time, config, spec, ehash, meta_dir, arch, tr, shift, 200, 5, shift_at_tap
            )
            for n in sorted({1, runtime_threads})
        ]

    if args.wall_only:
        walls = {
            family_name(a): walls_for(a, train[0], evals[1], evals_by[a.tap][1])
            for a in archs.values()
        }
        args.out.mkdir(parents=True, exist_ok=True)
        out = {"wall": walls, "loadavg": os.getloadavg(), "machine": machine_name()}
        (args.out / "bench_meta_wall.json").write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        return 0
    load_start = os.getloadavg()
    report: dict[str, Any] = {
        "command": "python benchmarks/bench_meta.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_name(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": config_source(args),
        "encoder_hash": ehash[:16],
        "held_out": [d.name for d in held],
        "meta_train": [s.name for s in TRAIN_SHIFTS],
        "meta_training": meta_train_info,
        "draws": draws,
        "lrs": list(lrs),
        "families": {},
    }
    base_arch = family_arch("linear", spec.dim)
    base = build_adaptor(base_arch, sorted(set(base_train.labels.tolist())))
    PrototypeInit().init(base, base_train.features, base_train.labels)
    train_adaptor(base, base_train.features, base_train.labels, steps=300, lr=1e-2)
    base_before = _acc(base, base_eval.features, base_eval.labels)

    for fam, arch in archs.items():
        meta = load_meta_init(meta_dir, ehash, arch)
        prev = base if arch == base_arch else _base_for(arch, train_by[arch.tap][0])
        raw = accuracy_grid(arch, meta, prev, evals_by[arch.tap][1:], draws, args.seed, lrs)
        summary = summarise(raw)
        bars = _bars(summary)
        report["families"][family_name(arch)] = {
            "meta_init": str(meta.path),
            "accuracy": summary,
            "bars": bars,
            "wall": walls_for(arch, base_train, held[0], evals_by[arch.tap][1]),
        }
        _plot(summary, args.out / f"bench_meta_{fam}.png")
        if fam == next(iter(archs)):
            _plot(summary, args.out / "bench_meta.png")
    first = load_meta_init(meta_dir, ehash, next(iter(archs.values())))
    report["detector"] = detector_side(
        config, spec, base_train, base_eval, held, first.correction, max(draws, 5) * 2, args.seed
    )
    report["base_accuracy"] = {
        "before": base_before,
        "after": _acc(base, base_eval.features, base_eval.labels),
    }
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["loadavg_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_meta.json").write_text(json.dumps(report, indent=2) + "\n")
    text = _markdown(report)
    print(text)
    if not args.quick:
        args.md.write_text(text)
    else:
        (args.out / "results_meta.md").write_text(text)
    return 0


def _threads(n: int, fn: Any, *args: Any) -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def _base_for(arch: AdaptorArch, base_train: Domain) -> Adaptor:
    """The previous adaptor of another family: trained on the base domain as the runtime would."""
    a = build_adaptor(arch, sorted(set(base_train.labels.tolist())))
    PrototypeInit().init(a, base_train.features, base_train.labels)
    train_adaptor(a, base_train.features, base_train.labels, steps=300, lr=1e-2)
    return a


def _bars(summary: dict[str, Any]) -> dict[str, Any]:
    m, p = summary.get("meta"), summary["prototype"]
    if m is None:
        return {}

    def acc(tbl: dict[str, Any], k: int, s: int) -> float:
        return 100 * tbl[str(k)][str(s)]["accuracy"]

    return {
        "5shot_5step_gain": acc(m, 5, 5) - acc(p, 5, 5),
        "1shot_5step_gain": acc(m, 1, 5) - acc(p, 1, 5),
        "5shot_meta5_minus_proto100": acc(m, 5, 5) - acc(p, 5, 100),
        "1shot_meta5_minus_proto100": acc(m, 1, 5) - acc(p, 1, 100),
    }


def _load_text(r: dict[str, Any]) -> str:
    load = r.get("loadavg_1min")
    if not load:
        return ""
    return (
        f", 1-min load average {load['start']:.1f} at start and {load['end']:.1f} at end "
        "(the 2 cores were shared with other jobs)"
    )


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "## Meta-learned fast adaptation (bench_meta)",
        "",
        f"`{r['command']}` — {r['machine']}, torch threads {r['torch_threads']}, {r['date']}, "
        f"{r['config']}, encoder {r['encoder_hash']}{_load_text(r)}. Held-out shifts: "
        f"{', '.join(r['held_out'])} (no episode uses their corruptions, classes or images); "
        f"{r['draws']} shot draws per shift. Accuracy = mean over the held-out shifts; "
        "baselines' Adam lr tuned per cell on these shifts"
        + (f" (from {r['lrs']})." if r.get("lrs") else "."),
        "",
    ]
    if r.get("meta_training"):
        mt = r["meta_training"]
        lines += [f"Meta-training: {mt['iterations']} iterations, seconds {mt['families']}.", ""]
    for fam, f in r["families"].items():
        acc = f["accuracy"]
        lines += [
            f"### {fam}",
            "",
            "| shots/class | method | " + " | ".join(f"{s} steps" for s in STEPS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in STEPS) + " |",
        ]
        for k in SHOTS:
            for method in METHODS:
                if method not in acc:
                    continue
                cells = [acc[method][str(k)][str(s)] for s in STEPS]
                row = " | ".join(_fmt(c["accuracy"]) for c in cells)
                lines.append(f"| {k} | {method} | {row} |")
        b = f["bars"]
        walls = "; ".join(
            f"{w['torch_threads']} thread(s): head {w['head_seconds'] * 1000:.1f} ms, head + "
            f"memory + threshold {w['head_and_memory_seconds'] * 1000:.1f} ms"
            for w in f["wall"]
        )
        w0 = f["wall"][0]
        lines += [
            "",
            f"Bars: 5 shots, 5 steps: meta − prototype = {b['5shot_5step_gain']:+.1f} points "
            f"(need ≥ +3); 1 shot: {b['1shot_5step_gain']:+.1f} (need ≥ +1.5); meta at 5 steps "
            f"− prototype at 100 steps, 5 shots: {b['5shot_meta5_minus_proto100']:+.1f} "
            "(need ≥ −1).",
            f"Wall time from the last of {w0['budget']} labels ({w0['init']} init), {walls} "
            "(bar ≤ 1 s).",
            "",
        ]
    det = r["detector"]
    lines += [
        f"### Detector (target TPR {100 * det['target_tpr']:.0f}%)",
        "",
        "| shots | shift | AUROC vs other domains | TPR bank threshold | TPR corrected |",
        "| --- | --- | --- | --- | --- |",
    ]
    for budget, rows in det.items():
        if budget == "target_tpr":
            continue
        for name, v in rows.items():
            lines.append(
                f"| {budget} | {name} | {_fmt(v['auroc'])} | {_fmt(v['tpr'])} | "
                f"{_fmt(v['tpr_corrected'])} |"
            )
    fifty = det["50"]
    tgt = det["target_tpr"]
    err_c = [abs(v["tpr_corrected"] - tgt) for v in fifty.values()]
    err_b = [abs(v["tpr"] - tgt) for v in fifty.values()]
    draw_c = [v["tpr_corrected_abs_error"] for v in fifty.values()]
    draw_b = [v["tpr_abs_error"] for v in fifty.values()]
    lines += [
        "",
        f"Threshold from 50 shots: mean TPR off target by {100 * np.mean(err_c):.1f} points "
        f"(worst shift {100 * max(err_c):.1f}) with the meta-learned correction, "
        f"{100 * np.mean(err_b):.1f} (worst {100 * max(err_b):.1f}) with the bank's own "
        f"threshold; one draw of 50 shots is off by {100 * np.mean(draw_c):.1f} points on "
        f"average corrected, {100 * np.mean(draw_b):.1f} uncorrected (bar: within 3 points).",
    ]
    if r.get("budget"):
        for fam, b in r["budget"].items():
            names = list(b["rows"]["mean"])
            lines += [
                "",
                f"Label budget ({fam}; each row then runs the runtime's {b['steps']} Adam steps at"
                f" lr {b['lr']} unless it says otherwise; adaptor accuracy on the shift's other "
                f"frames, {b['draws']} draws; routing and detection not included; "
                f"`--budget-only --draws {b['draws']}`, same DIR):",
                "",
                "| shift | " + " | ".join(names) + " |",
                "| --- | " + " | ".join("---" for _ in names) + " |",
            ]
            for shift, row in b["rows"].items():
                lines.append(f"| {shift} | " + " | ".join(_fmt(row[n]) for n in names) + " |")
    if r.get("wall"):
        lines += ["", "Wall time under the bench lock (`--wall-only`):"]
        for fam, ws in r["wall"]["wall"].items():
            for w in ws:
                lines.append(
                    f"- {fam}, {w['torch_threads']} thread(s), {w['budget']} labels, "
                    f"{w['init']} init: head {w['head_seconds'] * 1000:.1f} ms, head + memory + "
                    f"threshold {w['head_and_memory_seconds'] * 1000:.1f} ms"
                )
        lines.append(f"  (1/5/15-min load average then: {r['wall']['loadavg']})")
    ba = r["base_accuracy"]
    lines += [
        "",
        f"Base-domain accuracy (base adaptor, clean held-out frames): {_fmt(ba['before'])} before,"
        f" {_fmt(ba['after'])} after adaptation. Total {r['seconds']} s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
