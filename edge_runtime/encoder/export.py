"""Exporting the frozen encoder: ONNX, torch.export programs and TorchScript, with a manifest.

Every export has a dynamic batch dimension (1..``max_batch``) and a fixed
(3, S, S) image; beside the model file sits ``<stem>.manifest.json`` naming the
input size, normalisation, pooled layers and the SHA-256 of the weights, so a
consumer (another process, a Jetson, a C++ runtime) can preprocess frames the
same way and refuse a model built from other weights.

An ONNX export may also carry *taps*: besides the pooled ``features`` output, one
``tap_<block>`` output per tapped MobileNetV2 block, the (batch, C, h, w) map that conv
adaptors read. The manifest lists them under ``"taps"``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from edge_runtime.encoder.backend import TAP_BLOCKS, FeatureSpec, normalise_taps, tap_shape
from edge_runtime.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "exported-program", "torchscript", "tensorrt"]
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "exported-program", "torchscript", "tensorrt")
SUFFIXES = {"onnx": ".onnx", "exported-program": ".pt2", "torchscript": ".ts", "tensorrt": ".ep"}

INPUT_NAME = "input"
OUTPUT_NAME = "features"
DEFAULT_MAX_BATCH = 1024
ONNX_OPSET = 18
MANIFEST_SCHEMA = 1
# Bump when the exported graph changes for the same spec, to invalidate caches. (Taps are
# part of the cache keys themselves, so adding them needed no bump.)
EXPORT_REVISION = 1


def tap_output_name(block: int) -> str:
    """The ONNX output carrying block ``block``'s map."""
    return f"tap_{int(block)}"


def tap_entries(spec: FeatureSpec, taps: Sequence[int]) -> list[dict[str, Any]]:
    """The manifest's ``"taps"`` list: block, map shape (C, h, w) and ONNX output name."""
    return [
        {"block": b, "shape": list(tap_shape(b, spec.input_size)), "output": tap_output_name(b)}
        for b in normalise_taps(taps)
    ]


def manifest_taps(manifest: dict[str, Any]) -> tuple[int, ...]:
    """The tap blocks a manifest lists (none for exports made before taps existed)."""
    try:
        return normalise_taps([int(t["block"]) for t in manifest.get("taps") or ()])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"manifest 'taps' is corrupt: {exc}") from exc


@dataclass(frozen=True)
class ExportResult:
    """Where an export went and what its manifest says."""

    path: Path
    manifest_path: Path
    manifest: dict[str, Any]


def manifest_path_for(model_path: str | Path) -> Path:
    """``dir/encoder.onnx`` → ``dir/encoder.manifest.json``."""
    p = Path(model_path)
    return p.with_name(f"{p.stem}.manifest.json")


def build_manifest(
    fmt: str,
    model_path: Path,
    spec: FeatureSpec,
    *,
    max_batch: int,
    precision: str = "fp32",
    extra: dict[str, Any] | None = None,
    taps: Sequence[int] = (),
) -> dict[str, Any]:
    s = spec.input_size
    manifest: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA,
        "format": fmt,
        "file": model_path.name,
        "file_sha256": _sha256_file(model_path),
        "precision": precision,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, s, s],
            "dtype": "float32",
            "layout": "NCHW",
            "preprocess": "RGB in [0,1], resized bilinearly to input_size, then (x - mean) / std",
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", spec.dim], "dtype": "float32"},
        "taps": tap_entries(spec, taps),
        "batch": {"min": 1, "max": int(max_batch)},
        "spec": spec.to_dict(),
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if extra:
        manifest.update(extra)
    return manifest


def write_manifest(manifest: dict[str, Any], path: Path) -> None:
    _atomic_write_bytes(path, (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(model_path: str | Path) -> dict[str, Any]:
    """The manifest beside an exported model; CheckpointError if missing or unreadable."""
    mpath = manifest_path_for(model_path)
    try:
        manifest = json.loads(mpath.read_text())
        FeatureSpec.from_dict(manifest["spec"])
    except FileNotFoundError as exc:
        raise CheckpointError(f"no manifest beside {model_path} (expected {mpath})") from exc
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"manifest {mpath} is corrupt: {exc}") from exc
    return manifest


def spec_from_manifest(manifest: dict[str, Any]) -> FeatureSpec:
    return FeatureSpec.from_dict(manifest["spec"])


# --------------------------------------------------------------------------- preparation


def export_copy(module: nn.Module, taps: Sequence[int] = ()) -> nn.Module:
    """A contiguous-format, eval-mode, grad-free copy, so the backend's module is untouched.

    For the built-in encoder (:class:`PooledFeatures`) the copy holds only the blocks the
    export runs; with ``taps`` it returns ``(features, *maps)`` in block order. Other
    modules cannot be tapped (InputError)."""
    taps = normalise_taps(taps)
    view = getattr(module, "export_view", None)
    if callable(view):
        module = view(taps)
    elif taps:
        raise InputError(
            f"only the built-in MobileNetV2 encoder can export taps {list(taps)}; "
            f"{type(module).__name__} has no named blocks"
        )
    m = copy.deepcopy(module).eval().to(memory_format=torch.contiguous_format)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def example_input(spec: FeatureSpec, batch: int = 2) -> torch.Tensor:
    # Batch 2, not 1: torch.export specialises dimensions whose example size is 0 or 1.
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, spec.input_size, spec.input_size, generator=g)


