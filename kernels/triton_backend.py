"""Triton kernels: packed Hamming distances and per-segment top-k fused into the scan.

Triton has no popcount op that the interpreter understands, so popcount is SWAR bit
arithmetic on uint64 (runs under TRITON_INTERPRET=1 on CPU and compiles on GPU).

Top-k: each program owns one (query, segment, split) and keeps its k best as sorted int64
keys ``distance << 32 | row`` (unique, so ties go to the lower row). After each block of
rows it merges the block into the list by k rounds of "take the smaller head", skipped
when no row in the block beats the current k-th key. Splits (used to fill a GPU when there
are few queries and segments) are merged on the host with one ``torch.topk`` over keys.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
from edge_runtime.kernels import _alloc
from edge_runtime.kernels.reference import PAD_DISTANCE

_MAX_K = 64
# CUDA grid limits, which Triton inherits: axis 0 up to 2**31-1 programs, axes 1 and 2 up
# to 65,535. A module constant so the interpreter tests can shrink it to exercise the
# grid-stride loop over queries without millions of rows.
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65_535


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType:
    """The jitted kernels, imported lazily (triton costs ~1 s to import and is optional).

    They are re-decorated if TRITON_INTERPRET changed since, but triton's own library
    functions keep the mode of triton's first import, so interpreted runs need a process
    started with the flag (as the tests do).
    """
    import importlib

    from edge_runtime.kernels import _triton_kernels

    if (os.environ.get("TRITON_INTERPRET") == "1") != _triton_kernels.INTERPRETED:
        _triton_kernels = importlib.reload(_triton_kernels)
    return _triton_kernels


def _block_w(words: int) -> int:
    return min(64, 1 << max(0, (words - 1).bit_length()))


def hamming_grid(batch: int, rows: int, block_m: int) -> tuple[int, int]:
    """Launch grid of ``hamming_kernel``: (row blocks, query programs), both within CUDA's
    per-axis limits (row blocks on axis 0; queries capped on axis 1 and walked in-kernel)."""
    row_blocks = -(-rows // block_m)
    if row_blocks > MAX_GRID_X:
        raise ValueError(f"{rows} rows need {row_blocks} row blocks, over {MAX_GRID_X}")
    return max(1, row_blocks), max(1, min(batch, MAX_GRID_YZ))


def hamming(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    hamming_kernel = _kernels().hamming_kernel
    b, words = query.shape
    m = memory.shape[0]
    out = _alloc.empty((b, m), torch.int32, query.device)
    if m == 0 or b == 0:
        return out
    block_m = 32
    grid = hamming_grid(b, m, block_m)
    hamming_kernel[grid](
        query, memory, out, b, m, words, BLOCK_M=block_m, BLOCK_W=_block_w(words)
    )  # fmt: skip
    return out


def segmented_hamming_topk(
    query: torch.Tensor, memory: torch.Tensor, offsets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if k > _MAX_K:
        from edge_runtime.errors import BackendUnavailableError

        raise BackendUnavailableError(f"the triton top-k supports k <= {_MAX_K}, got {k}")
    topk_kernel = _kernels().topk_kernel
    b, words = query.shape
    n_seg = offsets.numel() - 1
    k_pad = max(2, 1 << (k - 1).bit_length())
    # On a GPU, split segments until there are a few programs per SM; the interpreter runs
    # programs one after another, so there one split per (query, segment) is cheapest.
    splits = 1
    if query.is_cuda:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count
        longest = int((offsets[1:] - offsets[:-1]).max())
        splits = max(1, min(-(-4 * sms // max(1, b * n_seg)), longest // 256))
    splits = min(splits, MAX_GRID_YZ)
    if n_seg > MAX_GRID_YZ:
        from edge_runtime.errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"the triton top-k supports at most {MAX_GRID_YZ} segments, got {n_seg}"
        )
    keys = _alloc.empty((b, n_seg, splits * k_pad), torch.int64, query.device)
    topk_kernel[(b, n_seg, splits)](
        query, memory, offsets, keys, n_seg, words, k, splits,
        BLOCK_M=32, BLOCK_W=_block_w(words), K_PAD=k_pad,
    )  # fmt: skip
    if splits > 1 or k_pad != k:
        keys = torch.topk(keys, k, dim=2, largest=False, sorted=True).values
    dist = (keys >> 32).to(torch.int32)
    idx = torch.where(dist == PAD_DISTANCE, -1, keys & 0xFFFFFFFF)
    return dist, idx
