"""The frozen encoder: a backend interface, the torch reference backend, and a batching front.

A backend maps a preprocessed float32 batch (N,3,S,S) to pooled features
(N,F) and, where it ``supports_taps``, also to the spatial maps of chosen
MobileNetV2 blocks ("taps", for conv adaptors) from the same forward pass.
Compiled backends (ONNX Runtime, TensorRT) implement the same
:class:`EncoderBackend` protocol, so the rest of the runtime never knows which
one runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from edge_runtime.config.defaults import DEFAULT_INPUT_SIZE, DEFAULT_LAYERS
from edge_runtime.encoder.condition import get_conditioner
from edge_runtime.encoder.mobilenet import INVERTED_RESIDUAL_SETTING, MobileNetV2, PooledFeatures
from edge_runtime.encoder.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess
from edge_runtime.encoder.weights import default_weights_path, file_sha256, load_state_dict
from edge_runtime.errors import CheckpointError, InputError

# Output channels of MobileNetV2's 19 ``features`` blocks (stem 32, the inverted residuals, the
# 1,280-wide last conv), so a default FeatureSpec's widths agree with its default layers without
# building the model.
_BLOCK_CHANNELS: tuple[int, ...] = (
    32,
    *(c for _t, c, n, _s in INVERTED_RESIDUAL_SETTING for _ in range(n)),
    1280,
)
# Stride of each block (stem 2, each stage's first inverted residual its s, the rest 1).
_BLOCK_STRIDES: tuple[int, ...] = (
    2,
    *(s if i == 0 else 1 for _t, _c, n, s in INVERTED_RESIDUAL_SETTING for i in range(n)),
    1,
)
NUM_BLOCKS = len(_BLOCK_CHANNELS)

# The blocks the adaptor search space taps: the last block of the 24-, 32-, 64- and 96-channel
# stages (at 64 px: 16x16, 8x8, 4x4, 4x4 maps). Any block 0..18 can be tapped.
TAP_BLOCKS: tuple[int, ...] = (3, 6, 10, 13)


def normalise_taps(taps: Sequence[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated tap blocks; InputError for anything outside 0..18."""
    if isinstance(taps, (str, bytes)):
        raise InputError(f"taps must be a sequence of block numbers, got {taps!r}")
    out: set[int] = set()
    for t in taps:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise InputError(f"tap blocks must be integers, got {t!r}")
        if not 0 <= int(t) < NUM_BLOCKS:
            raise InputError(
                f"tap block {int(t)} is outside MobileNetV2's blocks 0..{NUM_BLOCKS - 1}"
            )
        out.add(int(t))
    return tuple(sorted(out))


