"""Several domains' HDC memories side by side, for the runtime's reconfigurator.

Every domain keeps bit-packed exemplar hypervectors; all domains are packed
contiguously with an ``offsets`` array, so one ``segmented_hamming_topk``
kernel call scores a batch against every domain. All domains share one
hypervector encoder (fitted on the first domain), so a frame is projected once.

Raw scores are k-NN similarities; they are made comparable across domains by
subtracting each domain's threshold, calibrated for the configured TPR on that
domain's own frames, each scored leave-one-out against the domain's memory. The
runtime routes to the argmax and calls a frame OOD when every calibrated score is below 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_runtime import kernels
from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.hdc.base import check_labels, threshold_for_tpr
from edge_runtime.hdc.memory import (
    _QUERY_CHUNK,
    knn_similarity,
    knn_similarity_np,
    knn_vote,
    segmented_topk,
    select_exemplars,
)
from edge_runtime.hdc.projection import HypervectorEncoder, check_features

# Up to this many frames a query is one unchecked kernel call: the same call, so the same
# bits, as ``segmented_topk`` makes for its single chunk.
_FAST_BATCH = _QUERY_CHUNK
# Up to this many frames scores() / calibrated_scores() take kernels.fused_bank_scores: the
# per-frame case, where Python and torch dispatch between the kernels cost more than they do.
_FUSED_BATCH = 64


@dataclass
class Routing:
    """Per frame: best domain (-1 = OOD everywhere), its k-NN class, calibrated score, raw score."""

    domain: np.ndarray  # int64 (N,), a domain id or -1
    label: np.ndarray  # int64 (N,), the class voted in the best domain (even when OOD)
    calibrated: np.ndarray  # float32 (N,), best calibrated score (>= 0 means in-distribution)
    best_domain: np.ndarray  # int64 (N,), argmax domain id, also for OOD frames


class DomainMemoryBank:
    """Per-domain packed exemplar memories scored together; see the module docstring."""

    def __init__(
        self,
        dim: int = 10_000,
        k: int = 10,
        *,
        reduce: str = "mean",
        max_exemplars: int = 6000,
        tpr: float = 0.95,
        layer_dims: tuple[int, ...] | None = None,
        layer_weights: tuple[float, ...] | None = None,
        early_weight: float = 0.5,
        center: bool = False,
        projection: str = "gaussian",
        seed: int = 0,
        max_calibration: int = 2000,
    ):
        if k <= 0 or max_exemplars <= 0:
            raise InputError("k and max_exemplars must be > 0")
        if not 0.0 < tpr < 1.0:
            raise InputError(f"tpr must lie in (0, 1), got {tpr}")
        self.k, self.reduce, self.max_exemplars, self.tpr = (
            int(k),
            reduce,
            int(max_exemplars),
            float(tpr),
        )
        if max_calibration <= 0:
            raise InputError(f"max_calibration must be > 0, got {max_calibration}")
        self.seed, self.max_calibration = int(seed), int(max_calibration)
        self.encoder = HypervectorEncoder(
            dim=dim,
            layer_dims=layer_dims,
            layer_weights=layer_weights,
            early_weight=early_weight,
            center=center,
            seed=seed,
            projection=projection,
        )
        self.domain_ids: list[int] = []
        self.thresholds: list[float] = []
        self.packed = torch.zeros(0, kernels.words_for(dim), dtype=torch.int64)
        self.labels = torch.zeros(0, dtype=torch.int64)
        self.offsets = torch.zeros(1, dtype=torch.int64)
        # (thresholds as a tuple, float32 tensor): rebuilt whenever the list differs
        self._thr_cache: tuple[tuple[float, ...], torch.Tensor] | None = None
        self._zero_thr: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __len__(self) -> int:
        return len(self.domain_ids)

    @property
    def nbytes(self) -> int:
        return int(self.packed.numel() * 8)

    # ------------------------------------------------------------------ domains
    def calibration_rows(self, n: int, seed: int) -> torch.Tensor:
        """Rows of ``n`` frames used to calibrate a threshold: all of them, or a random
        ``max_calibration`` of them for a large domain (each costs one scan of the memory)."""
        if n <= self.max_calibration:
            return torch.arange(n)
        rng = np.random.default_rng(seed)
        return torch.from_numpy(np.sort(rng.choice(n, self.max_calibration, replace=False)))

    def _loo_similarity(
        self, queries: torch.Tensor, memory: torch.Tensor, own_rows: torch.Tensor
    ) -> np.ndarray:
        """k-NN similarity of each query to ``memory`` without the query's own row.

        ``own_rows[i]`` is the memory row holding query i, or -1. Scoring a frame
        against a memory that holds it would make the threshold optimistic; holding
        frames out instead would leave a few-shot domain both a smaller memory and a
        noisier threshold (40 of 200 shots), so every frame stays in memory and is
        scored leave-one-out: its k+1 nearest rows, less itself.
        """
        off = torch.tensor([0, len(memory)], dtype=torch.int64)
        dist, rows = segmented_topk(queries, memory, off, self.k + 1)
        dist, rows = dist[:, 0], rows[:, 0]
        is_self = (rows == own_rows.unsqueeze(1)) & (own_rows.unsqueeze(1) >= 0)
        # The self row moves to the end; a query not in memory drops its (k+1)-th instead.
        order = torch.argsort(is_self.to(torch.int8), dim=1, stable=True)
        dist = torch.gather(dist, 1, order)[:, : self.k]
        return knn_similarity(dist.unsqueeze(1), self.dim, self.reduce)[:, 0].numpy()

    def _calibrate(
        self, x: torch.Tensor, keep: torch.Tensor, memory: torch.Tensor, offset: int, seed: int
    ) -> float:
        """Threshold from leave-one-out scores of (a sample of) ``x`` against ``memory``, in
        which ``x[keep[j]]`` is row ``offset + j``."""
        own = torch.full((len(x),), -1, dtype=torch.int64)
        own[keep] = torch.arange(len(keep), dtype=torch.int64) + offset
        cal = self.calibration_rows(len(x), seed)
        scores = self._loo_similarity(self.encoder.encode_packed(x[cal]), memory, own[cal])
        return threshold_for_tpr(scores, self.tpr)

    def add_domain(
        self,
        domain_id: int,
        features: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        calib_features: np.ndarray | torch.Tensor | None = None,
    ) -> float:
        """Store a domain's exemplars and calibrate its threshold; returns the threshold.

        Without ``calib_features`` the threshold comes from ``features`` themselves,
        each scored leave-one-out against the domain's memory (see
        :meth:`_loo_similarity`).
        """
        domain_id = int(domain_id)
        if domain_id in self.domain_ids:
            raise InputError(f"domain {domain_id} is already in the memory bank")
        if self.encoder.in_features is None:
            self.encoder.fit(features)
        x = check_features(features, self.encoder.in_features)
        y = check_labels(labels, len(x))
        if calib_features is None and len(x) < 2:
            raise InputError("add_domain needs calib_features or at least 2 training frames")
        keep = torch.from_numpy(
            select_exemplars(y.numpy(), self.max_exemplars, self.seed + domain_id)
        )
        packed = self.encoder.encode_packed(x[keep])
        if calib_features is None:
            threshold = self._calibrate(x, keep, packed, 0, self.seed + domain_id)
        else:
            calib = check_features(calib_features, self.encoder.in_features, name="calib_features")
            no_self = torch.full((len(calib),), -1, dtype=torch.int64)
            scores = self._loo_similarity(self.encoder.encode_packed(calib), packed, no_self)
            threshold = threshold_for_tpr(scores, self.tpr)
        self.packed = torch.cat([self.packed, packed])
        self.labels = torch.cat([self.labels, y[keep]])
        self.offsets = torch.cat([self.offsets, self.offsets[-1:] + len(packed)])
        self.domain_ids.append(domain_id)
        self.thresholds.append(threshold)
        return threshold

    def extend_domain(
        self,
        domain_id: int,
        features: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
    ) -> float:
        """Append exemplars (e.g. new classes) inside an existing domain; returns its threshold.

        The new frames are scored leave-one-out against the extended memory; the
        threshold becomes the lower of the old one and the new frames' TPR quantile, so
        the old frames and the new ones both keep at least ``tpr`` coverage. Later
        domains' segments shift by the number of exemplars added.
        """
        domain_id = int(domain_id)
        if domain_id not in self.domain_ids:
            raise InputError(f"domain {domain_id} is not in the memory bank")
        x = check_features(features, self.encoder.in_features)
        y = check_labels(labels, len(x))
        if len(x) < 2:
            raise InputError("extend_domain needs at least 2 frames")
        s = self.domain_ids.index(domain_id)
        seed = self.seed + domain_id + len(self.labels)
        keep = torch.from_numpy(select_exemplars(y.numpy(), self.max_exemplars, seed))
        packed = self.encoder.encode_packed(x[keep])
        lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
        segment = torch.cat([self.packed[lo:hi], packed])
        new_thr = self._calibrate(x, keep, segment, hi - lo, seed)
        threshold = min(self.thresholds[s], new_thr)
        self.packed = torch.cat([self.packed[:hi], packed, self.packed[hi:]])
        self.labels = torch.cat([self.labels[:hi], y[keep], self.labels[hi:]])
        self.offsets = self.offsets.clone()
        self.offsets[s + 1 :] += len(packed)
        self.thresholds[s] = threshold
        return threshold

    def remove_domain(self, domain_id: int) -> None:
        """Drop a domain's exemplars and threshold (e.g. an operator rolls back an adaptor)."""
        if int(domain_id) not in self.domain_ids:
            raise InputError(f"domain {domain_id} is not in the memory bank")
        s = self.domain_ids.index(int(domain_id))
        lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
        self.packed = torch.cat([self.packed[:lo], self.packed[hi:]])
        self.labels = torch.cat([self.labels[:lo], self.labels[hi:]])
        sizes = torch.diff(self.offsets)
        sizes = torch.cat([sizes[:s], sizes[s + 1 :]])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
        del self.domain_ids[s]
        del self.thresholds[s]

    def set_threshold(self, domain_id: int, threshold: float) -> None:
        """Override a domain's threshold (a fleet 'set threshold' command)."""
        if int(domain_id) not in self.domain_ids:
            raise InputError(f"domain {domain_id} is not in the memory bank")
        self.thresholds[self.domain_ids.index(int(domain_id))] = float(threshold)

    # ------------------------------------------------------------------ scoring
    def _checked(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        if not self.domain_ids:
            raise InputError("the memory bank holds no domains: add_domain first")
        # Validated once here; past this point the encoder and kernels take the unchecked
        # paths (packed/offsets are built by this class and checked on load_state_dict).
        return check_features(features, self.encoder.in_features)

    def _query(self, features: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._topk(self._checked(features))

    def _topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.encoder.encode_packed_checked(x)
        if len(q) <= _FAST_BATCH and q.device.type == "cpu":
            topk = kernels.api.unchecked("segmented_hamming_topk", q.device)
            return topk(q, self.packed, self.offsets, self.k)
        return segmented_topk(q, self.packed, self.offsets, self.k)

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,S) float32 raw k-NN similarity to each domain (columns follow ``domain_ids``)."""
        x = self._checked(features)
        fused = self._fused(x, calibrated=False)
        if fused is not None:
            return fused
        dist, _ = self._topk(x)
        return knn_similarity_np(dist, self.dim, self.reduce)

    def calibrated_scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,S) float32 score minus each domain's threshold: >= 0 means in-distribution there."""
        x = self._checked(features)
        fused = self._fused(x, calibrated=True)
        if fused is not None:
            return fused
        dist, _ = self._topk(x)
        sim = knn_similarity_np(dist, self.dim, self.reduce)
        return sim - np.asarray(self.thresholds, dtype=np.float32)

    def _fused(self, x: torch.Tensor, *, calibrated: bool) -> np.ndarray | None:
        """Small-batch scores in one native call (kernels.fused_bank_scores), or None when the
        settings, batch, backend or reduce need the general path. The norms are accumulated
        differently from torch's, so a score may differ from the general path's by float
        rounding (sign bits of near-zero projections); see tests/test_hdc_fastpath.py."""
        if len(x) > _FUSED_BATCH or self.reduce not in ("kth", "mean"):
            return None
        plan = self.encoder.fused_plan()
        if plan is None or not (self.packed.is_contiguous() and self.offsets.is_contiguous()):
            return None
        if kernels.resolve_backend("auto", x.device) != "cpp":
            return None  # e.g. EDGE_RUNTIME_KERNEL_BACKEND=torch: honour the override
        fn = kernels.api.unchecked("fused_bank_scores", x.device)
        out = fn(
            x.contiguous(),
            plan.bounds,
            plan.weights,
            self.encoder.layer_norm,
            plan.signs,
            self.dim,
            self.packed,
            self.offsets,
            self.k,
            self.reduce,
            self._thresholds_tensor() if calibrated else self._zeros(),
        )
        return out.numpy()

    def _thresholds_tensor(self) -> torch.Tensor:
        """The thresholds as a float32 tensor, cached until the list changes (any way)."""
        key = tuple(self.thresholds)
        cache = self._thr_cache
        if cache is None or cache[0] != key:
            cache = (key, torch.tensor(key, dtype=torch.float32))
            self._thr_cache = cache
        return cache[1]

    def _zeros(self) -> torch.Tensor:
        """(S,) float32 zeros: raw scores minus nothing (x - 0 is x, -inf stays -inf)."""
        n = len(self.domain_ids)
        if self._zero_thr is None or len(self._zero_thr) != n:
            self._zero_thr = torch.zeros(n, dtype=torch.float32)
        return self._zero_thr

    def route(self, features: np.ndarray | torch.Tensor) -> Routing:
        """Best domain per frame (-1 if every calibrated score is < 0) and its k-NN class."""
        dist, rows = self._query(features)
        cal = knn_similarity_np(dist, self.dim, self.reduce) - np.asarray(
            self.thresholds, dtype=np.float32
        )
        best = cal.argmax(axis=1)
        b = torch.from_numpy(best)
        ar = torch.arange(len(best))
        n_classes = int(self.labels.max()) + 1 if len(self.labels) else 1
        label = knn_vote(rows[ar, b], dist[ar, b], self.labels, n_classes).numpy()
        ids = np.asarray(self.domain_ids, dtype=np.int64)[best]
        top = cal[np.arange(len(best)), best].astype(np.float32)
        return Routing(
            domain=np.where(top >= 0, ids, -1), label=label, calibrated=top, best_domain=ids
        )

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """``{"config": JSON-able dict, "tensors": dict[str, Tensor]}`` (safetensors-ready)."""
        tensors = {
            "packed": self.packed.contiguous(),
            "labels": self.labels.contiguous(),
            "offsets": self.offsets.contiguous(),
        }
        tensors.update(self.encoder.tensors())
        config = {
            "k": self.k,
            "reduce": self.reduce,
            "max_exemplars": self.max_exemplars,
            "tpr": self.tpr,
            "seed": self.seed,
            "max_calibration": self.max_calibration,
            "domain_ids": list(self.domain_ids),
            "thresholds": list(self.thresholds),
            "encoder": self.encoder.config(),
        }
        return {"config": config, "tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; CheckpointError if inconsistent."""
        try:
            cfg, t = state["config"], state["tensors"]
            enc = HypervectorEncoder.from_state(cfg["encoder"], t)
            packed, labels, offsets = t["packed"], t["labels"], t["offsets"]
            ids = [int(i) for i in cfg["domain_ids"]]
            thr = [float(v) for v in cfg["thresholds"]]
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise CheckpointError(f"memory bank state is invalid: {exc}") from exc
        if (
            packed.dtype != torch.int64
            or packed.ndim != 2
            or packed.shape[1] != kernels.words_for(enc.dim)
        ):
            raise CheckpointError(
                f"memory bank packed tensor {tuple(packed.shape)} does not match dim {enc.dim}"
            )
        if (
            len(ids) != len(thr)
            or offsets.shape != (len(ids) + 1,)
            or int(offsets[-1]) != len(packed)
        ):
            raise CheckpointError("memory bank offsets, domains and thresholds disagree")
        if labels.shape != (len(packed),):
            raise CheckpointError("memory bank labels do not match its exemplars")
        self.k, self.reduce = int(cfg["k"]), str(cfg["reduce"])
        self.max_exemplars, self.tpr = int(cfg["max_exemplars"]), float(cfg["tpr"])
        self.seed = int(cfg["seed"])
        self.max_calibration = int(cfg.get("max_calibration", 2000))
        self.encoder = enc
        self.packed, self.labels, self.offsets = (
            packed,
            labels.to(torch.int64),
            offsets.to(torch.int64),
        )
        self.domain_ids, self.thresholds = ids, thr
