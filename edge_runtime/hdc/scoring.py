"""How a memory bank scores frames against its domains' packed exemplar memories.

Three paths compute the same k-NN similarities, picked per call by the batch and the settings:

- the native per-frame path: a small C-contiguous float32 numpy batch goes straight to the C++
  scorer (normalise, project, scan and reduce in one call), since on a served frame each
  Python-level step costs tens of microseconds;
- the fused batch path: the same native call for a batch already checked (a torch tensor);
- the composed path: normalise and pack through the encoder, then the kernels' top-k scan (and,
  with ``rerank``, the exact re-scoring of its candidates, see ``kernels/knn.py``), on the
  device of the batch or the configured one, through the dispatch that picks that device's
  backend (the C++ kernels on CPU, CUDA or Triton on a GPU).

The native norms are accumulated differently from torch's, so a native score may differ from
the composed path's by float rounding (sign bits of near-zero projections); see
tests/test_hdc_fastpath.py. The memory stays on the CPU, where checkpoints and the runtime's
budget read it, and is mirrored once per change to the scoring device.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_runtime import kernels
from edge_runtime.errors import BackendUnavailableError, InputError
from edge_runtime.hdc.devices import DeviceCopies
from edge_runtime.hdc.memory import _QUERY_CHUNK, knn_similarity, knn_vote, segmented_topk
from edge_runtime.hdc.projection import HypervectorEncoder, check_features
from edge_runtime.hdc.segments import DomainRows, Segments
from edge_runtime.kernels import _alloc, cpp_backend

# Up to this many frames a query is one unchecked kernel call: the same call, so the same
# bits, as ``segmented_topk`` makes for its single chunk.
_FAST_BATCH = _QUERY_CHUNK
# Up to this many frames scores take kernels.fused_bank_scores: the per-frame case, where
# Python and torch dispatch between the kernels cost more than they do.
_FUSED_BATCH = 64
_BACKEND_ENV = "EDGE_RUNTIME_KERNEL_BACKEND"
_CPU = torch.device("cpu")

# (out, features, *fused args) -> the count of NaN/Inf rows, whose scores are NaN
NativeScorer = Callable[..., int]


@dataclass
class Routing:
    """Per frame: best domain (-1 = OOD everywhere), its k-NN class, calibrated score, raw score."""

    domain: np.ndarray  # int64 (N,), a domain id or -1
    label: np.ndarray  # int64 (N,), the class voted in the best domain (even when OOD)
    calibrated: np.ndarray  # float32 (N,), best calibrated score (>= 0 means in-distribution)
    best_domain: np.ndarray  # int64 (N,), argmax domain id, also for OOD frames


def scoring_device(device: str | torch.device | None) -> torch.device | None:
    """A configured scoring device, refused up front when it cannot run here (rather than at
    the first frame)."""
    if device is None:
        return None
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"memory bank device {dev} needs CUDA, which is absent")
    return dev


def _unit(z: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm: the vectors whose angles the sign codes estimate."""
    return z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)


