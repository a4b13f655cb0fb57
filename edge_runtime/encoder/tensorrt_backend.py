"""TensorRT encoder backend through torch-tensorrt's dynamo path.

torch.export (dynamic batch) → ``torch_tensorrt.dynamo.compile`` with the
profile's precision and min/opt/max batch shapes → ``torch_tensorrt.save``.
Compiled programs are cached on disk under a key made of everything that makes
an engine invalid (:class:`EngineFacts`: GPU name, compute capability, SM count and
memory size, the torch, torch-tensorrt and TensorRT versions; plus precision, shapes
and the encoder spec with its weights hash). Change any of them and the key, hence
the file, changes, so a stale engine is never loaded. A cached file that fails to
load is deleted and rebuilt; a new engine is reloaded from disk and run at min, opt
and max batch before it is renamed into place, so a restart always finds one that
loads.

An engine built with ``taps`` (see :data:`~edge_runtime.encoder.backend.TAP_BLOCKS`)
returns ``(features, *maps)``: the pooled features and the map of each tapped block, from
the same TensorRT execution. The taps are part of the engine key.

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
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from edge_runtime.encoder.backend import (
    DEFAULT_INPUT_SIZE,
    DEFAULT_LAYERS,
    FeatureSpec,
    normalise_taps,
    tap_shape,
)
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


def _module_version(name: str) -> str:
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:
        return "unknown"


@dataclass(frozen=True)
class EngineFacts:
    """What the machine contributes to an engine's validity.

    ``get_device_name`` answers "Orin" on Orin Nano, NX and AGX alike, so the GPU is
    also named by its compute capability and SM count, and the module by its memory
    (rounded to GiB: Jetson's GPU memory is the module's RAM, less carve-outs).
    """

    device_name: str = "unknown"
    tensorrt_version: str = "unknown"
    torch_version: str = "unknown"
    torch_tensorrt_version: str = "unknown"
    compute_capability: str = "unknown"
    sm_count: int = 0
    memory_gib: int = 0

    @classmethod
    def detect(cls, device: str | torch.device = "cuda:0") -> EngineFacts:
        """The facts of this machine's GPU ``device`` (needs CUDA)."""
        props = torch.cuda.get_device_properties(torch.device(device))
        return cls(
            device_name=str(props.name),
            tensorrt_version=tensorrt_version(),
            torch_version=str(torch.__version__),
            torch_tensorrt_version=_module_version("torch_tensorrt"),
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=int(props.multi_processor_count),
            memory_gib=round(int(props.total_memory) / 2**30),
        )


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
    torch_version: str = "unknown"
    torch_tensorrt_version: str = "unknown"
    compute_capability: str = "unknown"
    sm_count: int = 0
    memory_gib: int = 0
    revision: int = EXPORT_REVISION
    taps: tuple[int, ...] = ()

    @classmethod
    def make(
        cls,
        spec: FeatureSpec,
        precision: str,
        batch_shapes: Sequence[int],
        device_name: str | None = None,
        tensorrt_version: str | None = None,
        *,
        facts: EngineFacts | None = None,
        taps: Sequence[int] = (),
    ) -> EngineKey:
        """The key: a pure function of the spec, precision, shapes and the machine's facts.
        ``device_name``/``tensorrt_version`` alone (no ``facts``) leave the rest unknown."""
        lo, opt, hi = validate_batch_shapes(batch_shapes)
        if precision not in PRECISIONS:
            raise ConfigError(
                f"encoder.precision: TensorRT engines are built as fp32 or fp16, got {precision!r}"
            )
        if facts is None:
            facts = EngineFacts(
                device_name=device_name or "unknown", tensorrt_version=tensorrt_version or "unknown"
            )
        items = tuple(sorted((k, _freeze(v)) for k, v in spec.to_dict().items()))
        return cls(
            facts.device_name,
            facts.tensorrt_version,
            precision,
            lo,
            opt,
            hi,
            items,
            torch_version=facts.torch_version,
            torch_tensorrt_version=facts.torch_tensorrt_version,
            compute_capability=facts.compute_capability,
            sm_count=facts.sm_count,
            memory_gib=facts.memory_gib,
            taps=normalise_taps(taps),
        )

    def record(self) -> dict[str, Any]:
        """The key as JSON data (the manifest's ``engine_key``). An untapped key leaves
        ``taps`` out, so engines cached before taps existed keep their name and still load."""
        return _key_record(asdict(self))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()

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


