"""Cases for the Triton kernels on CPU under TRITON_INTERPRET=1 (run by test_kernels_triton.py).

Triton decides whether to interpret when its own library functions are decorated, i.e. when
``triton`` is first imported, so these cases must run in a process started with
TRITON_INTERPRET=1; test_kernels_triton.py starts one. Sizes stay small: the interpreter runs
every program in Python.
"""

from __future__ import annotations

import os

import edge_runtime.kernels as K
import pytest
import torch
from edge_runtime.kernels import reference
from edge_runtime.kernels._alloc import poisoned_outputs

from edge_runtime.errors import BackendUnavailableError

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "run through test_kernels_triton.py (needs TRITON_INTERPRET=1 at start)",
        allow_module_level=True,
    )
pytest.importorskip("triton", reason="triton is not installed")


@pytest.mark.parametrize("d", [1, 65, 130])
def test_triton_hamming_exact(d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    q = reference.pack_bits(torch.randn(3, d, generator=gen))
    mem = reference.pack_bits(torch.randn(37, d, generator=gen))
    with poisoned_outputs():
        got = K.hamming(q, mem, backend="triton")
    assert torch.equal(got, reference.hamming(q, mem))


@pytest.mark.parametrize(("d", "k"), [(1, 1), (65, 3), (4200, 5)])
def test_triton_segmented_topk_exact(d: int, k: int) -> None:
    gen = torch.Generator().manual_seed(10 + d)
    x = torch.randn(70, d, generator=gen)
    x[5::5] = x[0]  # duplicate rows: ties must go to the lower row
    mem = reference.pack_bits(x)
    q = reference.pack_bits(torch.randn(2, d, generator=gen))
    # an empty segment, a one-row segment, one shorter than k, and one spanning row blocks
    off = torch.tensor([0, 0, 1, 3, 70], dtype=torch.int64)
    with poisoned_outputs():
        dist, idx = K.segmented_hamming_topk(q, mem, off, k, backend="triton")
    ref_d, ref_i = reference.segmented_hamming_topk(q, mem, off, k)
    assert torch.equal(dist, ref_d)
    assert torch.equal(idx, ref_i)


def test_triton_rejects_huge_k() -> None:
    q = reference.pack_bits(torch.randn(1, 64))
    with pytest.raises(BackendUnavailableError, match="k <= 64"):
        K.segmented_hamming_topk(q, q, torch.tensor([0, 1]), 65, backend="triton")


def test_triton_hamming_walks_queries_past_the_grid_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queries sit on grid axis 1 (CUDA caps it at 65,535 programs): with the cap shrunk to 2,
    each program must walk its queries grid-stride and still fill every (query, row)."""
    from edge_runtime.kernels import triton_backend

    monkeypatch.setattr(triton_backend, "MAX_GRID_YZ", 2)
    assert triton_backend.hamming_grid(5, 70, 32) == (3, 2)
    gen = torch.Generator().manual_seed(3)
    q = reference.pack_bits(torch.randn(5, 130, generator=gen))
    mem = reference.pack_bits(torch.randn(70, 130, generator=gen))
    with poisoned_outputs():
        got = K.hamming(q, mem, backend="triton")
    assert torch.equal(got, reference.hamming(q, mem))
