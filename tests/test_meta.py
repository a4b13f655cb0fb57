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

import numpy as np
import pytest
import torch

from edge_runtime.adapt.adaptor import AdaptorArch, build_adaptor
from edge_runtime.adapt.init import INITIALIZERS, MetaInit, PrototypeInit, make_initializer
from edge_runtime.errors import CheckpointError, ConfigError
from edge_runtime.meta.detector import ThresholdCorrection, shot_statistics
from edge_runtime.meta.episodes import Domain, EpisodeSampler
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
