"""k-NN similarity from the packed scan's neighbours: the Hamming estimate, or exact angles.

``knn_similarity`` turns (B,S,k) Hamming distances into a per-segment score.
``rerank_similarity`` re-scores a longer candidate list exactly: the packed scan estimates
each neighbour's angle from D sign bits, and near a tie between two domains that estimate's
noise (about 0.01 in similarity at D = 4,096) decides the route. The
scan keeps a few more candidates than k per segment, and their exact angles to the query
(unit-norm float16 copies of the normalised exemplar features) give the final k-NN score:
a few dot products per frame instead of a float scan of the whole memory. Pure torch, on the
inputs' device; the C++ kernel ``fused_bank_scores`` does the same in native code.
"""

from __future__ import annotations

import math

import torch
from edge_runtime.kernels.reference import PAD_DISTANCE

from edge_runtime.errors import InputError

__all__ = ["PAD_DISTANCE", "angular_similarity", "knn_similarity", "rerank_similarity"]


def knn_similarity(dist: torch.Tensor, dim: int, reduce: str = "kth") -> torch.Tensor:
    """(B,S,k) Hamming distances → (B,S) float32 similarity in [-1, 1], higher = closer.

    ``1 - 2·d/D`` is the bipolar cosine of two sign codes. ``reduce="kth"``
    uses the k-th neighbour (Sun et al. 2022; robust to a single near-duplicate);
    ``"mean"`` averages the k nearest. A segment with fewer than k rows uses
    the neighbours it has; an empty one scores -inf.
    """
    valid = dist != PAD_DISTANCE
    sim = 1.0 - 2.0 * dist.to(torch.float64) / dim
    n_valid = valid.sum(dim=2)
    if reduce == "kth":
        last = (n_valid - 1).clamp(min=0).unsqueeze(-1)
        out = torch.gather(sim, 2, last).squeeze(-1)
    elif reduce == "mean":
        out = torch.where(valid, sim, torch.zeros_like(sim)).sum(dim=2) / n_valid.clamp(min=1)
    else:
        raise InputError(f"unknown k-NN reduce {reduce!r}: use 'kth' or 'mean'")
    out = torch.where(n_valid > 0, out, torch.full_like(out, float("-inf")))
    return out.to(torch.float32)


def angular_similarity(cos: torch.Tensor) -> torch.Tensor:
    """``1 - 2·acos(cos)/π``: what the bipolar Hamming similarity ``1 - 2·d/D`` of two random
    sign codes estimates (SimHash), computed exactly; float64 in and out."""
    return 1.0 - 2.0 * torch.arccos(cos.to(torch.float64).clamp(-1.0, 1.0)) / math.pi


def rerank_similarity(
    rows: torch.Tensor,
    zq: torch.Tensor,
    zmem: torch.Tensor,
    k: int,
    reduce: str = "mean",
    own: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact angular k-NN similarity among Hamming candidates.

    ``rows`` (B,S,C) int64: candidate rows of ``zmem`` per query and segment (-1 = none), from
    the packed scan; ``zq`` (B,P) float32 and ``zmem`` (M,P) unit-norm vectors (any float
    dtype); ``own`` (B,) int64: the row holding each query, never its own neighbour (-1 =
    none). Each candidate gets :func:`angular_similarity` of its cosine to the query; the
    ``k`` best are reduced as in :func:`knn_similarity` (-inf when a segment has none).
    Returns the (B,S) float32 similarity, the (B,S,k) rows best first (-1 padded) and their
    (B,S,k) float64 angular similarities (-inf padded).
    """
    b, s, c = rows.shape
    valid = rows >= 0
    if own is not None:
        valid &= rows != own.view(b, 1, 1)
    safe = rows.clamp(min=0)
    zq = zq.to(torch.float32)
    cos = torch.empty(b, s, c, dtype=torch.float32, device=zq.device)
    step = max(1, 4096 // max(1, s * c))  # bounds the gathered (step,S,C,P) block
    for i in range(0, b, step):
        cand = zmem[safe[i : i + step]].to(torch.float32)
        cos[i : i + step] = torch.einsum("bp,bscp->bsc", zq[i : i + step], cand)
    ang = torch.where(valid, angular_similarity(cos), float("-inf"))
    kk = min(k, c)
    top, pos = torch.topk(ang, kk, dim=2)  # sorted, best first
    top_rows = torch.where(torch.isfinite(top), torch.gather(rows, 2, pos), -1)
    n_valid = torch.isfinite(top).sum(dim=2)
    if reduce == "kth":
        last = (n_valid - 1).clamp(min=0).unsqueeze(-1)
        out = torch.gather(top, 2, last).squeeze(-1)
    elif reduce == "mean":
        out = torch.where(torch.isfinite(top), top, 0.0).sum(dim=2) / n_valid.clamp(min=1)
    else:
        raise InputError(f"unknown k-NN reduce {reduce!r}: use 'kth' or 'mean'")
    out = torch.where(n_valid > 0, out, float("-inf"))
    return out.to(torch.float32), top_rows, top
