"""Choosing the encoder backend: by device profile, by what imports, with a fallback chain.

Chain (fastest first): TensorRT → ONNX Runtime CUDA → torch CUDA → ONNX Runtime CPU →
torch CPU. ``encoder.backend: auto`` walks the whole chain; naming a backend tries
its family first, then the rest (minus TensorRT, whose engine build takes minutes
and must be asked for). The choice and why each faster one was skipped is logged
in one line, e.g.::

    encoder backend: onnxruntime-cpu fp32 (tensorrt: not installed; onnxruntime-cuda:
    no CUDA execution provider (install onnxruntime-gpu); torch-cuda: no CUDA device)

Every candidate is checked against the torch reference on a probe batch before it
is accepted (``verify=True``): a backend that disagrees beyond its precision's
tolerance is skipped with its measured error as the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.config.schema import EncoderConfig
from edge_runtime.encoder.backend import TAP_BLOCKS, EncoderBackend, TorchBackend
from edge_runtime.encoder.export import relative_error
from edge_runtime.errors import BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)

CHAIN: tuple[str, ...] = (
    "tensorrt",
    "onnxruntime-cuda",
    "torch-cuda",
    "onnxruntime-cpu",
    "torch-cpu",
)
FAMILIES: dict[str, tuple[str, ...]] = {
    "auto": CHAIN,
    "tensorrt": ("tensorrt",),
    "onnxruntime": ("onnxruntime-cuda", "onnxruntime-cpu"),
    "torch": ("torch-cuda", "torch-cpu"),
}
# Parity with the fp32 torch reference: relative_error = max|a - ref| / max|ref| for
# fp32/fp16, and the relative Frobenius error ||a - ref|| / ||ref|| for int8, whose
# per-element error is dominated by a few activations near quantisation steps.
PARITY_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.25}
# On Ampere GPUs (every Orin) torch and ORT run fp32 convolutions in TF32 by default,
# 10-bit mantissas: their fp32 tolerance is stated separately.
GPU_FP32_TOLERANCE = 2e-3


# The config section's own defaults, so a selection without a config builds the encoder that
# the default runtime serves.
_DEFAULTS = EncoderConfig()


def parity_tolerance(name: str, precision: str) -> float:
    if precision == "fp32" and name in ("onnxruntime-cuda", "torch-cuda"):
        return GPU_FP32_TOLERANCE
    return PARITY_TOLERANCE[precision]


@dataclass(frozen=True)
class EncoderSettings:
    """The ``encoder`` config section's fields this module reads, plus run-time extras."""

    backend: str = _DEFAULTS.backend
    precision: str = _DEFAULTS.precision
    input_size: int = _DEFAULTS.input_size
    layers: tuple[int, ...] = tuple(_DEFAULTS.layers)
    batch_size: int = _DEFAULTS.batch_size
    threads: int | None = _DEFAULTS.threads
    weights: Path | None = _DEFAULTS.weights
    engine_cache_dir: Path = _DEFAULTS.engine_cache_dir
    onnx_cache_dir: Path | None = None
    device: str = "cuda:0"
    # device.memory_budget_mb of the profile: ONNX Runtime's CUDA arena limit.
    memory_budget_mb: int | None = None
    calibration: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_any(cls, config: Any = None, **overrides: Any) -> EncoderSettings:
        """From a RuntimeConfig, its ``encoder`` section, a mapping, or keywords alone."""
        budget = None
        if config is not None and hasattr(config, "encoder") and not isinstance(config, Mapping):
            budget = getattr(getattr(config, "device", None), "memory_budget_mb", None)
            config = config.encoder
        if config is None:
            values: dict[str, Any] = {}
        elif isinstance(config, Mapping):
            values = dict(config)
        elif hasattr(config, "model_dump"):
            values = config.model_dump()
        else:
            raise ConfigError(f"encoder: expected a config section or mapping, got {type(config)}")
        if budget is not None:
            values.setdefault("memory_budget_mb", int(budget))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"encoder.{unknown[0]}: unknown setting")
        if values.get("backend", "auto") not in FAMILIES:
            raise ConfigError(
                f"encoder.backend: expected one of {sorted(FAMILIES)}, got {values['backend']!r}"
            )
        if values.get("precision", "fp32") not in PARITY_TOLERANCE:
            raise ConfigError(
                f"encoder.precision: expected fp32, fp16 or int8, got {values['precision']!r}"
            )
        if "layers" in values:
            values["layers"] = tuple(int(i) for i in values["layers"])
        for key in ("weights", "engine_cache_dir", "onnx_cache_dir"):
            if values.get(key) is not None:
                values[key] = Path(values[key]).expanduser()
        return cls(**values)


