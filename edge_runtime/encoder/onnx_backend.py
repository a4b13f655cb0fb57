"""ONNX Runtime encoder backend (CPU, or the CUDA execution provider where installed).

The runtime can pick this backend without a manual export step: :func:`cached_onnx`
exports the encoder once per (spec, weights hash) into
``$EDGE_RUNTIME_CACHE/onnx/`` (default ``~/.cache/edge_runtime/onnx/``) and later
starts reuse the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.encoder.backend import DEFAULT_INPUT_SIZE, DEFAULT_LAYERS, FeatureSpec
from edge_runtime.encoder.export import (
    DEFAULT_MAX_BATCH,
    INPUT_NAME,
    build_manifest,
    export_onnx,
    manifest_path_for,
    read_manifest,
    spec_digest,
    spec_from_manifest,
    write_manifest,
)
from edge_runtime.errors import BackendUnavailableError, CheckpointError, InputError

log = logging.getLogger(__name__)

CACHE_ENV = "EDGE_RUNTIME_CACHE"


def cache_root() -> Path:
    """``$EDGE_RUNTIME_CACHE`` or ``~/.cache/edge_runtime``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edge_runtime"


def physical_cores() -> int:
    """Physical cores: ORT's intra-op pool gains nothing from SMT siblings."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # psutil can fail inside odd containers
        n = None
    return max(1, int(n or os.cpu_count() or 1))


def ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def cuda_provider_status() -> str | None:
    """None if ORT's CUDA execution provider can run here, else why not (one phrase)."""
    try:
        providers = ort_providers()
    except ImportError:
        return "onnxruntime not installed"
    if "CUDAExecutionProvider" not in providers:
        return "no CUDA execution provider (install onnxruntime-gpu)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


ProviderSpec = str | tuple[str, dict[str, Any]]


