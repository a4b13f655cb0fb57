"""Float64 / exact-integer reference implementations of the HDC hot path.

Slow and simple on purpose: every fast path (CPU, Triton, CUDA) is tested
against these on random inputs.

Conventions shared by every implementation:
- a packed hypervector is an int64 tensor (N, W) with W = ceil(D / 64); bit j of
  word w holds component 64*w + j, set where the component is > 0; padding bits
  past D are zero, so they never count in a Hamming distance.
- ``offsets`` (S+1,) int64 splits memory rows into S segments (domains):
  rows offsets[s]:offsets[s+1] belong to segment s.
- a top-k list shorter than k (a segment with fewer rows) is padded with distance
  ``PAD_DISTANCE`` and row -1.
"""

from __future__ import annotations

import torch

PAD_DISTANCE = 2**31 - 1  # the distance reported for a missing neighbour (int32 max)


def words_for(dim: int) -> int:
    return (dim + 63) // 64


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    """(N, D) real or bool → (N, ceil(D/64)) int64, bit set where x > 0."""
    bits = (x > 0) if x.dtype != torch.bool else x
    n, d = bits.shape
    w = words_for(d)
    padded = torch.zeros(n, w * 64, dtype=torch.int64, device=x.device)
    padded[:, :d] = bits.to(torch.int64)
    weights = torch.ones(64, dtype=torch.int64, device=x.device) << torch.arange(
        64, dtype=torch.int64, device=x.device
    )
    return (padded.view(n, w, 64) * weights).sum(dim=2)


def unpack_bits(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, W) int64 → (N, dim) bool."""
    shifts = torch.arange(64, dtype=torch.int64, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :dim].bool()


def hamming(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Exact Hamming distances (B, M) int32 between packed rows."""
    x = query.unsqueeze(1) ^ memory.unsqueeze(0)
    count = torch.zeros(x.shape[:2], dtype=torch.int64, device=x.device)
    for j in range(64):
        count += ((x >> j) & 1).sum(dim=2)
    return count.to(torch.int32)


def segmented_hamming_topk(
    query: torch.Tensor, memory: torch.Tensor, offsets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per segment, the k smallest distances (B,S,k) int32 ascending and row indices (B,S,k) int64.

    A segment with fewer than k rows pads with distance 2**31-1 and index -1.
    Ties break towards the lower row index.
    """
    dist = hamming(query, memory).to(torch.int64)
    b, s = query.shape[0], offsets.numel() - 1
    out_d = torch.full((b, s, k), PAD_DISTANCE, dtype=torch.int32, device=query.device)
    out_i = torch.full((b, s, k), -1, dtype=torch.int64, device=query.device)
    for seg in range(s):
        lo, hi = int(offsets[seg]), int(offsets[seg + 1])
        if hi <= lo:
            continue
        block = dist[:, lo:hi]
        # stable ordering by (distance, index)
        key = block * (hi - lo + 1) + torch.arange(hi - lo, device=query.device)
        kk = min(k, hi - lo)
        _, order = torch.topk(key, kk, dim=1, largest=False, sorted=True)
        out_d[:, seg, :kk] = torch.gather(block, 1, order).to(torch.int32)
        out_i[:, seg, :kk] = order + lo
    return out_d, out_i


def segmented_cosine_max(
    query: torch.Tensor, memory: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per segment, the best cosine similarity (B,S) float64 and its row (B,S) int64.

    An empty segment gives -inf and -1.
    """
    q = torch.nn.functional.normalize(query.double(), dim=1)
    m = torch.nn.functional.normalize(memory.double(), dim=1)
    sim = q @ m.T
    b, s = query.shape[0], offsets.numel() - 1
    best = torch.full((b, s), float("-inf"), dtype=torch.float64, device=query.device)
    idx = torch.full((b, s), -1, dtype=torch.int64, device=query.device)
    for seg in range(s):
        lo, hi = int(offsets[seg]), int(offsets[seg + 1])
        if hi > lo:
            v, i = sim[:, lo:hi].max(dim=1)
            best[:, seg], idx[:, seg] = v, i + lo
    return best, idx


def hadamard_matrix(p: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester Hadamard matrix H[i, j] = (-1)^popcount(i & j), built explicitly (p = 2^n)."""
    i = torch.arange(p, dtype=torch.int64)
    both = i.unsqueeze(1) & i.unsqueeze(0)
    parity = torch.zeros_like(both)
    for j in range(max(1, p.bit_length())):
        parity ^= (both >> j) & 1
    return (1 - 2 * parity).to(dtype)


def hadamard_project_pack(
    features: torch.Tensor, signs: torch.Tensor, dim: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Structured sign projection: per round r, h_r = H D2_r H D1_r pad(x) (length P).

    signs (R, 2, P) holds the ±1 diagonals D1_r, D2_r; the rounds are concatenated and cut
    to ``dim`` components, ``bias`` (dim,) is added, and the signs are packed.
    """
    b, f = features.shape
    rounds, _, p = signs.shape
    h_mat = hadamard_matrix(p).to(features.device)
    x = torch.zeros(b, p, dtype=torch.float64, device=features.device)
    x[:, :f] = features.double()
    s = signs.double()
    blocks = [((x * s[r, 0]) @ h_mat.T * s[r, 1]) @ h_mat.T for r in range(rounds)]
    h = torch.cat(blocks, dim=1)[:, :dim]
    if bias is not None:
        h = h + bias.double()
    return pack_bits(h)


def sign_project_pack(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """sign(features @ weight.T + bias) packed: (B,F) × (D,F) → (B, ceil(D/64)) int64."""
    h = features.double() @ weight.double().T
    if bias is not None:
        h = h + bias.double()
    return pack_bits(h)
