"""Encoder taps (block maps beside the pooled features, one forward pass), input conditioning,
the ONNX multi-output export and the on-disk cache of pooled features plus maps."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.encoder import (
    CONDITIONERS,
    TAP_BLOCKS,
    Encoded,
    Encoder,
    MobileNetV2,
    TorchBackend,
    condition,
    default_weights_path,
    encoder_ms_per_frame,
    load_state_dict,
    preprocess,
    tap_shape,
)
from edge_runtime.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def reference() -> MobileNetV2:
    model = MobileNetV2()
    model.load_state_dict(load_state_dict(default_weights_path()), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def torch64() -> TorchBackend:
    return TorchBackend.mobilenet(64, (3, 18))


def _frames(n: int = 6, shape: tuple[int, ...] = (28, 28), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _hooked_maps(model: MobileNetV2, x: torch.Tensor, blocks: tuple[int, ...]) -> dict:
    got: dict[int, torch.Tensor] = {}
    handles = [
        model.features[b].register_forward_hook(
            lambda _m, _i, out, b=b: got.__setitem__(b, out.detach().clone())
        )
        for b in blocks
    ]
    try:
        with torch.no_grad():
            model.features(x)
    finally:
        for h in handles:
            h.remove()
    return got


# ------------------------------------------------------------------------------- torch taps


@pytest.mark.parametrize("size", [64, 32])
def test_torch_taps_equal_hooks_on_the_reference_model(reference, size: int):
    backend = TorchBackend.mobilenet(size, (3, 18))
    assert backend.supports_taps
    x = preprocess(_frames(3), size)
    pooled, maps = backend.encode_taps(x, TAP_BLOCKS)
    want = _hooked_maps(reference, x, TAP_BLOCKS)
    assert sorted(maps) == list(TAP_BLOCKS)
    for b in TAP_BLOCKS:
        assert maps[b].dtype == np.float32 and maps[b].flags.c_contiguous
        assert maps[b].shape == (3, *tap_shape(b, size))  # the formula matches the real maps
        np.testing.assert_allclose(maps[b], want[b].numpy(), atol=1e-5, rtol=0)
    assert np.array_equal(pooled, backend.encode(x))  # taps change nothing in the features


def test_taps_deeper_than_the_pooled_layers_and_all_blocks(reference):
    """An encoder pooling block 2 only still taps any block 0..18; the pass stops at the
    deepest one asked for."""
    backend = TorchBackend.mobilenet(32, (2,))
    x = preprocess(_frames(2), 32)
    every = tuple(range(19))
    pooled, maps = backend.encode_taps(x, every)
    want = _hooked_maps(reference, x, every)
    for b in every:
        assert maps[b].shape == (2, *tap_shape(b, 32))
        np.testing.assert_allclose(maps[b], want[b].numpy(), atol=1e-5, rtol=0)
    assert np.array_equal(pooled, backend.encode(x))


def test_forward_runs_only_the_blocks_needed(torch64):
    """Taps up to block 3 on an encoder pooling (3,) run blocks 0..3 and nothing else."""
    backend = TorchBackend.mobilenet(32, (3,))
    ran: list[int] = []
    module = backend.module
    blocks = [*module.blocks, *module.tail]  # type: ignore[misc]
    handles = [
        blk.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, blk in enumerate(blocks)
    ]
    try:
        backend.encode_taps(preprocess(_frames(1), 32), (1, 3))
        assert ran == [0, 1, 2, 3]
        ran.clear()
        backend.encode(preprocess(_frames(1), 32))
        assert ran == [0, 1, 2, 3]
        ran.clear()
        backend.encode_taps(preprocess(_frames(1), 32), (6,))
        assert ran == list(range(7))
    finally:
        for h in handles:
            h.remove()


def test_tap_shape_and_bad_blocks():
    assert tap_shape(3, 64) == (24, 16, 16)
    assert tap_shape(6, 64) == (32, 8, 8)
    assert tap_shape(10, 64) == (64, 4, 4)
    assert tap_shape(13, 64) == (96, 4, 4)
    assert tap_shape(18, 224) == (1280, 7, 7)
    assert tap_shape(0, 28) == (32, 14, 14)
    for bad in (-1, 19):
        with pytest.raises(InputError, match=r"0\.\.18"):
            tap_shape(bad, 64)


def test_encoder_encode_matches_features_and_batches(torch64):
    enc = Encoder(torch64, batch_size=4)
    frames = _frames(10)
    plain = enc.encode(frames)
    assert isinstance(plain, Encoded) and plain.maps == {}
    assert np.array_equal(plain.features, enc.features(frames))  # bitwise
    tapped = enc.encode(frames, taps=(13, 3, 3))  # any order, duplicates folded
    assert np.array_equal(tapped.features, plain.features)
    assert sorted(tapped.maps) == [3, 13]
    assert tapped.maps[3].shape == (10, 24, 16, 16) and tapped.maps[13].shape == (10, 96, 4, 4)
    # batching does not change the maps (batch 4 vs all at once)
    whole = Encoder(torch64, batch_size=64).encode(frames, taps=(3,))
    np.testing.assert_allclose(whole.maps[3], tapped.maps[3], atol=1e-5, rtol=0)
    with pytest.raises(InputError, match=r"0\.\.18"):
        enc.encode(frames, taps=(19,))
    with pytest.raises(InputError, match="empty"):
        enc.encode(frames[:0], taps=(3,))


def test_encode_with_conditioning_filters_before_preprocessing(torch64):
    enc = Encoder(torch64, batch_size=4)
    frames = _frames(5, (40, 30, 3))
    got = enc.encode(frames, condition="median3")
    assert np.array_equal(got.features, enc.features(condition(frames, "median3")))
    assert not np.array_equal(got.features, enc.features(frames))
    with pytest.raises(ConfigError, match="median3"):
        enc.encode(frames, condition="sharpen")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_user_torchscript_backend_refuses_taps(tmp_path: Path):
    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    path = tmp_path / "tiny.ts"
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    backend = TorchBackend.from_module(path, input_size=32)
    assert backend.supports_taps is False
    enc = Encoder(backend)
    assert enc.encode(_frames(2)).features.shape == (2, 3)  # no taps: fine
    with pytest.raises(InputError, match=r"backend 'torch'.*block maps"):
        enc.encode(_frames(2), taps=(3,))
    with pytest.raises(InputError, match="user module"):
        backend.encode_taps(preprocess(_frames(2), 32), (3,))


def test_encoder_ms_per_frame_is_a_positive_number(torch64):
    ms = encoder_ms_per_frame(Encoder(torch64), batch=2, repeats=1)
    assert 0 < ms < 10_000
    with pytest.raises(InputError):
        encoder_ms_per_frame(torch64, batch=0)


# ------------------------------------------------------------------------------ conditioning


def _salt_and_pepper(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth image, the same with 5% of pixels flipped to 0/255, and the flip mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:64]
    clean = (128 + 60 * np.sin(xx / 9.0) * np.cos(yy / 7.0)).astype(np.uint8)
    noisy = clean.copy()
    mask = rng.random(clean.shape) < 0.05
    noisy[mask] = rng.choice(np.array([0, 255], np.uint8), size=int(mask.sum()))
    return clean[None], noisy[None], mask[None]


def test_median3_removes_salt_and_pepper():
    clean, noisy, mask = _salt_and_pepper()
    fixed = condition(noisy, "median3")
    restored = np.abs(fixed.astype(int) - clean.astype(int))[mask] <= 6
    assert restored.mean() > 0.9  # most flipped pixels are back near their true value
    err_before = np.abs(noisy.astype(int) - clean.astype(int)).mean()
    assert np.abs(fixed.astype(int) - clean.astype(int)).mean() < err_before / 5


def test_blur_lowers_variance_of_noise():
    rng = np.random.default_rng(1)
    noise = rng.normal(0.5, 0.1, (2, 32, 32)).astype(np.float32)
    assert condition(noise, "blur").var() < 0.5 * noise.var()
    flat = np.full((1, 8, 8), 100, np.uint8)
    assert np.array_equal(condition(flat, "blur"), flat)  # normalised kernel, replicated edges


@pytest.mark.parametrize("name", sorted(CONDITIONERS))
@pytest.mark.parametrize(
    "frames",
    [
        np.random.default_rng(2).integers(0, 256, (3, 28, 28), dtype=np.uint8),
        np.random.default_rng(3).integers(0, 256, (2, 30, 20, 3), dtype=np.uint8),
        np.random.default_rng(4).random((2, 28, 28)).astype(np.float32),
        np.random.default_rng(5).random((2, 17, 19, 3)),
    ],
    ids=["u8-gray", "u8-rgb", "f32-gray", "f64-rgb"],
)
def test_conditioning_keeps_shape_and_dtype(name: str, frames: np.ndarray):
    frozen = frames.copy()
    frozen.setflags(write=False)  # datasets are handed out read-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = condition(frozen, name)
    assert out.shape == frames.shape and out.dtype == frames.dtype
    if name == "none":
        assert out is frozen  # identity, no copy


def test_conditioning_is_per_channel_and_keeps_nan():
    rgb = np.zeros((1, 9, 9, 3), np.uint8)
    rgb[0, 4, 4, 1] = 255  # a lone hot pixel in the green channel only
    rgb[..., 2] = 77
    out = condition(rgb, "median3")
    assert out[0, 4, 4, 1] == 0 and (out[..., 2] == 77).all()
    nan = np.random.default_rng(6).random((2, 12, 12)).astype(np.float32)
    nan[0, 3, 3] = np.nan
    for name in ("median3", "blur"):
        out = condition(nan, name)
        assert not np.isfinite(out[0]).all() and np.isfinite(out[1]).all()


def test_unknown_conditioner_lists_the_choices():
    with pytest.raises(ConfigError, match=r"blur.*median3.*none"):
        condition(np.zeros((1, 4, 4), np.uint8), "sharpen")
    with pytest.raises(InputError):  # the same error is an input error too
        condition(np.zeros((1, 4, 4), np.uint8), "sharpen")


# ------------------------------------------------------------------------------- ONNX taps

ONNX_TAPS = (3, 10)  # a 24- and a 64-channel map; exporting fewer outputs keeps this fast


@pytest.fixture(scope="module")
def onnx_tapped(tmp_path_factory: pytest.TempPathFactory):
    """The real encoder (ImageNet weights) pooling block 3, exported at 32 px with two taps:
    eleven blocks, a few seconds to export."""
    from edge_runtime.encoder import build_feature_module, export_encoder
    from edge_runtime.encoder.backend import FeatureSpec

    module, sha = build_feature_module((3,))
    spec = FeatureSpec(input_size=32, layers=module.layers, dims=module.dims, weights_sha256=sha)
    out = tmp_path_factory.mktemp("onnx-taps") / "enc.onnx"
    return export_encoder(module, spec, "onnx", out, max_batch=16, taps=ONNX_TAPS)


def test_onnx_export_lists_taps_and_checks_their_shapes(onnx_tapped):
    import onnx

    from edge_runtime.encoder.export import check_onnx, spec_from_manifest

    manifest = onnx_tapped.manifest
    assert manifest["taps"] == [
        {"block": 3, "shape": [24, 8, 8], "output": "tap_3"},
        {"block": 10, "shape": [64, 2, 2], "output": "tap_10"},
    ]
    spec = spec_from_manifest(manifest)
    check_onnx(onnx_tapped.path, spec, ONNX_TAPS)  # symbolic batch on every output
    graph = onnx.load(str(onnx_tapped.path)).graph
    assert [o.name for o in graph.output] == ["features", "tap_3", "tap_10"]
    from edge_runtime.errors import CheckpointError

    with pytest.raises(CheckpointError, match="tap_6"):
        check_onnx(onnx_tapped.path, spec, (6,))


def test_onnx_taps_match_torch(onnx_tapped):
    from edge_runtime.encoder.onnx_backend import OnnxRuntimeBackend

    ort_backend = OnnxRuntimeBackend.from_file(onnx_tapped.path, threads=1)
    assert ort_backend.supports_taps and ort_backend.taps == ONNX_TAPS
    ref = TorchBackend.mobilenet(32, (3,))
    for n in (1, 5):  # the dynamic batch axis, on every output
        x = preprocess(_frames(n, seed=n), 32)
        feats, maps = ort_backend.encode_taps(x, ONNX_TAPS)
        ref_feats, ref_maps = ref.encode_taps(x, ONNX_TAPS)
        np.testing.assert_allclose(feats, ref_feats, atol=1e-3, rtol=0)
        for b in ONNX_TAPS:
            assert maps[b].shape == ref_maps[b].shape == (n, *tap_shape(b, 32))
            np.testing.assert_allclose(maps[b], ref_maps[b], atol=1e-3, rtol=0)
        only10 = ort_backend.encode_taps(x, (10,))[1]
        assert list(only10) == [10]
        plain = ort_backend.encode(x)  # features only
        # block 10 lies past the pooled block 3: encode runs a graph pruned to `features`
        assert ("features",) in ort_backend._pruned
        assert isinstance(plain, np.ndarray) and plain.shape == (n, 24)
        np.testing.assert_allclose(plain, feats, atol=1e-6, rtol=0)
    got = Encoder(ort_backend, batch_size=3).encode(_frames(4), taps=(3,))
    assert got.maps[3].shape == (4, 24, 8, 8)


def test_onnx_tap_not_exported_is_refused(onnx_tapped):
    from edge_runtime.encoder.onnx_backend import OnnxRuntimeBackend

    ort_backend = OnnxRuntimeBackend.from_file(onnx_tapped.path, threads=1)
    x = preprocess(_frames(1), 32)
    with pytest.raises(InputError, match=r"tap block\(s\) \[6\].*re-export.*edge-runtime export"):
        ort_backend.encode_taps(x, (3, 6))
    with pytest.raises(InputError, match="re-export"):
        Encoder(ort_backend).encode(_frames(1), taps=(13,))


def test_untapped_export_keeps_its_single_output_and_cache_key(tmp_path: Path):
    """No taps: the same single-output graph, manifest 'taps' empty, the same cache file name
    as before taps existed; asking a tapped cache for taps gives another file."""
    from edge_runtime.encoder.backend import FeatureSpec, build_feature_module
    from edge_runtime.encoder.export import export_encoder, spec_digest
    from edge_runtime.encoder.onnx_backend import OnnxRuntimeBackend

    module, sha = build_feature_module((1,))
    spec = FeatureSpec(input_size=16, layers=module.layers, dims=module.dims, weights_sha256=sha)
    result = export_encoder(module, spec, "onnx", tmp_path / "plain.onnx", max_batch=4, taps=())
    assert result.manifest["taps"] == []
    backend = OnnxRuntimeBackend.from_file(result.path, threads=1)
    assert backend.supports_taps is False and [o.name for o in backend.session.get_outputs()] == [
        "features"
    ]
    with pytest.raises(InputError, match="no taps"):
        backend.encode_taps(torch.zeros(1, 3, 16, 16), (1,))
    assert spec_digest(spec, max_batch=4) != spec_digest(spec, max_batch=4, taps=[3])


def test_onnx_taps_through_the_torchscript_exporter(tmp_path: Path, monkeypatch):
    """Where torch.export cannot trace, the TorchScript exporter writes the same outputs with a
    dynamic batch on each."""
    from edge_runtime.encoder import export as export_mod
    from edge_runtime.encoder.backend import FeatureSpec, build_feature_module
    from edge_runtime.encoder.onnx_backend import OnnxRuntimeBackend

    module, sha = build_feature_module((1,))
    spec = FeatureSpec(input_size=16, layers=module.layers, dims=module.dims, weights_sha256=sha)
    real = torch.onnx.export
    axes: list[dict] = []

    def script_only(model, args, f, *, dynamo=True, dynamic_axes=None, **kwargs):
        if dynamo:
            raise RuntimeError("simulated torch.export failure")
        axes.append(dynamic_axes)
        return real(model, args, f, dynamo=False, dynamic_axes=dynamic_axes, **kwargs)

    monkeypatch.setattr(export_mod.torch.onnx, "export", script_only)
    path = export_mod.export_onnx(module, spec, tmp_path / "ts.onnx", max_batch=4, taps=(2,))
    assert axes == [{"input": {0: "batch"}, "features": {0: "batch"}, "tap_2": {0: "batch"}}]
    backend = OnnxRuntimeBackend(path, spec, threads=1)
    x = preprocess(_frames(3), 16)
    feats, maps = backend.encode_taps(x, (2,))
    ref_feats, ref_maps = TorchBackend.mobilenet(16, (1,)).encode_taps(x, (2,))
    np.testing.assert_allclose(maps[2], ref_maps[2], atol=1e-3, rtol=0)
    np.testing.assert_allclose(feats, ref_feats, atol=1e-3, rtol=0)


def test_export_refuses_taps_it_cannot_honour(tmp_path: Path):
    from edge_runtime.encoder.backend import FeatureSpec, build_feature_module
    from edge_runtime.encoder.export import export_copy, export_encoder

    module, sha = build_feature_module((1,))
    spec = FeatureSpec(input_size=16, layers=module.layers, dims=module.dims, weights_sha256=sha)
    with pytest.raises(InputError, match="onnx"):
        export_encoder(module, spec, "torchscript", tmp_path, taps=(3,))
    with pytest.raises(InputError, match="built-in MobileNetV2"):
        export_copy(torch.nn.Identity(), (3,))
    with pytest.raises(InputError, match=r"0\.\.18"):
        export_copy(module, (20,))
    # without taps, an export holds only the blocks it runs (not the tail kept for taps)
    assert len(export_copy(module).tail) == 0 and len(module.tail) == 17  # type: ignore[arg-type]


# ---------------------------------------------------------------- TensorRT backend, CPU stand-in


def test_tensorrt_backend_taps_with_a_cpu_stand_in_for_the_engine():
    """The TensorRT backend's output handling (features, *maps), batch splitting/padding and
    engine check, with the tapped torch graph standing in for a compiled engine."""
    from edge_runtime.encoder.export import export_copy
    from edge_runtime.encoder.tensorrt_backend import EngineKey, TensorRTBackend, check_engine

    ref = TorchBackend.mobilenet(32, (3,))
    key = EngineKey.make(ref.spec, "fp32", (2, 2, 3), taps=(6, 3))
    assert key.taps == (3, 6) and key.record()["taps"] == [3, 6]
    assert "taps" not in EngineKey.make(ref.spec, "fp32", (2, 2, 3)).record()
    assert key.digest() != EngineKey.make(ref.spec, "fp32", (2, 2, 3)).digest()
    engine = export_copy(ref.module, key.taps)
    check_engine(engine, key, ref.spec, "cpu")
    backend = TensorRTBackend(engine, ref.spec, key, "cpu")
    assert backend.supports_taps
    x = preprocess(_frames(7), 32)  # 7 > max 3 (split) and a last chunk of 1 < min 2 (pad)
    feats, maps = backend.encode_taps(x, (6,))
    ref_feats, ref_maps = ref.encode_taps(x, (6,))
    np.testing.assert_allclose(feats, ref_feats, atol=1e-5, rtol=0)
    assert list(maps) == [6]
    np.testing.assert_allclose(maps[6], ref_maps[6], atol=1e-5, rtol=0)
    np.testing.assert_allclose(backend.encode(x), ref_feats, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="rebuild"):
        backend.encode_taps(x, (10,))
    untapped = EngineKey.make(ref.spec, "fp32", (2, 2, 3))
    with pytest.raises(InputError, match="outputs"):
        check_engine(engine, untapped, ref.spec, "cpu")


# ------------------------------------------------------------------------------------ cache


def test_cached_encoded_hit_is_identical_and_corruption_recomputes(
    torch64, tmp_path: Path, monkeypatch
):
    from edge_runtime.encoder.cache import CACHE_ENV, cache_dir, cached_encoded

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    calls: list[tuple] = []

    class Counting(Encoder):
        def encode(self, frames, taps=(), condition="none", *, progress=False):
            calls.append((tuple(taps), condition))
            return super().encode(frames, taps, condition, progress=progress)

    enc = Counting(torch64, batch_size=8)
    frames = _frames(5)
    first = cached_encoded(enc, frames, (13, 3), tag="unit/test")
    again = cached_encoded(enc, frames, (3, 13), tag="unit/test")
    assert len(calls) == 1  # the second call is a hit (taps in any order)
    assert np.array_equal(first.features, again.features)
    assert sorted(again.maps) == [3, 13]
    for b in (3, 13):
        assert again.maps[b].dtype == np.float32 and np.array_equal(first.maps[b], again.maps[b])
        # float16 on disk: within half-precision rounding of the exact maps
        exact = enc.encode(frames, (b,)).maps[b]
        np.testing.assert_allclose(again.maps[b], exact, rtol=2e-3, atol=1e-4)
    assert np.array_equal(first.features, enc.features(frames))  # features are exact
    calls.clear()
    files = list(cache_dir().glob("unit_test-*.npz"))
    assert len(files) == 1
    # taps and conditioning are part of the key
    cached_encoded(enc, frames, (3,))
    cached_encoded(enc, frames, (3, 13), condition="blur")
    assert calls == [((3,), "none"), ((3, 13), "blur")]
    # a truncated file is recomputed and rewritten, never trusted
    calls.clear()
    files[0].write_bytes(files[0].read_bytes()[:100])
    fixed = cached_encoded(enc, frames, (3, 13), tag="unit/test")
    assert len(calls) == 1 and np.array_equal(fixed.maps[3], first.maps[3])
    assert cached_encoded(enc, frames, (3, 13), tag="unit/test").features.shape == (5, 1304)
    assert len(calls) == 1
    # a file of the right name holding other arrays is recomputed too
    np.savez(files[0], features=np.zeros((5, 3), np.float32))
    cached_encoded(enc, frames, (3, 13), tag="unit/test")
    assert len(calls) == 2
    with pytest.raises(ConfigError):
        cached_encoded(enc, frames, (3,), condition="sharpen")


# ------------------------------------------------------------------------------- CUDA parity
# Run by scripts/gpu_check.sh on a CUDA machine; skipped on CPU-only hosts (CI).


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_torch_cuda_taps_and_conv_adaptor_match_the_cpu_path(torch64) -> None:
    from edge_runtime.adapt.adaptor import build_adaptor
    from edge_runtime.adapt.init import PrototypeInit
    from edge_runtime.adapt.space import conv_arch

    cuda = TorchBackend.mobilenet(64, (3, 18), device="cuda")
    x = preprocess(_frames(8), 64)
    feats, maps = cuda.encode_taps(x, TAP_BLOCKS)
    ref_feats, ref_maps = torch64.encode_taps(x, TAP_BLOCKS)
    # TF32 convolutions on Ampere and later: a few 1e-3 off the fp32 CPU path.
    np.testing.assert_allclose(feats, ref_feats, atol=5e-3, rtol=0)
    for b in TAP_BLOCKS:
        assert maps[b].shape == ref_maps[b].shape
        np.testing.assert_allclose(maps[b], ref_maps[b], atol=5e-3, rtol=0)
    # A conv adaptor on a tap: the same weights on the GPU give the CPU's logits.
    rows = ref_maps[10].reshape(len(x), -1)
    labels = np.arange(len(x)) % 4
    head = build_adaptor(conv_arch(10, 64, 64, 2), [0, 1, 2, 3], seed=0)
    PrototypeInit().init(head, rows, labels)
    head.eval()
    on_gpu = build_adaptor(head.arch, head.label_map)
    on_gpu.load_state_dict(head.state_dict())
    on_gpu = on_gpu.to("cuda").eval()
    with torch.inference_mode():
        want = head(torch.as_tensor(rows)).numpy()
        got = on_gpu(torch.as_tensor(maps[10].reshape(len(x), -1), device="cuda")).cpu().numpy()
    np.testing.assert_allclose(got, want, atol=5e-2, rtol=1e-2)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.75


def _ort_cuda_status() -> str | None:
    from edge_runtime.encoder.onnx_backend import cuda_provider_status

    return cuda_provider_status()


@pytest.mark.skipif(
    _ort_cuda_status() is not None, reason=f"onnxruntime-cuda: {_ort_cuda_status()}"
)
def test_ort_cuda_taps_match_the_cpu_session(onnx_tapped) -> None:
    from edge_runtime.encoder.onnx_backend import OnnxRuntimeBackend

    cpu = OnnxRuntimeBackend.from_file(onnx_tapped.path, threads=1)
    cuda = OnnxRuntimeBackend.from_file(onnx_tapped.path, device="cuda")
    assert cuda.name == "onnxruntime-cuda" and cuda.taps == ONNX_TAPS
    x = preprocess(_frames(5, seed=3), 32)
    feats, maps = cuda.encode_taps(x, ONNX_TAPS)
    ref_feats, ref_maps = cpu.encode_taps(x, ONNX_TAPS)
    np.testing.assert_allclose(feats, ref_feats, atol=5e-3, rtol=0)
    for b in ONNX_TAPS:
        np.testing.assert_allclose(maps[b], ref_maps[b], atol=5e-3, rtol=0)
