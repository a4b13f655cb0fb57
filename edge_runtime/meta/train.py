"""The ``meta-train`` driver: episodes in, one meta-init file per family out.

For each family: Adam on the meta-parameters (:class:`~edge_runtime.meta.maml.MetaParams`),
one batch of ``tasks`` same-shaped episodes per iteration (the way and shot counts are drawn
per batch, so one meta-init serves 1 to 20 shots and 2 to 6 classes), with a progress bar and a
checkpoint every ``checkpoint_every`` iterations: a killed run started again with the same
arguments continues from its last checkpoint (the sampler's random state included, so the
resumed run draws the episodes the uninterrupted one would have drawn).

Families: ``linear`` (and opt-in ``mlp``) on the pooled features with plain few-shot episodes;
``conv``, one file per conv arch of the search space on encoder taps 10 and 13
(:func:`conv_family_archs`; a file is keyed by the exact arch), on the tap maps of the same
frames (:func:`~edge_runtime.meta.episodes.build_tap_domains`) with replay episodes shaped like
the runtime's build (:class:`~edge_runtime.meta.episodes.ReplayEpisodeSampler`).

Then the detector side: the threshold correction (:mod:`edge_runtime.meta.detector`), fitted on
the same training shifts through a memory bank built as the runtime builds it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from edge_runtime.adapt.adaptor import AdaptorArch, _torch_threads
from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.meta.episodes import Domain, EpisodeBatch, EpisodeSampler, ReplayEpisodeSampler
from edge_runtime.meta.maml import MetaParams, ProtoMAML, family_name, initial_meta_params
from edge_runtime.state.atomic import atomic_path, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class MetaTrainConfig:
    """Default size: about two minutes on one core for the linear family; a conv arch costs
    more (``conv_iterations`` outer steps of ``conv_tasks`` replay episodes: a second-order
    step through five fast steps of two 3x3 convs of width 64 costs ~0.5-1.5 s on one core,
    20 times a linear head's; 250 of them took 669-713 s each on 2 cores shared with four
    other jobs, benchmarks/RESULTS.md). The narrower and separable archs cost less."""

    iterations: int = 1500
    tasks: int = 8
    conv_iterations: int = 250
    conv_tasks: int = 4
    inner_steps: int = 5
    first_order: bool = False
    meta_lr: float = 3e-3
    n_way: tuple[int, ...] = (2, 3, 4, 5, 6)
    k_shot: tuple[int, ...] = (1, 2, 5, 10, 20)
    q_query: int = 10
    init_lr: float = 0.5
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 100
    eval_tasks: int = 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_arch(self, arch: AdaptorArch) -> MetaTrainConfig:
        """The size this arch trains at (a conv family: ``conv_iterations``/``conv_tasks``)."""
        if arch.kind != "conv":
            return self
        return replace(self, iterations=self.conv_iterations, tasks=self.conv_tasks)


@dataclass
class TrainResult:
    meta: MetaParams
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0


def _shape_rng(cfg: MetaTrainConfig, it: int) -> tuple[int, int]:
    """Way and shot of iteration ``it``: a pure function of (seed, it), so resuming is exact."""
    r = np.random.default_rng([cfg.seed, it])
    return int(r.choice(cfg.n_way)), int(r.choice(cfg.k_shot))


def fixed_batches(sampler: EpisodeSampler, cfg: MetaTrainConfig, count: int) -> list[EpisodeBatch]:
    """Validation batches: one per (way, shot) pair cycled, ``cfg.eval_tasks`` tasks each."""
    out = []
    pairs = [(w, k) for w in cfg.n_way for k in cfg.k_shot]
    for i in range(count):
        w, k = pairs[i % len(pairs)]
        out.append(sampler.batch(cfg.eval_tasks, _way(sampler, w), k, cfg.q_query))
    return out


def _way(sampler: EpisodeSampler, w: int) -> int:
    """The episode's way for a drawn ``w``. Replay episodes: ``w`` new classes up to one fewer
    than the base has, and from there on the shift case (0: every class, shared labels), so
    the default (2..6) gives 2-4 new classes in 60% of batches and a shift in 40%."""
    if isinstance(sampler, ReplayEpisodeSampler):
        return w if w < sampler.max_new else 0
    return min(w, min(len(d.classes) for d in sampler.domains))


@torch.no_grad()
def evaluate(
    model: ProtoMAML, meta: MetaParams, batches: Sequence[EpisodeBatch], steps: int | None = None
) -> tuple[float, float]:
    """Mean post-adaptation query loss and accuracy over ``batches``."""
    losses, accs = [], []
    for b in batches:
        with torch.enable_grad():  # the inner steps need gradients; nothing flows outward
            loss, acc = model.batch_loss(
                _detached(meta), b.xs, b.ys, b.xq, b.yq, b.n_way, steps, b.ws
            )
        losses.append(float(loss))
        accs.append(float(acc))
    return float(np.mean(losses)), float(np.mean(accs))


def _detached(meta: MetaParams) -> MetaParams:
    return MetaParams.from_tensors({k: v.detach() for k, v in meta.tensors().items()})


# ------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(
    path: Path,
    meta: MetaParams,
    opt: torch.optim.Optimizer,
    it: int,
    sampler: EpisodeSampler,
    history: list[dict[str, float]],
) -> None:
    tensors = {f"meta.{k}": v for k, v in meta.tensors().items()}
    leaves = meta.leaves()
    for i, p in enumerate(leaves):
        st = opt.state.get(p)
        if st:
            tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].detach().clone()
            tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].detach().clone()
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    with atomic_path(path.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
    state = {
        "iteration": it,
        "rng": sampler.rng.bit_generator.state,
        "history": history,
        "names": list(meta.tensors()),
    }
    atomic_write_json(path.with_suffix(".json"), state)


def _load_checkpoint(
    path: Path, meta: MetaParams, opt: torch.optim.Optimizer, sampler: EpisodeSampler
) -> tuple[int, list[dict[str, float]]]:
    jpath, tpath = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not (jpath.is_file() and tpath.is_file()):
        return 0, []
    try:
        state = json.loads(jpath.read_text())
        tensors = load_file(str(tpath))
    except (OSError, json.JSONDecodeError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"meta-train checkpoint {path} is unreadable ({exc})") from exc
    names = list(meta.tensors())
    if state.get("names") != names:
        raise CheckpointError(f"meta-train checkpoint {path} is for another family or config")
    with torch.no_grad():
        for leaf, name in zip(meta.leaves(), names, strict=True):
            leaf.copy_(tensors[f"meta.{name}"])
    for i, p in enumerate(meta.leaves()):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {
                "step": torch.tensor(float(tensors[f"opt.{i}.step"][0])),
                "exp_avg": tensors[f"opt.{i}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].clone(),
            }
    sampler.rng.bit_generator.state = state["rng"]
    return int(state["iteration"]), list(state.get("history", []))


# ------------------------------------------------------------------------------------ train
def meta_train_family(
    arch: AdaptorArch,
    sampler: EpisodeSampler,
    cfg: MetaTrainConfig,
    *,
    checkpoint: str | Path | None = None,
    val_batches: Sequence[EpisodeBatch] = (),
    progress: bool = True,
    stop_after: int | None = None,
    on_eval: Callable[[int, float, float], None] | None = None,
    threads: int | None = 1,
) -> TrainResult:
    """Meta-train one family. ``checkpoint``: a path stem (``.json`` + ``.safetensors``) to
    resume from and save to. ``stop_after``: stop early after that many iterations of this
    call (tests use it to simulate a kill). Runs on one torch thread: the tensors are small
    (tens of frames by ~1,300 features), and on 2 shared cores a second thread measured 5x
    slower per iteration (0.4 s vs 2.3 s, linear family, 8 tasks, with other jobs running)."""
    with _torch_threads(threads):
        return _meta_train_family(
            arch, sampler, cfg, checkpoint, val_batches, progress, stop_after, on_eval
        )


def _meta_train_family(
    arch: AdaptorArch,
    sampler: EpisodeSampler,
    cfg: MetaTrainConfig,
    checkpoint: str | Path | None,
    val_batches: Sequence[EpisodeBatch],
    progress: bool,
    stop_after: int | None,
    on_eval: Callable[[int, float, float], None] | None,
) -> TrainResult:
    if cfg.iterations <= 0 or cfg.tasks <= 0:
        raise InputError("iterations and tasks must be > 0")
    model = ProtoMAML(arch, cfg.inner_steps, cfg.first_order)
    prior = torch.from_numpy(
        np.mean([d.features.std(0) for d in sampler.domains], axis=0).astype(np.float32)
    )
    meta = initial_meta_params(arch, cfg.seed, cfg.init_lr, prior).requires_grad_()
    # The body learns slowly (a whole layer); the step sizes, gain and temperature are log-scale
    # scalars or vectors that tolerate (and need) a larger rate.
    opt = torch.optim.Adam(
        [
            {"params": list(meta.body.values()), "lr": cfg.meta_lr * 0.3},
            {
                "params": [
                    *meta.log_lr.values(),
                    meta.log_gain,
                    meta.log_scale,
                    meta.log_prior_std,
                    meta.log_kappa,
                ],
                "lr": cfg.meta_lr,
            },
        ]
    )
    ckpt = Path(checkpoint) if checkpoint is not None else None
    start, history = (0, []) if ckpt is None else _load_checkpoint(ckpt, meta, opt, sampler)
    if start:
        log.info("meta-train %s: resuming at iteration %d", family_name(arch), start)
    t0 = time.perf_counter()
    bar = tqdm(
        total=cfg.iterations,
        initial=start,
        desc=f"meta-train {family_name(arch)}",
        disable=not progress,
        leave=False,
    )
    for done, it in enumerate(range(start, cfg.iterations), start=1):
        w, k = _shape_rng(cfg, it)
        b = sampler.batch(cfg.tasks, _way(sampler, w), k, cfg.q_query)
        loss, acc = model.batch_loss(meta, b.xs, b.ys, b.xq, b.yq, b.n_way, ws=b.ws)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            # Keep step sizes and gains in a range where 5 steps cannot diverge.
            for v in meta.log_lr.values():
                v.clamp_(-8.0, 2.0)
            meta.log_gain.clamp_(-4.0, 2.0)
            meta.log_scale.clamp_(-3.0, 5.0)
            meta.log_kappa.clamp_(-5.0, 8.0)
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{float(acc):.3f}")
        last = it + 1 == cfg.iterations
        if val_batches and (last or (it + 1) % cfg.eval_every == 0):
            vl, va = evaluate(model, meta, val_batches)
            history.append({"iteration": it + 1, "val_loss": vl, "val_acc": va})
            if on_eval is not None:
                on_eval(it + 1, vl, va)
        if ckpt is not None and (last or (it + 1) % cfg.checkpoint_every == 0):
            _save_checkpoint(ckpt, meta, opt, it + 1, sampler, history)
        if stop_after is not None and done >= stop_after:
            if ckpt is not None:
                _save_checkpoint(ckpt, meta, opt, it + 1, sampler, history)
            break
    bar.close()
    return TrainResult(_detached(meta), history, time.perf_counter() - t0, start)


FAMILIES: tuple[str, ...] = ("linear", "mlp", "conv")
# The MLP family trains but does not yet pay: on the held-out shifts its meta-init was 4.9
# points below prototype init at 5 shots and 5 steps (benchmarks/bench_meta.py --families mlp),
# and a cached file would make MetaInit use it. Opt in with --families linear,mlp.
# The conv family is opt-in too (--families linear,conv): its 8 files took about 30 minutes of
# 2 shared cores, and in the runtime at 50 labels per drift the heads after the worker's
# training were no better than prototype-initialised ones (80.6 both on fashion-drift); what it
# changes is the head served before training ends -- better for a shift of known labels (fog
# served at 79-84% against 55%), worse for new label sets (benchmarks/RESULTS.md).
DEFAULT_FAMILIES: tuple[str, ...] = ("linear",)
MLP_HIDDEN = 128
#: The encoder taps whose conv adaptors are meta-trained: the zero-shot search picked conv
#: adaptors on blocks 10 and 13 for every drift of fashion-drift (benchmarks/RESULTS.md); the
#: 8x8 maps of blocks 3 and 6 cost four times as much per step and were not picked.
META_TAPS: tuple[int, ...] = (10, 13)


def conv_family_archs(input_size: int, taps: Sequence[int] = META_TAPS) -> list[AdaptorArch]:
    """The conv archs of the runtime's search space (:func:`default_space`) on ``taps``
    without input conditioning: one meta-init file each, since a file is keyed by the exact
    arch (its tap, map shape, convs, width, separability and activation)."""
    from edge_runtime.adapt.space import default_space

    return [
        a
        for a in default_space(1, input_size)
        if a.kind == "conv" and a.tap in set(taps) and a.condition == "none"
    ]


def family_archs(kind: str, in_dim: int, input_size: int) -> list[AdaptorArch]:
    """The archs a ``--families`` entry stands for: ``linear``, ``mlp``, ``conv`` (every arch
    of :func:`conv_family_archs`), or one conv family's exact name (e.g.
    ``conv-t13-96x4x4-2x64``, as :func:`family_name` writes it)."""
    if kind in ("linear", "mlp"):
        return [family_arch(kind, in_dim)]
    convs = conv_family_archs(input_size)
    if kind == "conv":
        return convs
    named = [a for a in convs if family_name(a) == kind]
    if not named:
        raise InputError(
            f"meta-train: unknown family {kind!r}; choose from {FAMILIES} or one of "
            f"{[family_name(a) for a in convs]}"
        )
    return named


def family_arch(kind: str, in_dim: int, hidden: int = MLP_HIDDEN) -> AdaptorArch:
    """The arch a pooled family name stands for on features of width ``in_dim``."""
    if kind == "linear":
        return AdaptorArch("linear", in_dim)
    if kind == "mlp":
        return AdaptorArch("mlp", in_dim, hidden=hidden, depth=1)
    raise InputError(f"meta-train: unknown pooled family {kind!r}; choose linear or mlp")


def episode_sampler(domains: list[Domain], tap: int | None, seed: int) -> EpisodeSampler:
    """A tap (conv) family's episodes carry base replay, as the runtime builds a new domain's
    adaptor on a tap: its shots plus replayed base frames, weighted half and half, with the
    replay's classes in the label map (a tap adaptor only ever serves such sets). Measured on
    fashion-drift (benchmarks/RESULTS.md, 2026-12-08), the fast steps still serve new label
    sets worse than prototypes do, and neither kind of episode moved the trained head's final
    accuracy. A pooled family keeps plain episodes: the base domain's head uses it too, on
    thousands of labels and no replay."""
    if tap is None:
        return EpisodeSampler(domains, seed)
    return ReplayEpisodeSampler(domains, seed)


# ------------------------------------------------------------------------------ the command
CORRECTION_SHOTS: tuple[int, ...] = (20, 50, 100, 200)


def fit_threshold_correction(
    config: Any,
    spec: Any,
    base: Any,
    domains: Sequence[Any],
    *,
    draws: int = 5,
    seed: int = 0,
) -> Any:
    """The detector correction, from shot sets of :data:`CORRECTION_SHOTS` on each training
    shift, scored by a bank built as the runtime builds it (base domain first)."""
    from edge_runtime.meta.detector import ThresholdCorrection, correction_episodes
    from edge_runtime.runtime import make_bank

    bank = make_bank(config, spec)
    bank.add_domain(0, base.features, base.labels)
    stats, targets = correction_episodes(
        bank,
        [(d.features, d.labels) for d in domains],
        CORRECTION_SHOTS,
        draws,
        float(config.hdc.tpr),
        seed,
    )
    return ThresholdCorrection.fit(stats, targets, float(config.hdc.tpr))


def run_meta_train(
    config: Any,
    out: str | Path,
    cfg: MetaTrainConfig,
    *,
    families: Sequence[str] = DEFAULT_FAMILIES,
    per_class: int = 200,
    install: bool = True,
    progress: bool = True,
    encoder: Any = None,
) -> dict[str, Any]:
    """``edge-runtime meta-train``: episodes from the runtime encoder's cached features, one
    meta-init per family in ``out`` (and in the cache for this encoder when ``install``), and
    ``out/meta_train.json`` describing the run."""
    from edge_runtime.encoder.export import spec_digest
    from edge_runtime.meta.episodes import TRAIN_SHIFTS, domains_by_tap
    from edge_runtime.meta.store import SUMMARY_NAME, meta_cache_dir, save_meta_init
    from edge_runtime.runtime import build_encoder

    t0 = time.perf_counter()
    out = Path(out)
    enc = encoder if encoder is not None else build_encoder(config)
    encoder_hash = spec_digest(enc.spec)
    archs = [
        a for kind in families for a in family_archs(kind, int(enc.spec.dim), enc.spec.input_size)
    ]
    taps = tuple(sorted({a.tap for a in archs if a.tap is not None}))
    # With taps, one encoder pass per shift gives the pooled features and every tap's map.
    by_tap = domains_by_tap(TRAIN_SHIFTS, enc, taps, per_class, cfg.seed, progress)
    domains = by_tap[None]
    t_features = time.perf_counter() - t0
    # Validation episodes come from the training shifts under another seed: the held-out shifts
    # stay unseen until benchmarks/bench_meta.py. A conv family's cost fewer batches (each is
    # ~20x a linear head's).
    val = {
        tap: fixed_batches(episode_sampler(ds, tap, cfg.seed + 1), cfg, 10 if tap is None else 4)
        for tap, ds in by_tap.items()
    }
    t1 = time.perf_counter()
    correction = fit_threshold_correction(config, enc.spec, domains[0], domains[1:], seed=cfg.seed)
    t_detector = time.perf_counter() - t1
    summary: dict[str, Any] = {
        "encoder_hash": encoder_hash,
        "config": cfg.to_dict(),
        "shifts": [s.name for s in TRAIN_SHIFTS],
        "per_class": per_class,
        "feature_seconds": round(t_features, 2),
        "detector_seconds": round(t_detector, 2),
        "detector": correction.to_dict(),
        "families": {},
    }
    for arch in archs:
        name = family_name(arch)
        acfg = cfg.for_arch(arch)
        sampler = episode_sampler(by_tap[arch.tap], arch.tap, cfg.seed)
        res = meta_train_family(
            arch,
            sampler,
            acfg,
            checkpoint=out / ".checkpoints" / name,
            val_batches=val[arch.tap],
            progress=progress,
        )
        training = {
            "config": acfg.to_dict(),
            "shifts": summary["shifts"],
            "seconds": round(res.seconds, 2),
            "resumed_from": res.resumed_from,
            "history": res.history,
        }
        paths = [
            save_meta_init(
                out,
                arch,
                res.meta,
                encoder_hash,
                inner_steps=acfg.inner_steps,
                first_order=acfg.first_order,
                correction=correction,
                training=training,
            )
        ]
        if install:
            paths.append(
                save_meta_init(
                    meta_cache_dir(encoder_hash),
                    arch,
                    res.meta,
                    encoder_hash,
                    inner_steps=acfg.inner_steps,
                    first_order=acfg.first_order,
                    correction=correction,
                    training=training,
                )
            )
        summary["families"][name] = {
            "files": [str(p) for p in paths],
            "seconds": round(res.seconds, 2),
            "history": res.history,
        }
        log.info("meta-train %s: %.1f s, files %s", name, res.seconds, [str(p) for p in paths])
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(out / SUMMARY_NAME, summary)
    return summary
