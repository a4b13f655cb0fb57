"""Adaptor families: pooled heads (linear, MLP) and conv adaptors on encoder taps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edge_runtime.adapt import Adaptor, AdaptorArch, PrototypeInit, build_adaptor, train_adaptor
from edge_runtime.adapt.space import default_space, sample_space
from edge_runtime.data import load_fashion_mnist
from edge_runtime.encoder import Encoder, TorchBackend
from edge_runtime.encoder.cache import cached_encoded
from edge_runtime.errors import CheckpointError, InputError

SPACE = sample_space(60, seed=3, feature_dim=1304, input_size=64)


def _hooked_macs(model: Adaptor, x: torch.Tensor) -> int:
    """MACs counted from the real forward pass (conv and linear layers), per frame."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        total += out[0].numel() * (m.in_channels // m.groups) * k

    def lin_hook(m: nn.Linear, _inp, _out) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    with torch.no_grad():
        model.eval()(x[:1])
    for h in hooks:
        h.remove()
    return total


def test_space_has_every_family() -> None:
    labels = {a.label() for a in default_space(1304, 64)}
    kinds = {a.kind for a in SPACE}
    assert kinds == {"linear", "mlp", "conv"}
    assert {a.tap for a in SPACE if a.kind == "conv"} == {3, 6, 10, 13}
    assert {a.activation for a in SPACE} == {"relu", "gelu", "tanh"}
    assert {a.condition for a in SPACE} == {"none", "median3", "blur"}
    assert {a.separable for a in SPACE if a.kind == "conv"} == {False, True}
    assert len(SPACE) == 60 and len(set(SPACE)) == 60 and "linear" in labels
    for a in SPACE:
        if a.kind == "conv":
            assert 16 <= a.width <= 128 and a.convs in (1, 2)
        if a.kind == "mlp":
            assert 32 <= a.hidden <= 512 and 1 <= a.depth <= 3


@pytest.mark.parametrize("arch", SPACE, ids=[a.label() for a in SPACE])
def test_every_family_builds_and_counts_params_and_macs(arch: AdaptorArch) -> None:
    model = build_adaptor(arch, list(range(7)))
    assert arch.n_params(7) == sum(p.numel() for p in model.parameters())
    x = torch.randn(4, arch.in_dim)
    assert model(x).shape == (4, 7)
    assert arch.macs(7) == _hooked_macs(model, x)
    assert arch.flops(7) == 2 * arch.macs(7)


def test_macs_of_a_hand_computed_conv() -> None:
    plain = AdaptorArch("conv", 8 * 4 * 4, tap=10, in_shape=(8, 4, 4), width=16, convs=2)
    # conv1 9*8*16 per pixel, conv2 9*16*16 per pixel, 16 pixels each; head 16*3.
    assert plain.macs(3) == 9 * 8 * 16 * 16 + 9 * 16 * 16 * 16 + 16 * 3 == 55_344
    assert plain.n_params(3) == 9 * 8 * 16 + 2 * 16 + 9 * 16 * 16 + 2 * 16 + 17 * 3
    sep = AdaptorArch(
        "conv", 8 * 4 * 4, tap=10, in_shape=(8, 4, 4), width=16, convs=2, separable=True
    )
    assert sep.macs(3) == (9 * 8 + 8 * 16) * 16 + (9 * 16 + 16 * 16) * 16 + 48 == 9_648
    # A 16x16 map: the first conv strides by 2 (8x8 outputs).
    big = AdaptorArch("conv", 4 * 16 * 16, tap=3, in_shape=(4, 16, 16), width=8, convs=1)
    assert big.macs(2) == 9 * 4 * 8 * 64 + 8 * 2


