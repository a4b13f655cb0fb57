"""Compiled encoder backends: parity with the torch reference, caching, INT8, engine keys
and the selection chain. GPU paths run where a GPU is present and skip with a reason here."""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.encoder import Encoder, FeatureSpec, TorchBackend, preprocess
from edge_runtime.encoder.export import relative_error
from edge_runtime.encoder.onnx_backend import (
    CACHE_ENV,
    OnnxRuntimeBackend,
    cache_root,
    cached_onnx,
    cuda_provider_status,
)
from edge_runtime.encoder.quantize import cached_quantized
from edge_runtime.encoder.select import (
    PARITY_TOLERANCE,
    EncoderSettings,
    availability,
    build_candidate,
    candidate_order,
    parity_error,
    select,
    select_backend,
)
from edge_runtime.encoder.tensorrt_backend import (
    EngineKey,
    TensorRTBackend,
    load_engine,
    tensorrt_status,
    trt_precision,
    validate_batch_shapes,
)
from edge_runtime.errors import BackendUnavailableError, ConfigError, InputError

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def fashion_frames(start: int, n: int) -> np.ndarray:
    if not FASHION.is_file():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION}")
    with gzip.open(FASHION) as f:
        data = f.read(16 + (start + n) * 784)
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)[start:].copy()


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "onnx-cache"


@pytest.fixture(scope="module")
def torch_ref() -> TorchBackend:
    return TorchBackend.mobilenet(64, (18,))


@pytest.fixture(scope="module")
def ort_cpu(onnx_cache: Path) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend.mobilenet(64, (18,), cache_dir=onnx_cache)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return fashion_frames(0, 48)


def test_ort_cpu_matches_torch_on_real_frames(ort_cpu, torch_ref, frames):
    assert ort_cpu.name == "onnxruntime-cpu"
    ref = Encoder(torch_ref, batch_size=16).features(frames)
    out = Encoder(ort_cpu, batch_size=16).features(frames)
    assert out.dtype == np.float32 and out.shape == (48, 1280)
    assert relative_error(out, ref) < 1e-4
    # batch 1 (the latency case) agrees too
    x = preprocess(frames[:1], 64)
    assert relative_error(ort_cpu.encode(x), torch_ref.encode(x)) < 1e-4


def test_ort_cpu_rejects_wrong_shapes(ort_cpu):
    with pytest.raises(InputError, match=r"\(N,3,64,64\)"):
        ort_cpu.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(InputError):
        ort_cpu.encode(np.zeros((0, 3, 64, 64), np.float32))


def test_onnx_cache_reused_and_keyed_by_spec(onnx_cache, ort_cpu, monkeypatch):
    path, _spec = cached_onnx(64, (18,), cache_dir=onnx_cache)
    assert path == ort_cpu.model_path
    mtime = path.stat().st_mtime_ns
    again, _ = cached_onnx(64, (18,), cache_dir=onnx_cache)
    assert again == path and again.stat().st_mtime_ns == mtime  # not re-exported
    other, other_spec = cached_onnx(32, (2,), cache_dir=onnx_cache)
    assert other != path and other_spec.layers == (2,) and other_spec.input_size == 32
    monkeypatch.setenv(CACHE_ENV, str(onnx_cache / "root"))
    assert cache_root() == onnx_cache / "root"


def test_threads_come_from_settings(onnx_cache):
    path, _ = cached_onnx(32, (2,), cache_dir=onnx_cache)
    backend = OnnxRuntimeBackend.from_file(path, threads=1)
    assert backend.threads == 1
    assert backend.session.get_session_options().intra_op_num_threads == 1