@dataclass
class Selection:
    """The chosen backend, the precision it really runs, and why faster ones were skipped."""

    backend: EncoderBackend
    precision: str
    skipped: dict[str, str]
    notes: list[str]

    def line(self) -> str:
        reasons = [f"{name}: {why}" for name, why in self.skipped.items()] + self.notes
        tail = f" ({'; '.join(reasons)})" if reasons else ""
        return f"encoder backend: {self.backend.name} {self.precision}{tail}"


def candidate_order(preference: str) -> tuple[str, ...]:
    """Candidates to try, in order, for ``encoder.backend``."""
    if preference not in FAMILIES:
        raise ConfigError(
            f"encoder.backend: expected one of {sorted(FAMILIES)}, got {preference!r}"
        )
    first = FAMILIES[preference]
    rest = tuple(c for c in CHAIN if c not in first and c != "tensorrt")
    return first + rest if preference != "auto" else CHAIN


def availability(name: str) -> str | None:
    """None if candidate ``name`` can be tried here, else why not — without building it."""
    if name == "tensorrt":
        from edge_runtime.encoder.tensorrt_backend import tensorrt_status

        return tensorrt_status()
    if name == "onnxruntime-cuda":
        from edge_runtime.encoder.onnx_backend import cuda_provider_status

        return cuda_provider_status()
    if name == "torch-cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if name == "onnxruntime-cpu":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime not installed"
        return None
    if name == "torch-cpu":
        return None
    raise ConfigError(f"unknown encoder backend {name!r}")


def build_candidate(name: str, s: EncoderSettings) -> tuple[EncoderBackend, str, list[str]]:
    """Build backend ``name``: (backend, precision it runs, notes about precision changes)."""
    notes: list[str] = []
    if name == "tensorrt":
        from edge_runtime.encoder.tensorrt_backend import TensorRTBackend, trt_precision

        precision = trt_precision(s.precision)
        if precision != s.precision:
            notes.append(f"tensorrt {s.precision} → {precision} (int8 needs ModelOpt)")
        shapes = (1, s.batch_size, max(32, s.batch_size))
        backend: EncoderBackend = TensorRTBackend.mobilenet(
            s.input_size,
            s.layers,
            s.weights,
            precision=precision,
            batch_shapes=shapes,
            cache_dir=s.engine_cache_dir,
            device=s.device,
            taps=TAP_BLOCKS,
        )
        return backend, precision, notes
    if name.startswith("onnxruntime"):
        from edge_runtime.encoder.onnx_backend import OnnxRuntimeBackend, cached_onnx

        device = s.device if name.endswith("cuda") else "cpu"
        # The runtime's ONNX encoder carries the search space's taps for conv adaptors.
        path, _ = cached_onnx(
            s.input_size, s.layers, s.weights, cache_dir=s.onnx_cache_dir, taps=TAP_BLOCKS
        )
        if s.precision == "int8" and device == "cpu":
            if s.calibration is None:
                notes.append("int8 needs calibration frames; running fp32")
            else:
                from edge_runtime.encoder.quantize import cached_quantized

                qpath = cached_quantized(path, "static", s.calibration)
                return OnnxRuntimeBackend.from_file(qpath, threads=s.threads), "int8", notes
        gpu: dict[str, Any] = {}
        if device != "cpu":
            gpu = {
                "memory_budget_mb": s.memory_budget_mb,
                "precision": s.precision,
                "trt_cache_dir": s.engine_cache_dir / "onnxruntime-trt",
            }
        ort_backend = OnnxRuntimeBackend.from_file(path, device=device, threads=s.threads, **gpu)
        if s.precision not in ("fp32", ort_backend.precision) and not notes:
            notes.append(f"{name} runs {s.precision} as {ort_backend.precision}")
        return ort_backend, ort_backend.precision, notes
    device = s.device if name == "torch-cuda" else "cpu"
    if s.precision != "fp32":
        notes.append(f"{name} runs {s.precision} as fp32")
    if name == "torch-cpu" and s.threads:
        torch.set_num_threads(s.threads)
    return TorchBackend.mobilenet(s.input_size, s.layers, s.weights, device=device), "fp32", notes


