"""Structured sign projection (SRHT / SimHash-like): no stored matrix, O(D log P) per frame.

A dense ±1 projection of F = 1,280 features to D = 10,000 reads a 51 MB float matrix per
frame. Here each block of P = 2^ceil(log2 F) output components is ``H D2 H D1 pad(x)``, with
H the Walsh–Hadamard transform and D1, D2 random ±1 diagonals (two rounds of mixing so that
even a feature vector concentrated on a few coordinates spreads over every output). Blocks
use independent diagonals; ceil(D / P) blocks are concatenated and cut to D. The only state
is the (R, 2, P) sign table: 20 KB for F = 1,280, D = 10,000.
"""

from __future__ import annotations

import torch

from edge_runtime.errors import InputError


def hadamard_block(in_features: int) -> int:
    """Transform length P for ``in_features`` inputs: a power of two, at least 64 (one word)."""
    if in_features < 1:
        raise InputError(f"in_features must be positive, got {in_features}")
    return max(64, 1 << (in_features - 1).bit_length())


def hadamard_signs(
    in_features: int, dim: int, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Random ±1 diagonals (R, 2, P) float32 for a projection of ``in_features`` to ``dim``."""
    if dim < 1:
        raise InputError(f"dim must be positive, got {dim}")
    p = hadamard_block(in_features)
    rounds = -(-dim // p)
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (rounds, 2, p), generator=gen)
    return (2 * bits - 1).to(torch.float32).to(device)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform over the last axis (length 2^n), on any device."""
    *lead, p = x.shape
    h = 1
    y = x
    while h < p:
        # view as (..., p/(2h), 2, h): the pair axis holds the butterfly's two halves
        y = y.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, p)


def hadamard_project(
    features: torch.Tensor, signs: torch.Tensor, dim: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The float hypervector (B, dim) before the sign (torch ops; used by the torch/GPU paths)."""
    b, f = features.shape
    rounds, _, p = signs.shape
    x = torch.zeros(b, p, dtype=signs.dtype, device=features.device)
    x[:, :f] = features.to(signs.dtype)
    v = x.unsqueeze(1) * signs[:, 0]  # (B, R, P)
    v = fwht(fwht(v) * signs[:, 1])
    h = v.reshape(b, rounds * p)[:, :dim]
    if bias is not None:
        h = h + bias.to(h.dtype)
    return h


def check_signs(signs: torch.Tensor, in_features: int, dim: int) -> None:
    if not isinstance(signs, torch.Tensor) or signs.dim() != 3 or signs.shape[1] != 2:
        raise InputError("signs must be a (R, 2, P) tensor from hadamard_signs()")
    rounds, _, p = signs.shape
    if p & (p - 1) or p < 64:
        raise InputError(f"signs block length {p} must be a power of two >= 64")
    if in_features > p:
        raise InputError(f"{in_features} features do not fit the signs' block length {p}")
    if dim < 1 or rounds * p < dim:
        raise InputError(f"signs give {rounds * p} components, fewer than dim={dim}")
