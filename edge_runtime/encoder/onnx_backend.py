"""ONNX Runtime encoder backend (CPU, or the CUDA execution provider where installed).

The runtime can pick this backend without a manual export step: :func:`cached_onnx`
exports the encoder once per (spec, weights hash) into
``$EDGE_RUNTIME_CACHE/onnx/`` (default ``~/.cache/edge_runtime/onnx/``) and later
starts reuse the file.

Taps: a model exported with ``tap_<block>`` outputs (see :mod:`edge_runtime.encoder.export`)
serves :meth:`OnnxRuntimeBackend.encode_taps`; each call fetches only the outputs asked for,
and ``encode`` fetches ``features`` alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.encoder.backend import (
    DEFAULT_INPUT_SIZE,
    DEFAULT_LAYERS,
    NUM_BLOCKS,
    FeatureSpec,
    normalise_taps,
)
from edge_runtime.encoder.export import (
    DEFAULT_MAX_BATCH,
    INPUT_NAME,
    OUTPUT_NAME,
    build_manifest,
    export_onnx,
    manifest_path_for,
    manifest_taps,
    read_manifest,
    spec_digest,
    spec_from_manifest,
    tap_output_name,
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
    taps: Sequence[int] = (),
) -> tuple[Path, FeatureSpec]:
    """The encoder as an ONNX file, exported on first use and cached by spec + weights hash
    (+ ``taps``, the blocks exported as ``tap_<block>`` outputs; the runtime's selection
    asks for :data:`~edge_runtime.encoder.backend.TAP_BLOCKS`)."""
    from edge_runtime.encoder.backend import build_feature_module

    taps = normalise_taps(taps)
    module, sha = build_feature_module(layers, weights)
    spec = FeatureSpec(
        input_size=input_size, layers=module.layers, dims=module.dims, weights_sha256=sha
    )
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "onnx"
    # Untapped exports keep the key (hence the file) they had before taps existed.
    key_extra: dict[str, Any] = {"taps": list(taps)} if taps else {}
    path = root / f"mobilenetv2-{spec_digest(spec, max_batch=max_batch, **key_extra)[:24]}.onnx"
    if path.is_file() and manifest_path_for(path).is_file():
        manifest = read_manifest(path)
        if spec_from_manifest(manifest) == spec and manifest_taps(manifest) == taps:
            log.debug("using cached ONNX encoder %s", path)
            return path, spec
    log.info("exporting the encoder to ONNX (once; cached at %s)", path)
    export_onnx(module, spec, path, max_batch=max_batch, taps=taps)
    write_manifest(
        build_manifest("onnx", path, spec, max_batch=max_batch, taps=taps),
        manifest_path_for(path),
    )
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
            self._session_args = (so, providers)
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
        outputs = [o.name for o in self.session.get_outputs()]
        # A user's own ONNX file may name its one output anything.
        self._output = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]
        # The graph itself says which maps it can return; a manifest only describes it.
        self.taps: tuple[int, ...] = tuple(
            sorted(b for b in range(NUM_BLOCKS) if tap_output_name(b) in outputs)
        )
        self.supports_taps = bool(self.taps)
        # ORT executes the whole graph whatever outputs are fetched: a model whose taps reach
        # past the pooled layers would make every `encode` pay for those blocks. Such calls
        # get a session on the graph pruned to the outputs asked for (built once per set).
        self._pruned: dict[tuple[str, ...], Any] = {}

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
        taps: Sequence[int] = (),
    ) -> OnnxRuntimeBackend:
        """The frozen MobileNetV2 encoder, exported on first use (see :func:`cached_onnx`),
        with ``tap_<block>`` outputs for ``taps``."""
        path, spec = cached_onnx(input_size, layers, weights, cache_dir=cache_dir, taps=taps)
        return cls(path, spec, device=device, threads=threads)

    def _input_array(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        x = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        s = self.spec.input_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s) or x.shape[0] == 0:
            raise InputError(f"encoder input must be (N,3,{s},{s}) with N>0, got {tuple(x.shape)}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _session_for(self, taps: tuple[int, ...]) -> Any:
        """The full session, or one pruned to ``features`` + ``taps`` where the graph's
        deeper taps would otherwise run blocks nobody asked for."""
        depth = max((*self.spec.layers, *taps), default=0)
        if not self.taps or max(self.taps) <= depth:
            return self.session
        names = (self._output, *(tap_output_name(b) for b in taps))
        if names not in self._pruned:
            import onnx
            import onnxruntime as ort
            from onnx.utils import Extractor

            sub = Extractor(onnx.load(str(self.model_path))).extract_model([self._input], names)
            so, providers = self._session_args
            self._pruned[names] = ort.InferenceSession(
                sub.SerializeToString(), so, providers=providers
            )
        return self._pruned[names]

    def encode(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        # Only `features`: a tapped model's maps are never copied out here.
        session = self._session_for(())
        (out,) = session.run([self._output], {self._input: self._input_array(batch)})
        return np.asarray(out, dtype=np.float32)

    def encode_taps(
        self, batch: torch.Tensor | np.ndarray, taps: tuple[int, ...]
    ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Features and the maps of ``taps`` from one session run that fetches only those."""
        taps = normalise_taps(taps)
        missing = [b for b in taps if b not in self.taps]
        if missing:
            have = f"taps {list(self.taps)}" if self.taps else "no taps"
            raise InputError(
                f"ONNX model {self.model_path.name} has no output for tap block(s) {missing} "
                f"(it has {have}); re-export it with those taps "
                "(`edge-runtime export --format onnx --out DIR` exports taps 3,6,10,13)"
            )
        names = [self._output, *(tap_output_name(b) for b in taps)]
        out = self._session_for(taps).run(names, {self._input: self._input_array(batch)})
        maps = {
            b: np.ascontiguousarray(m, dtype=np.float32) for b, m in zip(taps, out[1:], strict=True)
        }
        return np.asarray(out[0], dtype=np.float32), maps

    def __repr__(self) -> str:
        return (
            f"OnnxRuntimeBackend({self.name}, {self.model_path.name}, threads={self.threads}, "
            f"taps={list(self.taps)})"
        )
