"""Encoder export: ONNX (checked), torch.export with a dynamic batch, TorchScript, manifests,
and the TensorRT format's one-line message where torch-tensorrt is missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_runtime.encoder import FeatureSpec, TorchBackend, build_feature_module
from edge_runtime.encoder.export import (
    check_onnx,
    export_encoder,
    export_program,
    manifest_path_for,
    read_manifest,
    relative_error,
)
from edge_runtime.encoder.onnx_backend import cached_onnx
from edge_runtime.encoder.tensorrt_backend import tensorrt_status
from edge_runtime.encoder.weights import default_weights_path, file_sha256
from edge_runtime.errors import CheckpointError

SMALL_LAYERS = (2,)  # three blocks: a real slice of the encoder that exports in seconds


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX cache per test session, shared with test_backends.py (same base temp)."""
    return tmp_path_factory.getbasetemp() / "onnx-cache"


@pytest.fixture(scope="module")
def full_torch() -> TorchBackend:
    return TorchBackend.mobilenet(64, (18,))


@pytest.fixture(scope="module")
def small() -> tuple[torch.nn.Module, FeatureSpec]:
    module, sha = build_feature_module(SMALL_LAYERS)
    spec = FeatureSpec(input_size=32, layers=module.layers, dims=module.dims, weights_sha256=sha)
    return module, spec


