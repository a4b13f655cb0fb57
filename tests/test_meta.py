"""Meta-learned initialisation (issue 12): Proto-MAML core, meta-init files, MetaInit, detector.

Everything runs on synthetic features shaped like the real problem: each class has a mean in a
small informative subspace, most channels are high-variance noise, and every domain applies its
own shift and rescaling (a corruption). A learner that finds which channels to trust adapts
better from few shots, which is what meta-training must discover.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_runtime.adapt.adaptor import AdaptorArch, build_adaptor
from edge_runtime.adapt.init import INITIALIZERS, MetaInit, PrototypeInit, make_initializer
from edge_runtime.adapt.space import conv_arch
from edge_runtime.errors import CheckpointError, ConfigError, InputError
from edge_runtime.meta.detector import ThresholdCorrection, shot_statistics
from edge_runtime.meta.episodes import (
    BASE_CLASSES,
    Domain,
    EpisodeSampler,
    ReplayEpisodeSampler,
    ShiftSpec,
    build_tap_domains,
    shift_images,
)
from edge_runtime.meta.maml import ProtoMAML, expected_shapes, family_name, initial_meta_params
from edge_runtime.meta.store import find_meta_init, load_meta_init, meta_cache_dir, save_meta_init
from edge_runtime.meta.train import MetaTrainConfig, evaluate, fixed_batches, meta_train_family

DIM, INFO = 48, 8
HASH = "ab" * 32
OTHER_HASH = "cd" * 32


def _domains(classes: range, n_domains: int, seed: int, per_class: int = 40) -> list[Domain]:
    rng = np.random.default_rng(seed)
    class_rng = np.random.default_rng(1234)  # class means are shared by every domain
    means = np.zeros((40, DIM))
    means[:, :INFO] = class_rng.normal(0, 1.0, (40, INFO))
    out = []
    for d in range(n_domains):
        shift = rng.normal(0, 2.0, DIM)
        scale = rng.uniform(0.5, 2.0, DIM)
        xs, ys = [], []
        for c in classes:
            noise = rng.normal(0, 1.0, (per_class, DIM))
            noise[:, INFO:] *= 3.0  # the uninformative channels are the loud ones
            xs.append((means[c] + noise) * scale + shift)
            ys += [c] * per_class
        out.append(Domain(f"d{d}", np.concatenate(xs).astype(np.float32), np.asarray(ys)))
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)


CFG = MetaTrainConfig(
    iterations=30,
    tasks=4,
    inner_steps=2,
    n_way=(3, 4),
    k_shot=(1, 5),
    q_query=8,
    meta_lr=3e-2,
    eval_tasks=8,
)


def _trained(arch: AdaptorArch, iterations: int = 30):
    sampler = EpisodeSampler(_domains(range(0, 20), 6, seed=0), seed=0)
    cfg = MetaTrainConfig(**{**CFG.to_dict(), "iterations": iterations})
    return meta_train_family(arch, sampler, cfg, progress=False), cfg


@pytest.mark.parametrize("arch", [AdaptorArch("linear", DIM), AdaptorArch("mlp", DIM, 16, 1)])
def test_meta_training_lowers_heldout_post_adaptation_loss(arch: AdaptorArch) -> None:
    result, cfg = _trained(arch)
    # Held out: classes 20-29 and domains (shift, scale) never seen in an episode.
    held = EpisodeSampler(_domains(range(20, 30), 4, seed=99), seed=5)
    batches = fixed_batches(held, cfg, 4)
    model = ProtoMAML(arch, cfg.inner_steps)
    prior = torch.from_numpy(np.mean([d.features.std(0) for d in held.domains], 0))
    before, acc0 = evaluate(model, initial_meta_params(arch, cfg.seed, cfg.init_lr, prior), batches)
    after, acc1 = evaluate(model, result.meta, batches)
    assert after < before - 0.05, (before, after)
    assert acc1 > acc0


def test_vmap_matches_a_loop_and_first_order_has_gradients() -> None:
    arch = AdaptorArch("mlp", DIM, 8, 1)
    sampler = EpisodeSampler(_domains(range(0, 6), 2, seed=1), seed=1)
    b = sampler.batch(3, 3, 2, 4)
    meta = initial_meta_params(arch).requires_grad_()
    model = ProtoMAML(arch, 2)
    batched, _ = model.batch_loss(meta, b.xs, b.ys, b.xq, b.yq, 3)
    loop = torch.stack(
        [model.query_loss(meta, b.xs[i], b.ys[i], b.xq[i], b.yq[i], 3)[0] for i in range(3)]
    ).mean()
    assert torch.allclose(batched, loop, atol=1e-5)
    fo = ProtoMAML(arch, 2, first_order=True)
    loss, _ = fo.batch_loss(meta, b.xs, b.ys, b.xq, b.yq, 3)
    loss.backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in meta.leaves())


def test_checkpoint_resume_is_exact(tmp_path: Path) -> None:
    arch = AdaptorArch("linear", DIM)
    cfg = MetaTrainConfig(**{**CFG.to_dict(), "iterations": 5, "checkpoint_every": 100})

    def sampler() -> EpisodeSampler:
        return EpisodeSampler(_domains(range(0, 10), 3, seed=2), seed=3)

    whole = meta_train_family(arch, sampler(), cfg, progress=False)
    ck = tmp_path / "ck" / "linear"
    meta_train_family(arch, sampler(), cfg, checkpoint=ck, progress=False, stop_after=2)
    resumed = meta_train_family(arch, sampler(), cfg, checkpoint=ck, progress=False)
    assert resumed.resumed_from == 2
    for k, v in whole.meta.tensors().items():
        assert torch.allclose(v, resumed.meta.tensors()[k], atol=1e-6), k


# ---------------------------------------------------------------------------------- files
def _saved(tmp_path: Path, arch: AdaptorArch, encoder_hash: str = HASH) -> Path:
    meta = initial_meta_params(arch, seed=1)
    corr = ThresholdCorrection(coef=np.arange(6) * 0.01, tpr=0.95, fitted_on=10)
    return save_meta_init(
        tmp_path / "out", arch, meta, encoder_hash, inner_steps=4, correction=corr
    )


def test_meta_init_file_round_trips(tmp_path: Path) -> None:
    arch = AdaptorArch("mlp", DIM, 16, 1)
    path = _saved(tmp_path, arch)
    manifest = json.loads(path.read_text())
    assert manifest["format_version"] == 1 and manifest["encoder_hash"] == HASH
    assert manifest["family"] == family_name(arch) == f"mlp-{DIM}-16x1"
    loaded = load_meta_init(path, HASH)
    want = initial_meta_params(arch, seed=1).tensors()
    got = loaded.meta.tensors()
    assert set(got) == set(want) == set(expected_shapes(arch))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.inner_steps == 4 and loaded.arch == arch
    assert loaded.correction is not None and np.allclose(
        loaded.correction.coef, np.arange(6) * 0.01
    )
    # The directory form finds the family's file; the .safetensors path finds its manifest.
    assert load_meta_init(path.parent, HASH, arch).family == loaded.family
    assert load_meta_init(path.with_suffix(".safetensors"), HASH).family == loaded.family


def test_meta_init_file_for_another_encoder_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path, AdaptorArch("linear", DIM), encoder_hash=OTHER_HASH)
    with pytest.raises(CheckpointError, match=r"learned on encoder cdcd.*this encoder is abab"):
        load_meta_init(path, HASH)
    with pytest.raises(CheckpointError, match="family"):
        load_meta_init(path, OTHER_HASH, AdaptorArch("mlp", DIM, 16, 1))


def test_corrupt_meta_init_files_are_refused(tmp_path: Path) -> None:
    arch = AdaptorArch("linear", DIM)
    path = _saved(tmp_path, arch)
    tensors = path.with_suffix(".safetensors")
    blob = bytearray(tensors.read_bytes())
    blob[-5] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        load_meta_init(path, HASH)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_meta_init(path, HASH)
    # A well-formed file whose tensors do not fit the family it claims.
    other = _saved(tmp_path / "b", AdaptorArch("linear", DIM + 1))
    manifest = json.loads(other.read_text())
    manifest["arch"]["in_dim"] = DIM
    manifest["family"] = family_name(arch)
    other.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="do not fit family"):
        load_meta_init(other, HASH)
    manifest["format_version"] = 99
    other.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_meta_init(other, HASH)


# -------------------------------------------------------------------------------- MetaInit
def _shots(n_per_class: int = 5, classes: range = range(3, 7)) -> tuple[np.ndarray, np.ndarray]:
    d = _domains(classes, 1, seed=7, per_class=n_per_class)[0]
    return d.features, d.labels


def test_meta_init_falls_back_to_prototypes_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    arch = AdaptorArch("linear", DIM)
    x, y = _shots()
    label_map = sorted(set(y.tolist()))
    a, b = build_adaptor(arch, label_map), build_adaptor(arch, label_map)
    init = MetaInit(encoder_hash=HASH)
    with caplog.at_level(logging.INFO, logger="edge_runtime.adapt.init"):
        init.init(a, x, y)
    assert "using prototype init" in caplog.text and family_name(arch) in caplog.text
    PrototypeInit().init(b, x, y)
    assert torch.equal(a.head.weight, b.head.weight)
    assert init.last["init"] == "prototype"
    assert "meta" in INITIALIZERS and isinstance(make_initializer("meta"), MetaInit)


def test_meta_init_found_in_cache_by_encoder_hash_adapts() -> None:
    arch = AdaptorArch("linear", DIM)
    result, _ = _trained(arch, iterations=10)
    save_meta_init(meta_cache_dir(HASH), arch, result.meta, HASH, inner_steps=2)
    assert find_meta_init(HASH, arch) is not None
    assert find_meta_init(OTHER_HASH, arch) is None
    x, y = _shots(50)  # the runtime's default budget, 200 shots
    adaptor = build_adaptor(arch, sorted(set(y.tolist())))
    init = MetaInit(encoder_hash=HASH)
    init.init(adaptor, x, y)
    assert init.last["init"] == "meta" and init.last["fast_steps"] == 2
    assert init.last["seconds"] < 1.0
    assert (adaptor.predict(x) == y).mean() > 0.8
    # Another encoder's runtime finds nothing and falls back.
    other = MetaInit(encoder_hash=OTHER_HASH)
    other.init(build_adaptor(arch, sorted(set(y.tolist()))), x, y)
    assert other.last["init"] == "prototype"


def test_configured_meta_init_that_is_wrong_fails_at_construction(tmp_path: Path) -> None:
    path = _saved(tmp_path, AdaptorArch("linear", DIM), encoder_hash=OTHER_HASH)
    with pytest.raises(CheckpointError, match="encoder"):
        MetaInit(path, encoder_hash=HASH)
    with pytest.raises(ConfigError, match="does not exist"):
        MetaInit(tmp_path / "nope.json", encoder_hash=HASH)
    ok = MetaInit(path, encoder_hash=OTHER_HASH)  # right encoder: loads; other families fall back
    x, y = _shots()
    mlp = build_adaptor(AdaptorArch("mlp", DIM, 16, 1), sorted(set(y.tolist())))
    ok.init(mlp, x, y)
    assert ok.last["init"] == "prototype"


# -------------------------------------------------------------------------------- detector
def test_threshold_correction_learns_a_known_bias() -> None:
    rng = np.random.default_rng(0)
    stats, targets = [], []
    for _ in range(200):
        own = rng.normal(0.6, rng.uniform(0.02, 0.1), int(rng.integers(20, 200)))
        t = float(np.quantile(own, 0.05))
        st = shot_statistics(t, own)
        stats.append(st)
        targets.append(-0.5 * st[2] + 0.01)  # a true offset that depends on the spread
    corr = ThresholdCorrection.fit(np.asarray(stats), np.asarray(targets), tpr=0.95, ridge=0.0)
    own = rng.normal(0.6, 0.05, 50)
    t = float(np.quantile(own, 0.05))
    assert corr.apply(t, own) == pytest.approx(t - 0.5 * own.std() + 0.01, abs=2e-3)
    again = ThresholdCorrection.from_dict(json.loads(json.dumps(corr.to_dict())))
    assert np.allclose(again.coef, corr.coef)
    with pytest.raises(CheckpointError):
        ThresholdCorrection.from_dict({"features": ["x"], "coef": [1.0], "tpr": 0.95})


def test_meta_train_command_parses() -> None:
    import argparse

    from edge_runtime.cli import meta_train as cli_meta

    parser = argparse.ArgumentParser()
    cli_meta.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["meta-train", "--out", "x", "--iterations", "5", "--first-order"])
    assert args.func is cli_meta._cmd_meta_train and args.iterations == 5 and args.first_order
    with pytest.raises(ConfigError, match="families"):
        cli_meta._cmd_meta_train(parser.parse_args(["meta-train", "--out", "x", "--families", "z"]))


def test_detector_correction_and_meta_label_budget_follow_the_files(tmp_path: Path) -> None:
    from edge_runtime.config import RuntimeConfig
    from edge_runtime.runtime import label_budget_for

    cfg = RuntimeConfig().with_overrides({"adapt.init": "meta", "adapt.meta_label_budget": "50"})
    none = MetaInit(encoder_hash=HASH)
    assert not none.available() and none.detector_correction() is None
    assert label_budget_for(cfg, none) == 200  # no meta-init: the full budget, and the log says so
    folder = _saved(tmp_path, AdaptorArch("linear", DIM)).parent
    (folder / "meta_train.json").write_text("{}")  # the training summary beside the files
    found = MetaInit(folder, encoder_hash=HASH)
    assert found.available()
    corr = found.detector_correction()
    assert corr is not None and np.allclose(corr.coef, np.arange(6) * 0.01)
    assert label_budget_for(cfg, found) == 50
    assert label_budget_for(cfg.with_overrides({"adapt.meta_label_budget": "null"}), found) == 200
    # The cache, by encoder hash, serves the same way; a damaged cached file is skipped.
    save_meta_init(
        meta_cache_dir(HASH),
        AdaptorArch("linear", DIM),
        initial_meta_params(AdaptorArch("linear", DIM), seed=1),
        HASH,
        inner_steps=2,
    )
    (meta_cache_dir(HASH) / "mlp-48-16x1.json").write_text("not json")
    cached = MetaInit(encoder_hash=HASH)
    assert cached.available() and cached.detector_correction() is None  # saved without one
    with pytest.raises(CheckpointError):
        (folder / "mlp-48-16x1.json").write_text("not json")
        MetaInit(folder, encoder_hash=HASH).available()  # a configured folder's bad file raises


# ------------------------------------------------------------------ conv family (tap maps)
# Real encoder tap maps: Fashion-MNIST frames through the runtime's encoder at 32 px (block 13's
# map is 96x2x2 there), a few shifts for episodes and one held out (fog on test images).
TAP = 13
CONV_TRAIN = (
    ShiftSpec("clean", "fashion-train", BASE_CLASSES),
    ShiftSpec("blur-3", "fashion-train", BASE_CLASSES, "blur", 3),
    ShiftSpec("contrast-5", "fashion-train", BASE_CLASSES, "contrast", 5),
    ShiftSpec("inversion-3", "fashion-train", BASE_CLASSES, "inversion", 3),
)
CONV_HELD = (ShiftSpec("fog-4", "fashion-test", BASE_CLASSES, "fog", 4),)


@pytest.fixture(scope="module")
def tap_domains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from edge_runtime.config import RuntimeConfig
    from edge_runtime.runtime import build_encoder

    encoder = build_encoder(RuntimeConfig().with_overrides({"encoder.input_size": 32}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_RUNTIME_CACHE", str(tmp_path_factory.mktemp("tapcache")))
        train = build_tap_domains(CONV_TRAIN, encoder, (TAP,), 40, seed=0)
        held = build_tap_domains(CONV_HELD, encoder, (TAP,), 40, seed=0)
    return {"encoder": encoder, "train": train, "held": held}


def _conv_arch(width: int = 16) -> AdaptorArch:
    return conv_arch(TAP, 32, width, 2)


def test_tap_domains_hold_the_pooled_features_and_the_maps(tap_domains: dict[str, Any]) -> None:
    train = tap_domains["train"]
    assert [d.name for d in train[None]] == [s.name for s in CONV_TRAIN]
    pooled, maps = train[None][0], train[TAP][0]
    assert pooled.features.shape == (240, tap_domains["encoder"].spec.dim)
    assert maps.features.shape == (240, 96 * 2 * 2)
    assert np.array_equal(pooled.labels, maps.labels)
    # The pooled rows are what the pooled families' episodes would read (Encoder.features).
    frames, _ = shift_images(CONV_TRAIN[0], 40, seed=0)
    np.testing.assert_allclose(
        tap_domains["encoder"].features(frames), pooled.features, rtol=0, atol=1e-5
    )


def test_conv_meta_training_lowers_heldout_post_adaptation_loss(
    tap_domains: dict[str, Any],
) -> None:
    arch = _conv_arch()
    cfg = MetaTrainConfig(**{**CFG.to_dict(), "iterations": 25, "n_way": (3, 4, 5)})
    result = meta_train_family(
        arch, EpisodeSampler(tap_domains["train"][TAP], 0), cfg, progress=False
    )
    held = EpisodeSampler(tap_domains["held"][TAP], seed=5)
    batches = fixed_batches(held, cfg, 6)
    model = ProtoMAML(arch, cfg.inner_steps)
    assert model.batchnorm
    prior = torch.from_numpy(np.mean([d.features.std(0) for d in tap_domains["train"][TAP]], 0))
    start = initial_meta_params(arch, cfg.seed, cfg.init_lr, prior)
    before, acc0 = evaluate(model, start, batches)
    after, acc1 = evaluate(model, result.meta, batches)
    assert after < before - 0.05, (before, after)
    assert acc1 > acc0


def test_conv_fast_steps_match_the_installed_adaptor(tap_domains: dict[str, Any]) -> None:
    """The functional BatchNorm is the runtime's: support statistics while adapting, then the
    installed adaptor serves in eval mode with what calibrate_batchnorm would store."""
    arch = _conv_arch()
    d = tap_domains["held"][TAP][0]
    xs, ys = torch.from_numpy(d.features[:60]), torch.from_numpy(d.labels[:60])
    label_map = sorted(set(d.labels[:60].tolist()))
    local = torch.from_numpy(build_adaptor(arch, label_map).to_local(ys.numpy()))
    model = ProtoMAML(arch, 3)
    params, buffers = model.adapt(initial_meta_params(arch), xs, local, len(label_map))
    a = build_adaptor(arch, label_map)
    model.install(a, params, buffers)
    b = build_adaptor(arch, label_map)
    model.install(b, params, {k: v for k, v in buffers.items() if "running" not in k})
    b.calibrate_batchnorm(xs)
    xq = torch.from_numpy(d.features[60:])
    with torch.no_grad():
        want = model.logits(params, buffers, xq)
        assert torch.allclose(a.eval()(xq), want, atol=1e-4)
        assert torch.allclose(b.eval()(xq), want, atol=1e-4)


def test_conv_meta_init_round_trips_and_is_refused_for_another_encoder(
    tmp_path: Path, tap_domains: dict[str, Any]
) -> None:
    arch = _conv_arch()
    meta = initial_meta_params(arch, seed=3)
    path = save_meta_init(tmp_path, arch, meta, HASH, inner_steps=3)
    assert path.name == f"{family_name(arch)}.json" and "conv-t13-96x2x2-2x16" in path.name
    loaded = load_meta_init(path, HASH, arch)
    assert loaded.arch == arch and loaded.inner_steps == 3
    for k, v in meta.tensors().items():
        assert torch.equal(v, loaded.meta.tensors()[k]), k
    with pytest.raises(CheckpointError, match="encoder"):
        load_meta_init(path, OTHER_HASH, arch)
    with pytest.raises(CheckpointError, match="family"):
        load_meta_init(path, HASH, _conv_arch(width=32))  # another width: another family
    # The runtime finds it in the cache by encoder hash and exact arch, and adapts with it.
    save_meta_init(meta_cache_dir(HASH), arch, meta, HASH, inner_steps=3)
    d = tap_domains["held"][TAP][0]
    x, y = d.features[:48], d.labels[:48]
    adaptor = build_adaptor(arch, sorted(set(y.tolist())))
    init = MetaInit(encoder_hash=HASH)
    init.init(adaptor, x, y)
    assert init.last["init"] == "meta" and init.last["fast_steps"] == 3
    assert not adaptor.training
    other = build_adaptor(_conv_arch(width=32), sorted(set(y.tolist())))
    init.init(other, x, y)
    assert init.last["init"] == "prototype" and "no meta-init" in init.last["fallback"]
    assert MetaInit(encoder_hash=OTHER_HASH).file_for(adaptor) is None


def test_build_report_init_names_what_ran(tap_domains: dict[str, Any]) -> None:
    from edge_runtime.adapt.executor import AdaptationExecutor
    from edge_runtime.adapt.jobs import TrainSet
    from edge_runtime.adapt.search import FixedArchitecture

    arch = _conv_arch()
    d = tap_domains["held"][TAP][0]
    train = TrainSet(d.features[:48], d.labels[:48], None, arch)

    def report() -> dict[str, Any]:
        ex = AdaptationExecutor(
            FixedArchitecture(arch), MetaInit(encoder_hash=HASH), steps=5, lr=1e-2, seed=0
        )
        return ex.train_head(train, 1, steps=0)[1]

    fell_back = report()
    assert fell_back["init"] == "prototype"
    assert fell_back["init_detail"]["meta_init"] is None
    assert family_name(arch) in fell_back["init_detail"]["fallback"]
    save_meta_init(meta_cache_dir(HASH), arch, initial_meta_params(arch), HASH, inner_steps=2)
    used = report()
    assert used["init"] == "meta" and used["init_detail"]["fast_steps"] == 2
    assert used["init_detail"]["meta_init"].endswith(f"{family_name(arch)}.json")


def test_replay_episodes_mirror_the_runtime_build() -> None:
    """Shots of a shift plus base replay, weighted half and half; a shift shares the replay's
    labels, new classes have their own and the query holds only the shifted frames."""
    domains = _domains(range(0, 6), 3, seed=4)
    sampler = ReplayEpisodeSampler(domains, seed=0, replay_per_class=4)
    xs, ys, xq, yq, w = sampler.weighted_episode(0, 2, 3)  # shift
    assert xs.shape == (6 * 4 + 6 * 2, DIM) and xq.shape == (6 * 3, DIM)
    assert sorted(set(ys[:24].tolist())) == sorted(set(ys[24:].tolist())) == list(range(6))
    assert np.isclose(w[:24].sum(), 0.5) and np.isclose(w[24:].sum(), 0.5)
    assert (xs[:24, None] == domains[0].features[None]).all(-1).any(-1).all()  # replay = base
    xs, ys, xq, yq, w = sampler.weighted_episode(2, 3, 3)  # two new classes
    replay, shots = set(ys[:16].tolist()), set(ys[16:].tolist())
    assert len(replay) == 4 and len(shots) == 2 and not replay & shots
    assert set(yq.tolist()) == shots and xs.shape == (16 + 6, DIM)
    b = sampler.batch(3, 2, 3, 3)
    assert b.ws is not None and b.ws.shape == (3, 22) and b.n_way == 6
    with pytest.raises(InputError):
        sampler.weighted_episode(6, 1, 1)  # no base class would be left for the replay


def test_weighted_conv_batch_matches_a_loop(tap_domains: dict[str, Any]) -> None:
    arch = _conv_arch(width=8)
    sampler = ReplayEpisodeSampler(tap_domains["train"][TAP], seed=2)
    b = sampler.batch(3, 2, 2, 3)
    meta = initial_meta_params(arch).requires_grad_()
    model = ProtoMAML(arch, 2)
    batched, _ = model.batch_loss(meta, b.xs, b.ys, b.xq, b.yq, b.n_way, ws=b.ws)
    loop = torch.stack(
        [
            model.query_loss(meta, b.xs[i], b.ys[i], b.xq[i], b.yq[i], b.n_way, ws=b.ws[i])[0]
            for i in range(3)
        ]
    ).mean()
    assert torch.allclose(batched, loop, atol=1e-5)
    batched.backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in meta.leaves())


def test_conv_families_cover_the_search_space_taps() -> None:
    from edge_runtime.adapt.space import default_space
    from edge_runtime.meta.train import META_TAPS, family_archs

    archs = family_archs("conv", 1304, 64)
    want = [
        a
        for a in default_space(1304, 64)
        if a.kind == "conv" and a.tap in META_TAPS and a.condition == "none"
    ]
    assert archs == want and {a.tap for a in archs} == set(META_TAPS)
    names = [family_name(a) for a in archs]
    assert len(set(names)) == len(archs)  # one file per arch, never two archs on one file
    assert family_archs(names[-1], 1304, 64) == [archs[-1]]
    with pytest.raises(InputError, match="unknown family"):
        family_archs("conv-t3-24x16x16-2x16", 1304, 64)  # tap 3 is not meta-trained
    cfg = MetaTrainConfig()
    assert cfg.for_arch(archs[0]).iterations == cfg.conv_iterations
    assert cfg.for_arch(AdaptorArch("linear", 1304)).iterations == cfg.iterations
