"""The frozen encoder: a backend interface, the torch reference backend, and a batching front.

A backend maps a preprocessed float32 batch (N,3,S,S) to pooled features
(N,F). Compiled backends (ONNX Runtime, TensorRT) implement the same
:class:`EncoderBackend` protocol, so the rest of the runtime never knows which
one runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from edge_runtime.config.defaults import DEFAULT_INPUT_SIZE, DEFAULT_LAYERS
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
    """Preprocessed batch (N,3,S,S) float32 → features (N, spec.dim) float32."""

    name: str
    spec: FeatureSpec

    def encode(self, batch: torch.Tensor) -> np.ndarray: ...


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
    which are globally average-pooled.
    """

    name = "torch"

    def __init__(self, module: nn.Module, spec: FeatureSpec, device: str = "cpu"):
        # channels_last roughly doubles MobileNetV2's CPU throughput (depthwise convs).
        self.module = module.eval().to(device, memory_format=torch.channels_last)
        for p in self.module.parameters():
            p.requires_grad_(False)
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
        return cls(module, FeatureSpec(input_size=input_size, layers=(0,), dims=(dim,)), device)

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> np.ndarray:
        out = self.module(batch.to(self.device, memory_format=torch.channels_last))
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        if out.ndim != 2:
            raise InputError(f"encoder module returned shape {tuple(out.shape)}, expected (N,F)")
        return out.float().cpu().numpy()


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
        if not isinstance(frames, (np.ndarray, torch.Tensor)):
            raise InputError(f"frames must be an array, got {type(frames).__name__}")
        n = len(frames)
        if n == 0:
            raise InputError("frames is an empty batch (zero frames)")
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
