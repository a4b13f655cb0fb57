"""The frozen encoder: ImageNet weights, preprocessing of any frame shape, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.encoder import (
    Encoder,
    MobileNetV2,
    TorchBackend,
    default_weights_path,
    load_state_dict,
    preprocess,
)
from edge_runtime.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(TorchBackend.mobilenet(input_size=32, layers=(3, 18)), batch_size=8)


def test_imagenet_weights_load_strictly_into_our_definition() -> None:
    state = load_state_dict(default_weights_path())
    model = MobileNetV2()
    model.load_state_dict(state, strict=True)  # torchvision key layout, every key used
    assert torch.equal(model.classifier[1].weight, state["classifier.1.weight"])


def test_encoder_is_frozen_and_pools_the_chosen_layers(encoder: Encoder) -> None:
    assert encoder.spec.dims == (24, 1280)
    assert not any(p.requires_grad for p in encoder.backend.module.parameters())  # type: ignore[attr-defined]
    frames = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    a, b = encoder.features(frames), encoder.features(frames)
    assert a.shape == (3, 1304) and np.array_equal(a, b)


@pytest.mark.parametrize("shape", [(2, 28, 28), (2, 50, 70, 1), (2, 20, 20, 3), (2, 64, 64, 4)])
def test_any_frame_size_and_channel_count(encoder: Encoder, shape: tuple[int, ...]) -> None:
    frames = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    x = preprocess(frames, 32)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
    assert encoder.features(frames).shape == (2, 1304)


def test_gray_equals_replicated_rgb(encoder: Encoder) -> None:
    gray = np.random.default_rng(2).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=3)
    np.testing.assert_allclose(encoder.features(gray), encoder.features(rgb), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((28, 28), np.uint8), "rank"),
        (np.zeros((1, 2, 28, 28, 3), np.uint8), "rank"),
        (np.zeros((0, 28, 28), np.uint8), "empty"),
        (np.zeros((2, 28, 28, 2), np.uint8), "channels"),
        (np.full((2, 28, 28), np.nan, np.float32), "NaN"),
        (np.zeros((2, 28, 28), np.int32), "dtype"),
    ],
)
def test_bad_frames_give_one_clear_error(
    encoder: Encoder, frames: np.ndarray, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        encoder.features(frames)


def test_corrupt_or_foreign_weights_file(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(default_weights_path().read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="corrupt"):
        TorchBackend.mobilenet(weights=truncated)
    foreign = tmp_path / "foreign.pth"
    torch.save({"features.0.0.weight": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="does not match MobileNetV2"):
        TorchBackend.mobilenet(weights=foreign)
    with pytest.raises(CheckpointError, match="not found"):
        TorchBackend.mobilenet(weights=tmp_path / "missing.pth")
