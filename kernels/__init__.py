"""The HDC similarity hot path behind one dispatch (imported as ``edge_runtime.kernels``).

Public API (every implementation follows the conventions in ``reference``):
``pack_bits``, ``unpack_bits``, ``hamming``, ``segmented_hamming_topk``,
``segmented_cosine_max``, ``sign_project_pack``.
"""

from __future__ import annotations

from edge_runtime.kernels.reference import (
    hamming,
    pack_bits,
    segmented_cosine_max,
    segmented_hamming_topk,
    sign_project_pack,
    unpack_bits,
    words_for,
)

__all__ = [
    "hamming",
    "pack_bits",
    "segmented_cosine_max",
    "segmented_hamming_topk",
    "sign_project_pack",
    "unpack_bits",
    "words_for",
]