def _forward_arg_name(module: nn.Module) -> str:
    params = list(inspect.signature(module.forward).parameters)
    return params[0] if params else "x"


def batch_dynamic_shapes(module: nn.Module, max_batch: int) -> dict[str, dict[int, Any]]:
    """torch.export's dynamic_shapes for a dynamic batch of 1..max_batch."""
    batch = torch.export.Dim("batch", min=1, max=int(max_batch))
    return {_forward_arg_name(module): {0: batch}}


def export_program(
    module: nn.Module,
    spec: FeatureSpec,
    max_batch: int = DEFAULT_MAX_BATCH,
    device: str | torch.device = "cpu",
    taps: Sequence[int] = (),
) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch: the graph torch-tensorrt's dynamo path consumes.
    With ``taps`` the program returns ``(features, *maps)``."""
    m = export_copy(module, taps).to(device)
    x = example_input(spec).to(device)
    with torch.no_grad():
        return torch.export.export(
            m, (x,), dynamic_shapes=batch_dynamic_shapes(m, max_batch), strict=False
        )


# --------------------------------------------------------------------------- formats


def export_onnx(
    module: nn.Module,
    spec: FeatureSpec,
    path: str | Path,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    opset: int = ONNX_OPSET,
    program: torch.export.ExportedProgram | None = None,
    taps: Sequence[int] = (),
) -> Path:
    """Export to a single ONNX file (weights inline) with a dynamic batch, then check it.

    Uses the torch.export-based exporter (from ``program`` when given, which saves
    re-tracing; it must then have been exported with the same ``taps``): its graph is
    BatchNorm-folded and free of Constant nodes. The TorchScript-based exporter is the
    fallback for modules torch.export cannot trace. ``taps`` add one ``tap_<block>``
    output each, after ``features``.
    """
    path = Path(path)
    taps = normalise_taps(taps)
    m = export_copy(module, taps)
    x = example_input(spec)
    outputs = [OUTPUT_NAME, *(tap_output_name(b) for b in taps)]
    names = {"input_names": [INPUT_NAME], "output_names": outputs, "opset_version": opset}
    dynamo_kwargs = onnx_export_kwargs(
        torch.onnx.export,
        dynamo=True,
        external_data=False,
        optimize=True,
        verbose=False,
        **names,
    )
    script_kwargs = onnx_export_kwargs(
        torch.onnx.export,
        dynamo=False,
        dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
        do_constant_folding=True,
        **names,
    )
    with _atomic_target(path) as tmp:
        try:
            if dynamo_kwargs is None:
                raise CheckpointError("this torch's torch.onnx.export has no dynamo exporter")
            with _quiet(), torch.no_grad():
                if program is None:
                    program = export_program(m, spec, max_batch)  # m is already tapped
                torch.onnx.export(program, (x,), str(tmp), **dynamo_kwargs)
        except Exception as exc:  # torch.export cannot trace some user modules
            log.warning(
                "torch.export-based ONNX export failed (%s); using the TorchScript exporter",
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            if script_kwargs is None:  # unreachable: dynamo=False is dropped, never refused
                raise
            with _quiet(), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(m, (x,), str(tmp), **script_kwargs)
        check_onnx(tmp, spec, taps)
    return path


def onnx_export_kwargs(export: Callable[..., Any], **wanted: Any) -> dict[str, Any] | None:
    """The keywords of ``wanted`` that ``export`` (``torch.onnx.export``) accepts.

    Older torch (JetPack 5/6's 2.0-2.4 wheels) has no ``dynamo``, ``external_data`` or
    ``optimize``: those are dropped, since without them it writes one file and runs the
    TorchScript exporter anyway. The one request it cannot meet is ``dynamo=True``: then
    None, for the caller to take its TorchScript path. A signature that takes
    ``**kwargs`` (or none that can be read) gets everything.
    """
    try:
        params = inspect.signature(export).parameters
    except (TypeError, ValueError):
        return dict(wanted)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(wanted)
    if wanted.get("dynamo") and "dynamo" not in params:
        return None
    return {k: v for k, v in wanted.items() if k in params}


def check_onnx(path: str | Path, spec: FeatureSpec, taps: Sequence[int] = ()) -> None:
    """onnx.checker (full) plus strict shape inference; the batch axis must stay symbolic,
    on ``features`` and on each ``tap_<block>`` output of ``taps`` ([batch, C, h, w])."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise CheckpointError(
            f"ONNX model {path} failed onnx.checker/shape inference: {exc}"
        ) from exc
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.input, *inferred.graph.output]
    }
    s = spec.input_size
    inp, out = shapes.get(INPUT_NAME), shapes.get(OUTPUT_NAME)
    if inp is None or out is None:
        raise CheckpointError(f"ONNX model {path} lacks '{INPUT_NAME}'/'{OUTPUT_NAME}': {shapes}")
    if not isinstance(inp[0], str) or inp[1:] != [3, s, s]:
        raise CheckpointError(f"ONNX input shape {inp} is not [batch, 3, {s}, {s}]")
    if not isinstance(out[0], str) or out[1:] != [spec.dim]:
        raise CheckpointError(f"ONNX output shape {out} is not [batch, {spec.dim}]")
    for b in normalise_taps(taps):
        name, want = tap_output_name(b), list(tap_shape(b, s))
        got = shapes.get(name)
        if got is None:
            raise CheckpointError(f"ONNX model {path} lacks tap output '{name}'")
        if not isinstance(got[0], str) or got[1:] != want:
            raise CheckpointError(f"ONNX output '{name}' shape {got} is not [batch, {want}]")


