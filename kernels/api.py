"""Public HDC kernel API: one dispatch over the reference, C++ CPU, torch, Triton and CUDA paths.

``backend="auto"`` picks by the tensors' device: on CPU the C++ kernels (built on first use;
torch/numpy path if they cannot be built), on CUDA the CUDA C++ kernels, else Triton, else
torch. ``"reference"`` is the float64 / exact-integer implementation the tests compare to.
A backend that does not implement an operation (e.g. cosine in Triton) uses the torch path,
which is device-agnostic; asking explicitly for a backend that cannot run raises
:class:`BackendUnavailableError`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal

import torch
from edge_runtime.kernels import _alloc, _checks, cpp_backend, cpu_ext, reference, torch_backend
from edge_runtime.kernels.hadamard import check_signs
from edge_runtime.kernels.knn import knn_similarity, rerank_similarity

from edge_runtime.errors import BackendUnavailableError, InputError

Backend = Literal["auto", "reference", "cpp", "torch", "triton", "cuda"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "cpp", "torch", "triton", "cuda")
_ENV = "EDGE_RUNTIME_KERNEL_BACKEND"  # replaces "auto" when set (see resolve_backend)


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _module(name: str) -> ModuleType:
    if name == "reference":
        return reference
    if name == "torch":
        return torch_backend
    if name == "cpp":
        return cpp_backend
    if name == "triton":
        if not triton_importable():
            raise BackendUnavailableError("backend 'triton' needs the triton package")
        from edge_runtime.kernels import triton_backend

        return triton_backend
    if name == "cuda":
        from edge_runtime.kernels import cuda_backend

        reason = cuda_backend.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend 'cuda' cannot run here: {reason}")
        return cuda_backend
    raise InputError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` means for tensors on ``device``.

    EDGE_RUNTIME_KERNEL_BACKEND, if set, replaces "auto" (e.g. "reference" to rule the fast
    kernels in or out when a result looks wrong).
    """
    if backend == "auto":
        backend = os.environ.get(_ENV, "auto") or "auto"
    if backend != "auto":
        if backend not in BACKENDS:
            raise InputError(
                f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if backend == "cpp" and device.type != "cpu":
            raise BackendUnavailableError("backend 'cpp' runs on CPU tensors only")
        if (
            backend in ("triton", "cuda")
            and device.type != "cuda"
            and not _triton_interpreted(backend)
        ):
            raise BackendUnavailableError(f"backend {backend!r} needs CUDA tensors")
        return backend
    if device.type == "cpu":
        return "cpp" if cpu_ext.load() is not None else "torch"
    if device.type == "cuda":
        from edge_runtime.kernels import cuda_backend

        if cuda_backend.unavailable_reason() is None:
            return "cuda"
        return "triton" if triton_importable() else "torch"
    return "torch"


def _lean_cpu_topk(backend: str) -> Callable[..., Any] | None:
    """The C++ top-k that validates and allocates in native code, when ``backend`` means the
    C++ kernels for CPU tensors and outputs need no poisoning; else None.

    Per frame against a small memory the scan itself takes about a microsecond, and the
    Python checks and two torch allocations around it cost several times that: enough to
    lose to FAISS at the runtime's own sizes (the FAISS table of benchmarks/bench_hdc.py).
    The general path stays the one that names a bad input.
    """
    if backend == "auto":
        env = os.environ.get(_ENV)
        if env and env != "auto":
            return None
    elif backend != "cpp":
        return None
    if _alloc.poisoning():
        return None
    mod = cpu_ext.load()
    return None if mod is None else mod.segmented_topk_checked


def _triton_interpreted(backend: str) -> bool:
    """Triton runs CPU tensors under TRITON_INTERPRET=1 (how the tests exercise it)."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _impl(op: str, backend: str, device: torch.device):
    name = resolve_backend(backend, device)
    mod = _module(name)
    fn = getattr(mod, op, None)
    return fn if fn is not None else getattr(torch_backend, op)


def unchecked(op: str, device: torch.device, backend: Backend = "auto") -> Callable[..., Any]:
    """The backend function behind ``op`` for tensors on ``device``, without the API's checks.

    For callers that validated their inputs once at their own boundary and call per frame
    (the HDC memory bank): it takes the backend's positional signature (``bias``/``k``
    included, no ``backend=``) and trusts shapes, dtypes, devices and offsets. Backend
    choice follows :func:`resolve_backend` on every call, EDGE_RUNTIME_KERNEL_BACKEND included.
    """
    name = resolve_backend(backend, device)
    if op == "segmented_hamming_topk" and backend == "auto" and name in ("cuda", "triton"):
        # same k > 32 rule as segmented_hamming_topk; the caller's k is not known here
        return functools.partial(_topk_any_k, name)
    if op == "fused_bank_scores":
        return _module("cpp").fused_bank_scores if name == "cpp" else _fused_bank_scores_composed
    fn = getattr(_module(name), op, None)
    return fn if fn is not None else getattr(torch_backend, op)


def _topk_any_k(
    name: str, query: torch.Tensor, memory: torch.Tensor, offsets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if k > 32:
        name = "triton" if k <= 64 and triton_importable() else "torch"
    return _module(name).segmented_hamming_topk(query, memory, offsets.to(query.device), k)


def pack_bits(x: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """(N, D) real or bool → (N, ceil(D/64)) int64, bit set where x > 0, padding zero."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] == 0:
        raise InputError("pack_bits needs a 2-D tensor (N, D) with D >= 1")
    if x.dtype == torch.bool and backend in ("auto", "cpp", "cuda"):
        backend = "torch"  # the fast kernels read floats; torch packs bools directly
    return _impl("pack_bits", backend, x.device)(x)