def _key_record(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-normal form of a key dict (tuples as lists), without an empty ``taps``."""
    out = json.loads(json.dumps(d, default=list))
    if not out.get("taps"):
        out.pop("taps", None)
    return out


def trt_precision(precision: str) -> str:
    """fp32/fp16 build as asked. INT8 in the dynamo path needs a model quantised with
    NVIDIA ModelOpt first; without it we build fp16 and say so."""
    if precision == "int8":
        log.warning("TensorRT INT8 needs a ModelOpt-quantised encoder; building an fp16 engine")
        return "fp16"
    if precision not in PRECISIONS:
        raise ConfigError(f"encoder.precision: expected fp32, fp16 or int8, got {precision!r}")
    return precision


def _param_names(signature: inspect.Signature | Collection[str]) -> frozenset[str]:
    if isinstance(signature, inspect.Signature):
        return frozenset(signature.parameters)
    return frozenset(signature)


def precision_compile_kwargs(
    signature: inspect.Signature | Collection[str], precision: str
) -> tuple[dict[str, Any], str]:
    """``dynamo.compile`` keywords for ``precision`` under this torch-tensorrt's signature,
    and the precision the engine will really be built with (with how, for the log).

    - ``enabled_precisions`` present: ask for it; where ``use_explicit_typing`` exists too
      (2.10 made it default True, which ignores ``enabled_precisions``), turn it off.
    - newer builds without ``enabled_precisions``: ``enable_autocast`` with
      ``autocast_low_precision_type=float16`` (explicit typing on, as autocast needs).
    - neither: an fp16 request builds fp32, and the returned precision says so.
    """
    params = _param_names(signature)
    if precision not in PRECISIONS:
        raise ConfigError(f"encoder.precision: expected fp32 or fp16, got {precision!r}")
    if precision == "fp32":
        kwargs: dict[str, Any] = {}
        if "enabled_precisions" in params:
            kwargs["enabled_precisions"] = {torch.float32}
        if "enable_autocast" in params:
            kwargs["enable_autocast"] = False
        return kwargs, "fp32"
    if "enabled_precisions" in params:
        kwargs = {"enabled_precisions": {torch.float16}}
        if "use_explicit_typing" in params:
            kwargs["use_explicit_typing"] = False
        return kwargs, "fp16 (enabled_precisions)"
    if "enable_autocast" in params:
        kwargs = {"enable_autocast": True}
        if "autocast_low_precision_type" in params:
            kwargs["autocast_low_precision_type"] = torch.float16
        if "use_explicit_typing" in params:
            kwargs["use_explicit_typing"] = True
        return kwargs, "fp16 (autocast)"
    return {}, "fp32 (this torch-tensorrt offers no fp16 option)"


def save_kwargs(
    signature: inspect.Signature | Collection[str],
    example: Sequence[torch.Tensor],
    dynamic_shapes: Any,
) -> dict[str, Any]:
    """``torch_tensorrt.save`` keywords: the example inputs under the name this version
    takes, ``retrace=False`` (2.10 re-traces by default, pinning the program to the
    example's batch size) and the dynamic batch, where the version takes them."""
    params = _param_names(signature)
    input_kw = "arg_inputs" if "arg_inputs" in params else "inputs"
    kwargs: dict[str, Any] = {input_kw: list(example)}
    if "retrace" in params:
        kwargs["retrace"] = False
    if "dynamic_shapes" in params:
        kwargs["dynamic_shapes"] = dynamic_shapes
    return kwargs


def engine_outputs(out: Any, n_taps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(features, maps) from a compiled module's output: a tensor when untapped, else a
    tuple/list ``(features, *maps)``; InputError if the count is not 1 + ``n_taps``."""
    parts = list(out) if isinstance(out, (tuple, list)) else [out]
    if len(parts) != 1 + n_taps:
        raise InputError(
            f"TensorRT engine returns {len(parts)} outputs; expected features and {n_taps} maps"
        )
    return parts[0], parts[1:]


def check_engine(
    module: Callable[[torch.Tensor], Any], key: EngineKey, spec: FeatureSpec, device: str
) -> None:
    """Run ``module`` at min, opt and max batch; InputError unless each gives finite
    (N, dim) features and, for a tapped key, finite (N, C, h, w) maps."""
    s = spec.input_size
    for n in sorted({key.min_batch, key.opt_batch, key.max_batch}):
        with torch.inference_mode():
            feats, maps = engine_outputs(
                module(torch.randn(n, 3, s, s, device=device)), len(key.taps)
            )
        if tuple(feats.shape) != (n, spec.dim) or not bool(torch.isfinite(feats).all()):
            raise InputError(
                f"TensorRT engine gives {tuple(feats.shape)} (or non-finite) features at batch "
                f"{n}; expected ({n}, {spec.dim})"
            )
        for b, m in zip(key.taps, maps, strict=True):
            want = (n, *tap_shape(b, s))
            if tuple(m.shape) != want or not bool(torch.isfinite(m).all()):
                raise InputError(
                    f"TensorRT engine gives a {tuple(m.shape)} (or non-finite) map for tap {b} "
                    f"at batch {n}; expected {want}"
                )


def compile_engine(
    module: torch.nn.Module,
    spec: FeatureSpec,
    key: EngineKey,
    path: Path,
    device: str = "cuda:0",
) -> torch.nn.Module:
    """Export, compile with torch_tensorrt.dynamo, save, reload and check at min/opt/max;
    only then rename it to ``path``. Returns the reloaded module."""
    tt = _torch_tensorrt()
    s = spec.input_size
    program = export_program(module, spec, max_batch=key.max_batch, device=device, taps=key.taps)
    example = torch.randn(key.opt_batch, 3, s, s, device=device)
    inputs = [
        tt.Input(
            min_shape=(key.min_batch, 3, s, s),
            opt_shape=(key.opt_batch, 3, s, s),
            max_shape=(key.max_batch, 3, s, s),
            dtype=torch.float32,
        )
    ]
    precision_kwargs, built = precision_compile_kwargs(
        inspect.signature(tt.dynamo.compile), key.precision
    )
    if not built.startswith(key.precision):
        log.warning("TensorRT: %s was asked for; building %s", key.precision, built)
    log.info(
        "building TensorRT engine, precision %s, for batch %d..%d (opt %d); this takes minutes",
        built,
        key.min_batch,
        key.max_batch,
        key.opt_batch,
    )
    trt_gm = tt.dynamo.compile(program, inputs=inputs, **precision_kwargs)
    batch = torch.export.Dim("batch", min=key.min_batch, max=key.max_batch)
    kwargs = save_kwargs(inspect.signature(tt.save), [example], ({0: batch},))
    with _atomic_target(path) as tmp:
        tt.save(trt_gm, str(tmp), **kwargs)
        reloaded = _load_program(tt, tmp)  # what a restart will load
        check_engine(reloaded, key, spec, device)
    manifest = build_manifest(
        "tensorrt",
        path,
        spec,
        max_batch=key.max_batch,
        precision=key.precision,
        extra={"engine_key": key.record(), "built_precision": built},
        taps=key.taps,
    )
    write_manifest(manifest, manifest_path_for(path))
    log.info("TensorRT engine built with precision %s, cached at %s", built, path)
    return reloaded


def _load_program(tt: ModuleType, path: Path) -> torch.nn.Module:
    loader = getattr(tt, "load", None)
    program = loader(str(path)) if loader else torch.export.load(str(path))
    return program.module() if hasattr(program, "module") else program


def discard_engine(path: Path, why: str) -> None:
    """Delete a cached engine and its manifest, saying why."""
    log.warning("deleting unusable TensorRT engine %s (%s); it will be rebuilt", path, why)
    for p in (path, manifest_path_for(path)):
        p.unlink(missing_ok=True)


def load_engine(
    path: Path,
    key: EngineKey,
    *,
    loader: Callable[[Path], torch.nn.Module] | None = None,
) -> torch.nn.Module | None:
    """The cached compiled program at ``path`` if its recorded key matches, else None.

    A file that matches but fails to load (``torch_tensorrt.load`` raises ValueError on
    any failure) is deleted with its manifest, logged, and None returned: the caller
    rebuilds. ``loader`` (default: torch_tensorrt.load) turns a path into a module."""
    mpath = manifest_path_for(path)
    if not (path.is_file() and mpath.is_file()):
        return None
    try:
        recorded = json.loads(mpath.read_text()).get("engine_key")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(recorded, dict) or _key_record(recorded) != key.record():
        return None
    if loader is None:
        tt = _torch_tensorrt()

        def loader(p: Path) -> torch.nn.Module:
            return _load_program(tt, p)

    try:
        return loader(path)
    except Exception as exc:  # ValueError from torch_tensorrt.load, zip/pickle errors...
        discard_engine(
            path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
        return None


class TensorRTBackend:
    """Encoder compiled by torch-tensorrt; engines cached per device/TensorRT/precision/shapes
    (and taps: an engine built with taps also returns those blocks' maps)."""

    def __init__(self, module: torch.nn.Module, spec: FeatureSpec, key: EngineKey, device: str):
        self.module = module
        self.spec = spec
        self.key = key
        self.device = torch.device(device)
        self.name = f"tensorrt-{key.precision}"
        self.taps: tuple[int, ...] = key.taps
        self.supports_taps = bool(key.taps)

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
        taps: Sequence[int] = (),
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
            taps=taps,
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
        taps: Sequence[int] = (),
    ) -> TensorRTBackend:
        _torch_tensorrt()
        dev = torch.device(device)
        key = EngineKey.make(
            spec,
            trt_precision(precision),
            batch_shapes,
            facts=EngineFacts.detect(dev),
            taps=taps,
        )
        path = key.path(cache_dir)
        compiled = load_engine(path, key)
        if compiled is not None:
            try:
                check_engine(compiled, key, spec, str(dev))
            except Exception as exc:  # loads, but does not run at every batch size
                discard_engine(path, f"{type(exc).__name__}: {exc}")
                compiled = None
        if compiled is None:
            # A failure here propagates: select() falls back down the chain.
            compiled = compile_engine(module, spec, key, path, device=str(dev))
        else:
            log.info("using cached TensorRT engine %s", path)
        return cls(compiled, spec, key, str(dev))

    def encode(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        feats, _maps = self._run(batch, ())
        return feats

    def encode_taps(
        self, batch: torch.Tensor | np.ndarray, taps: tuple[int, ...]
    ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Features and the maps of ``taps`` (a subset of the engine's) from one execution."""
        taps = normalise_taps(taps)
        missing = [b for b in taps if b not in self.taps]
        if missing:
            have = f"taps {list(self.taps)}" if self.taps else "no taps"
            raise InputError(
                f"TensorRT engine {self.name} was built with {have}, not block(s) {missing}; "
                "rebuild it with those taps (TensorRTBackend.mobilenet(..., taps=...))"
            )
        return self._run(batch, taps)

    @torch.inference_mode()
    def _run(
        self, batch: torch.Tensor | np.ndarray, taps: tuple[int, ...]
    ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        x = torch.as_tensor(batch, dtype=torch.float32)
        s = self.spec.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s) or x.shape[0] == 0:
            raise InputError(f"encoder input must be (N,3,{s},{s}) with N>0, got {tuple(x.shape)}")
        n = x.shape[0]
        step = self.key.max_batch
        if n > step:  # the engine's profile ends at max_batch: split the batch
            parts = [self._run(x[i : i + step], taps) for i in range(0, n, step)]
            return np.concatenate([p[0] for p in parts]), {
                b: np.concatenate([p[1][b] for p in parts]) for b in taps
            }
        if n < self.key.min_batch:
            pad = x[-1:].expand(self.key.min_batch - n, -1, -1, -1)
            feats, maps = self._run(torch.cat([x, pad]), taps)
            return feats[:n], {b: m[:n] for b, m in maps.items()}
        feats, outs = engine_outputs(self.module(x.to(self.device).contiguous()), len(self.taps))
        # Only the maps asked for leave the GPU; the engine computes the rest regardless.
        by_block = dict(zip(self.taps, outs, strict=True))
        return feats.float().cpu().numpy(), {
            b: by_block[b].float().contiguous().cpu().numpy() for b in taps
        }
