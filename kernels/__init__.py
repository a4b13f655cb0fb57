"""The HDC similarity hot path behind one dispatch (imported as ``edge_runtime.kernels``).

Public API (every implementation follows the conventions in ``reference``; each function
takes ``backend=`` in {"auto", "reference", "cpp", "torch", "triton", "cuda"}):
``pack_bits``, ``unpack_bits``, ``hamming``, ``segmented_hamming_topk``,
``segmented_cosine_max``, ``sign_project_pack``, ``hadamard_project_pack`` (structured
projection, no stored matrix; signs from ``hadamard_signs``) and ``project_and_topk``
(the fused HDC step), ``fused_bank_scores`` (a memory bank's whole per-frame step) and
``rerank_similarity`` (exact angles of the scan's candidates). Compiled kernels build
lazily on first use, never at import.
"""

from __future__ import annotations

from edge_runtime.kernels.api import (
    BACKENDS,
    Backend,
    fused_bank_scores,
    hadamard_project_pack,
    hamming,
    pack_bits,
    project_and_topk,
    resolve_backend,
    segmented_cosine_max,
    segmented_hamming_topk,
    sign_project_pack,
    unpack_bits,
)
from edge_runtime.kernels.hadamard import hadamard_block, hadamard_signs
from edge_runtime.kernels.knn import angular_similarity, knn_similarity, rerank_similarity
from edge_runtime.kernels.reference import words_for

__all__ = [
    "BACKENDS",
    "Backend",
    "angular_similarity",
    "fused_bank_scores",
    "hadamard_block",
    "hadamard_project_pack",
    "hadamard_signs",
    "hamming",
    "knn_similarity",
    "pack_bits",
    "project_and_topk",
    "rerank_similarity",
    "resolve_backend",
    "segmented_cosine_max",
    "segmented_hamming_topk",
    "sign_project_pack",
    "unpack_bits",
    "words_for",
]