def unpack_bits(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, W) int64 → (N, dim) bool."""
    _checks.check_packed("packed", packed, allow_empty=True)
    if not 0 < dim <= packed.shape[1] * 64:
        raise InputError(f"dim={dim} does not fit {packed.shape[1]} packed words")
    return torch_backend.unpack_bits(packed, dim)


def hamming(
    query: torch.Tensor, memory: torch.Tensor, *, backend: Backend = "auto"
) -> torch.Tensor:
    """Exact Hamming distances (B, M) int32 between packed rows."""
    _checks.check_pair(query, memory)
    return _impl("hamming", backend, query.device)(query, memory)


def segmented_hamming_topk(
    query: torch.Tensor,
    memory: torch.Tensor,
    offsets: torch.Tensor,
    k: int,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per segment the k nearest rows: dist (B, S, k) int32 ascending, idx (B, S, k) int64.

    Segments with fewer than k rows pad with distance 2**31-1 and index -1; ties go to the
    lower row. The fast paths keep only k candidates per (query, segment) while scanning:
    the (B, M) distance matrix is never written.
    """
    if type(query) is torch.Tensor and query.is_cpu and type(k) is int:
        lean = _lean_cpu_topk(backend)
        if lean is not None:
            try:
                return lean(query, memory, offsets, k, cpp_backend.PARALLEL_WORK)
            except (TypeError, ValueError, RuntimeError):
                pass  # the checks below name the mistake, or the general path runs
    _checks.check_pair(query, memory)
    _checks.check_k(k)
    _checks.check_offsets(offsets, memory.shape[0])
    name = resolve_backend(backend, query.device)
    if backend == "auto" and name in ("cuda", "triton") and k > 32:
        name = "triton" if k <= 64 and triton_importable() else "torch"
    offsets = offsets.to(query.device)
    return _module(name).segmented_hamming_topk(query, memory, offsets, k)