def test_old_arch_dicts_load_and_new_ones_round_trip_as_json() -> None:
    old = {"kind": "mlp", "in_dim": 96, "hidden": 8, "depth": 2, "dropout": 0.1, "normalize": True}
    arch = AdaptorArch.from_dict(old)
    assert arch.activation == "relu" and arch.tap is None and arch.condition == "none"
    keys = set(build_adaptor(arch, [0, 1]).state_dict())
    # The layout older checkpoints were written in: Linear, ReLU, Dropout per hidden layer.
    assert {"body.0.weight", "body.3.weight", "head.weight", "feat_mean"} <= keys
    conv = default_space(1304, 64)[-1]
    back = AdaptorArch.from_dict(json.loads(json.dumps(conv.to_dict())))
    assert back == conv and isinstance(back.in_shape, tuple)
    with pytest.raises(CheckpointError):
        AdaptorArch.from_dict({**old, "colour": "red"})
    with pytest.raises(InputError, match="in_shape"):
        AdaptorArch("conv", 100, tap=10, in_shape=(8, 4, 4), width=16, convs=1)
    with pytest.raises(InputError, match="activation"):
        AdaptorArch("mlp", 10, hidden=4, depth=1, activation="swish")
    with pytest.raises(InputError, match="condition"):
        AdaptorArch("linear", 10, condition="sharpen")
    with pytest.raises(InputError, match="pooled"):
        AdaptorArch("linear", 10, tap=3)


@pytest.mark.parametrize("arch", [a for a in default_space(1304, 64) if a.kind == "conv"][:3])
def test_describe_from_state_round_trip_is_exact(arch: AdaptorArch) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, arch.in_dim)).astype(np.float32)
    y = np.arange(40) % 4 + 10
    model = build_adaptor(arch, [10, 11, 12, 13], seed=2)
    train_adaptor(model, x, y, steps=3)
    desc = json.loads(json.dumps(model.describe()))
    back = Adaptor.from_state(desc, model.state_dict())
    assert back.arch == arch
    assert np.array_equal(model.logits(x), back.logits(x))


@pytest.fixture(scope="module")
def tap_maps() -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    images, labels = load_fashion_mnist("test")
    keep = np.flatnonzero(labels < 4)[:240]
    enc = Encoder(TorchBackend.mobilenet(input_size=64, layers=(3, 18)))
    got = cached_encoded(enc, np.ascontiguousarray(images[keep]), (10,), "none", "test-families")
    m = got.maps[10]
    return m.reshape(len(m), -1), labels[keep].astype(np.int64), tuple(m.shape[1:])


def test_prototype_init_and_training_on_real_tap_maps(tap_maps) -> None:
    x, y, shape = tap_maps
    xtr, ytr, xte, yte = x[:120], y[:120], x[120:], y[120:]
    arch = AdaptorArch("conv", x.shape[1], tap=10, in_shape=shape, width=32, convs=2)
    model = build_adaptor(arch, [0, 1, 2, 3], seed=0)
    PrototypeInit().init(model, xtr, ytr)
    # BatchNorm running statistics were set from the shots, so eval-mode embeddings are the
    # ones the prototypes were computed from, and the initialised head already classifies.
    model.eval()
    with torch.no_grad():
        z_eval = model.embed(torch.as_tensor(xtr))
        model.train()
        z_train = model.embed(torch.as_tensor(xtr))
    # (running variance is the unbiased estimate: equal up to n/(n-1))
    assert torch.allclose(z_eval, z_train, rtol=1e-2, atol=1e-3)
    init_acc = float((model.predict(xte) == yte).mean())
    assert init_acc > 0.4, init_acc  # chance is 0.25

    def loss() -> float:
        with torch.no_grad():
            logits = torch.as_tensor(model.logits(xtr))
            return float(nn.functional.cross_entropy(logits, torch.as_tensor(ytr)))

    before = loss()
    report = train_adaptor(model, xtr, ytr, steps=30, lr=1e-2, fit_normalizer=False)
    assert loss() < before and report.train_accuracy > 0.8
    assert float((model.predict(xte) == yte).mean()) > 0.6