def tap_shape(block: int, input_size: int) -> tuple[int, int, int]:
    """(C, h, w) of block ``block``'s output map for a square ``input_size`` input, without
    building the model. Every stride-s conv here (3x3 pad 1, or 1x1) maps h to ceil(h / s)."""
    (block,) = normalise_taps((block,))
    if input_size < 1:
        raise InputError(f"input_size must be positive, got {input_size}")
    h = int(input_size)
    for stride in _BLOCK_STRIDES[: block + 1]:
        h = -(-h // stride)
    return _BLOCK_CHANNELS[block], h, h


@dataclass
class Encoded:
    """One :meth:`Encoder.encode` result."""

    features: np.ndarray  # (N, spec.dim) float32 pooled, exactly what Encoder.features returns
    maps: dict[int, np.ndarray]  # block -> (N, C, h, w) float32, C-contiguous


@dataclass(frozen=True)
class FeatureSpec:
    """What an encoder produces: input size, normalisation and the pooled layers' widths."""

    input_size: int = DEFAULT_INPUT_SIZE
    layers: tuple[int, ...] = DEFAULT_LAYERS
    dims: tuple[int, ...] = tuple(_BLOCK_CHANNELS[i] for i in DEFAULT_LAYERS)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_sha256: str = ""

    @property
    def dim(self) -> int:
        return int(sum(self.dims))

    def slices(self) -> list[slice]:
        """Column range of each layer inside the concatenated feature vector."""
        out, start = [], 0
        for d in self.dims:
            out.append(slice(start, start + d))
            start += d
        return out

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "layers": list(self.layers),
            "dims": list(self.dims),
            "mean": list(self.mean),
            "std": list(self.std),
            "weights_sha256": self.weights_sha256,
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(
            input_size=int(d["input_size"]),
            layers=tuple(int(i) for i in d["layers"]),
            dims=tuple(int(i) for i in d["dims"]),
            mean=tuple(float(v) for v in d.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
            weights_sha256=str(d.get("weights_sha256", "")),
        )


@runtime_checkable
class EncoderBackend(Protocol):
    """Preprocessed batch (N,3,S,S) float32 → features (N, spec.dim) float32.

    ``encode_taps`` returns the same features plus ``{block: (N,C,h,w) float32}`` maps
    from one forward pass; a backend with ``supports_taps = False`` raises InputError.
    """

    name: str
    spec: FeatureSpec
    supports_taps: bool

    def encode(self, batch: torch.Tensor) -> np.ndarray: ...

    def encode_taps(
        self, batch: torch.Tensor, taps: tuple[int, ...]
    ) -> tuple[np.ndarray, dict[int, np.ndarray]]: ...


def build_feature_module(
    layers: Sequence[int] = DEFAULT_LAYERS, weights: str | Path | None = None
) -> tuple[PooledFeatures, str]:
    """The frozen MobileNetV2 feature extractor with ImageNet weights, and their SHA-256."""
    path = Path(weights) if weights is not None else default_weights_path()
    state = load_state_dict(path)
    model = MobileNetV2()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights file {path} does not match MobileNetV2: {exc}") from exc
    module = PooledFeatures(model, layers).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module, file_sha256(path)


class TorchBackend:
    """Eager torch reference backend; also wraps any user module or TorchScript file.

    A user module must map (N,3,S,S) to (N,F) features or to (N,C,h,w) maps,
    which are globally average-pooled. Taps need the built-in MobileNetV2
    (:class:`PooledFeatures`); a user module cannot name its blocks.
    """

    name = "torch"
    supports_taps: bool = False

    def __init__(self, module: nn.Module, spec: FeatureSpec, device: str = "cpu"):
        # channels_last roughly doubles MobileNetV2's CPU throughput (depthwise convs).
        self.module = module.eval().to(device, memory_format=torch.channels_last)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.supports_taps = isinstance(self.module, PooledFeatures)
        self.spec = spec
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.name = "torch-cuda"

    @classmethod
    def mobilenet(
        cls,
        input_size: int = DEFAULT_INPUT_SIZE,
        layers: Sequence[int] = DEFAULT_LAYERS,
        weights: str | Path | None = None,
        device: str = "cpu",
    ) -> TorchBackend:
        module, sha = build_feature_module(layers, weights)
        spec = FeatureSpec(
            input_size=input_size, layers=module.layers, dims=module.dims, weights_sha256=sha
        )
        return cls(module, spec, device)

    @classmethod
    def from_module(
        cls,
        module: nn.Module | str | Path,
        input_size: int = DEFAULT_INPUT_SIZE,
        device: str = "cpu",
    ) -> TorchBackend:
        """Wrap a user's torch module or TorchScript file; infers the feature width."""
        if isinstance(module, (str, Path)):
            try:
                module = torch.jit.load(str(module), map_location="cpu")
            except Exception as exc:
                raise CheckpointError(f"cannot load TorchScript file {module}: {exc}") from exc
        probe = cls(module, FeatureSpec(input_size=input_size, layers=(0,), dims=(1,)), device)
        dim = probe.encode(torch.zeros(1, 3, input_size, input_size)).shape[1]
        backend = cls(module, FeatureSpec(input_size=input_size, layers=(0,), dims=(dim,)), device)
        # Its spec says layers=(0,) whatever the module is: block numbers mean nothing here.
        backend.supports_taps = False
        return backend

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> np.ndarray:
        out = self.module(batch.to(self.device, memory_format=torch.channels_last))
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        if out.ndim != 2:
            raise InputError(f"encoder module returned shape {tuple(out.shape)}, expected (N,F)")
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def encode_taps(
        self, batch: torch.Tensor, taps: tuple[int, ...]
    ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Pooled features (bitwise what ``encode`` gives) and block maps, one pass."""
        taps = normalise_taps(taps)
        if not self.supports_taps or not isinstance(self.module, PooledFeatures):
            raise InputError(
                f"encoder backend '{self.name}' wraps a user module, which cannot return the "
                f"maps of MobileNetV2 blocks {list(taps)}; use the built-in MobileNetV2 encoder "
                "(TorchBackend.mobilenet or an ONNX export with taps) for tap adaptors"
            )
        pooled, maps = self.module.forward_taps(
            batch.to(self.device, memory_format=torch.channels_last), taps
        )
        # channels_last maps would come out as strided numpy views; consumers expect NCHW.
        return pooled.float().cpu().numpy(), {
            b: m.float().contiguous().cpu().numpy() for b, m in maps.items()
        }


@dataclass
class Encoder:
    """Frames in, features out: validation, preprocessing, batching and a progress bar."""

    backend: EncoderBackend
    batch_size: int = 256
    _hooks: list[Callable[[int], None]] = field(default_factory=list, repr=False)

    @property
    def spec(self) -> FeatureSpec:
        return self.backend.spec

    @property
    def device(self) -> torch.device:
        """Where the backend computes; its features come back as numpy either way."""
        return torch.device(str(getattr(self.backend, "device", "cpu")))

    def features(self, frames: np.ndarray, *, progress: bool | str = False) -> np.ndarray:
        """(N,H,W[,C]) frames → (N, spec.dim) float32 features."""
        n = _check_batch(frames)
        out = np.empty((n, self.spec.dim), dtype=np.float32)
        desc = progress if isinstance(progress, str) else "encoding"
        bar = tqdm(total=n, desc=desc, unit="frame", disable=not progress, leave=False)
        for start in range(0, n, self.batch_size):
            chunk = frames[start : start + self.batch_size]
            x = preprocess(chunk, self.spec.input_size, self.spec.mean, self.spec.std)
            out[start : start + len(chunk)] = self.backend.encode(x)
            bar.update(len(chunk))
        bar.close()
        return out

    def encode(
        self,
        frames: np.ndarray,
        taps: Sequence[int] = (),
        condition: str = "none",
        *,
        progress: bool | str = False,
    ) -> Encoded:
        """Frames → pooled features and the maps of blocks ``taps``, from one forward pass.

        ``condition`` (see :mod:`edge_runtime.encoder.condition`) filters each frame at its
        native resolution before preprocessing. With ``taps=()`` and ``condition="none"`` the
        features are bitwise :meth:`features`'s and ``maps`` is empty.
        """
        taps = normalise_taps(taps)
        conditioner = get_conditioner(condition)
        if taps and not getattr(self.backend, "supports_taps", False):
            name = getattr(self.backend, "name", type(self.backend).__name__)
            raise InputError(
                f"encoder backend '{name}' cannot return block maps (taps {list(taps)} asked); "
                "use the built-in MobileNetV2 on torch, or re-export the ONNX model with taps "
                "(`edge-runtime export --format onnx ...`)"
            )
        n = _check_batch(frames)
        out = np.empty((n, self.spec.dim), dtype=np.float32)
        maps: dict[int, np.ndarray] = {}
        desc = progress if isinstance(progress, str) else "encoding"
        bar = tqdm(total=n, desc=desc, unit="frame", disable=not progress, leave=False)
        for start in range(0, n, self.batch_size):
            chunk = frames[start : start + self.batch_size]
            if condition != "none":
                chunk = conditioner(_as_numpy(chunk))
            x = preprocess(chunk, self.spec.input_size, self.spec.mean, self.spec.std)
            stop = start + len(chunk)
            if not taps:
                out[start:stop] = self.backend.encode(x)
            else:
                feats, got = self.backend.encode_taps(x, taps)
                out[start:stop] = feats
                for b in taps:
                    if b not in maps:  # shapes come from the backend, not assumed
                        maps[b] = np.empty((n, *got[b].shape[1:]), dtype=np.float32)
                    maps[b][start:stop] = got[b]
            bar.update(len(chunk))
        bar.close()
        return Encoded(features=out, maps=maps)


def _check_batch(frames: np.ndarray | torch.Tensor) -> int:
    if not isinstance(frames, (np.ndarray, torch.Tensor)):
        raise InputError(f"frames must be an array, got {type(frames).__name__}")
    n = len(frames)
    if n == 0:
        raise InputError("frames is an empty batch (zero frames)")
    return n


def _as_numpy(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    return frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else frames


def encoder_ms_per_frame(
    encoder: Encoder | EncoderBackend, batch: int = 32, repeats: int = 3
) -> float:
    """Milliseconds per frame of the backend's forward pass at ``batch`` frames (median of
    ``repeats`` timed runs after one warm-up), for the adaptor search's budget. Preprocessing
    is excluded: it is the same for every candidate. It measures: callers cache the result."""
    if batch < 1 or repeats < 1:
        raise InputError(f"batch and repeats must be >= 1, got {batch}, {repeats}")
    backend = encoder.backend if isinstance(encoder, Encoder) else encoder
    s = backend.spec.input_size
    # A fixed random batch: dense conv timing does not depend on the values.
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0))
    backend.encode(x)  # warm-up: lazy allocation, ORT/TensorRT first-run setup
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.encode(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0 / batch)
