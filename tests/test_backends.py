"""Compiled encoder backends: parity with the torch reference, caching, INT8, engine keys
and the selection chain. GPU paths run where a GPU is present and skip with a reason here."""

from __future__ import annotations

import gzip
import inspect
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
    cuda_providers,
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
    EngineFacts,
    EngineKey,
    TensorRTBackend,
    check_engine,
    load_engine,
    precision_compile_kwargs,
    save_kwargs,
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


# ---------------------------------------------------------------- issue 15: bad engines, keys


class _RaisesOnEncode:
    """A backend that builds but fails on its first batch, as a bad engine's module does."""

    name = "broken"

    def encode(self, batch):
        raise ValueError("engine deserialisation failed")


def test_select_falls_back_when_a_builder_raises_value_error(onnx_cache, caplog):
    """torch_tensorrt.load raises ValueError on any failure: select moves down the chain."""

    def bad_engine(name, settings):
        if name == "onnxruntime-cpu":
            raise ValueError("Failed to deserialize the engine")
        return build_candidate(name, settings)

    caplog.set_level(logging.WARNING, logger="edge_runtime.encoder.select")
    selection = select(onnx_cache_dir=onnx_cache, builder=bad_engine)
    assert selection.backend.name == "torch"
    assert "ValueError: Failed to deserialize" in selection.skipped["onnxruntime-cpu"]
    assert any("onnxruntime-cpu failed" in r.getMessage() for r in caplog.records)


def test_select_falls_back_when_the_parity_probe_raises(onnx_cache):
    """The parity call is inside the try: a backend whose encode raises is skipped."""

    def broken_encode(name, settings):
        if name == "onnxruntime-cpu":
            return _RaisesOnEncode(), "fp32", []
        return build_candidate(name, settings)

    selection = select(onnx_cache_dir=onnx_cache, builder=broken_encode)
    assert selection.backend.name == "torch"
    assert "engine deserialisation failed" in selection.skipped["onnxruntime-cpu"]


def test_select_skips_a_backend_whose_features_are_nan(onnx_cache):
    def nan_features(name, settings):
        if name != "onnxruntime-cpu":
            return build_candidate(name, settings)
        backend = TorchBackend.mobilenet(settings.input_size, settings.layers)
        with torch.no_grad():
            next(backend.module.parameters()).fill_(float("nan"))
        return backend, "fp32", []

    selection = select(onnx_cache_dir=onnx_cache, builder=nan_features)
    assert "features differ from torch" in selection.skipped["onnxruntime-cpu"]


def _cached_engine(tmp_path: Path, key: EngineKey, payload: bytes) -> Path:
    path = key.path(tmp_path)
    path.write_bytes(payload)
    manifest = {"engine_key": json.loads(json.dumps(key.__dict__, default=list))}
    (tmp_path / f"{path.stem}.manifest.json").write_text(json.dumps(manifest))
    return path


def test_corrupt_engine_file_is_deleted_and_reported_for_rebuild(tmp_path, caplog):
    """A real corrupt program file whose key matches: the loader fails, the file and its
    manifest are deleted, and load_engine answers None so the caller rebuilds."""
    key = _key()
    path = _cached_engine(tmp_path, key, b"PK\x03\x04 not a torch.export archive" * 8)
    caplog.set_level(logging.WARNING, logger="edge_runtime.encoder.tensorrt_backend")

    def export_loader(p):  # what torch_tensorrt.load falls back to for .ep files
        return torch.export.load(str(p)).module()

    assert load_engine(path, key, loader=export_loader) is None
    assert not path.exists() and not (tmp_path / f"{path.stem}.manifest.json").exists()
    assert any("deleting unusable TensorRT engine" in r.getMessage() for r in caplog.records)


def test_engine_loader_value_error_deletes_the_file(tmp_path):
    key = _key()
    path = _cached_engine(tmp_path, key, b"engine")

    def tt_load(p):
        raise ValueError("The file doesn't correspond to a valid ExportedProgram")

    assert load_engine(path, key, loader=tt_load) is None
    assert not path.exists()


def test_good_engine_file_loads_through_the_loader(tmp_path):
    """The loader seam with a real torch.export program: a matching, valid file loads."""
    module = torch.nn.Linear(4, 2)
    ep = torch.export.export(module, (torch.randn(2, 4),))
    key = _key()
    path = key.path(tmp_path)
    torch.export.save(ep, str(path))
    _cached_engine(tmp_path, key, path.read_bytes())
    loaded = load_engine(path, key, loader=lambda p: torch.export.load(str(p)).module())
    assert loaded is not None and path.exists()
    x = torch.randn(2, 4)
    assert torch.allclose(loaded(x), module(x))


def _facts(**changes) -> EngineFacts:
    base = dict(
        device_name="Orin",
        tensorrt_version="tensorrt-10.3.0",
        torch_version="2.5.0a0+nv24.08",
        torch_tensorrt_version="2.5.0",
        compute_capability="8.7",
        sm_count=8,
        memory_gib=7,
    )
    base.update(changes)
    return EngineFacts(**base)


