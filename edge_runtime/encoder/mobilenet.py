"""MobileNetV2 with torchvision's state-dict key layout.

Written here rather than imported because torchvision does not import beside
the CPU build of torch. Key names match torchvision's ``mobilenet_v2`` so its
ImageNet checkpoint loads with ``strict=True``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU6(nn.Sequential):
    """Conv2d → BatchNorm2d → ReLU6; indices 0/1 match torchvision's Conv2dNormActivation."""

    def __init__(self, inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        input_channel = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, out, s if i == 0 else 1, t))
                input_channel = out
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def block_channels(model: MobileNetV2) -> list[int]:
    """Output channels of each block of ``model.features``."""
    out: list[int] = []
    for block in model.features:
        if isinstance(block, InvertedResidual):
            out.append(block.out_channels)
        else:
            out.append(block[0].out_channels)
    return out


class PooledFeatures(nn.Module):
    """Global-average-pooled outputs of chosen ``features`` blocks, concatenated.

    The HDFF-style multi-layer view: ``layers=(18,)`` is the usual 1,280-d
    penultimate feature; earlier blocks add lower-level statistics. ``forward``
    runs only the blocks up to the deepest requested one, so early-layer
    extractors are cheap. The later blocks are kept in ``tail`` (unused by
    ``forward``) so that :meth:`forward_taps` can still return the map of any
    block; ``keep_tail=False`` drops them.
    """

    def __init__(self, model: MobileNetV2, layers: Sequence[int], *, keep_tail: bool = True):
        super().__init__()
        n = len(model.features)
        layers = tuple(sorted(set(int(i) for i in layers)))
        if not layers or layers[0] < 0 or layers[-1] >= n:
            raise ValueError(f"feature layers must lie in 0..{n - 1}, got {layers}")
        self.layers = layers
        self.blocks = nn.ModuleList(model.features[: layers[-1] + 1])
        self.tail = nn.ModuleList(model.features[layers[-1] + 1 :] if keep_tail else [])
        channels = block_channels(model)
        self.dims = tuple(channels[i] for i in layers)
        self.block_channels = tuple(channels)

    @property
    def num_blocks(self) -> int:
        """Blocks this module can run: ``forward``'s plus the tail's."""
        return len(self.blocks) + len(self.tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.layers:
                pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)

    def forward_taps(
        self, x: torch.Tensor, taps: Sequence[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Pooled features (exactly ``forward``'s) and the output maps of blocks ``taps``,
        in one pass that stops at the deepest of the pooled layers and the taps."""
        wanted = frozenset(int(t) for t in taps)
        if wanted and (min(wanted) < 0 or max(wanted) >= self.num_blocks):
            raise ValueError(
                f"tap blocks must lie in 0..{self.num_blocks - 1}, got {sorted(wanted)}"
            )
        depth = max(self.layers[-1], max(wanted, default=-1))
        pooled: list[torch.Tensor] = []
        maps: dict[int, torch.Tensor] = {}
        for i in range(depth + 1):
            block = self.blocks[i] if i < len(self.blocks) else self.tail[i - len(self.blocks)]
            x = block(x)
            if i in self.layers:
                pooled.append(x.mean(dim=(2, 3)))
            if i in wanted:
                maps[i] = x
        return torch.cat(pooled, dim=1), maps

    def export_view(self, taps: Sequence[int] = ()) -> nn.Module:
        """A module for export that shares these blocks (no copy): without taps, this
        module minus its tail (the graph exports always had); with taps, a
        :class:`TappedFeatures` returning ``(pooled, *maps)``."""
        taps = tuple(sorted(set(int(t) for t in taps)))
        if taps:
            return TappedFeatures(self, taps)
        view = copy.copy(self)  # shallow: same blocks, its own (empty) module registry below
        view._modules = dict(self._modules)
        view._modules["tail"] = nn.ModuleList()
        return view


class TappedFeatures(nn.Module):
    """``(pooled, map_t0, map_t1, ...)`` for a fixed, sorted tuple of tap blocks: the
    multi-output graph that ONNX and TensorRT exports carry. Runs only the blocks up
    to the deepest of the pooled layers and the taps."""

    def __init__(self, pooled: PooledFeatures, taps: Sequence[int]):
        super().__init__()
        self.taps = tuple(sorted(set(int(t) for t in taps)))
        if not self.taps or self.taps[0] < 0 or self.taps[-1] >= pooled.num_blocks:
            raise ValueError(f"tap blocks must lie in 0..{pooled.num_blocks - 1}, got {self.taps}")
        self.layers = pooled.layers
        self.dims = pooled.dims
        depth = max(self.layers[-1], self.taps[-1])
        everything = [*pooled.blocks, *pooled.tail]
        self.blocks = nn.ModuleList(everything[: depth + 1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled = []
        maps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.layers:
                pooled.append(x.mean(dim=(2, 3)))
            if i in self.taps:
                maps.append(x)
        return (torch.cat(pooled, dim=1), *maps)
