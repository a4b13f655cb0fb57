"""The C++ CPU kernels behind the public API (see csrc/hdc_cpu.cpp and cpu_ext.py)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from edge_runtime.kernels import _alloc, cpu_ext

from edge_runtime.errors import BackendUnavailableError

# Below this many (query, row, word) triples (~0.3 ms on one core) a scan runs on the calling
# thread: waking a second thread costs more than it saves, and on a busy device (encoder,
# other processes) waiting for a descheduled thread can cost a whole scheduler tick. One
# frame against 10,000 exemplars at D = 10,000 (1.57 M triples) stays on one thread.
PARALLEL_WORK = 1 << 21
# "no bias" for the kernels (read-only there), made once rather than per frame
_NO_BIAS = torch.empty(0, dtype=torch.float32)
_NO_EXACT = torch.empty(0, 0, dtype=torch.float16)  # "no re-ranking" for fused_bank_scores


def _mod() -> ModuleType:
    mod = cpu_ext.load()
    if mod is None:
        raise BackendUnavailableError(f"HDC C++ CPU kernels unavailable: {cpu_ext.failure()}")
    return mod


def available() -> bool:
    return cpu_ext.load() is not None


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    out = _alloc.empty((x.shape[0], (x.shape[1] + 63) // 64), torch.int64, x.device)
    _mod().pack_bits(x.contiguous(), out)
    return out


def hamming(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    out = _alloc.empty((query.shape[0], memory.shape[0]), torch.int32, query.device)
    _mod().hamming(query.contiguous(), memory.contiguous(), out, PARALLEL_WORK)
    return out


def segmented_hamming_topk(
    query: torch.Tensor, memory: torch.Tensor, offsets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (query.shape[0], offsets.numel() - 1, k)
    dist = _alloc.empty(shape, torch.int32, query.device)
    idx = _alloc.empty(shape, torch.int64, query.device)
    q, m, off = query.contiguous(), memory.contiguous(), offsets.contiguous()
    _mod().segmented_topk(q, m, off, dist, idx, PARALLEL_WORK)
    return dist, idx


def sign_project_pack(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    # Dense path: MKL's GEMM is as good as it gets for a dense ±1 matrix; only the pack is ours.
    w = weight.float()
    if bias is not None:
        h = torch.addmm(bias.float(), features.float(), w.T)
    else:
        h = features.float() @ w.T
    return pack_bits(h)


def hadamard_project_pack(
    features: torch.Tensor, signs: torch.Tensor, dim: int, bias: torch.Tensor | None
) -> torch.Tensor:
    b = bias.float().contiguous() if bias is not None else _NO_BIAS
    out = _alloc.empty((features.shape[0], (dim + 63) // 64), torch.int64, features.device)
    _mod().hadamard_project_pack(
        features.float().contiguous(), signs.float().contiguous(), b, dim, out
    )
    return out


def fused_bank_scores(features: torch.Tensor, *args: Any) -> torch.Tensor:
    """:func:`fused_bank_scores_into` a new (B, S) output; ``args`` as there, after features
    (``offsets``, the 7th, gives S)."""
    out = _alloc.empty((features.shape[0], args[6].numel() - 1), torch.float32, features.device)
    fused_bank_scores_into(out, features, *args)
    return out


def fused_bank_scores_into(
    out: torch.Tensor,
    features: torch.Tensor,
    layers: torch.Tensor,
    weights: torch.Tensor,
    layer_norm: bool,
    signs: torch.Tensor,
    dim: int,
    memory: torch.Tensor,
    offsets: torch.Tensor,
    k: int,
    reduce: str,
    thresholds: torch.Tensor,
    exact: torch.Tensor | None = None,
    candidates: int = 0,
) -> int:
    """:func:`fused_bank_scores` into ``out`` (B, S) float32; returns the number of rows of
    ``features`` holding NaN or Inf (their outputs are NaN), so a caller that skipped its own
    finiteness pass can still report them."""
    return int(
        _mod().fused_bank_scores(
            features,
            layers,
            weights,
            layer_norm,
            signs,
            dim,
            memory,
            offsets,
            k,
            _REDUCE[reduce],
            thresholds,
            _NO_EXACT if exact is None else exact,
            int(candidates) if exact is not None else int(k),
            out,
            PARALLEL_WORK,
        )
    )


_REDUCE = {"kth": 0, "mean": 1}  # the kernel's reduce codes
