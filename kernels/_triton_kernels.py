"""Triton JIT kernels for ``triton_backend`` (see there for the design).

Kept in their own module because ``triton.jit`` decides at decoration time whether to
interpret (TRITON_INTERPRET=1): ``triton_backend`` imports this module lazily and reloads it
when that setting changes.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _distances(q_ptr, m_ptr, rows, row_mask, words, BLOCK_W: tl.constexpr):
    """Hamming distance of one query to a block of rows, as int64 (BLOCK_M,)."""
    acc = tl.zeros(rows.shape, dtype=tl.int64)
    for w0 in range(0, words, BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)
        cmask = cols < words
        qv = tl.load(q_ptr + cols, mask=cmask, other=0).to(tl.uint64, bitcast=True)
        mv = tl.load(
            m_ptr + rows[:, None] * words + cols[None, :],
            mask=row_mask[:, None] & cmask[None, :],
            other=0,
        ).to(tl.uint64, bitcast=True)
        # SWAR popcount (inline: the interpreter does not follow helper-in-helper calls)
        x = mv ^ qv[None, :]
        x = x - ((x >> 1) & 0x5555555555555555)
        x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
        acc += tl.sum(((x * 0x0101010101010101) >> 56).to(tl.int64), axis=1)
    return acc


@triton.jit
def hamming_kernel(
    q_ptr, m_ptr, out_ptr, n_queries, n_rows, words, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr
):
    # Row blocks on axis 0 (up to 2**31-1 programs); queries on axis 1, which CUDA caps at
    # 65,535 programs, so the launcher caps it and each program walks queries grid-stride.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    # an int64 loop variable: queries x rows may pass 2**31 output elements
    for b in range(tl.program_id(1).to(tl.int64), n_queries, tl.num_programs(1)):
        d = _distances(q_ptr + b * words, m_ptr, rows, rmask, words, BLOCK_W)
        tl.store(out_ptr + b * n_rows + rows, d.to(tl.int32), mask=rmask)


@triton.jit
def topk_kernel(
    q_ptr,
    m_ptr,
    off_ptr,
    out_ptr,
    n_seg,
    words,
    k,
    splits,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
    K_PAD: tl.constexpr,
):
    # queries on axis 0; segments and splits on axes 1 and 2 (capped at 65,535 programs by
    # the launcher; n_seg is far below that in practice, and splits are at most 4 x SMs)
    b = tl.program_id(0)
    seg = tl.program_id(1)
    split = tl.program_id(2)
    lo = tl.load(off_ptr + seg)
    hi = tl.load(off_ptr + seg + 1)
    span = hi - lo
    start = lo + span * split // splits
    stop = lo + span * (split + 1) // splits
    pad_key = 0x7FFFFFFFFFFFFFFF  # distance 2**31-1, row 0xFFFFFFFF: sorts last
    slots = tl.arange(0, K_PAD)
    best = tl.full((K_PAD,), pad_key, dtype=tl.int64)
    for r0 in range(start, stop, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < stop
        d = _distances(q_ptr + b * words, m_ptr, rows, rmask, words, BLOCK_W)
        keys = tl.where(rmask, (d << 32) | rows.to(tl.int64), pad_key)
        kth = tl.max(tl.where(slots < k, best, -1), axis=0)
        if tl.min(keys, axis=0) < kth:
            # merge two sources by repeatedly taking the smaller head
            merged = tl.full((K_PAD,), pad_key, dtype=tl.int64)
            old = best
            for j in range(k):
                a = tl.min(old, axis=0)
                c = tl.min(keys, axis=0)
                take = tl.minimum(a, c)
                merged = tl.where(slots == j, take, merged)
                old = tl.where(old == take, pad_key, old)
                keys = tl.where(keys == take, pad_key, keys)
            best = merged
    base = ((b * n_seg + seg) * splits + split) * K_PAD
    tl.store(out_ptr + base + slots, best)
