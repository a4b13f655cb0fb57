"""Zero-shot NAS for adaptors: do training-free proxies rank trained accuracy?

For each shift segment -- the ``fashion-drift`` shifts (fog, sensor noise, new classes 6-9,
MNIST digits, the clean return), plus heavy low-level ones (JPEG-like block artefacts + impulse
noise on digits, impulse noise on Fashion, pixelation + impulse noise on Fashion) -- draw the
label budget of shots (200 by default, class-balanced at random) and >= 1000 held-out frames of
the same transform. Every candidate of a sampled search space (the runtime's default space plus
random draws from the same families, >= 50 in all) is trained the way the runtime trains a new
head (``build_adaptor`` seed, ``PrototypeInit``, ``train_adaptor`` with ``adapt.steps`` /
``adapt.lr``; isolated adaptors on the shots only, no base replay, no routing) and evaluated on
the held-out frames. Every proxy is computed on the shots. Reported per proxy: Spearman and
Kendall correlation with trained accuracy (mean over segments); for the runtime's search
(``ZeroShotSearch`` with its default proxy): its pick's regret (points below the best candidate
in the same space and budget) and its wall time on the default space, tap inputs included
(uncached encoder passes over the shots). The fixed linear head on the pooled features is the
runtime's old adaptor.

    flock /tmp/edge-bench.lock python benchmarks/bench_nas.py --out DIR [--quick]
                                        [--config C.yaml | --profile NAME]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_setup import add_config_args, build_encoder, config_source, encoder_line, runtime_config

from edge_runtime.adapt.adaptor import AdaptorArch, build_adaptor, train_adaptor
from edge_runtime.adapt.init import PrototypeInit
from edge_runtime.adapt.nas import DEFAULT_PROXY, ZeroShotSearch
from edge_runtime.adapt.proxies import PROXIES, RankVote, proxy_names
from edge_runtime.adapt.search import ArrayInputs, EncodedInputs, SearchBudget
from edge_runtime.adapt.space import default_space, sample_space
from edge_runtime.data.corruptions import corrupt
from edge_runtime.data.scenario import SOURCES, get_scenario
from edge_runtime.encoder.backend import TAP_BLOCKS
from edge_runtime.encoder.cache import cached_encoded

#: Extra votes reported besides the registry's ``vote`` (snip + synflow + naswot).
EXTRA_VOTES = (
    "vote:synflow+jacob_cov+snip",  # the NAS-Bench-Suite-Zero vote (0.82 on NAS-Bench-201)
    "vote:ncm+snip",
    "vote:ncm+grad_norm",
    "vote:snip+grad_norm+ncm",
    "vote:ridge_loo+snip",
    "vote:ridge_loo+ncm",
    "vote:ridge_loo+grad_norm",
    "vote:lga+ncm",
    "vote:lga+grad_norm",
    "vote:lga+snip",
    "vote:lga+ridge_loo",
    "vote:entk_loo+lga",
    "vote:entk_loo+grad_norm",
    "vote:entk_loo+ncm",
)
CONDITIONS = ("none", "median3", "blur")
REFINE_PROXIES = ("entk_loo", "ncm", "vote:ncm+snip")


@dataclass
class Segment:
    name: str
    source: str
    classes: tuple[int, ...]
    transforms: tuple[tuple[str, int], ...]  # corruption chain (name, severity)


def segments() -> list[Segment]:
    spec = get_scenario("fashion-drift")
    out = []
    for seg in spec.segments:
        if not seg.is_shift:
            continue
        chain = ((seg.corruption, seg.severity),) if seg.corruption else ()
        out.append(Segment(seg.name, seg.source, seg.classes, chain))
    digits = tuple(range(10))
    fashion = tuple(range(6))
    out += [
        Segment(
            "digits-block+impulse", "mnist", digits, (("block_artifacts", 5), ("impulse_noise", 3))
        ),
        Segment("fashion-impulse", "fashion", fashion, (("impulse_noise", 4),)),
        Segment(
            "fashion-pixelate+impulse", "fashion", fashion, (("pixelate", 3), ("impulse_noise", 2))
        ),
    ]
    return out


def draw(seg: Segment, shots: int, n_eval: int, seed: int, used: dict[str, set[int]]):
    """Shots and eval frames of ``seg``: class-balanced, disjoint from earlier segments' draws."""
    src = SOURCES[seg.source]
    x, y = src.load_stream_split()
    rng = np.random.default_rng(seed)
    taken = used.setdefault(seg.source, set())
    pool = np.array([i for i in rng.permutation(len(y)) if y[i] in seg.classes and i not in taken])
    per = -(-(shots + n_eval) // len(seg.classes))
    picks = []
    for c in seg.classes:
        picks.append(pool[y[pool] == c][:per])
    idx = np.concatenate(picks)
    idx = idx[rng.permutation(len(idx))]
    shot_idx, eval_idx = idx[:shots], idx[shots : shots + n_eval]
    taken.update(idx[: shots + n_eval].tolist())
    images = np.ascontiguousarray(x[np.concatenate([shot_idx, eval_idx])])
    for k, (name, sev) in enumerate(seg.transforms):
        images = corrupt(images, name, sev, seed=seed + k)
    labels = y[np.concatenate([shot_idx, eval_idx])].astype(np.int64) + src.label_offset
    return images, labels, shots


def regret_of(
    scores: dict[str, list[float]],
    p: str,
    acc: np.ndarray,
    space: list[AdaptorArch],
    n_cls: int,
    idx: list[int],
) -> float:
    """Points lost picking by proxy ``p`` among ``idx`` (ties: fewer MACs, as the search). A
    vote is re-ranked within ``idx``: its ranks depend on the population, as in the search."""
    vote = PROXIES.get(p)
    if p.startswith("vote:"):
        vote = RankVote(tuple(p[5:].split("+")))
    if isinstance(vote, RankVote):
        sub = vote.aggregate({m: [scores[m][j] for j in idx] for m in vote.members})
    else:
        sub = [scores[p][j] for j in idx]
    t = min(range(len(idx)), key=lambda j: (-sub[j], space[idx[j]].macs(n_cls)))
    return float(acc[idx].max() - acc[idx[t]])


def spearman(a, b) -> float:
    r = stats.spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else 0.0


def kendall(a, b) -> float:
    r = stats.kendalltau(a, b).statistic
    return float(r) if np.isfinite(r) else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument(
        "--quick", action="store_true", help="2 segments, the 26 default candidates, 20 steps"
    )
    ap.add_argument("--proxy", default=DEFAULT_PROXY, help="the search's proxy (runtime default)")
    ap.add_argument("--candidates", type=int, default=None, help="sampled space size (>= 50)")
    ap.add_argument("--eval", type=int, default=None, help="held-out frames per segment")
    ap.add_argument("--steps", type=int, default=None, help="default: adapt.steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-max-macs", type=int, default=400_000)
    ap.add_argument(
        "--also-time",
        default=None,
        help="comma-separated proxy:refine_top specs whose default-space search is also timed",
    )
    ap.add_argument(
        "--rescore",
        default=None,
        help="an earlier bench_nas.json: reuse its trained accuracies, recompute proxies/search",
    )
    ap.add_argument(
        "--segments", default=None, help="comma-separated segment names (default: the six below)"
    )
    # One thread: tiny adaptors gain nothing from two, and the cores are shared.
    ap.add_argument("--threads", type=int, default=1)
    add_config_args(ap)
    args = ap.parse_args(argv)
    cfg = runtime_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shots = cfg.adapt.label_budget
    steps = args.steps or (20 if args.quick else cfg.adapt.steps)
    lr, schedule = cfg.adapt.lr, cfg.adapt.lr_schedule
    n_cand = args.candidates or (26 if args.quick else 50)
    n_eval = args.eval or (300 if args.quick else 1000)
    torch.set_num_threads(args.threads)

    enc = build_encoder(cfg)
    torch.set_num_threads(args.threads)
    feat_dim, size = enc.spec.dim, enc.spec.input_size
    # The random extras are capped at 400k MACs: 50 candidates x 6 segments x 300 full-batch
    # steps must fit in well under an hour on 2 shared cores.
    space = sample_space(n_cand, args.seed, feat_dim, size, max_macs=args.extra_max_macs)
    default = default_space(feat_dim, size)
    fixed = AdaptorArch("linear", feat_dim)
    segs = segments()
    if args.segments:
        wanted = args.segments.split(",")
    elif args.quick:
        wanted = ["fog", "digits-block+impulse"]
    else:
        # clean-return (the base domain again) and fashion-pixelate+impulse are left out of the
        # default run for time; --segments adds them.
        wanted = ["fog", "noise", "new-classes", "mnist", "digits-block+impulse", "fashion-impulse"]
    segs = [s for s in segs if s.name in wanted]
    old = None
    if args.rescore:
        # Same draws (seed, segment order), same space: only the proxies and the search rerun.
        prev = json.loads(Path(args.rescore).read_text())
        if prev["space"] != [a.to_dict() for a in space]:
            raise SystemExit(f"{args.rescore} was run on a different space")
        old = {s["segment"]: s for s in prev["segments"]}
        segs = [s for s in segs if s.name in old]
        steps = prev["config"]["steps"]
    plain = proxy_names(include_vote=False)
    votes = ["vote", *EXTRA_VOTES]
    print(
        f"bench_nas: {len(segs)} segments x {len(space)} candidates, {shots} shots, {n_eval} eval "
        f"frames, {steps} steps, lr {lr} ({schedule}); runtime config = {config_source(args)}: "
        f"{encoder_line(enc)}; search proxy {args.proxy}"
    )

    used: dict[str, set[int]] = {}
    per_seg: list[dict] = []
    for si, seg in enumerate(segs):
        images, labels, k = draw(seg, shots, n_eval, args.seed + 101 * si, used)
        tag = f"nas-{seg.name}-{len(images)}"
        t0 = time.time()
        enc_by_cond = {
            c: cached_encoded(enc, images, TAP_BLOCKS, c, f"{tag}-{c}", progress=f"{seg.name} {c}")
            for c in CONDITIONS
        }
        enc_s = time.time() - t0

        def rows(arch: AdaptorArch, part: slice, by_cond: dict = enc_by_cond) -> np.ndarray:
            e = by_cond[arch.condition]
            if arch.tap is None:
                return e.features[part]
            m = e.maps[arch.tap]
            return m[part].reshape(len(m[part]), -1)

        ys, ye = labels[:k], labels[k:]
        label_map = sorted({int(v) for v in ys})
        accs, scores, train_s = [], {p: [] for p in plain}, []
        bar = tqdm(space, desc=f"{seg.name}", unit="cand", leave=False)
        for arch in bar:
            xs, xe = rows(arch, slice(0, k)), rows(arch, slice(k, None))
            # Proxies: exactly what ZeroShotSearch computes (same seed, normaliser on the shots).
            probe = build_adaptor(arch, label_map, seed=0)
            xt = torch.as_tensor(xs, dtype=torch.float32)
            yt = torch.from_numpy(probe.to_local(ys))
            probe.fit_normalizer(xt)
            for p in plain:
                scores[p].append(float(PROXIES[p](probe, xt, yt)))
            if old is not None:  # --rescore: the trained accuracies of an earlier run
                accs.append(float(old[seg.name]["accuracy"][len(accs)]))
                continue
            # Trained accuracy: the runtime's recipe.
            t = time.perf_counter()
            model = build_adaptor(arch, label_map, seed=0)
            PrototypeInit().init(model, xs, ys)
            train_adaptor(
                model, xs, ys, steps=steps, lr=lr, seed=0, fit_normalizer=False, schedule=schedule
            )
            train_s.append(time.perf_counter() - t)
            accs.append(float((model.predict(xe) == ye).mean()) * 100.0)
        for v in votes:
            vote = PROXIES[v] if v in PROXIES else RankVote(tuple(v[5:].split("+")))
            scores[v] = vote.aggregate(scores)
        acc = np.asarray(accs)

        # The runtime's search, on the sampled space (arrays in hand) and on the default space.
        pooled_inputs = ArrayInputs(
            enc_by_cond["none"].features[:k],
            {(t, c): enc_by_cond[c].maps[t][:k] for c in CONDITIONS for t in TAP_BLOCKS}
            | {(None, c): enc_by_cond[c].features[:k] for c in CONDITIONS},
        )
        max_params = getattr(cfg.adapt, "max_adaptor_params", None)
        budget = SearchBudget(max_params=max_params)
        in_budget = [i for i, a in enumerate(space) if budget.allows(a, len(label_map))]
        res = ZeroShotSearch(space=space, proxy=args.proxy).search(
            pooled_inputs, ys, label_map, budget
        )
        pick = space.index(res.arch)
        # Prune-then-refine (not training-free): the proxy's top 3, 40 steps each on 3/4 of the
        # shots, best on the other 1/4. Reported apart from the pure proxies.
        refine = {}
        for p in REFINE_PROXIES:
            r = ZeroShotSearch(space=space, proxy=p, refine_top=3).search(
                pooled_inputs, ys, label_map, budget
            )
            i = space.index(r.arch)
            refine[p] = {
                "pick": r.arch.label(),
                "accuracy": float(acc[i]),
                "regret_points": float(acc[in_budget].max() - acc[i]),
                "seconds": r.report["seconds"],
            }
        d_idx = [space.index(a) for a in default if a in space and budget.allows(a, len(label_map))]
        timings = {}
        for spec in filter(None, (args.also_time or "").split(",")):
            name, _, top = spec.rpartition(":")
            t = time.perf_counter()
            fresh = EncodedInputs(enc, images[:k], enc_by_cond["none"].features[:k])
            r = ZeroShotSearch(proxy=name, input_size=size, refine_top=int(top)).search(
                fresh, ys, label_map, budget
            )
            timings[spec] = {
                "seconds": time.perf_counter() - t,
                "pick": r.arch.label(),
                "regret_points": (
                    float(max(acc[d_idx]) - acc[space.index(r.arch)]) if r.arch in space else None
                ),
            }
        t = time.perf_counter()
        live = EncodedInputs(enc, images[:k], enc_by_cond["none"].features[:k])
        res_d = ZeroShotSearch(space=None, proxy=args.proxy, input_size=size).search(
            live, ys, label_map, budget
        )
        search_s = time.perf_counter() - t
        pick_d = space.index(res_d.arch) if res_d.arch in space else None

        fixed_acc = float(acc[space.index(fixed)])
        detail = {
            "segment": seg.name,
            "source": seg.source,
            "transforms": [list(t) for t in seg.transforms],
            "shots": k,
            "eval_frames": len(ye),
            "accuracy": [round(a, 2) for a in accs],
            "scores": scores,
            "spearman": {p: spearman(scores[p], acc) for p in scores},
            "kendall": {p: kendall(scores[p], acc) for p in scores},
            "best": {
                "arch": space[in_budget[int(acc[in_budget].argmax())]].label(),
                "accuracy": float(acc[in_budget].max()),
            },
            "best_overall": float(acc.max()),
            "fixed_linear_accuracy": fixed_acc,
            "pick": {"arch": space[pick].label(), "accuracy": float(acc[pick])},
            "regret_points": float(acc[in_budget].max() - acc[pick]),
            "budget": budget.to_dict(),
            "regret_by_proxy": {
                p: regret_of(scores, p, acc, space, len(label_map), in_budget) for p in scores
            },
            "default_space": {
                "pick": res_d.arch.label(),
                "accuracy": None if pick_d is None else float(acc[pick_d]),
                "best": space[d_idx[int(np.argmax(acc[d_idx]))]].label(),
                "regret_points": None if pick_d is None else float(max(acc[d_idx]) - acc[pick_d]),
                "regret_by_proxy": {
                    p: regret_of(scores, p, acc, space, len(label_map), d_idx) for p in scores
                },
                "search_seconds": search_s,
                "encoder_passes": live.passes,
                "report": res_d.report,
            },
            "refine_top3": refine,
            "search_timings": timings,
            "gain_best_over_fixed": float(acc.max() - fixed_acc),
            "gain_pick_over_fixed": float(acc[pick] - fixed_acc),
            "train_seconds_total": float(sum(train_s)) if old is None else None,
            "encode_seconds": enc_s,
        }
        per_seg.append(detail)
        rho = detail["spearman"]
        print(
            f"  {seg.name:26} fixed {fixed_acc:5.1f}  best {acc.max():5.1f} "
            f"({detail['best']['arch']})  pick {acc[pick]:5.1f} ({space[pick].label()})  "
            f"regret {detail['regret_points']:.1f}  default-space regret "
            f"{detail['default_space']['regret_by_proxy'][args.proxy]:.1f} in {search_s:.2f}s  "
            f"rho {args.proxy} {rho[args.proxy]:.2f} snip {rho['snip']:.2f} "
            f"params {rho['params']:.2f}  train {sum(train_s):.0f}s"
        )

        _write(out, per_seg, space, args, enc, shots, n_eval, steps, lr, schedule, plain + votes)
    _write(
        out,
        per_seg,
        space,
        args,
        enc,
        shots,
        n_eval,
        steps,
        lr,
        schedule,
        plain + votes,
        final=True,
    )
    return 0


def _write(
    out, per_seg, space, args, enc, shots, n_eval, steps, lr, schedule, names, final=False
) -> None:
    """The JSON after every segment (a long run interrupted still leaves its numbers); the
    table and the PNG at the end."""
    feat_dim, size = enc.spec.dim, enc.spec.input_size
    default = default_space(feat_dim, size)
    summary = {
        "spearman": {p: float(np.mean([s["spearman"][p] for s in per_seg])) for p in names},
        "kendall": {p: float(np.mean([s["kendall"][p] for s in per_seg])) for p in names},
        "regret_points": float(np.median([s["regret_points"] for s in per_seg])),
        "regret_points_default_space": float(
            np.median([s["default_space"]["regret_by_proxy"][args.proxy] for s in per_seg])
        ),
        "regret_by_proxy": {
            p: float(np.median([s["regret_by_proxy"][p] for s in per_seg])) for p in names
        },
        "regret_by_proxy_default_space": {
            p: float(np.median([s["default_space"]["regret_by_proxy"][p] for s in per_seg]))
            for p in names
        },
        "search_seconds": float(np.median([s["default_space"]["search_seconds"] for s in per_seg])),
        "search_seconds_max": float(
            np.max([s["default_space"]["search_seconds"] for s in per_seg])
        ),
        "regret_points_refine_top3": {
            p: float(np.median([s["refine_top3"][p]["regret_points"] for s in per_seg]))
            for p in REFINE_PROXIES
        },
        "candidates": len(space),
        "default_space_candidates": len(default),
        "proxy": args.proxy,
        "fixed_linear_accuracy": {s["segment"]: s["fixed_linear_accuracy"] for s in per_seg},
    }
    payload = {
        **summary,
        "config": {
            "shots": shots,
            "eval_frames": n_eval,
            "steps": steps,
            "lr": lr,
            "lr_schedule": schedule,
            "threads": args.threads,
            "quick": args.quick,
            "encoder": encoder_line(enc),
            "runtime_config": config_source(args),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": final,
            "rescored_from": args.rescore,
        },
        "space": [a.to_dict() for a in space],
        "segments": per_seg,
    }
    (out / "bench_nas.json").write_text(json.dumps(payload, indent=1))
    if not final:
        return

    print("\n  proxy                    spearman  kendall  regret(sampled)  regret(default)")
    for p in sorted(names, key=lambda q: -summary["spearman"][q]):
        mark = "  <- search" if p == args.proxy else ""
        print(
            f"  {p:24} {summary['spearman'][p]:8.3f} {summary['kendall'][p]:8.3f} "
            f"{summary['regret_by_proxy'][p]:16.2f} "
            f"{summary['regret_by_proxy_default_space'][p]:16.2f}{mark}"
        )
    print(
        f"median regret {summary['regret_points']:.2f} points (sampled space), "
        f"{summary['regret_points_default_space']:.2f} (default space); median search "
        f"{summary['search_seconds']:.2f}s, max {summary['search_seconds_max']:.2f}s "
        f"({len(default)} candidates, tap inputs included)"
    )
    _plot(per_seg, args.proxy, out / "bench_nas.png")
    print(f"wrote {out / 'bench_nas.json'} and {out / 'bench_nas.png'}")


def _plot(per_seg: list[dict], proxy: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [proxy, "snip", "grad_norm", "params"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4))
    for ax, p in zip(axes, shown, strict=True):
        for s in per_seg:
            ax.scatter(s["scores"][p], s["accuracy"], s=10, label=s["segment"])
        rho = np.mean([s["spearman"][p] for s in per_seg])
        ax.set_title(f"{p} (mean Spearman {rho:.2f})")
        ax.set_xlabel(f"{p} score on the shots")
        if p in ("params",):
            ax.set_xscale("log")
    axes[0].set_ylabel("trained accuracy on held-out frames (%)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
