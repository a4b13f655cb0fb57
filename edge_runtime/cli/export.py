"""``edge-runtime export``: write the frozen encoder as ONNX, a torch.export program,
TorchScript or a TensorRT-compiled program, with a manifest beside it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import BackendUnavailableError, InputError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "exported-program", "torchscript", "tensorrt")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export the frozen encoder (onnx | exported-program | torchscript | tensorrt)",
        description=(
            "Export the frozen MobileNetV2 encoder with a dynamic batch dimension and write "
            "<name>.manifest.json beside it (input size, normalisation, feature layers, "
            "weights SHA-256). Encoder settings come from --config/--profile, then the flags."
        ),
    )
    p.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default onnx)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("export"),
        help="model file, or a directory to hold encoder.<ext> (default ./export)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", type=Path, help="runtime config YAML (its encoder section)")
    src.add_argument("--profile", help="device profile name or path, e.g. jetson-orin-nano-8gb")
    p.add_argument("--input-size", type=int, help="square input size in pixels")
    p.add_argument("--layers", help="comma-separated MobileNetV2 blocks to pool, e.g. 14,18")
    p.add_argument(
        "--weights", type=Path, help="MobileNetV2 checkpoint (default: installed weights)"
    )
    p.add_argument(
        "--taps",
        help="comma-separated MobileNetV2 blocks whose spatial maps become extra outputs, for "
        "adaptors below the last layer (onnx/tensorrt; default 3,6,10,13; 'none' for none)",
    )
    p.add_argument("--max-batch", type=int, default=1024, help="largest batch the export accepts")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (onnx format)")
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        help="tensorrt engine precision; int8 with onnx quantises (see --quantize)",
    )
    p.add_argument(
        "--quantize",
        choices=("static", "dynamic"),
        default="static",
        help="ONNX INT8 mode when --precision int8 (static needs --calibration)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        help="npz with uint8 frames ('images' or 'train_images') for static INT8",
    )
    p.set_defaults(func=run)


def encoder_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The encoder section from --config/--profile (the runtime's defaults otherwise), flags on
    top. Without either, the export is the encoder that ``RuntimeConfig()`` serves."""
    from edge_runtime.config import RuntimeConfig, load_config, load_profile

    if args.config is not None:
        cfg = load_config(args.config)
    elif args.profile is not None:
        cfg = load_profile(args.profile)
    else:
        cfg = RuntimeConfig()
    values: dict[str, Any] = cfg.encoder.model_dump()
    if args.input_size is not None:
        values["input_size"] = args.input_size
    if args.layers:
        try:
            values["layers"] = [int(v) for v in args.layers.split(",") if v.strip()]
        except ValueError as exc:
            raise InputError(
                f"--layers must be comma-separated integers, got {args.layers!r}"
            ) from exc
    if args.weights is not None:
        values["weights"] = args.weights
    if args.precision is not None:
        values["precision"] = args.precision
    if args.max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {args.max_batch}")
    return values


def load_calibration(path: Path, input_size: int) -> np.ndarray:
    from edge_runtime.encoder.preprocess import preprocess

    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read calibration file {path}: {exc}") from exc
    for key in ("images", "train_images"):
        if key in data:
            frames = data[key][:512]
            return preprocess(frames, input_size).numpy()
    raise InputError(f"calibration file {path} has no 'images' or 'train_images' array")


def run(args: argparse.Namespace) -> int:
    s = encoder_settings(args)
    if args.format == "tensorrt":
        return _run_tensorrt(args, s)
    from edge_runtime.encoder.backend import FeatureSpec, build_feature_module
    from edge_runtime.encoder.export import export_encoder

    module, sha = build_feature_module(s["layers"], s["weights"])
    spec = FeatureSpec(
        input_size=s["input_size"], layers=module.layers, dims=module.dims, weights_sha256=sha
    )
    result = export_encoder(
        module,
        spec,
        args.format,
        args.out,
        max_batch=args.max_batch,
        opset=args.opset,
        taps=_taps(args),
    )
    print(f"wrote {result.path}")
    print(f"wrote {result.manifest_path}")
    if s["precision"] == "int8":
        if args.format != "onnx":
            raise InputError("--precision int8 applies to --format onnx (or tensorrt) only")
        from edge_runtime.encoder.quantize import quantize_onnx

        calibration = None
        if args.quantize == "static":
            if args.calibration is None:
                raise InputError("static INT8 needs --calibration FILE.npz (or --quantize dynamic)")
            calibration = load_calibration(args.calibration, spec.input_size)
        dst = result.path.with_name(f"{result.path.stem}.int8{result.path.suffix}")
        quantize_onnx(result.path, dst, args.quantize, calibration)
        print(f"wrote {dst}")
    return 0


def _taps(args: argparse.Namespace) -> tuple[int, ...] | None:
    """``--taps``: None (the format's default), () for "none", else the blocks."""
    raw = getattr(args, "taps", None)
    if raw is None:
        return None
    if raw.strip().lower() == "none":
        return ()
    try:
        return tuple(int(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise InputError(f"--taps must be comma-separated block numbers, got {raw!r}") from None


def _run_tensorrt(args: argparse.Namespace, s: dict[str, Any]) -> int:
    from edge_runtime.encoder.tensorrt_backend import missing_message, tensorrt_status

    if tensorrt_status() is not None:
        raise BackendUnavailableError(missing_message())

    from edge_runtime.encoder.backend import FeatureSpec, build_feature_module
    from edge_runtime.encoder.export import resolve_out_path
    from edge_runtime.encoder.tensorrt_backend import (
        EngineFacts,
        EngineKey,
        compile_engine,
        trt_precision,
    )

    module, sha = build_feature_module(s["layers"], s["weights"])
    spec = FeatureSpec(
        input_size=s["input_size"], layers=module.layers, dims=module.dims, weights_sha256=sha
    )
    batch = int(s.get("batch_size", 32))
    from edge_runtime.encoder.backend import TAP_BLOCKS

    taps = _taps(args)
    key = EngineKey.make(
        spec,
        trt_precision(s["precision"]),
        (1, batch, max(batch, 32)),
        facts=EngineFacts.detect("cuda:0"),
        taps=TAP_BLOCKS if taps is None else taps,
    )
    path = resolve_out_path(args.out, "tensorrt")
    compile_engine(module, spec, key, path)
    print(f"wrote {path}")
    return 0
