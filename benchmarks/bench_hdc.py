"""HDC hot path: our kernels side by side with torchhd and plain torch, in one run.

    python benchmarks/bench_hdc.py [--quick] [--out benchmarks/out] [--threads N] [--only faiss]
    python benchmarks/bench_hdc.py --device cuda [--quick] [--out DIR]   # on a CUDA GPU

Rows:
- ``step``: the whole HDC step for a batch (1,280 features → D → best match per domain over
  80 prototypes): torchhd Projection + MAP cosine, plain torch (float projection + cosine),
  ours (Hadamard projection packed + per-domain Hamming top-1; and the dense ±1 projection).
- ``projection``: features → hypervector only.
- ``similarity``: batch {1, 64, 256} × memory entries {10, 80, 1,000, 10,000 (exemplars, k=5)}
  × D {4,096, 10,000}: ours (packed Hamming, per-domain top-k fused in the scan), torchhd MAP
  cosine, torchhd BSC Hamming (where its B×M×D temporary fits in memory), torch float
  matmul cosine + per-domain max. torchhd BSC needs ~9 bytes per B×M×D element; where that
  does not fit in half the free memory it runs over query chunks that do (``bsc_query_chunk``).
- ``faiss``: exact Hamming top-5 against ``faiss.IndexBinaryFlat`` (faiss-cpu, the
  ``bench`` extra), the library a user would reach for: batch {1, 64, 256} × codes {10, 80,
  1,000, 10,000, 100,000} × D {2,048 (the runtime's default), 4,096, 10,000}, random codes,
  one segment (FAISS keeps one top-k list per query), both given the same threads. Ours and
  FAISS alternate call by call, so both see the same machine load, and the table says
  whether they returned identical distances (indices may differ only among equal distances).
Each row prints the median time, ratios against ours, and the achieved bytes/s of ours
(unique bytes read: packed memory + queries) next to the measured copy bandwidth (the
roofline for a scan that streams its memory once). JSON goes to OUT/bench_hdc.json.

``--quality`` instead measures whether the structured (Hadamard) projection keeps the
quality of a dense one, on real encoder features (MobileNetV2 on Fashion-MNIST, centred and
L2-normalised as edge_runtime.hdc does): Hamming-vs-angle error and correlation, overlap of
the 10 nearest neighbours by Hamming with those by cosine, and 5-NN accuracy, for the dense
Gaussian projection (what edge_runtime.hdc uses), a dense ±1 projection and the Hadamard one.
Writes OUT/bench_hdc_quality.json.

``--device cuda`` (a CUDA GPU and a CUDA build of torch; exit 2 without one) runs the
similarity table on the GPU: our kernels through the public dispatch (``backend="auto"`` on
CUDA tensors resolves to the CUDA C++ kernels, else Triton, else torch) against torch's float
matmul cosine + per-domain max on the same GPU, ``torch.cuda.synchronize()`` inside every
timed call, and whether our GPU distances equal our CPU ones. The FAISS table keeps
``faiss-cpu`` as the peer, on CPU, labelled so, against ours on the GPU. The step and
projection tables stay CPU-only. JSON goes to OUT/bench_hdc_cuda.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import edge_runtime.kernels as K
import numpy as np
import psutil
import torch

FEATURES = 1280
SEGMENTS = 10  # domains the memory is split into


def timeit(
    fn: Callable[[], object], budget_s: float, max_runs: int = 200, warmup: bool = True
) -> float:
    """Median seconds of ``fn`` over the runs that fit the budget (at least 1, after a warm-up
    unless a single call already takes seconds)."""
    if warmup:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_pair(
    fa: Callable[[], object], fb: Callable[[], object], budget_s: float, max_runs: int = 200
) -> tuple[float, float]:
    """Median seconds of ``fa`` and of ``fb``, called alternately (after one warm-up each), so
    a ratio of the two is not skewed by load that came and went between two separate runs."""
    fa()
    fb()
    ta: list[float] = []
    tb: list[float] = []
    start = time.perf_counter()
    while len(ta) < max_runs and (not ta or time.perf_counter() - start < 2 * budget_s):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


def copy_bandwidth(nbytes: int, device: str = "cpu") -> float:
    """Bytes/s of a large tensor copy (read + write), the machine's streaming roofline."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = timeit(synced(lambda: dst.copy_(src), device), 0.5, max_runs=20)
    return 2 * nbytes / t


def synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """``fn`` as is on CPU; on CUDA, ``fn`` then ``torch.cuda.synchronize()``, so a timer
    around the call measures the kernels, not just their launch."""
    if device != "cuda":
        return fn

    def call() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def offsets_for(m: int, s: int) -> torch.Tensor:
    s = min(s, m)
    return torch.tensor([m * i // s for i in range(s + 1)], dtype=torch.int64)


def segment_max(sim: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    bounds = offsets.tolist()
    return torch.stack([sim[:, a:b].max(dim=1).values for a, b in pairwise(bounds)], 1)


def bench_step(batch: int, dim: int, n_proto: int, budget: float) -> dict[str, float]:
    import torchhd

    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(batch, FEATURES, generator=gen)
    off = offsets_for(n_proto, SEGMENTS)
    proj = torchhd.embeddings.Projection(FEATURES, dim)
    protos_map = torchhd.random(n_proto, dim, "MAP")
    w = proj.weight.detach()
    protos_f = torch.randn(n_proto, dim, generator=gen)
    signs = K.hadamard_signs(FEATURES, dim, seed=1)
    dense_pm1 = torch.where(torch.randn(dim, FEATURES, generator=gen) > 0, 1.0, -1.0)
    protos_packed = K.pack_bits(torch.randn(n_proto, dim, generator=gen))

    def torchhd_step() -> object:
        sim = torchhd.cosine_similarity(proj(feats), protos_map)
        return segment_max(sim.as_subclass(torch.Tensor), off)

    def torch_step() -> object:
        h = torch.nn.functional.normalize(feats @ w.T, dim=1)
        return segment_max(h @ torch.nn.functional.normalize(protos_f, dim=1).T, off)

    def ours_hadamard() -> object:
        return K.project_and_topk(feats, signs, protos_packed, off, 1, dim=dim)

    def ours_dense() -> object:
        return K.project_and_topk(feats, dense_pm1, protos_packed, off, 1)

    with torch.inference_mode():
        return {
            "torchhd_projection_cosine": timeit(torchhd_step, budget),
            "torch_float": timeit(torch_step, budget),
            "ours_hadamard_packed": timeit(ours_hadamard, budget),
            "ours_dense_pm1_packed": timeit(ours_dense, budget),
        }


def bench_projection(batch: int, dim: int, budget: float) -> dict[str, float]:
    import torchhd

    feats = torch.rand(batch, FEATURES)
    proj = torchhd.embeddings.Projection(FEATURES, dim)
    signs = K.hadamard_signs(FEATURES, dim, seed=1)
    dense = torch.where(torch.randn(dim, FEATURES) > 0, 1.0, -1.0)
    with torch.inference_mode():
        return {
            "torchhd_projection": timeit(lambda: proj(feats), budget),
            "ours_hadamard_packed": timeit(
                lambda: K.hadamard_project_pack(feats, signs, dim), budget
            ),
            "ours_dense_pm1_packed": timeit(lambda: K.sign_project_pack(feats, dense), budget),
        }


def bench_similarity(
    batch: int, m: int, dim: int, budget: float, bsc_max_elems: float
) -> dict[str, float | None]:
    import torchhd

    k = 5 if m >= 10_000 else 1
    off = offsets_for(m, SEGMENTS)
    q_map, mem_map = torchhd.random(batch, dim, "MAP"), torchhd.random(m, dim, "MAP")
    q_bsc, mem_bsc = torchhd.random(batch, dim, "BSC"), torchhd.random(m, dim, "BSC")
    q_pk, mem_pk = (
        K.pack_bits(q_bsc.as_subclass(torch.Tensor)),
        K.pack_bits(mem_bsc.as_subclass(torch.Tensor)),
    )
    q_f = q_map.as_subclass(torch.Tensor).float()
    mem_f = torch.nn.functional.normalize(mem_map.as_subclass(torch.Tensor).float(), dim=1)

    row: dict[str, float | None] = {"k": k}
    with torch.inference_mode():
        row["ours_packed_topk"] = timeit(
            lambda: K.segmented_hamming_topk(q_pk, mem_pk, off, k), budget
        )
        row["torchhd_map_cosine"] = timeit(
            lambda: torchhd.cosine_similarity(q_map, mem_map), budget
        )
        row["torch_float_cosine_max"] = timeit(
            lambda: segment_max(torch.nn.functional.normalize(q_f, dim=1) @ mem_f.T, off), budget
        )
        elems = batch * m * dim
        # torchhd BSC builds a (B, M, D) bool tensor and sums it as int64: ~9 bytes per element.
        # Where that does not fit in memory, it runs on query chunks that do (time summed).
        room = psutil.virtual_memory().available / 2
        chunk = max(1, min(batch, int(room // (9 * m * dim))))
        row["bsc_query_chunk"] = chunk

        def bsc() -> None:
            for i in range(0, batch, chunk):
                torchhd.hamming_similarity(q_bsc[i : i + chunk], mem_bsc)

        if elems <= bsc_max_elems and 9 * m * dim < room:
            big = elems > 1e8
            row["torchhd_bsc_hamming"] = timeit(bsc, budget, 3 if big else 200, warmup=not big)
        else:
            row["torchhd_bsc_hamming"] = None
    words = K.words_for(dim)
    row["ours_bytes_per_s"] = (m + batch) * words * 8 / row["ours_packed_topk"]
    row["torch_float_bytes_per_s"] = (m + batch) * dim * 4 / row["torch_float_cosine_max"]
    return row


def bench_similarity_cuda(batch: int, m: int, dim: int, budget: float) -> dict[str, Any]:
    """Ours (public dispatch, CUDA tensors) vs torch float matmul cosine + per-domain max, both
    on the GPU; ``same_as_cpu``: our GPU distances equal our CPU ones."""
    gen = torch.Generator().manual_seed(batch * 1_000_003 + m * 101 + dim)
    k = 5 if m >= 10_000 else 1
    off = offsets_for(m, SEGMENTS)
    q_cpu = K.pack_bits(torch.randn(batch, dim, generator=gen))
    mem_cpu = K.pack_bits(torch.randn(m, dim, generator=gen))
    q_pk, mem_pk, off_dev = q_cpu.cuda(), mem_cpu.cuda(), off.cuda()
    q_f = torch.randn(batch, dim, generator=gen).cuda()
    mem_f = torch.nn.functional.normalize(torch.randn(m, dim, generator=gen), dim=1).cuda()

    def ours() -> object:
        return K.segmented_hamming_topk(q_pk, mem_pk, off_dev, k)

    def torch_float() -> object:  # segment bounds from the CPU offsets: no device sync
        return segment_max(torch.nn.functional.normalize(q_f, dim=1) @ mem_f.T, off)

    row: dict[str, Any] = {"k": k}
    with torch.inference_mode():
        d_gpu, _ = ours()
        d_cpu, _ = K.segmented_hamming_topk(q_cpu, mem_cpu, off, k)
        row["same_as_cpu"] = bool(torch.equal(d_gpu.cpu(), d_cpu))
        row["ours_packed_topk"] = timeit(synced(ours, "cuda"), budget)
        row["torch_float_cosine_max"] = timeit(synced(torch_float, "cuda"), budget)
    words = K.words_for(dim)
    row["ours_bytes_per_s"] = (m + batch) * words * 8 / row["ours_packed_topk"]
    row["torch_float_bytes_per_s"] = (m + batch) * dim * 4 / row["torch_float_cosine_max"]
    return row


FAISS_K = 5


def bench_faiss(batch: int, m: int, dim: int, budget: float, device: str = "cpu") -> dict[str, Any]:
    """Ours vs ``faiss.IndexBinaryFlat``: exact Hamming top-k of random codes, one segment.

    FAISS (faiss-cpu) always runs on the CPU; with ``device="cuda"`` ours runs on the GPU."""
    import faiss

    gen = torch.Generator().manual_seed(batch * 1_000_003 + m * 101 + dim)
    q = K.pack_bits(torch.randn(batch, dim, generator=gen))
    mem = K.pack_bits(torch.randn(m, dim, generator=gen))
    off = torch.tensor([0, m], dtype=torch.int64)
    k = min(FAISS_K, m)
    # FAISS takes codes as bytes and a bit count that is a multiple of 8: the packed words
    # as bytes, all 64·W bits; the padding bits are zero in every code, so they add nothing.
    index = faiss.IndexBinaryFlat(K.words_for(dim) * 64)
    index.add(mem.numpy().view(np.uint8))
    q_bytes = q.numpy().view(np.uint8)
    if device == "cuda":
        q, mem, off = q.cuda(), mem.cuda(), off.cuda()

    def ours_call() -> tuple[torch.Tensor, torch.Tensor]:
        return K.segmented_hamming_topk(q, mem, off, k)

    ours = synced(ours_call, device)

    def theirs() -> tuple[np.ndarray, np.ndarray]:
        return index.search(q_bytes, k)

    with torch.inference_mode():
        d_ours, i_ours = ours()
        d_faiss, i_faiss = theirs()
        big = batch * m * dim > 5e10  # a few seconds a call: one timed run each
        t_ours, t_faiss = timeit_pair(ours, theirs, budget, 1 if big else 200)
    d_ours, i_ours = d_ours.cpu(), i_ours.cpu()
    return {
        "k": k,
        "ours_topk": t_ours,
        "faiss_index_binary_flat": t_faiss,
        "faiss_over_ours": t_faiss / t_ours,
        "identical_distances": bool(np.array_equal(d_ours[:, 0].numpy(), d_faiss)),
        "identical_indices": bool(np.array_equal(i_ours[:, 0].numpy(), i_faiss)),
    }


def quality(n_train: int, n_test: int, dims: list[int]) -> dict[str, object]:
    from edge_runtime.data.datasets import load_fashion_mnist
    from edge_runtime.encoder import Encoder, TorchBackend

    x_tr, y_tr = load_fashion_mnist("train")
    x_te, y_te = load_fashion_mnist("test")
    enc = Encoder(TorchBackend.mobilenet())
    f_tr = torch.from_numpy(enc.features(x_tr[:n_train], progress="train features"))
    f_te = torch.from_numpy(enc.features(x_te[:n_test], progress="test features"))
    y_tr, y_te = torch.from_numpy(y_tr[:n_train].copy()), torch.from_numpy(y_te[:n_test].copy())
    mean = torch.nn.functional.normalize(f_tr, dim=1).mean(0)
    z_tr = torch.nn.functional.normalize(torch.nn.functional.normalize(f_tr, dim=1) - mean, dim=1)
    z_te = torch.nn.functional.normalize(torch.nn.functional.normalize(f_te, dim=1) - mean, dim=1)
    cos = (z_te.double() @ z_tr.double().T).clamp(-1, 1)
    angle = torch.arccos(cos) / torch.pi  # SimHash: E[hamming / D] = angle / pi
    nn_cos = cos.topk(10, dim=1).indices

    def knn_acc(score: torch.Tensor) -> float:  # 5-NN majority vote, higher score = nearer
        votes = y_tr[score.topk(5, dim=1).indices]
        return float((torch.mode(votes, dim=1).values == y_te).float().mean())

    f = z_tr.shape[1]
    rows: dict[str, object] = {"n_train": n_train, "n_test": n_test, "features": f,
                               "cosine_5nn_accuracy": knn_acc(cos)}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for dim in dims:
        w_gauss = torch.randn(dim, f, generator=gen)
        w_pm1 = torch.where(torch.randn(dim, f, generator=gen) > 0, 1.0, -1.0)
        signs = K.hadamard_signs(f, dim, seed=1)
        projections = {
            "gaussian_dense": functools.partial(K.sign_project_pack, weight=w_gauss),
            "pm1_dense": functools.partial(K.sign_project_pack, weight=w_pm1),
            "hadamard": functools.partial(K.hadamard_project_pack, signs=signs, dim=dim),
        }
        for name, proj in projections.items():
            ham = K.hamming(proj(z_te), proj(z_tr)).double() / dim
            nn_ham = (-ham).topk(10, dim=1).indices
            overlap = (nn_ham.unsqueeze(2) == nn_cos.unsqueeze(1)).any(2).float().mean()
            a, h = angle.flatten(), ham.flatten()
            corr = float(torch.corrcoef(torch.stack([a, h]))[0, 1])
            rows[f"{name}_D{dim}"] = {
                "mean_abs_hamming_minus_angle": float((h - a).abs().mean()),
                "pearson_hamming_angle": corr,
                "top10_overlap_with_cosine": float(overlap),
                "hamming_5nn_accuracy": knn_acc(-ham),
            }
    return rows


def ratio(a: float | None, b: float) -> str:
    return f"{a / b:.1f}x" if a else "-"


def ms(t: float | None) -> str:
    return f"{t * 1e3:.3f}" if t else "-"


def show(cells: list[str], widths: list[int]) -> None:
    print(" ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))


def _report_acceptance(result: dict[str, Any]) -> None:
    """Close a run: the end load, then each acceptance line (PASS / FAIL / n/a), printed and
    kept in the result."""
    result["machine"]["load_average_at_end"] = list(psutil.getloadavg())
    checks = _acceptance(result)
    result["acceptance"] = checks
    print("\n== acceptance ==")
    for name, c in checks.items():
        verdict = "n/a " if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        print(f"{verdict}  {name}: {c['value']}")
    print(f"load average at start {result['machine']['load_average_at_start']}, at end "
          f"{result['machine']['load_average_at_end']}")  # fmt: skip


def _write_result(path: Path, result: dict[str, Any]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="where our kernels and torch's matmul run (cuda: similarity and FAISS tables)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--bsc-max-elems", type=float, default=None,
        help="largest B*M*D for torchhd BSC (it materialises that many bools)",
    )  # fmt: skip
    parser.add_argument(
        "--quality", action="store_true", help="projection quality on real features"
    )
    parser.add_argument(
        "--only", choices=["step", "projection", "similarity", "faiss"], action="append",
        help="run only these tables (repeatable; default all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device"
        print(f"bench_hdc: --device cuda needs a CUDA GPU, but torch.cuda.is_available() is "
              f"False ({why}, torch {torch.__version__})", file=sys.stderr)  # fmt: skip
        return 2
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality:
        n_train, n_test = (1000, 200) if args.quick else (5000, 1000)
        q = quality(n_train, n_test, [4096] if args.quick else [4096, 10_000])
        print(json.dumps(q, indent=2))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_hdc_quality.json").write_text(json.dumps(q, indent=2))
        print(f"wrote {args.out / 'bench_hdc_quality.json'}")
        return 0
    budget = 0.05 if args.quick else 0.5
    bsc_max = args.bsc_max_elems or (2e7 if args.quick else 2.6e9)
    batches = [1, 64] if args.quick else [1, 64, 256]
    sizes = [10, 80, 1000] if args.quick else [10, 80, 1000, 10_000]
    dims = [4096] if args.quick else [4096, 10_000]
    faiss_sizes = [80, 1000, 10_000] if args.quick else [10, 80, 1000, 10_000, 100_000]
    faiss_dims = [2048] if args.quick else [2048, 4096, 10_000]
    tables = set(args.only or ["step", "projection", "similarity", "faiss"])
    if args.device == "cuda":
        return _main_cuda(args, tables, budget, batches, sizes, dims, faiss_sizes, faiss_dims)

    K.segmented_hamming_topk(K.pack_bits(torch.randn(1, 64)), K.pack_bits(torch.randn(2, 64)),
                             torch.tensor([0, 2]), 1)  # fmt: skip  # build the C++ kernels first
    bw = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    backend = K.resolve_backend("auto", torch.device("cpu"))
    print(f"threads={torch.get_num_threads()} backend={backend} copy bandwidth={bw / 1e9:.1f} GB/s")
    result: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "copy_bandwidth_bytes_per_s": bw,
            "backend": backend,
            "load_average_at_start": list(psutil.getloadavg()),
        },
        "step": [],
        "projection": [],
        "similarity": [],
        "faiss": [],
    }
    if "step" in tables:
        _step_table(result, dims, budget, args.quick)
    if "projection" in tables:
        _projection_table(result, batches, dims, budget)
    if "similarity" in tables:
        _similarity_table(result, batches, sizes, dims, budget, bsc_max, bw)
    if "faiss" in tables:
        _faiss_table(result, batches, faiss_sizes, faiss_dims, budget)
    _report_acceptance(result)
    return _write_result(args.out / "bench_hdc.json", result)


def _main_cuda(
    args: argparse.Namespace,
    tables: set[str],
    budget: float,
    batches: list[int],
    sizes: list[int],
    dims: list[int],
    faiss_sizes: list[int],
    faiss_dims: list[int],
) -> int:
    """The ``--device cuda`` run: similarity (and FAISS on CPU) with ours on the GPU."""
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    # build the CPU kernels (the parity reference) and warm the CUDA context and kernels
    K.segmented_hamming_topk(K.pack_bits(torch.randn(1, 64)), K.pack_bits(torch.randn(2, 64)),
                             torch.tensor([0, 2]), 1)  # fmt: skip
    K.segmented_hamming_topk(K.pack_bits(torch.randn(1, 64)).cuda(),
                             K.pack_bits(torch.randn(2, 64)).cuda(),
                             torch.tensor([0, 2]).cuda(), 1)  # fmt: skip
    torch.cuda.synchronize()
    bw = copy_bandwidth(256 << 20 if args.quick else 1 << 30, "cuda")
    backend = K.resolve_backend("auto", dev)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    print(f"device={props.name} (sm_{props.major}{props.minor}, "
          f"{props.total_memory / 2**30:.1f} GiB) backend={backend} "
          f"copy bandwidth={bw / 1e9:.1f} GB/s")  # fmt: skip
    result: dict[str, Any] = {
        "machine": {
            "device": "cuda",
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpu_memory_bytes": props.total_memory,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": triton_version,
            "copy_bandwidth_bytes_per_s": bw,
            "backend": backend,
            "load_average_at_start": list(psutil.getloadavg()),
        },
        "similarity": [],
        "faiss": [],
    }
    for name in sorted(tables & {"step", "projection"}):
        print(f"\n== {name}: CPU only (run without --device cuda); skipped ==")
    if "similarity" in tables:
        _similarity_table_cuda(result, batches, sizes, dims, budget, bw)
    if "faiss" in tables:
        _faiss_table(result, batches, faiss_sizes, faiss_dims, budget, "cuda")
    _report_acceptance(result)
    return _write_result(args.out / "bench_hdc_cuda.json", result)


def _similarity_table_cuda(
    result: dict[str, Any],
    batches: list[int],
    sizes: list[int],
    dims: list[int],
    budget: float,
    bw: float,
) -> None:
    print(f"\n== similarity + best per domain (10 domains), on the GPU: ours "
          f"({result['machine']['backend']}) vs torch float matmul cosine ==")  # fmt: skip
    w = [5, 6, 6, 2, 9, 9, 10, 9, 6, 8]
    head = ["batch", "M", "D", "k", "ours ms", "torch ms", "torch/ours", "ours GB/s", "%copy"]
    show([*head, "same CPU"], w)
    for dim in dims:
        for m in sizes:
            for batch in batches:
                r = bench_similarity_cuda(batch, m, dim, budget)
                result["similarity"].append({"batch": batch, "entries": m, "dim": dim, **r})
                ours, tf, bps = (
                    r["ours_packed_topk"],
                    r["torch_float_cosine_max"],
                    r["ours_bytes_per_s"],
                )
                cells = [ms(ours), ms(tf), ratio(tf, ours), f"{bps / 1e9:.2f}"]
                cells += [f"{100 * bps / bw:.1f}%", "yes" if r["same_as_cpu"] else "NO"]
                show([str(batch), str(m), str(dim), str(r["k"]), *cells], w)


def _step_table(result: dict[str, Any], dims: list[int], budget: float, quick: bool) -> None:
    print("\n== whole HDC step: 1,280 features -> D -> best of 80 prototypes per domain ==")
    w = [5, 6, 11, 9, 11, 12, 13]
    show(["batch", "D", "torchhd ms", "torch ms", "ours(H) ms", "ours(±1) ms", "torchhd/oursH"], w)
    for batch in [1] if quick else [1, 256]:
        for dim in dims:
            r = bench_step(batch, dim, 80, budget)
            result["step"].append({"batch": batch, "dim": dim, "prototypes": 80, **r})
            th, ours = r["torchhd_projection_cosine"], r["ours_hadamard_packed"]
            cells = [ms(th), ms(r["torch_float"]), ms(ours), ms(r["ours_dense_pm1_packed"])]
            show([str(batch), str(dim), *cells, ratio(th, ours)], w)


def _projection_table(
    result: dict[str, Any], batches: list[int], dims: list[int], budget: float
) -> None:
    print("\n== projection only ==")
    w = [5, 6, 11, 11, 12, 13]
    show(["batch", "D", "torchhd ms", "ours(H) ms", "ours(±1) ms", "torchhd/oursH"], w)
    for batch in batches:
        for dim in dims:
            r = bench_projection(batch, dim, budget)
            result["projection"].append({"batch": batch, "dim": dim, **r})
            th, ours = r["torchhd_projection"], r["ours_hadamard_packed"]
            cells = [ms(th), ms(ours), ms(r["ours_dense_pm1_packed"]), ratio(th, ours)]
            show([str(batch), str(dim), *cells], w)


def _similarity_table(
    result: dict[str, Any],
    batches: list[int],
    sizes: list[int],
    dims: list[int],
    budget: float,
    bsc_max: float,
    bw: float,
) -> None:
    print("\n== similarity + best per domain (10 domains) ==")
    w = [5, 6, 6, 2, 9, 9, 10, 9, 10, 10, 10, 9, 6]
    head = ["batch", "M", "D", "k", "ours ms", "MAP ms", "BSC ms", "torch ms"]
    show([*head, "MAP/ours", "BSC/ours", "torch/ours", "ours GB/s", "%copy"], w)
    for dim in dims:
        for m in sizes:
            for batch in batches:
                r = bench_similarity(batch, m, dim, budget, bsc_max)
                result["similarity"].append({"batch": batch, "entries": m, "dim": dim, **r})
                ours, bsc = r["ours_packed_topk"], r["torchhd_bsc_hamming"]
                mp, tf, bps = (
                    r["torchhd_map_cosine"],
                    r["torch_float_cosine_max"],
                    r["ours_bytes_per_s"],
                )
                cells = [ms(ours), ms(mp), ms(bsc), ms(tf), ratio(mp, ours), ratio(bsc, ours)]
                cells += [ratio(tf, ours), f"{bps / 1e9:.2f}", f"{100 * bps / bw:.1f}%"]
                show([str(batch), str(m), str(dim), str(r["k"]), *cells], w)


def _faiss_table(
    result: dict[str, Any],
    batches: list[int],
    sizes: list[int],
    dims: list[int],
    budget: float,
    device: str = "cpu",
) -> None:
    try:
        import faiss
    except ImportError:
        print("\n== FAISS: not installed (pip install -e .[bench]); table skipped ==")
        result["faiss_version"] = None
        return
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)  # the same threads as ours
    result["faiss_version"] = faiss.__version__
    if device == "cuda":
        who = f"ours on the GPU vs FAISS on CPU (faiss.IndexBinaryFlat {faiss.__version__}, "
        who += f"{threads} threads)"
    else:
        who = f"ours vs faiss.IndexBinaryFlat {faiss.__version__}, {threads} threads each"
    print(f"\n== exact Hamming top-{FAISS_K}: {who}, random codes, one segment ==")
    w = [5, 7, 6, 2, 10, 10, 11, 10]
    show(["batch", "codes", "D", "k", "ours ms", "FAISS ms", "FAISS/ours", "same dist"], w)
    for dim in dims:
        for m in sizes:
            for batch in batches:
                r = bench_faiss(batch, m, dim, budget, device)
                result["faiss"].append({"batch": batch, "entries": m, "dim": dim, **r})
                same = "yes" if r["identical_distances"] else "NO"
                cells = [f"{r['ours_topk'] * 1e3:.4f}", f"{r['faiss_index_binary_flat'] * 1e3:.4f}"]
                cells += [f"{r['faiss_over_ours']:.2f}x", same]
                show([str(batch), str(m), str(dim), str(r["k"]), *cells], w)


def _acceptance(result: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if result.get("faiss"):
        rows = result["faiss"]
        worst = min(rows, key=lambda r: r["faiss_over_ours"])
        where = f"batch {worst['batch']}, {worst['entries']} codes, D={worst['dim']}"
        gpu = result["machine"].get("device") == "cuda"
        name = "ours (GPU) >= FAISS on CPU" if gpu else "ours >= FAISS IndexBinaryFlat"
        out[f"{name} at every size"] = {
            "value": f"lowest FAISS/ours {worst['faiss_over_ours']:.2f}x ({where})",
            "pass": worst["faiss_over_ours"] >= 1.0,
        }
        same = sum(r["identical_distances"] for r in rows)
        out["identical distances to FAISS"] = {
            "value": f"{same}/{len(rows)} sizes",
            "pass": same == len(rows),
        }
    for r in result["step"]:
        if r["batch"] == 1 and r["dim"] == 10_000:
            x = r["torchhd_projection_cosine"] / r["ours_hadamard_packed"]
            out["step 1 frame D=10k 80 protos >= 10x torchhd"] = {
                "value": f"{x:.1f}x",
                "pass": x >= 10,
            }
    for r in result["similarity"]:
        if (
            r["batch"] == 256
            and r["entries"] == 1000
            and r["dim"] == 10_000
            and "torchhd_map_cosine" in r
        ):
            x = r["torchhd_map_cosine"] / r["ours_packed_topk"]
            out["256x1000 >= 5x torchhd MAP cosine"] = {"value": f"{x:.1f}x", "pass": x >= 5}
            bsc = r["torchhd_bsc_hamming"]
            y = bsc / r["ours_packed_topk"] if bsc else None
            out["256x1000 >= 1000x torchhd BSC"] = {
                "value": f"{y:.0f}x" if y else "BSC not run", "pass": (y >= 1000) if y else None,
            }  # fmt: skip
        if r["batch"] == 1 and r["entries"] == 10_000 and r["dim"] == 10_000:
            t = r["ours_packed_topk"] * 1e3
            out["top-5 over 10k exemplars, 1 frame < 1 ms"] = {
                "value": f"{t:.3f} ms",
                "pass": t < 1,
            }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