def segmented_cosine_max(
    query: torch.Tensor, memory: torch.Tensor, offsets: torch.Tensor, *, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per segment the best cosine similarity (B, S) and its row (B, S) int64 (-inf, -1 if empty).

    Float64 under "reference" (or float64 inputs), float32 otherwise.
    """
    _checks.check_float_rows("query", query)
    if memory.dim() != 2 or memory.shape[1] != query.shape[1]:
        raise InputError(f"memory must be (M, {query.shape[1]}), got {tuple(memory.shape)}")
    _checks.check_offsets(offsets, memory.shape[0])
    fn = _impl("segmented_cosine_max", backend, query.device)
    return fn(query, memory, offsets)


def sign_project_pack(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """sign(features @ weight.T + bias), packed: (B, F) × (D, F) → (B, ceil(D/64)) int64."""
    _checks.check_features(features)
    if weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise InputError(f"weight must be (D, {features.shape[1]}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise InputError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    return _impl("sign_project_pack", backend, features.device)(features, weight, bias)


def hadamard_project_pack(
    features: torch.Tensor,
    signs: torch.Tensor,
    dim: int,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Structured sign projection (see ``hadamard``): (B, F) → packed (B, ceil(dim/64)) int64.

    Needs no stored matrix (``signs`` from ``hadamard_signs`` is 20 KB for F=1,280,
    D=10,000) and costs O(D log F) per frame; on CPU the float hypervector only ever lives
    in a per-thread scratch buffer of P floats.
    """
    _checks.check_features(features)
    check_signs(signs, features.shape[1], dim)
    if bias is not None and bias.shape != (dim,):
        raise InputError(f"bias must be ({dim},), got {tuple(bias.shape)}")
    return _impl("hadamard_project_pack", backend, features.device)(features, signs, dim, bias)


def project_and_topk(
    features: torch.Tensor,
    projection: torch.Tensor,
    memory: torch.Tensor,
    offsets: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    *,
    dim: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole HDC step: features → packed hypervector → per-segment Hamming top-k.

    ``projection`` is a dense ±1 weight (D, F) or Hadamard signs (R, 2, P) (then ``dim`` is
    required). Only the packed query (ceil(D/64) words per frame) passes between the steps.
    """
    if projection.dim() == 3:
        if dim is None:
            raise InputError("project_and_topk with Hadamard signs needs dim=")
        packed = hadamard_project_pack(features, projection, dim, bias, backend=backend)
    else:
        packed = sign_project_pack(features, projection, bias, backend=backend)
    return segmented_hamming_topk(packed, memory, offsets, k, backend=backend)


def fused_bank_scores(
    features: torch.Tensor,
    layers: torch.Tensor,
    weights: torch.Tensor,
    layer_norm: bool,
    signs: torch.Tensor,
    dim: int,
    memory: torch.Tensor,
    offsets: torch.Tensor,
    k: int,
    reduce: str,
    thresholds: torch.Tensor,
    exact: torch.Tensor | None = None,
    candidates: int = 0,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """A memory bank's per-frame scoring step in one call: (B, F) features → (B, S) float32.

    Per layer ``(start, stop)`` in ``layers`` (L, 2) int64: L2-normalise (if ``layer_norm``;
    eps 1e-12 as ``F.normalize``) and multiply by ``weights`` (L,) float32; concatenate;
    Hadamard sign projection (``signs`` (R, 2, P), ``dim``); per-segment Hamming top-k against
    ``memory`` / ``offsets``; k-NN similarity ``1 - 2 d / dim`` reduced by ``reduce`` ("kth":
    the k-th valid neighbour, "mean": mean of the valid ones; an empty segment is -inf); minus
    ``thresholds`` (S,) float32. With ``exact`` (M, width) unit-norm rows (float16 or
    float32, row for row with ``memory``), the scan keeps ``candidates`` (>= k) rows per
    segment and their exact angular similarities give the k-NN score
    (:func:`~edge_runtime.kernels.knn.rerank_similarity`). The C++ backend does it
    without leaving native code; other backends compose the public kernels (same result up
    to float rounding of the norms and dot products).
    """
    _checks.check_features(features)
    _checks.check_k(k)
    _checks.check_offsets(offsets, memory.shape[0])
    if reduce not in ("kth", "mean"):
        raise InputError(f"unknown k-NN reduce {reduce!r}: use 'kth' or 'mean'")
    if layers.dtype != torch.int64 or layers.dim() != 2 or layers.shape[1] != 2:
        raise InputError(f"layers must be (L, 2) int64 column ranges, got {tuple(layers.shape)}")
    if weights.shape != (layers.shape[0],):
        raise InputError(f"weights must be ({layers.shape[0]},), got {tuple(weights.shape)}")
    lo, hi = layers[:, 0], layers[:, 1]
    if len(layers) and (
        int(lo.min()) < 0 or int(hi.max()) > features.shape[1] or bool((hi < lo).any())
    ):
        raise InputError(f"layers must be ranges within the {features.shape[1]} feature columns")
    width = int((hi - lo).sum())
    check_signs(signs, width, dim)
    if memory.dim() != 2 or memory.shape[1] != (dim + 63) // 64:
        raise InputError(f"memory must be (M, {(dim + 63) // 64}) packed rows for dim={dim}")
    _checks.check_packed("memory", memory, allow_empty=True)
    if thresholds.shape != (offsets.numel() - 1,):
        raise InputError(f"thresholds must be ({offsets.numel() - 1},), one per segment")
    if exact is not None:
        if not exact.dtype.is_floating_point or exact.shape != (memory.shape[0], width):
            raise InputError(
                f"exact must be ({memory.shape[0]}, {width}) float rows, got "
                f"{tuple(exact.shape)} {exact.dtype}"
            )
        if candidates < k:
            raise InputError(f"candidates must be >= k ({k}) to re-rank, got {candidates}")
    name = resolve_backend(backend, features.device)
    fn = _module("cpp").fused_bank_scores if name == "cpp" else _fused_bank_scores_composed
    return fn(
        features.float().contiguous(),
        layers.contiguous(),
        weights.float().contiguous(),
        bool(layer_norm),
        signs.float().contiguous(),
        int(dim),
        memory.contiguous(),
        offsets.to(features.device).contiguous(),
        int(k),
        reduce,
        thresholds.float().to(features.device).contiguous(),
        None if exact is None else exact.to(features.device, torch.float16).contiguous(),
        int(candidates),
    )


def _fused_bank_scores_composed(
    features: torch.Tensor,
    layers: torch.Tensor,
    weights: torch.Tensor,
    layer_norm: bool,
    signs: torch.Tensor,
    dim: int,
    memory: torch.Tensor,
    offsets: torch.Tensor,
    k: int,
    reduce: str,
    thresholds: torch.Tensor,
    exact: torch.Tensor | None = None,
    candidates: int = 0,
) -> torch.Tensor:
    """:func:`fused_bank_scores` from torch ops and the public kernels (any backend/device)."""
    parts = []
    for (a, b), w in zip(layers.tolist(), weights.tolist(), strict=True):
        x = features[:, a:b]
        if layer_norm:
            x = torch.nn.functional.normalize(x, dim=1, eps=1e-12)
        parts.append(x * torch.tensor(w, dtype=torch.float32, device=x.device))
    z = torch.cat(parts, dim=1).contiguous()
    q = hadamard_project_pack(z, signs, dim)
    if exact is not None:
        _, rows = segmented_hamming_topk(q, memory, offsets, candidates)
        unit = z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)
        sim = rerank_similarity(rows, unit, exact, k, reduce)[0]
        return sim - thresholds.to(torch.float32)
    dist, _ = segmented_hamming_topk(q, memory, offsets, k)
    return knn_similarity(dist, dim, reduce) - thresholds.to(torch.float32)
