"""Several domains' HDC memories side by side, for the runtime's reconfigurator.

Every domain keeps bit-packed exemplar hypervectors; all domains are packed
contiguously with an ``offsets`` array, so one ``segmented_hamming_topk``
kernel call scores a batch against every domain. All domains share one
hypervector encoder (fitted on the first domain), so a frame is projected once.

Raw scores are k-NN similarities; they are made comparable across domains by
subtracting each domain's threshold, calibrated on held-out in-distribution
frames of that domain for the configured TPR. The runtime routes to the
argmax and calls a frame OOD when every calibrated score is below 0.
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
        calib_fraction: float = 0.2,
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
        self.seed, self.calib_fraction = int(seed), float(calib_fraction)
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

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __len__(self) -> int:
        return len(self.domain_ids)

    @property
    def nbytes(self) -> int:
        return int(self.packed.numel() * 8)

    # ------------------------------------------------------------------ domains
    def calibration_split(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``n`` frames held out for calibration, and the rows kept in memory: scoring
        a frame against a memory holding itself would make the threshold optimistic."""
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
        n_cal = max(1, round(self.calib_fraction * n))
        return perm[:n_cal], perm[n_cal:]

    def add_domain(
        self,
        domain_id: int,
        features: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        calib_features: np.ndarray | torch.Tensor | None = None,
    ) -> float:
        """Store a domain's exemplars and calibrate its threshold; returns the threshold.

        Without ``calib_features`` a random ``calib_fraction`` of ``features`` is
        held out for calibration (scoring a frame against a memory holding
        itself would make the threshold optimistic).
        """
        domain_id = int(domain_id)
        if domain_id in self.domain_ids:
            raise InputError(f"domain {domain_id} is already in the memory bank")
        if self.encoder.in_features is None:
            self.encoder.fit(features)
        x = check_features(features, self.encoder.in_features)
        y = check_labels(labels, len(x))
        if calib_features is None:
            if len(x) < 2:
                raise InputError("add_domain needs calib_features or at least 2 training frames")
            cal_idx, fit_idx = self.calibration_split(len(x), self.seed + domain_id)
            calib, x, y = x[cal_idx], x[fit_idx], y[fit_idx]
        else:
            calib = check_features(calib_features, self.encoder.in_features, name="calib_features")
        keep = torch.from_numpy(
            select_exemplars(y.numpy(), self.max_exemplars, self.seed + domain_id)
        )
        packed = self.encoder.encode_packed(x[keep])
        # Score calibration frames against this domain's memory alone.
        off = torch.tensor([0, len(packed)], dtype=torch.int64)
        dist, _ = segmented_topk(self.encoder.encode_packed(calib), packed, off, self.k)
        threshold = threshold_for_tpr(
            knn_similarity(dist, self.dim, self.reduce)[:, 0].numpy(), self.tpr
        )
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

        A random ``calib_fraction`` of the new frames is held out and scored against the
        extended memory; the threshold becomes the lower of the old one and the new frames'
        TPR quantile, so the old frames and the new ones both keep at least ``tpr`` coverage.
        Later domains' segments shift by the number of exemplars added.
        """
        domain_id = int(domain_id)
        if domain_id not in self.domain_ids:
            raise InputError(f"domain {domain_id} is not in the memory bank")
        x = check_features(features, self.encoder.in_features)
        y = check_labels(labels, len(x))
        if len(x) < 2:
            raise InputError("extend_domain needs at least 2 frames")
        s = self.domain_ids.index(domain_id)
        cal_idx, fit_idx = self.calibration_split(len(x), self.seed + domain_id + len(self.labels))
        calib, x, y = x[cal_idx], x[fit_idx], y[fit_idx]
        keep = torch.from_numpy(
            select_exemplars(y.numpy(), self.max_exemplars, self.seed + domain_id)
        )
        packed = self.encoder.encode_packed(x[keep])
        lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
        segment = torch.cat([self.packed[lo:hi], packed])
        off = torch.tensor([0, len(segment)], dtype=torch.int64)
        dist, _ = segmented_topk(self.encoder.encode_packed(calib), segment, off, self.k)
        new_thr = threshold_for_tpr(
            knn_similarity(dist, self.dim, self.reduce)[:, 0].numpy(), self.tpr
        )
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
    def _query(self, features: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.domain_ids:
            raise InputError("the memory bank holds no domains: add_domain first")
        # Validated once here; past this point the encoder and kernels take the unchecked
        # paths (packed/offsets are built by this class and checked on load_state_dict).
        x = check_features(features, self.encoder.in_features)
        q = self.encoder.encode_packed_checked(x)
        if len(q) <= _FAST_BATCH and q.device.type == "cpu":
            topk = kernels.api.unchecked("segmented_hamming_topk", q.device)
            return topk(q, self.packed, self.offsets, self.k)
        return segmented_topk(q, self.packed, self.offsets, self.k)

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,S) float32 raw k-NN similarity to each domain (columns follow ``domain_ids``)."""
        dist, _ = self._query(features)
        return knn_similarity_np(dist, self.dim, self.reduce)

    def calibrated_scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,S) float32 score minus each domain's threshold: >= 0 means in-distribution there."""
        return self.scores(features) - np.asarray(self.thresholds, dtype=np.float32)

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
            "calib_fraction": self.calib_fraction,
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
        self.seed, self.calib_fraction = int(cfg["seed"]), float(cfg["calib_fraction"])
        self.encoder = enc
        self.packed, self.labels, self.offsets = (
            packed,
            labels.to(torch.int64),
            offsets.to(torch.int64),
        )
        self.domain_ids, self.thresholds = ids, thr
