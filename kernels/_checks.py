"""Input validation shared by every backend: one clear InputError per mistake.

Kept cheap (shape/dtype checks plus one small reduction over ``offsets``) because it runs
on every frame.
"""

from __future__ import annotations

import torch

from edge_runtime.errors import InputError


def check_packed(name: str, x: torch.Tensor, *, allow_empty: bool = False) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise InputError(f"{name} must be a 2-D packed tensor (N, W), got {_describe(x)}")
    if x.dtype != torch.int64:
        raise InputError(f"{name} must be int64 packed words, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise InputError(f"{name} has zero words per row; pack at least one dimension")
    if x.shape[0] == 0 and not allow_empty:
        raise InputError(f"{name} is empty (0 rows); pass at least one row")


def check_pair(query: torch.Tensor, memory: torch.Tensor) -> None:
    """A packed query batch (at least one row) and a packed memory (may be empty)."""
    check_packed("query", query)
    check_packed("memory", memory, allow_empty=True)
    if query.shape[1] != memory.shape[1]:
        raise InputError(
            f"query has {query.shape[1]} words per row but memory has {memory.shape[1]}; "
            "both must be packed at the same dimension"
        )
    if query.device != memory.device:
        raise InputError(f"query is on {query.device} but memory is on {memory.device}")


def check_offsets(offsets: torch.Tensor, rows: int) -> None:
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 2:
        raise InputError(
            f"offsets must be a 1-D tensor (S+1,) with S >= 1, got {_describe(offsets)}"
        )
    if offsets.dtype != torch.int64:
        raise InputError(f"offsets must be int64, got dtype {offsets.dtype}")
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != rows:
        raise InputError(
            f"offsets must start at 0 and end at the {rows} memory rows, got {first}..{last}"
        )
    if offsets.numel() > 2 and bool((offsets[1:] < offsets[:-1]).any()):
        raise InputError("offsets must be non-decreasing")


def check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")


def check_features(features: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise InputError(f"features must be a 2-D tensor (B, F), got {_describe(features)}")
    if not features.is_floating_point():
        raise InputError(f"features must be floating point, got dtype {features.dtype}")
    if features.shape[0] == 0:
        raise InputError("features is an empty batch (0 rows); pass at least one frame")
    if features.shape[1] == 0:
        raise InputError("features has 0 columns")


def check_float_rows(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise InputError(f"{name} must be a 2-D tensor, got {_describe(x)}")
    if x.shape[0] == 0:
        raise InputError(f"{name} is empty (0 rows); pass at least one row")
    if x.shape[1] == 0:
        raise InputError(f"{name} has 0 columns")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__
