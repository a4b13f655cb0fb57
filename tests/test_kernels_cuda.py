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

from edge_runtime.errors import BackendUnavailableError

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


BACKENDS = ["cuda", "triton"]


def _exact(backend: str, q: torch.Tensor, mem: torch.Tensor, off: torch.Tensor, k: int) -> None:
    ref_d, ref_i = reference.segmented_hamming_topk(q, mem, off, k)
    with poisoned_outputs():
        dist, idx = K.segmented_hamming_topk(q.cuda(), mem.cuda(), off.cuda(), k, backend=backend)
    assert torch.equal(dist.cpu(), ref_d) and torch.equal(idx.cpu(), ref_i)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", range(6, 33))
def test_gpu_topk_every_k_up_to_the_cuda_limit(backend: str, k: int) -> None:
    """k from 6 to 32 (HDC_MAX_K): per-warp insertion lists and the warp merge at every size,
    with segments shorter than k, one under a block, and one spanning many blocks."""
    q, mem = _case(200, 3, 700, seed=k)
    _exact(backend, q, mem, torch.tensor([0, 0, 3, k - 1, k + 40, 700]), k)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("k", [33, 48, 64, 65, 100])
def test_gpu_topk_over_32_dispatches_and_stays_exact(k: int) -> None:
    """auto sends k > 32 past the CUDA kernel (Triton up to 64, torch above); the CUDA
    backend named explicitly refuses it rather than overrunning its shared-memory lists."""
    q, mem = _case(130, 2, 500, seed=k)
    _exact("auto", q, mem, torch.tensor([0, 10, 250, 500]), k)
    with pytest.raises(BackendUnavailableError, match="k <= 32"):
        K.segmented_hamming_topk(q.cuda(), mem.cuda(), torch.tensor([0, 500]).cuda(), k,
                                 backend="cuda")  # fmt: skip


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_over_262k_rows(backend: str) -> None:
    """Rows used to sit on CUDA grid.y (65,535 blocks x 4 rows = 262,140 rows at most)."""
    m = 300_000
    q, mem = _case(256, 2, m, seed=1)
    with poisoned_outputs():
        ham = K.hamming(q.cuda(), mem.cuda(), backend=backend)
    assert torch.equal(ham.cpu(), reference.hamming(q, mem))
    _exact(backend, q, mem, torch.tensor([0, 5, 262_139, 262_145, m]), 8)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_over_2m_rows_and_70k_queries(backend: str) -> None:
    """Triton's rows were on grid axis 1 (65,535 programs x 32 rows, ~2.1M rows); queries
    now sit on a capped axis walked grid-stride, so more than 65,535 of them must work too."""
    q, mem = _case(64, 1, 2_200_000, seed=2)
    with poisoned_outputs():
        ham = K.hamming(q.cuda(), mem.cuda(), backend=backend)
    assert torch.equal(ham.cpu(), reference.hamming(q, mem))
    q, mem = _case(64, 70_000, 9, seed=3)
    with poisoned_outputs():
        ham = K.hamming(q.cuda(), mem.cuda(), backend=backend)
    assert torch.equal(ham.cpu(), reference.hamming(q, mem))
    _exact(backend, q[:66_000], mem, torch.tensor([0, 4, 9]), 3)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("reduce", ["kth", "mean"])
def test_gpu_fused_bank_scores_composed_on_cuda(reduce: str) -> None:
    """fused_bank_scores on CUDA tensors runs the composed path through the GPU kernels;
    against the exact reference on the same packed codes it must agree to float rounding."""
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(6, 40, generator=gen)
    layers = torch.tensor([[0, 24], [24, 40]], dtype=torch.int64)
    weights = torch.tensor([1.0, 0.5])
    dim, k = 1000, 5
    signs = K.hadamard_signs(40, dim, seed=5)
    mem = reference.pack_bits(torch.randn(900, dim, generator=gen))
    off = torch.tensor([0, 0, 3, 400, 900], dtype=torch.int64)
    thr = torch.tensor([0.1, -0.2, 0.0, 0.3])
    dev = torch.device("cuda")
    with poisoned_outputs():
        got = K.fused_bank_scores(
            feats.to(dev), layers.to(dev), weights.to(dev), True, signs.to(dev), dim,
            mem.to(dev), off.to(dev), k, reduce, thr.to(dev),
        )  # fmt: skip
    assert got.device.type == "cuda" and got.shape == (6, 4)
    z = torch.cat(
        [torch.nn.functional.normalize(feats[:, a:b].to(dev), dim=1, eps=1e-12) * w
         for (a, b), w in zip(layers.tolist(), weights.tolist(), strict=True)], dim=1,
    )  # fmt: skip
    codes = K.hadamard_project_pack(z, signs.to(dev), dim).cpu()
    ref_d, _ = reference.segmented_hamming_topk(codes, mem, off, k)
    want = K.knn_similarity(ref_d, dim, reduce) - thr
    assert torch.equal(torch.isneginf(got.cpu()), torch.isneginf(want))
    fin = torch.isfinite(want)
    assert torch.allclose(got.cpu()[fin], want[fin], rtol=0, atol=1e-6)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_kernels_run_on_the_current_stream(backend: str) -> None:
    """Under torch.cuda.stream(s) the kernels must launch on s: the memory rows are written
    on s behind a long sleep, so a launch on the default stream would read them unfilled."""
    q, mem = _case(300, 4, 5000, seed=6)
    off = torch.tensor([0, 1000, 5000])
    ref_d, ref_i = reference.segmented_hamming_topk(q, mem, off, 4)
    qg, src, offg = q.cuda(), mem.cuda(), off.cuda()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        memg = torch.zeros_like(src)
        torch.cuda._sleep(50_000_000)
        memg.copy_(src)
        ham = K.hamming(qg, memg, backend=backend)
        dist, idx = K.segmented_hamming_topk(qg, memg, offg, 4, backend=backend)
    side.synchronize()
    assert torch.equal(ham.cpu(), reference.hamming(q, mem))
    assert torch.equal(dist.cpu(), ref_d) and torch.equal(idx.cpu(), ref_i)


@pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs two CUDA GPUs",
)
@pytest.mark.gpu
def test_cuda_kernels_launch_on_the_tensors_gpu() -> None:
    """Tensors on cuda:1 while cuda:0 is current: the bindings' OptionalCUDAGuard must
    launch on cuda:1 (else an illegal access or wrong results)."""
    q, mem = _case(130, 3, 400, seed=7)
    off = torch.tensor([0, 100, 400])
    dev = torch.device("cuda:1")
    torch.cuda.set_device(0)
    with poisoned_outputs():
        ham = K.hamming(q.to(dev), mem.to(dev), backend="cuda")
        dist, idx = K.segmented_hamming_topk(q.to(dev), mem.to(dev), off.to(dev), 4,
                                             backend="cuda")  # fmt: skip
        packed = K.pack_bits(torch.randn(5, 70).to(dev), backend="cuda")
    assert ham.device == dev and packed.device == dev
    assert torch.equal(ham.cpu(), reference.hamming(q, mem))
    ref_d, ref_i = reference.segmented_hamming_topk(q, mem, off, 4)
    assert torch.equal(dist.cpu(), ref_d) and torch.equal(idx.cpu(), ref_i)
