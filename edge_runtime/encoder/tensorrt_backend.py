"""TensorRT encoder backend through torch-tensorrt's dynamo path.

torch.export (dynamic batch) → ``torch_tensorrt.dynamo.compile`` with the
profile's precision and min/opt/max batch shapes → ``torch_tensorrt.save``.
Compiled programs are cached on disk under a key made of everything that makes
an engine invalid: GPU name, TensorRT version, precision, shapes and the
encoder spec with its weights hash. Change any of them and the key, hence the
file, changes, so a stale engine is never loaded.

torch-tensorrt is imported lazily: it exists only on NVIDIA machines (Jetson
JetPack wheels, or x86 CUDA builds), never on the CPU build machines.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from edge_runtime.encoder.backend import DEFAULT_INPUT_SIZE, DEFAULT_LAYERS, FeatureSpec
from edge_runtime.encoder.export import (
    EXPORT_REVISION,
    _atomic_target,
    build_manifest,
    export_program,
    manifest_path_for,
    write_manifest,
)
from edge_runtime.errors import BackendUnavailableError, ConfigError, InputError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "on a Jetson, install the torch and torch-tensorrt wheels built for your JetPack "
    "(NVIDIA's Jetson wheels; TensorRT itself ships with JetPack); on x86 with CUDA: "
    "`pip install edge-runtime[tensorrt]`"
)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_BATCH_SHAPES = (1, 8, 32)


def tensorrt_status() -> str | None:
    """None if the TensorRT backend can run here, else why not (one phrase)."""
    if importlib.util.find_spec("torch_tensorrt") is None:
        return "not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        importlib.import_module("torch_tensorrt")
    except Exception as exc:  # wrong CUDA/TensorRT/torch combination, missing libnvinfer...
        return f"torch_tensorrt fails to import ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None


def missing_message() -> str:
    """The one line ``edge-runtime export --format tensorrt`` prints where it cannot run."""
    reason = tensorrt_status()
    return f"TensorRT export unavailable: torch_tensorrt {reason}; {INSTALL_HINT}"


def _torch_tensorrt() -> ModuleType:
    reason = tensorrt_status()
    if reason:
        raise BackendUnavailableError(
            f"tensorrt backend unavailable: torch_tensorrt {reason}; {INSTALL_HINT}"
        )
    return importlib.import_module("torch_tensorrt")


def tensorrt_version() -> str:
    """TensorRT's own version (engines are not portable across it), else torch-tensorrt's."""
    for name in ("tensorrt", "torch_tensorrt"):
        try:
            return f"{name}-{importlib.import_module(name).__version__}"
        except Exception:
            continue
    return "unknown"


@dataclass(frozen=True)
class EngineKey:
    """Everything a compiled engine depends on; its digest names the cache file."""

    device_name: str
    tensorrt_version: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    spec: tuple[tuple[str, Any], ...]
    revision: int = EXPORT_REVISION

    @classmethod
    def make(
        cls,
        spec: FeatureSpec,
        precision: str,
        batch_shapes: Sequence[int],
        device_name: str,
        tensorrt_version: str,
    ) -> EngineKey:
        lo, opt, hi = validate_batch_shapes(batch_shapes)
        if precision not in PRECISIONS:
            raise ConfigError(
                f"encoder.precision: TensorRT engines are built as fp32 or fp16, got {precision!r}"
            )
        items = tuple(sorted((k, _freeze(v)) for k, v in spec.to_dict().items()))
        return cls(device_name, tensorrt_version, precision, lo, opt, hi, items)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def path(self, cache_dir: str | Path) -> Path:
        return Path(cache_dir).expanduser() / f"encoder-{self.precision}-{self.digest()[:24]}.ep"


def validate_batch_shapes(batch_shapes: Sequence[int]) -> tuple[int, int, int]:
    if len(batch_shapes) != 3:
        raise ConfigError(
            f"encoder batch shapes must be (min, opt, max), got {tuple(batch_shapes)}"
        )
    lo, opt, hi = (int(b) for b in batch_shapes)
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"encoder batch shapes need 1 <= min <= opt <= max, got {(lo, opt, hi)}")
    return lo, opt, hi


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def trt_precision(precision: str) -> str:
    """fp32/fp16 build as asked. INT8 in the dynamo path needs a model quantised with
    NVIDIA ModelOpt first; without it we build fp16 and say so."""
    if precision == "int8":
        log.warning("TensorRT INT8 needs a ModelOpt-quantised encoder; building an fp16 engine")
        return "fp16"
    if precision not in PRECISIONS:
        raise ConfigError(f"encoder.precision: expected fp32, fp16 or int8, got {precision!r}")
    return precision


def compile_engine(
    module: torch.nn.Module,
    spec: FeatureSpec,
    key: EngineKey,
    path: Path,
    device: str = "cuda:0",
) -> torch.nn.Module:
    """Export, compile with torch_tensorrt.dynamo, save to ``path``; return the compiled module."""
    tt = _torch_tensorrt()
    s = spec.input_size
    program = export_program(module, spec, max_batch=key.max_batch, device=device)
    example = torch.randn(key.opt_batch, 3, s, s, device=device)
    dtype = PRECISIONS[key.precision]
    inputs = [
        tt.Input(
            min_shape=(key.min_batch, 3, s, s),
            opt_shape=(key.opt_batch, 3, s, s),
            max_shape=(key.max_batch, 3, s, s),
            dtype=torch.float32,
        )
    ]
    compile_kwargs: dict[str, Any] = {"inputs": inputs, "enabled_precisions": {dtype}}
    params = inspect.signature(tt.dynamo.compile).parameters
    if "use_explicit_typing" in params and key.precision == "fp16":
        # Newer torch-tensorrt ignores enabled_precisions unless explicit typing is off.
        compile_kwargs["use_explicit_typing"] = False
    log.info(
        "building TensorRT %s engine for batch %d..%d (opt %d); this takes minutes",
        key.precision,
        key.min_batch,
        key.max_batch,
        key.opt_batch,
    )
    trt_gm = tt.dynamo.compile(program, **compile_kwargs)
    save_params = inspect.signature(tt.save).parameters
    input_kw = "arg_inputs" if "arg_inputs" in save_params else "inputs"
    with _atomic_target(path) as tmp:
        tt.save(trt_gm, str(tmp), **{input_kw: [example]})
    manifest = build_manifest(
        "tensorrt",
        path,
        spec,
        max_batch=key.max_batch,
        precision=key.precision,
        extra={"engine_key": asdict(key)},
    )
    write_manifest(manifest, manifest_path_for(path))
    return trt_gm


def load_engine(path: Path, key: EngineKey) -> torch.nn.Module | None:
    """The cached compiled program at ``path`` if its recorded key matches, else None."""
    mpath = manifest_path_for(path)
    if not (path.is_file() and mpath.is_file()):
        return None
    try:
        recorded = json.loads(mpath.read_text()).get("engine_key")
    except (OSError, json.JSONDecodeError):
        return None
    if recorded != json.loads(json.dumps(asdict(key))):
        return None
    tt = _torch_tensorrt()
    loader = getattr(tt, "load", None)
    program = loader(str(path)) if loader else torch.export.load(str(path))
    return program.module()


class TensorRTBackend:
    """Encoder compiled by torch-tensorrt; engines cached per device/TensorRT/precision/shapes."""

    def __init__(self, module: torch.nn.Module, spec: FeatureSpec, key: EngineKey, device: str):
        self.module = module
        self.spec = spec
        self.key = key
        self.device = torch.device(device)
        self.name = f"tensorrt-{key.precision}"

    @classmethod
    def mobilenet(
        cls,
        input_size: int = DEFAULT_INPUT_SIZE,
        layers: Sequence[int] = DEFAULT_LAYERS,
        weights: str | Path | None = None,
        *,
        precision: str = "fp16",
        batch_shapes: Sequence[int] = DEFAULT_BATCH_SHAPES,
        cache_dir: str | Path = "~/.cache/edge_runtime/engines",
        device: str = "cuda:0",
    ) -> TensorRTBackend:
        _torch_tensorrt()  # fail fast, before loading weights
        from edge_runtime.encoder.backend import build_feature_module

        module, sha = build_feature_module(layers, weights)
        spec = FeatureSpec(
            input_size=input_size, layers=module.layers, dims=module.dims, weights_sha256=sha
        )
        return cls.build(
            module,
            spec,
            precision=precision,
            batch_shapes=batch_shapes,
            cache_dir=cache_dir,
            device=device,
        )

    @classmethod
    def build(
        cls,
        module: torch.nn.Module,
        spec: FeatureSpec,
        *,
        precision: str = "fp16",
        batch_shapes: Sequence[int] = DEFAULT_BATCH_SHAPES,
        cache_dir: str | Path = "~/.cache/edge_runtime/engines",
        device: str = "cuda:0",
    ) -> TensorRTBackend:
        _torch_tensorrt()
        dev = torch.device(device)
        key = EngineKey.make(
            spec,
            trt_precision(precision),
            batch_shapes,
            torch.cuda.get_device_name(dev),
            tensorrt_version(),
        )
        path = key.path(cache_dir)
        compiled = load_engine(path, key)
        if compiled is None:
            compiled = compile_engine(module, spec, key, path, device=str(dev))
        else:
            log.info("using cached TensorRT engine %s", path)
        return cls(compiled, spec, key, str(dev))

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        x = torch.as_tensor(batch, dtype=torch.float32)
        s = self.spec.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s) or x.shape[0] == 0:
            raise InputError(f"encoder input must be (N,3,{s},{s}) with N>0, got {tuple(x.shape)}")
        n = x.shape[0]
        if n > self.key.max_batch:  # the engine's profile ends at max_batch: split the batch
            return np.concatenate(
                [
                    self.encode(x[i : i + self.key.max_batch])
                    for i in range(0, n, self.key.max_batch)
                ]
            )
        if n < self.key.min_batch:
            pad = x[-1:].expand(self.key.min_batch - n, -1, -1, -1)
            return self.encode(torch.cat([x, pad]))[:n]
        out = self.module(x.to(self.device).contiguous())
        return out.float().cpu().numpy()