class BankScorer:
    """k-NN similarities of frames to each segment of a memory, by the fastest path that
    applies; see the module docstring.

    ``k`` neighbours per segment, reduced by ``reduce`` (``"mean"`` or ``"kth"``); with
    ``rerank`` > 0 the scan keeps that many candidates and re-scores them by exact angle.
    ``device``: where every batch is scored (None: where its features are).
    """

    def __init__(
        self,
        encoder: HypervectorEncoder,
        k: int,
        reduce: str,
        rerank: int,
        device: str | torch.device | None = None,
    ) -> None:
        self.encoder, self.k, self.reduce, self.rerank = encoder, int(k), reduce, int(rerank)
        self.device = scoring_device(device)
        self._numpy_on_cpu = self.device is None or self.device.type == "cpu"
        # (thresholds as a tuple, float32 tensor): rebuilt whenever the list differs
        self._thr_cache: tuple[tuple[float, ...], torch.Tensor] | None = None
        self._zero_thr: torch.Tensor | None = None
        # (EDGE_RUNTIME_KERNEL_BACKEND when resolved, the native scorer or None)
        self._native_fn: tuple[str | None, NativeScorer | None] | None = None
        self._copies = DeviceCopies()

    @property
    def candidates(self) -> int:
        """Rows per segment the packed scan keeps: k, or ``rerank`` (at least k) to re-score."""
        return max(self.rerank, self.k) if self.rerank else self.k

    # ------------------------------------------------------------------ devices
    def device_for(self, features: object) -> torch.device:
        """Where ``features`` are scored."""
        if self.device is not None:
            return self.device
        return features.device if isinstance(features, torch.Tensor) else _CPU

    def on_device(self, segments: Segments, device: torch.device) -> Segments:
        """``segments`` on ``device``; off the CPU, copies made once per change of the memory."""
        if device.type == "cpu":
            return segments
        held = zip(segments._fields, segments, strict=True)
        return Segments(*(None if t is None else self._copies.on(n, t, device) for n, t in held))

    @property
    def mirrored(self) -> frozenset[torch.device]:
        """The devices that hold a copy of the memory."""
        return self._copies.devices

    # ------------------------------------------------------------------ rows and neighbours
    def encode_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Memory rows for checked features: packed codes and, with rerank, the float16
        unit vectors the candidates are re-scored against."""
        z = self.encoder.normalise(x)
        exact = _unit(z).to(torch.float16) if self.rerank else None
        return self.encoder.pack_normalised(z), exact

    def knn(
        self, x: torch.Tensor, segments: Segments, own: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k-NN similarity of checked features ``x`` to each segment: (B,S) float32, with the
        (B,S,k) neighbour rows (best first) and their distances in bits.

        ``own[i]`` is the row holding query i (-1: none), which is never its own neighbour:
        its k+1 nearest rows are scanned, less itself (leave-one-out calibration).
        """
        packed, offsets, exact = segments
        c = self.candidates + (0 if own is None else 1)
        z = self.encoder.normalise(x)
        q = self.encoder.pack_normalised(z)
        offsets = offsets.to(q.device)
        if own is not None:
            own = own.to(q.device)
        if len(q) <= _FAST_BATCH:
            topk = kernels.api.unchecked("segmented_hamming_topk", q.device)
            dist, rows = topk(q, packed, offsets, c)
        else:
            dist, rows = segmented_topk(q, packed, offsets, c)
        if self.rerank:
            assert exact is not None
            sim, rows, ang = kernels.rerank_similarity(
                rows, _unit(z), exact, self.k, self.reduce, own
            )
            return sim, rows, (1.0 - ang) * (self.encoder.dim / 2.0)
        if own is not None:  # the self row moves last; a query not in memory drops its (k+1)-th
            mine = own.view(-1, 1, 1)
            is_self = (rows == mine) & (mine >= 0)
            order = torch.argsort(is_self.to(torch.int8), dim=2, stable=True)
            dist = torch.gather(dist, 2, order)[:, :, : self.k]
            rows = torch.gather(rows, 2, order)[:, :, : self.k]
        return knn_similarity(dist, self.encoder.dim, self.reduce), rows, dist

    def _checked(self, features: np.ndarray | torch.Tensor, memory: DomainRows) -> torch.Tensor:
        """``features`` validated once, on their scoring device: past this point the encoder and
        kernels take their unchecked paths (the memory's rows are valid by construction)."""
        if not memory.domain_ids:
            raise InputError("the memory bank holds no domains: add_domain first")
        return check_features(features, self.encoder.in_features, device=self.device_for(features))

    def _composed(
        self, x: torch.Tensor, memory: DomainRows
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`knn` of checked features against every domain, on their device."""
        return self.knn(x, self.on_device(memory.segments(), x.device))

    def route(self, features: np.ndarray | torch.Tensor, memory: DomainRows) -> Routing:
        """Best domain per frame (-1 if every calibrated score is < 0) and its k-NN class."""
        x = self._checked(features, memory)
        sim, rows, dist = (t.cpu() for t in self._composed(x, memory))
        cal = sim.numpy() - np.asarray(memory.thresholds, dtype=np.float32)
        best = cal.argmax(axis=1)
        b = torch.from_numpy(best)
        ar = torch.arange(len(best))
        n_classes = int(memory.labels.max()) + 1 if len(memory.labels) else 1
        label = knn_vote(rows[ar, b], dist[ar, b], memory.labels, n_classes).numpy()
        ids = np.asarray(memory.domain_ids, dtype=np.int64)[best]
        top = cal[np.arange(len(best)), best].astype(np.float32)
        return Routing(
            domain=np.where(top >= 0, ids, -1), label=label, calibrated=top, best_domain=ids
        )

    # ------------------------------------------------------------------ scores
    def scores(
        self, features: np.ndarray | torch.Tensor, memory: DomainRows, *, calibrated: bool
    ) -> np.ndarray:
        """(N,S) float32 k-NN similarity to each domain, less its threshold if ``calibrated``."""
        fast = self._per_frame(features, memory, calibrated)
        if fast is not None:
            return fast
        x = self._checked(features, memory)
        fused = self._fused(x, memory, calibrated)
        if fused is not None:
            return fused
        sim = self._composed(x, memory)[0].cpu().numpy()
        return sim - np.asarray(memory.thresholds, dtype=np.float32) if calibrated else sim

    def _per_frame(self, features: Any, memory: DomainRows, calibrated: bool) -> np.ndarray | None:
        """The serving path: a C-contiguous float32 numpy batch of up to ``_FUSED_BATCH``
        frames goes straight to the native scorer, which also spots NaN/Inf rows, so no
        numpy pass runs before it. It runs right after the encoder has evicted the caches,
        where each Python-level step costs tens of microseconds. None: take the general path.
        """
        if not (
            type(features) is np.ndarray
            and self._numpy_on_cpu
            and features.dtype == np.float32
            and features.ndim == 2
            and 0 < features.shape[0] <= _FUSED_BATCH
            and features.shape[1] == self.encoder.in_features
            and features.flags.c_contiguous
            and memory.domain_ids
        ):
            return None
        done = self._native(torch.from_numpy(features), memory, calibrated)
        if done is None:
            return None
        out, bad = done
        if bad:
            check_features(features, self.encoder.in_features)  # names the bad rows
        return out

    def _fused(self, x: torch.Tensor, memory: DomainRows, calibrated: bool) -> np.ndarray | None:
        """:meth:`_per_frame` for an already checked batch (e.g. a torch tensor), or None when
        the batch, settings or backend need the general path."""
        if len(x) > _FUSED_BATCH or x.device.type != "cpu":
            return None
        done = self._native(x.contiguous(), memory, calibrated)
        return None if done is None else done[0]

    def _native(
        self, x: torch.Tensor, memory: DomainRows, calibrated: bool
    ) -> tuple[np.ndarray, int] | None:
        """Scores of a CPU float32 batch in one native call, and the count of its NaN/Inf rows
        (their scores are NaN); None when the settings or backend need the general path."""
        native = self._native_scorer()
        plan = self.encoder.fused_plan() if native is not None else None
        if native is None or plan is None:
            return None
        n = len(memory.domain_ids)
        out = _alloc.empty_numpy((len(x), n))
        shift = self._thresholds_tensor(memory.thresholds) if calibrated else self._zeros(n)
        bad = native(
            torch.from_numpy(out),
            x,
            plan.bounds,
            plan.weights,
            self.encoder.layer_norm,
            plan.signs,
            self.encoder.dim,
            memory.packed,
            memory.offsets,
            self.k,
            self.reduce,
            shift,
            memory.exact if self.rerank else None,
            self.candidates,
        )
        return out, bad

    def _native_scorer(self) -> NativeScorer | None:
        """The native scorer when it applies to these settings on CPU, else None; looked up once
        per value of EDGE_RUNTIME_KERNEL_BACKEND (an override must be honoured)."""
        env = os.environ.get(_BACKEND_ENV)
        if self._native_fn is None or self._native_fn[0] != env:
            ok = self.reduce in ("kth", "mean") and kernels.resolve_backend("auto", _CPU) == "cpp"
            self._native_fn = (env, cpp_backend.fused_bank_scores_into if ok else None)
        return self._native_fn[1]

    def _thresholds_tensor(self, thresholds: list[float]) -> torch.Tensor:
        """The thresholds as a float32 tensor, cached until the list changes (any way)."""
        key = tuple(thresholds)
        cache = self._thr_cache
        if cache is None or cache[0] != key:
            cache = (key, torch.tensor(key, dtype=torch.float32))
            self._thr_cache = cache
        return cache[1]

    def _zeros(self, n: int) -> torch.Tensor:
        """(n,) float32 zeros: raw scores minus nothing (x - 0 is x, -inf stays -inf)."""
        if self._zero_thr is None or len(self._zero_thr) != n:
            self._zero_thr = torch.zeros(n, dtype=torch.float32)
        return self._zero_thr