def cuda_providers(
    available: Collection[str],
    *,
    device_id: int = 0,
    memory_budget_mb: int | None = None,
    precision: str = "fp32",
    trt_cache_dir: str | Path | None = None,
) -> list[ProviderSpec]:
    """ORT's execution providers and options for a GPU session on a shared-memory device.

    - TensorRT EP first where this ORT build has it: fp16 when ``precision`` is fp16,
      engines (and timing data) cached in ``trt_cache_dir`` so a restart skips the build.
    - CUDA EP: ``cudnn_conv_algo_search=HEURISTIC`` (the default EXHAUSTIVE re-benchmarks
      every new batch size), ``arena_extend_strategy=kSameAsRequested`` (no doubling of
      the arena into memory the CPU side shares) and ``gpu_mem_limit`` from the profile's
      ``device.memory_budget_mb``.
    - CPU EP last, for any node the GPU providers do not take.
    """
    providers: list[ProviderSpec] = []
    if "TensorrtExecutionProvider" in available:
        trt: dict[str, Any] = {
            "device_id": device_id,
            "trt_fp16_enable": precision == "fp16",
            "trt_engine_cache_enable": trt_cache_dir is not None,
        }
        if trt_cache_dir is not None:
            trt["trt_engine_cache_path"] = str(Path(trt_cache_dir).expanduser())
            trt["trt_timing_cache_enable"] = True
            trt["trt_timing_cache_path"] = str(Path(trt_cache_dir).expanduser())
        providers.append(("TensorrtExecutionProvider", trt))
    cuda: dict[str, Any] = {
        "device_id": device_id,
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
    }
    if memory_budget_mb:
        cuda["gpu_mem_limit"] = int(memory_budget_mb) * 2**20
    providers.append(("CUDAExecutionProvider", cuda))
    providers.append("CPUExecutionProvider")
    return providers


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def cached_onnx(
    input_size: int = DEFAULT_INPUT_SIZE,
    layers: Sequence[int] = DEFAULT_LAYERS,
    weights: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> tuple[Path, FeatureSpec]:
    """The encoder as an ONNX file, exported on first use and cached by spec + weights hash."""
    from edge_runtime.encoder.backend import build_feature_module

    module, sha = build_feature_module(layers, weights)
    spec = FeatureSpec(
        input_size=input_size, layers=module.layers, dims=module.dims, weights_sha256=sha
    )
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "onnx"
    path = root / f"mobilenetv2-{spec_digest(spec, max_batch=max_batch)[:24]}.onnx"
    if path.is_file() and manifest_path_for(path).is_file():
        manifest = read_manifest(path)
        if spec_from_manifest(manifest) == spec:
            log.debug("using cached ONNX encoder %s", path)
            return path, spec
    log.info("exporting the encoder to ONNX (once; cached at %s)", path)
    export_onnx(module, spec, path, max_batch=max_batch)
    write_manifest(build_manifest("onnx", path, spec, max_batch=max_batch), manifest_path_for(path))
    return path, spec


class OnnxRuntimeBackend:
    """Runs an exported encoder with ONNX Runtime.

    Session settings chosen for small-batch edge inference: every graph
    optimisation (constant folding, Conv+BN+Clip fusion, layout transforms),
    sequential execution (the graph is a chain; a parallel executor only adds
    scheduling cost), an intra-op pool of ``threads`` (default: physical cores)
    whose threads sleep rather than spin between runs.
    """

    def __init__(
        self,
        model_path: str | Path,
        spec: FeatureSpec,
        *,
        device: str = "cpu",
        threads: int | None = None,
        label: str | None = None,
        memory_budget_mb: int | None = None,
        precision: str = "fp32",
        trt_cache_dir: str | Path | None = None,
    ):
        import onnxruntime as ort

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise CheckpointError(f"ONNX model not found: {self.model_path}")
        self.spec = spec
        self.threads = int(threads) if threads else physical_cores()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # errors only: ORT warns about unused initializers
        # Idle pool threads would otherwise spin after each run and steal the cores the
        # HDC kernels and adaptors (and, in benchmarks, the torch baseline) run on next.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if device.startswith("cuda"):
            reason = cuda_provider_status()
            if reason:
                raise BackendUnavailableError(f"onnxruntime-cuda unavailable: {reason}")
            index = int(device.split(":")[1]) if ":" in device else 0
            providers: list[Any] = cuda_providers(
                ort_providers(),
                device_id=index,
                memory_budget_mb=memory_budget_mb,
                precision=precision,
                trt_cache_dir=trt_cache_dir,
            )
            if trt_cache_dir is not None:
                Path(trt_cache_dir).expanduser().mkdir(parents=True, exist_ok=True)
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.model_path), so, providers=providers)
        except Exception as exc:
            raise CheckpointError(f"ONNX Runtime cannot load {self.model_path}: {exc}") from exc
        # ORT silently falls back to CPU when the CUDA provider fails to initialise.
        active = self.session.get_providers()
        if device.startswith("cuda") and active[0] not in GPU_PROVIDERS:
            raise BackendUnavailableError(
                "onnxruntime-cuda unavailable: the CUDA provider failed to start"
            )
        # The precision the session really runs: fp16 only through the TensorRT EP.
        self.precision = (
            "fp16"
            if precision == "fp16"
            and device.startswith("cuda")
            and active[0] == "TensorrtExecutionProvider"
            else "fp32"
        )
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        self.name = label or f"onnxruntime-{self.device}"
        self._input = self.session.get_inputs()[0].name
        if self._input != INPUT_NAME:
            log.debug("ONNX input is named %r", self._input)

    @classmethod
    def from_file(
        cls,
        model_path: str | Path,
        *,
        device: str = "cpu",
        threads: int | None = None,
        **gpu: Any,
    ) -> OnnxRuntimeBackend:
        """Load an exported ``.onnx`` with the manifest written beside it."""
        manifest = read_manifest(model_path)
        precision = manifest.get("precision", "fp32")
        label = f"onnxruntime-{'cuda' if device.startswith('cuda') else 'cpu'}"
        if precision != "fp32":
            label += f"-{precision}"
        return cls(
            model_path,
            spec_from_manifest(manifest),
            device=device,
            threads=threads,
            label=label,
            **gpu,
        )

    @classmethod
    def mobilenet(
        cls,
        input_size: int = DEFAULT_INPUT_SIZE,
        layers: Sequence[int] = DEFAULT_LAYERS,
        weights: str | Path | None = None,
        *,
        device: str = "cpu",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> OnnxRuntimeBackend:
        """The frozen MobileNetV2 encoder, exported on first use (see :func:`cached_onnx`)."""
        path, spec = cached_onnx(input_size, layers, weights, cache_dir=cache_dir)
        return cls(path, spec, device=device, threads=threads)

    def encode(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        x = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        s = self.spec.input_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s) or x.shape[0] == 0:
            raise InputError(f"encoder input must be (N,3,{s},{s}) with N>0, got {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        (out,) = self.session.run(None, {self._input: x})
        return np.asarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return f"OnnxRuntimeBackend({self.name}, {self.model_path.name}, threads={self.threads})"
