"""Pure torch (+ numpy on CPU) implementations: the fallback when the C++ kernels cannot be
built, and the device-agnostic pieces (cosine, float projections) every backend shares.

No compiler needed. Hamming counts use numpy's ``bitwise_count`` on CPU and a SWAR popcount
in int64 torch ops elsewhere; work is chunked so no (B, M, W) tensor larger than
``_CHUNK_ELEMS`` is ever materialised (torchhd's BSC path builds the whole thing).
"""

from __future__ import annotations

import numpy as np
import torch
from edge_runtime.kernels import _alloc
from edge_runtime.kernels.hadamard import hadamard_project
from edge_runtime.kernels.reference import PAD_DISTANCE as _PAD

_CHUNK_ELEMS = 1 << 22  # elements of a (B, rows, W) temporary: 32 MB of int64

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101


def popcount64(x: torch.Tensor) -> torch.Tensor:
    """Per-element popcount of int64 words (SWAR). Masks after each shift make the
    arithmetic right shift of signed int64 harmless; the multiply wraps modulo 2^64."""
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return ((x * _H01) >> 56) & 0xFF


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    n, d = x.shape
    w = (d + 63) // 64
    bits = x if x.dtype == torch.bool else x > 0
    if x.device.type == "cpu":
        padded = np.zeros((n, w * 64), dtype=bool)
        padded[:, :d] = bits.numpy()
        # little bit order inside bytes + little-endian bytes inside words = bit j of word w
        packed = np.packbits(padded, axis=1, bitorder="little").view("<i8")
        return torch.from_numpy(np.ascontiguousarray(packed))
    padded = torch.zeros(n, w * 64, dtype=torch.int64, device=x.device)
    padded[:, :d] = bits.to(torch.int64)
    shifts = torch.arange(64, dtype=torch.int64, device=x.device)
    return (padded.view(n, w, 64) << shifts).sum(dim=2)


def unpack_bits(packed: torch.Tensor, dim: int) -> torch.Tensor:
    shifts = torch.arange(64, dtype=torch.int64, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :dim].bool()


def hamming(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    b, w = query.shape
    m = memory.shape[0]
    out = _alloc.empty((b, m), torch.int32, query.device)
    rows = max(1, _CHUNK_ELEMS // max(1, b * w))
    if query.device.type == "cpu":
        q = query.contiguous().numpy().view(np.uint64)
        mem = memory.contiguous().numpy().view(np.uint64)
        o = out.numpy()
        for r0 in range(0, m, rows):
            x = q[:, None, :] ^ mem[None, r0 : r0 + rows, :]
            o[:, r0 : r0 + rows] = np.bitwise_count(x).sum(axis=2, dtype=np.int32)
        return out
    for r0 in range(0, m, rows):
        x = query[:, None, :] ^ memory[None, r0 : r0 + rows, :]
        out[:, r0 : r0 + rows] = popcount64(x).sum(dim=2).to(torch.int32)
    return out


def segmented_hamming_topk(
    query: torch.Tensor, memory: torch.Tensor, offsets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    dist = hamming(query, memory).to(torch.int64)
    b, s = query.shape[0], offsets.numel() - 1
    out_d = torch.full((b, s, k), _PAD, dtype=torch.int32, device=query.device)
    out_i = torch.full((b, s, k), -1, dtype=torch.int64, device=query.device)
    bounds = offsets.tolist()
    for seg in range(s):
        lo, hi = bounds[seg], bounds[seg + 1]
        if hi <= lo:
            continue
        # (distance, row) in one int64 key: topk of keys is exact and ties go to the lower row
        rows = torch.arange(lo, hi, dtype=torch.int64, device=query.device)
        key = (dist[:, lo:hi] << 32) | rows
        kk = min(k, hi - lo)
        best = torch.topk(key, kk, dim=1, largest=False, sorted=True).values
        out_d[:, seg, :kk] = (best >> 32).to(torch.int32)
        out_i[:, seg, :kk] = best & 0xFFFFFFFF
    return out_d, out_i


def segmented_cosine_max(
    query: torch.Tensor, memory: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine per segment in float32, scanning memory in chunks so the full
    (B, M) similarity matrix is never held at once."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = torch.nn.functional.normalize(query.to(dtype), dim=1)
    mem = memory.to(dtype)
    b, s = query.shape[0], offsets.numel() - 1
    best = torch.full((b, s), float("-inf"), dtype=dtype, device=query.device)
    idx = torch.full((b, s), -1, dtype=torch.int64, device=query.device)
    rows = max(1, _CHUNK_ELEMS // max(1, b))
    bounds = offsets.tolist()
    for seg in range(s):
        lo, hi = bounds[seg], bounds[seg + 1]
        for r0 in range(lo, hi, rows):
            r1 = min(hi, r0 + rows)
            m = torch.nn.functional.normalize(mem[r0:r1], dim=1)
            v, i = (q @ m.T).max(dim=1)
            better = v > best[:, seg]  # strict: an earlier chunk keeps ties
            best[:, seg] = torch.where(better, v, best[:, seg])
            idx[:, seg] = torch.where(better, i + r0, idx[:, seg])
    return best, idx


def sign_project_pack(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    h = features.float() @ weight.float().T
    if bias is not None:
        h = h + bias.float()
    return pack_bits(h)


def hadamard_project_pack(
    features: torch.Tensor, signs: torch.Tensor, dim: int, bias: torch.Tensor | None
) -> torch.Tensor:
    return pack_bits(hadamard_project(features.float(), signs.float(), dim, bias))
