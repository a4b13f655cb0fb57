"""CUDA C++ and compiled Triton kernels against the exact reference.

The nvcc syntax/compile check runs wherever nvcc is on PATH (no GPU needed); the kernel
tests need a CUDA GPU and a CUDA build of torch and skip with the reason otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import edge_runtime.kernels as K
import pytest
import torch
from edge_runtime.kernels import reference
from edge_runtime.kernels._alloc import poisoned_outputs

CSRC = Path(K.__file__).with_name("csrc")

needs_gpu = pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available(),
    reason="needs a CUDA GPU and a CUDA build of torch (none here)",
)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_kernels_compile_with_nvcc(tmp_path: Path) -> None:
    obj = tmp_path / "hdc_cuda_kernels.o"
    cmd = [
        "nvcc",
        "-c",
        str(CSRC / "hdc_cuda_kernels.cu"),
        "-o",
        str(obj),
        "-Werror",
        "all-warnings",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    assert obj.stat().st_size > 0


def _case(d: int, b: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=gen)
    x[7::7] = x[0]  # ties across rows
    return reference.pack_bits(torch.randn(b, d, generator=gen)), reference.pack_bits(x)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize(
    ("d", "b", "m", "k"), [(1, 1, 1, 1), (65, 3, 100, 4), (10_000, 5, 3000, 5)]
)
def test_gpu_topk_and_hamming_exact(backend: str, d: int, b: int, m: int, k: int) -> None:
    q, mem = _case(d, b, m, seed=d + m)
    off = torch.tensor([0, 0, m // 3, m], dtype=torch.int64)
    ref_d, ref_i = reference.segmented_hamming_topk(q, mem, off, k)
    with poisoned_outputs():
        dist, idx = K.segmented_hamming_topk(q.cuda(), mem.cuda(), off.cuda(), k, backend=backend)
        ham = K.hamming(q.cuda(), mem.cuda(), backend=backend)
    assert torch.equal(dist.cpu(), ref_d) and torch.equal(idx.cpu(), ref_i)
    assert torch.equal(ham.cpu(), reference.hamming(q, mem))


@needs_gpu
@pytest.mark.gpu
def test_gpu_pack_and_auto_dispatch() -> None:
    x = torch.randn(9, 130)
    with poisoned_outputs():
        got = K.pack_bits(x.cuda(), backend="cuda")
    assert torch.equal(got.cpu(), reference.pack_bits(x))
    assert K.resolve_backend("auto", torch.device("cuda")) in ("cuda", "triton")