def export_exported_program(
    module: nn.Module, spec: FeatureSpec, path: str | Path, *, max_batch: int = DEFAULT_MAX_BATCH
) -> Path:
    """torch.export program (``.pt2``) with a dynamic batch; load with ``torch.export.load``."""
    path = Path(path)
    ep = export_program(module, spec, max_batch)
    with _atomic_target(path) as tmp:
        torch.export.save(ep, str(tmp))
    return path


def export_torchscript(module: nn.Module, spec: FeatureSpec, path: str | Path) -> Path:
    """Traced TorchScript. Tracing records no batch-dependent control flow in this
    encoder, so the batch stays free; the export is checked at two batch sizes."""
    path = Path(path)
    m = export_copy(module)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; it still runs
        traced = torch.jit.trace(m, example_input(spec), check_trace=False)
        for n in (1, 3):
            x = example_input(spec, n)
            if not torch.allclose(traced(x), m(x), rtol=1e-4, atol=1e-5):
                raise CheckpointError(f"TorchScript trace disagrees with the module at batch {n}")
        with _atomic_target(path) as tmp:
            torch.jit.save(traced, str(tmp))
    return path


def export_encoder(
    module: nn.Module,
    spec: FeatureSpec,
    fmt: str,
    out: str | Path,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    opset: int = ONNX_OPSET,
    taps: Sequence[int] | None = None,
) -> ExportResult:
    """Export ``module`` as ``fmt`` to ``out`` (a file, or a directory for ``encoder.<ext>``)
    and write the manifest beside it. TensorRT is handled by ``tensorrt_backend``.

    ``taps`` (ONNX only): the blocks whose maps become extra outputs; ``None`` means
    :data:`TAP_BLOCKS` for the built-in MobileNetV2 and none for any other module. The
    torch formats keep their single ``features`` output."""
    if fmt not in ("onnx", "exported-program", "torchscript"):
        raise InputError(
            f"export format must be onnx, exported-program or torchscript, got {fmt!r}"
        )
    if taps is None:
        taps = TAP_BLOCKS if (fmt == "onnx" and hasattr(module, "export_view")) else ()
    taps = normalise_taps(taps)
    if taps and fmt != "onnx":
        raise InputError(f"taps are exported with --format onnx (or tensorrt) only, not {fmt}")
    path = resolve_out_path(out, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    if fmt == "onnx":
        export_onnx(module, spec, path, max_batch=max_batch, opset=opset, taps=taps)
        extra["opset"] = opset
    elif fmt == "exported-program":
        export_exported_program(module, spec, path, max_batch=max_batch)
    else:
        export_torchscript(module, spec, path)
    manifest = build_manifest(fmt, path, spec, max_batch=max_batch, extra=extra, taps=taps)
    mpath = manifest_path_for(path)
    write_manifest(manifest, mpath)
    log.info("exported %s encoder to %s (manifest %s)", fmt, path, mpath.name)
    return ExportResult(path, mpath, manifest)


def resolve_out_path(out: str | Path, fmt: str) -> Path:
    """A path with a suffix is the model file; otherwise it is a directory."""
    out = Path(out).expanduser()
    if out.suffix and not out.is_dir():
        return out
    return out / f"encoder{SUFFIXES[fmt]}"


# --------------------------------------------------------------------------- helpers


def spec_digest(spec: FeatureSpec, **extra: Any) -> str:
    """Stable hash of a feature spec (weights hash included) and any extra key fields
    (an export cache passes ``taps=[...]`` when it has any, so tapped and untapped exports
    never share a file while untapped ones keep their old names)."""
    payload = {"spec": spec.to_dict(), "revision": EXPORT_REVISION, **extra}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def relative_error(features: np.ndarray, reference: np.ndarray) -> float:
    """max |a - ref| / max |ref|: the parity measure used for every backend."""
    scale = float(np.abs(reference).max())
    return float(np.abs(features - reference).max() / max(scale, 1e-12))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds,
    so a crash or a concurrent reader never sees a half-written model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the usual umask-derived mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic_target(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The ONNX exporter prints progress to stdout and logs every optimiser pass at INFO;
    keep both out of the runtime's output."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