def test_static_int8_within_stated_tolerance(onnx_cache, ort_cpu, frames):
    calibration = preprocess(fashion_frames(1000, 64), 64).numpy()
    qpath = cached_quantized(ort_cpu.model_path, "static", calibration)
    q = OnnxRuntimeBackend.from_file(qpath)
    assert q.name == "onnxruntime-cpu-int8"
    x = preprocess(frames, 64)
    err = parity_error(q.encode(x), ort_cpu.encode(x), "int8")
    assert 0 < err < PARITY_TOLERANCE["int8"]
    assert cached_quantized(ort_cpu.model_path, "static", calibration) == qpath


def test_select_default_is_onnxruntime_cpu_and_logs_one_line(onnx_cache, caplog):
    caplog.set_level(logging.INFO, logger="edge_runtime.encoder.select")
    backend = select_backend(onnx_cache_dir=onnx_cache)
    assert backend.name == "onnxruntime-cpu"
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_runtime.encoder.select"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("encoder backend: onnxruntime-cpu fp32 (tensorrt: ")
    assert "torch-cuda: no CUDA device" in lines[0] or torch.cuda.is_available()


def test_select_from_device_profile(onnx_cache):
    """A Jetson profile asks for fp16; on this CPU machine ORT runs it as fp32, and says so."""
    from edge_runtime.config import load_profile

    cfg = load_profile("jetson-orin-nano-8gb")
    selection = select(cfg, onnx_cache_dir=onnx_cache, engine_cache_dir=onnx_cache / "engines")
    if tensorrt_status() is None:
        assert selection.backend.name.startswith("tensorrt")
    else:
        assert "tensorrt" in selection.skipped
        assert "runs fp16 as fp32" in selection.line()
    assert selection.backend.spec.input_size == cfg.encoder.input_size


def test_select_torch_preference_and_strict_tensorrt():
    assert select(backend="torch", verify=False).backend.name in ("torch", "torch-cuda")
    assert candidate_order("torch")[:2] == ("torch-cuda", "torch-cpu")
    assert "tensorrt" not in candidate_order("onnxruntime")
    if tensorrt_status() is not None:
        with pytest.raises(BackendUnavailableError, match="tensorrt: "):
            select(backend="tensorrt", strict=True)


def test_select_falls_back_when_a_backend_fails(onnx_cache):
    def failing_ort(name, settings):
        if name == "onnxruntime-cpu":
            raise BackendUnavailableError("simulated session failure")
        return build_candidate(name, settings)

    selection = select(onnx_cache_dir=onnx_cache, builder=failing_ort)
    assert selection.backend.name == "torch"
    assert "simulated session failure" in selection.skipped["onnxruntime-cpu"]


def test_select_skips_a_backend_that_disagrees_with_the_reference(onnx_cache):
    """A backend built from other weights (BatchNorm scales perturbed) fails the parity probe."""

    def wrong_weights(name, settings):
        if name != "onnxruntime-cpu":
            return build_candidate(name, settings)
        backend = TorchBackend.mobilenet(settings.input_size, settings.layers)
        with torch.no_grad():
            for m in backend.module.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.mul_(1.01)
        return backend, "fp32", []

    selection = select(onnx_cache_dir=onnx_cache, builder=wrong_weights)
    assert "features differ from torch" in selection.skipped["onnxruntime-cpu"]
    assert selection.backend.name == "torch"


def test_settings_validation():
    with pytest.raises(ConfigError, match=r"encoder\.backend"):
        EncoderSettings.from_any({"backend": "tflite"})
    with pytest.raises(ConfigError, match=r"encoder\.colour"):
        EncoderSettings.from_any(colour="red")
    s = EncoderSettings.from_any({"layers": [14, 18], "weights": "~/w.pth"}, threads=3)
    assert s.layers == (14, 18) and s.threads == 3 and "~" not in str(s.weights)


# ---------------------------------------------------------------- TensorRT engine cache keys


def _key(**changes) -> EngineKey:
    base = dict(
        spec=FeatureSpec(weights_sha256="a" * 64),
        precision="fp16",
        batch_shapes=(1, 8, 32),
        device_name="Orin",
        tensorrt_version="tensorrt-10.3.0",
    )
    base.update(changes)
    return EngineKey.make(**base)


def test_engine_key_changes_with_everything_an_engine_depends_on(tmp_path):
    ref = _key()
    assert _key().digest() == ref.digest() and _key().path(tmp_path) == ref.path(tmp_path)
    variants = [
        _key(device_name="Xavier"),
        _key(tensorrt_version="tensorrt-10.4.0"),
        _key(precision="fp32"),
        _key(batch_shapes=(1, 16, 32)),
        _key(batch_shapes=(1, 8, 64)),
        _key(spec=FeatureSpec(weights_sha256="b" * 64)),
        _key(spec=replace(FeatureSpec(weights_sha256="a" * 64), input_size=96)),
        _key(spec=FeatureSpec(layers=(14, 18), dims=(160, 1280), weights_sha256="a" * 64)),
    ]
    paths = {v.path(tmp_path) for v in variants}
    assert len(paths) == len(variants) and ref.path(tmp_path) not in paths


def test_engine_key_validation():
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        validate_batch_shapes((8, 1, 32))
    with pytest.raises(ConfigError):
        _key(precision="int8")
    assert trt_precision("int8") == "fp16" and trt_precision("fp32") == "fp32"


def test_stale_engine_is_not_loaded(tmp_path):
    """A cached file whose recorded key differs (e.g. another TensorRT) is rebuilt, not loaded."""
    key = _key()
    path = key.path(tmp_path)
    path.write_bytes(b"engine")
    stale = json.loads(
        json.dumps({"engine_key": {**key.__dict__, "tensorrt_version": "old"}}, default=list)
    )
    (tmp_path / f"{path.stem}.manifest.json").write_text(json.dumps(stale))
    assert load_engine(path, key) is None
    assert load_engine(tmp_path / "absent.ep", key) is None


# ---------------------------------------------------------------- GPU paths (skip on CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_torch_cuda_parity(torch_ref, frames):
    x = preprocess(frames, 64)
    cuda = TorchBackend.mobilenet(64, (18,), device="cuda")
    assert parity_error(cuda.encode(x), torch_ref.encode(x), "fp32") < 2e-3  # TF32 convs


@pytest.mark.gpu
@pytest.mark.skipif(
    cuda_provider_status() is not None, reason=f"onnxruntime-cuda: {cuda_provider_status()}"
)
def test_ort_cuda_parity(onnx_cache, torch_ref, frames):
    x = preprocess(frames, 64)
    cuda = OnnxRuntimeBackend.mobilenet(64, (18,), device="cuda", cache_dir=onnx_cache)
    assert cuda.name == "onnxruntime-cuda"
    assert parity_error(cuda.encode(x), torch_ref.encode(x), "fp32") < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(tensorrt_status() is not None, reason=f"tensorrt: {tensorrt_status()}")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_parity_and_engine_cache(tmp_path, torch_ref, frames, precision):
    x = preprocess(frames, 64)
    trt = TensorRTBackend.mobilenet(
        64, (18,), precision=precision, batch_shapes=(1, 8, 32), cache_dir=tmp_path
    )
    tol = 2e-3 if precision == "fp32" else PARITY_TOLERANCE["fp16"]
    assert parity_error(trt.encode(x), torch_ref.encode(x), precision) < tol
    engine = trt.key.path(tmp_path)
    mtime = engine.stat().st_mtime_ns
    again = TensorRTBackend.mobilenet(
        64, (18,), precision=precision, batch_shapes=(1, 8, 32), cache_dir=tmp_path
    )
    assert engine.stat().st_mtime_ns == mtime and again.key == trt.key


def test_availability_reports_a_reason_for_every_missing_backend():
    for name in ("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime-cpu", "torch-cpu"):
        reason = availability(name)
        assert reason is None or (isinstance(reason, str) and reason)
    assert availability("onnxruntime-cpu") is None and availability("torch-cpu") is None