def probe_batch(input_size: int, n: int = 4) -> torch.Tensor:
    """Deterministic natural-image-like probe: smooth random fields, ImageNet-normalised."""
    g = torch.Generator().manual_seed(1234)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(
        low, size=(input_size, input_size), mode="bilinear", align_corners=False
    )
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def parity_error(features: np.ndarray, reference: np.ndarray, precision: str) -> float:
    if precision == "int8":
        return float(np.linalg.norm(features - reference) / max(np.linalg.norm(reference), 1e-12))
    return relative_error(features, reference)


# Every failure of one candidate (its build or its parity probe) is a reason to try the next.
BUILD_ERRORS: tuple[type[BaseException], ...] = (Exception,)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else repr(exc)


def select(
    config: Any = None,
    *,
    verify: bool = True,
    strict: bool = False,
    builder: Callable[
        [str, EncoderSettings], tuple[EncoderBackend, str, list[str]]
    ] = build_candidate,
    **overrides: Any,
) -> Selection:
    """Walk the chain and return the first backend that builds and (if ``verify``) agrees with
    the torch reference. ``strict``: only the named family; fail rather than fall back."""
    s = EncoderSettings.from_any(config, **overrides)
    order = FAMILIES[s.backend] if strict else candidate_order(s.backend)
    skipped: dict[str, str] = {}
    reference: np.ndarray | None = None
    probe = probe_batch(s.input_size)
    for name in order:
        reason = availability(name)
        if reason is None:
            try:
                backend, precision, notes = builder(name, s)
                if verify and name != "torch-cpu":
                    if reference is None:
                        ref_backend = TorchBackend.mobilenet(s.input_size, s.layers, s.weights)
                        reference = ref_backend.encode(probe)
                    err = parity_error(backend.encode(probe), reference, precision)
                    tol = parity_tolerance(name, precision)
                    if not err <= tol:  # NaN features fail too
                        reason = (
                            f"features differ from torch by {err:.2e} relative "
                            f"(> {tol:g} for {precision})"
                        )
            except BUILD_ERRORS as exc:
                # torch_tensorrt.load raises ValueError on a bad engine, ORT raises its own
                # types: any failure to build or run one candidate moves down the chain.
                log.warning("encoder backend %s failed: %s", name, _first_line(exc))
                reason = f"failed to start ({_first_line(exc)})"
            if reason is None:
                return Selection(backend, precision, skipped, notes)
        skipped[name] = reason
    detail = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    raise BackendUnavailableError(f"no encoder backend for '{s.backend}' can run here ({detail})")


def select_backend(config: Any = None, **kwargs: Any) -> EncoderBackend:
    """Pick, build and return the encoder backend; logs one line saying which and why."""
    selection = select(config, **kwargs)
    log.info(selection.line())
    return selection.backend


def backend_report(names: Sequence[str] = CHAIN) -> dict[str, str]:
    """Availability of every backend here: name → 'available' or the reason it is not."""
    return {n: availability(n) or "available" for n in names}