def test_full_encoder_onnx_checks_and_runs_any_batch(onnx_cache: Path, full_torch: TorchBackend):
    path, spec = cached_onnx(64, (18,), cache_dir=onnx_cache)
    check_onnx(path, spec)  # onnx.checker(full) + strict shape inference + symbolic batch
    manifest = read_manifest(path)
    assert manifest["spec"]["input_size"] == 64
    assert manifest["spec"]["layers"] == [18]
    assert manifest["spec"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert manifest["spec"]["weights_sha256"] == file_sha256(default_weights_path())
    assert manifest["file_sha256"] == file_sha256(path)
    assert manifest["input"]["shape"] == ["batch", 3, 64, 64]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.randn(n, 3, 64, 64)
        (out,) = session.run(None, {"input": x.numpy()})
        assert out.shape == (n, 1280)
        assert relative_error(out, full_torch.encode(x)) < 1e-4


def test_full_encoder_passes_torch_export_with_dynamic_batch(full_torch: TorchBackend):
    """The graph torch-tensorrt's dynamo path consumes: one program, any batch in range."""
    program = export_program(full_torch.module, full_torch.spec, max_batch=64)
    runner = program.module()
    for n in (1, 3, 8):
        x = torch.randn(n, 3, 64, 64)
        with torch.no_grad():
            out = runner(x).numpy()
        assert out.shape == (n, 1280)
        assert relative_error(out, full_torch.encode(x)) < 1e-4
    with pytest.raises(Exception, match=r"(?i)batch|range|constraint|guard"):
        runner(torch.randn(65, 3, 64, 64))


@pytest.mark.parametrize("fmt", ["exported-program", "torchscript"])
def test_torch_formats_round_trip(tmp_path: Path, small, fmt: str):
    module, spec = small
    result = export_encoder(module, spec, fmt, tmp_path, max_batch=16)
    assert result.path.is_file() and result.manifest_path == manifest_path_for(result.path)
    assert json.loads(result.manifest_path.read_text())["format"] == fmt
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = module(x).numpy()
        if fmt == "exported-program":
            out = torch.export.load(str(result.path)).module()(x).numpy()
        else:
            out = TorchBackend.from_module(result.path, input_size=32).encode(x)
    assert relative_error(out, ref) < 1e-4


def test_cli_export_onnx_writes_model_and_manifest(tmp_path: Path, capsys):
    from edge_runtime.cli import main

    out = tmp_path / "enc.onnx"
    rc = main(
        [
            "-q",
            "export",
            "--format",
            "onnx",
            "--out",
            str(out),
            "--input-size",
            "32",
            "--layers",
            "2",
            "--max-batch",
            "8",
        ]
    )
    assert rc == 0
    manifest = json.loads((tmp_path / "enc.manifest.json").read_text())
    assert manifest["spec"]["layers"] == [2] and manifest["spec"]["input_size"] == 32
    assert manifest["batch"] == {"min": 1, "max": 8}
    spec = FeatureSpec.from_dict(manifest["spec"])
    check_onnx(out, spec)
    assert str(out) in capsys.readouterr().out


@pytest.mark.skipif(tensorrt_status() is None, reason="torch-tensorrt is installed here")
def test_cli_tensorrt_missing_is_one_line(tmp_path: Path, capsys):
    from edge_runtime.cli import main

    rc = main(["export", "--format", "tensorrt", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert "torch_tensorrt" in err and "Jetson" in err and "JetPack" in err
    assert not list(tmp_path.iterdir())


def test_check_onnx_and_manifest_reject_bad_files(tmp_path: Path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(CheckpointError, match=r"onnx\.checker"):
        check_onnx(bad, FeatureSpec())
    with pytest.raises(CheckpointError, match="no manifest"):
        read_manifest(bad)
    manifest_path_for(bad).write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_manifest(bad)


def test_relative_error_is_scale_free():
    ref = np.array([[1.0, -2.0], [0.5, 4.0]], dtype=np.float32)
    assert relative_error(ref, ref) == 0.0
    assert relative_error(ref + 0.004, ref) == pytest.approx(1e-3, rel=1e-3)
    assert relative_error(10 * (ref + 0.004), 10 * ref) == pytest.approx(1e-3, rel=1e-3)


def test_cli_export_without_config_is_the_default_runtime_encoder(tmp_path: Path) -> None:
    """`edge-runtime export` with no --config/--profile exports the layers the runtime serves."""
    from edge_runtime.cli import build_parser, main
    from edge_runtime.cli.export import encoder_settings
    from edge_runtime.config import RuntimeConfig
    from edge_runtime.encoder.select import EncoderSettings

    default = RuntimeConfig().encoder
    settings = encoder_settings(build_parser().parse_args(["export"]))
    assert settings["layers"] == default.layers and settings["input_size"] == default.input_size
    assert list(EncoderSettings().layers) == default.layers  # backend selection without config
    out = tmp_path / "enc.onnx"
    assert main(["-q", "export", "--out", str(out), "--input-size", "32", "--max-batch", "2"]) == 0
    manifest = json.loads((tmp_path / "enc.manifest.json").read_text())
    assert manifest["spec"]["layers"] == default.layers


# ---------------------------------------------------------------- torch.onnx.export on older torch


def _jetpack_torch_onnx_export(
    model,
    args,
    f,
    export_params=True,
    verbose=False,
    training=None,
    input_names=None,
    output_names=None,
    operator_export_type=None,
    opset_version=None,
    do_constant_folding=True,
    dynamic_axes=None,
    keep_initializers_as_inputs=None,
    custom_opsets=None,
    export_modules_as_functions=False,
):
    """torch 2.1's torch.onnx.export signature (JetPack 6.0): no dynamo, external_data,
    optimize."""


def test_onnx_export_kwargs_drop_what_old_torch_lacks():
    from edge_runtime.encoder.export import onnx_export_kwargs

    script = onnx_export_kwargs(
        _jetpack_torch_onnx_export,
        dynamo=False,
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
        do_constant_folding=True,
        opset_version=17,
    )
    assert script == {
        "input_names": ["input"],
        "dynamic_axes": {"input": {0: "batch"}},
        "do_constant_folding": True,
        "opset_version": 17,
    }
    # the torch.export-based exporter does not exist there: the caller takes the TorchScript path
    assert onnx_export_kwargs(_jetpack_torch_onnx_export, dynamo=True, optimize=True) is None
    # today's torch takes everything
    full = onnx_export_kwargs(torch.onnx.export, dynamo=True, external_data=False, optimize=True)
    assert full == {"dynamo": True, "external_data": False, "optimize": True}
    # a **kwargs wrapper is trusted with everything
    assert onnx_export_kwargs(lambda *a, **k: None, dynamo=True) == {"dynamo": True}


def test_onnx_export_runs_with_an_old_torch_signature(tmp_path: Path, small, monkeypatch):
    """With torch.onnx.export standing in for torch 2.1's (no dynamo/external_data/optimize),
    export_onnx goes straight to the TorchScript exporter and passes none of them."""
    from edge_runtime.encoder import export as export_mod

    module, spec = small
    real = torch.onnx.export
    calls: list[dict] = []

    def old_export(
        model,
        args,
        f,
        export_params=True,
        verbose=False,
        input_names=None,
        output_names=None,
        opset_version=None,
        do_constant_folding=True,
        dynamic_axes=None,
    ):
        kwargs = dict(
            input_names=input_names,
            output_names=output_names,
            opset_version=opset_version,
            do_constant_folding=do_constant_folding,
            dynamic_axes=dynamic_axes,
        )
        calls.append(kwargs)
        return real(model, args, f, dynamo=False, **kwargs)

    monkeypatch.setattr(export_mod.torch.onnx, "export", old_export)
    path = export_mod.export_onnx(module, spec, tmp_path / "old.onnx", max_batch=8)
    assert len(calls) == 1 and calls[0]["dynamic_axes"] == {
        "input": {0: "batch"},
        "features": {0: "batch"},
    }
    check_onnx(path, spec)