def test_engine_key_tells_orin_modules_and_versions_apart(tmp_path):
    """get_device_name says "Orin" on Nano, NX and AGX: SMs, memory and versions decide."""
    spec = FeatureSpec(weights_sha256="a" * 64)

    def key(**changes):
        return EngineKey.make(spec, "fp16", (1, 8, 32), facts=_facts(**changes))

    ref = key()
    assert key() == ref and key().digest() == ref.digest()  # a pure function of the facts
    variants = [
        key(sm_count=4),  # Orin Nano 4GB
        key(sm_count=16, memory_gib=61),  # AGX Orin 64GB
        key(memory_gib=15),  # Orin NX 16GB
        key(compute_capability="7.2"),  # Xavier
        key(torch_version="2.8.0"),
        key(torch_tensorrt_version="2.8.0"),
        key(tensorrt_version="tensorrt-10.7.0"),
    ]
    paths = {v.path(tmp_path) for v in variants}
    assert len(paths) == len(variants) and ref.path(tmp_path) not in paths
    assert ref.sm_count == 8 and ref.memory_gib == 7 and ref.compute_capability == "8.7"


def test_engine_facts_detect_reads_the_device_properties(monkeypatch):
    class Props:
        name, major, minor, multi_processor_count = "Orin", 8, 7, 16
        total_memory = 62 * 2**30 + 123

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    facts = EngineFacts.detect("cuda:0")
    assert (facts.device_name, facts.compute_capability, facts.sm_count, facts.memory_gib) == (
        "Orin",
        "8.7",
        16,
        62,
    )
    assert facts.torch_version == torch.__version__


# ---------------------------------------------------------------- fp16 across torch-tensorrt


def _sig(*names: str) -> inspect.Signature:
    return inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
    )


def test_fp16_uses_enabled_precisions_with_explicit_typing_off_on_2_10():
    kwargs, built = precision_compile_kwargs(
        _sig("inputs", "enabled_precisions", "use_explicit_typing"), "fp16"
    )
    assert kwargs == {"enabled_precisions": {torch.float16}, "use_explicit_typing": False}
    assert built.startswith("fp16")


def test_fp16_uses_enabled_precisions_alone_before_explicit_typing():
    kwargs, built = precision_compile_kwargs(_sig("inputs", "enabled_precisions"), "fp16")
    assert kwargs == {"enabled_precisions": {torch.float16}} and built.startswith("fp16")


def test_fp16_uses_autocast_where_enabled_precisions_is_gone():
    kwargs, built = precision_compile_kwargs(
        _sig("inputs", "use_explicit_typing", "enable_autocast", "autocast_low_precision_type"),
        "fp16",
    )
    assert kwargs == {
        "enable_autocast": True,
        "autocast_low_precision_type": torch.float16,
        "use_explicit_typing": True,
    }
    assert built == "fp16 (autocast)"


def test_fp16_without_any_option_says_it_builds_fp32():
    kwargs, built = precision_compile_kwargs(_sig("inputs"), "fp16")
    assert kwargs == {} and built.startswith("fp32")
    kwargs, built = precision_compile_kwargs(_sig("enabled_precisions", "enable_autocast"), "fp32")
    assert kwargs == {"enabled_precisions": {torch.float32}, "enable_autocast": False}
    assert built == "fp32"


# ---------------------------------------------------------------- saving for a restart


def test_save_kwargs_pass_retrace_false_and_dynamic_shapes_where_taken():
    example = [torch.zeros(8, 3, 64, 64)]
    shapes = ({0: torch.export.Dim("batch", min=1, max=32)},)
    new = save_kwargs(
        _sig("arg_inputs", "kwarg_inputs", "retrace", "dynamic_shapes"), example, shapes
    )
    assert new["retrace"] is False and new["dynamic_shapes"] is shapes
    assert new["arg_inputs"] == example and "inputs" not in new
    old = save_kwargs(_sig("inputs", "output_format"), example, shapes)
    assert set(old) == {"inputs"}


def test_check_engine_runs_min_opt_max_and_rejects_a_pinned_program():
    key = _key(batch_shapes=(1, 2, 3))
    spec = FeatureSpec(input_size=32, layers=(0,), dims=(4,), weights_sha256="a" * 64)
    seen = []

    def ok(x):
        seen.append(x.shape[0])
        return torch.zeros(x.shape[0], 4)

    check_engine(ok, key, spec, "cpu")
    assert seen == [1, 2, 3]

    def pinned(x):  # a re-traced program pinned to the opt batch
        return torch.zeros(2, 4)

    with pytest.raises(InputError, match="batch 1"):
        check_engine(pinned, key, spec, "cpu")


# ---------------------------------------------------------------- ONNX Runtime CUDA options


def test_cuda_providers_for_a_shared_memory_device(tmp_path):
    providers = cuda_providers(
        ["CUDAExecutionProvider", "CPUExecutionProvider"], device_id=0, memory_budget_mb=3072
    )
    assert [p if isinstance(p, str) else p[0] for p in providers] == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    cuda = providers[0][1]
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cuda["arena_extend_strategy"] == "kSameAsRequested"
    assert cuda["gpu_mem_limit"] == 3072 * 2**20 and cuda["device_id"] == 0


def test_cuda_providers_offer_tensorrt_with_fp16_and_engine_cache(tmp_path):
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = cuda_providers(available, device_id=1, precision="fp16", trt_cache_dir=tmp_path)
    name, trt = providers[0]
    assert name == "TensorrtExecutionProvider" and providers[1][0] == "CUDAExecutionProvider"
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path) and trt["device_id"] == 1
    assert "gpu_mem_limit" not in providers[1][1]  # no budget given: ORT's own default
    _, trt32 = cuda_providers(available, precision="fp32")[0]
    assert trt32["trt_fp16_enable"] is False


def test_settings_take_the_memory_budget_from_the_device_profile():
    from edge_runtime.config import load_profile

    cfg = load_profile("jetson-orin-nano-8gb")
    s = EncoderSettings.from_any(cfg)
    assert s.memory_budget_mb == cfg.device.memory_budget_mb
    assert EncoderSettings.from_any(cfg.encoder).memory_budget_mb is None
