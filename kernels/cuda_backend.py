"""CUDA C++ kernels (csrc/hdc_cuda_kernels.cu + csrc/hdc_cuda.cpp) for Jetson-class GPUs,
where Triton is not the norm. Built lazily with torch's extension loader, only on CUDA builds
of torch with a GPU present; ``available()`` says whether they can run here and why not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import torch
from edge_runtime.kernels import _alloc
from edge_runtime.kernels._jit import JitExtension
from edge_runtime.kernels.reference import PAD_DISTANCE

from edge_runtime.errors import BackendUnavailableError

log = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
MAX_K = 32  # HDC_MAX_K in the .cu file: per-warp lists live in shared memory


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run here, or None if they can (builds on first call)."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    load()
    return _EXTENSION.failure


def _no_gpu() -> str | None:
    if torch.version.cuda is None or not torch.cuda.is_available():
        return "no CUDA torch build or GPU"
    return None


_EXTENSION = JitExtension(
    "HDC CUDA kernels",
    lambda: "edge_runtime_hdc_cuda",
    [_CSRC / "hdc_cuda.cpp", _CSRC / "hdc_cuda_kernels.cu"],
    precondition=_no_gpu,
    extra_cflags=["-O3"],
    extra_cuda_cflags=["-O3"],
)


def load() -> ModuleType | None:
    return _EXTENSION.load()


def _module_or_raise() -> ModuleType:
    mod = load()
    if mod is None:
        raise BackendUnavailableError(f"HDC CUDA kernels unavailable: {_EXTENSION.failure}")
    return mod


def hamming(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    out = _alloc.empty((query.shape[0], memory.shape[0]), torch.int32, query.device)
    if memory.shape[0] == 0:  # a zero-sized grid is a launch error
        return out
    _module_or_raise().hamming(query.contiguous(), memory.contiguous(), out)
    return out


def segmented_hamming_topk(
    query: torch.Tensor, memory: torch.Tensor, offsets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if k > MAX_K:
        raise BackendUnavailableError(f"the CUDA top-k supports k <= {MAX_K}, got {k}")
    mod = _module_or_raise()
    b, n_seg = query.shape[0], offsets.numel() - 1
    sms = torch.cuda.get_device_properties(query.device).multi_processor_count
    longest = int((offsets[1:] - offsets[:-1]).max())
    # enough blocks to fill the GPU when there are few (query, segment) pairs
    splits = max(1, min(-(-4 * sms // max(1, b * n_seg)), longest // 256))
    keys = _alloc.empty((b, n_seg, splits, k), torch.int64, query.device)
    mod.topk_keys(query.contiguous(), memory.contiguous(), offsets.contiguous(), keys)
    keys = keys.reshape(b, n_seg, splits * k)
    if splits > 1:
        keys = torch.topk(keys, k, dim=2, largest=False, sorted=True).values
    dist = (keys >> 32).to(torch.int32)
    idx = torch.where(dist == PAD_DISTANCE, -1, keys & 0xFFFFFFFF)
    return dist, idx


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    out = _alloc.empty((x.shape[0], (x.shape[1] + 63) // 64), torch.int64, x.device)
    if x.shape[0] == 0:
        return out
    _module_or_raise().pack_bits(x.float().contiguous(), out)
    return out
