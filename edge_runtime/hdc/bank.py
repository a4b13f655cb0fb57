"""Several domains' HDC memories side by side, for the runtime's reconfigurator.

Every domain keeps bit-packed exemplar hypervectors; all domains are packed
contiguously with an ``offsets`` array, so one ``segmented_hamming_topk``
kernel call scores a batch against every domain. All domains share one
hypervector encoder (fitted on the first domain), so a frame is projected once.

Raw scores are k-NN similarities (with ``rerank``, the exact angles of the Hamming
scan's candidates, see ``kernels/knn.py``); they are made comparable across domains by
subtracting each domain's threshold, calibrated for the configured TPR on that
domain's own frames, each scored leave-one-out against the domain's memory. The
runtime routes to the argmax and calls a frame OOD when every calibrated score is below 0.

Scoring runs on the device of the incoming features (a torch batch's own device; numpy on
the CPU), or on the bank's configured ``device``, through the kernels' dispatch, which picks
the backend for that device (the C++ kernels on CPU, CUDA or Triton on a GPU). The memory
itself stays on the CPU, where checkpoints and the runtime's budget read it, and is mirrored
once per change to the scoring device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_runtime import kernels
from edge_runtime.errors import BackendUnavailableError, CheckpointError, InputError
from edge_runtime.hdc.base import check_labels, threshold_for_tpr
from edge_runtime.hdc.memory import (
    _QUERY_CHUNK,
    knn_similarity,
    knn_vote,
    segmented_topk,
    select_exemplars,
)
from edge_runtime.hdc.projection import HypervectorEncoder, check_features
from edge_runtime.kernels import _alloc, cpp_backend

# Up to this many frames a query is one unchecked kernel call: the same call, so the same
# bits, as ``segmented_topk`` makes for its single chunk.
_FAST_BATCH = _QUERY_CHUNK
# Up to this many frames scores() / calibrated_scores() take kernels.fused_bank_scores: the
# per-frame case, where Python and torch dispatch between the kernels cost more than they do.
_FUSED_BATCH = 64
_BACKEND_ENV = "EDGE_RUNTIME_KERNEL_BACKEND"
_CPU = torch.device("cpu")


def _scoring_device(device: str | torch.device | None) -> torch.device | None:
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
        rerank: int = 0,
        device: str | torch.device | None = None,
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
        if rerank < 0:
            raise InputError(f"rerank must be >= 0 (0 = off), got {rerank}")
        self.rerank = int(rerank)
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
        # With rerank: unit-norm float16 copies of each exemplar's normalised features, row for
        # row with ``packed`` (see kernels/knn.py); None until the first domain.
        self.exact: torch.Tensor | None = None
        # (thresholds as a tuple, float32 tensor): rebuilt whenever the list differs
        self._thr_cache: tuple[tuple[float, ...], torch.Tensor] | None = None
        self._zero_thr: torch.Tensor | None = None
        # (EDGE_RUNTIME_KERNEL_BACKEND when resolved, the fused scorer or None)
        self._fused_fn: tuple[str | None, Any] | None = None
        # None: score where the features are; else every batch moves to this device
        self.device = _scoring_device(device)
        self._numpy_on_cpu = self.device is None or self.device.type == "cpu"
        # device -> ((packed, offsets, exact) on the CPU, their copies on that device)
        self._mirrors: dict[torch.device, tuple[tuple, tuple]] = {}

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __len__(self) -> int:
        return len(self.domain_ids)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.exact is None else self.exact.numel() * self.exact.element_size()
        return int(self.packed.numel() * 8 + extra)

    @property
    def candidates(self) -> int:
        """Rows per segment the packed scan keeps: k, or ``rerank`` (at least k) to re-score."""
        return max(self.rerank, self.k) if self.rerank else self.k

    # ------------------------------------------------------------------ devices
    def _device_for(self, features: object) -> torch.device:
        if self.device is not None:
            return self.device
        return features.device if isinstance(features, torch.Tensor) else _CPU

    def _memory(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(packed, offsets, exact) on ``device``; off the CPU, a copy made once per change of
        the memory (every change replaces these tensors, so identity tells)."""
        held = (self.packed, self.offsets, self.exact)
        if device.type == "cpu":
            return held
        hit = self._mirrors.get(device)
        if hit is None or any(a is not b for a, b in zip(hit[0], held, strict=True)):
            hit = (held, tuple(None if t is None else t.to(device) for t in held))
            self._mirrors[device] = hit
        return hit[1]

    # ------------------------------------------------------------------ domains
    def calibration_rows(self, n: int, seed: int) -> torch.Tensor:
        """Rows of ``n`` frames used to calibrate a threshold: all of them, or a random
        ``max_calibration`` of them for a large domain (each costs one scan of the memory)."""
        if n <= self.max_calibration:
            return torch.arange(n)
        rng = np.random.default_rng(seed)
        return torch.from_numpy(np.sort(rng.choice(n, self.max_calibration, replace=False)))

    def _knn(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        offsets: torch.Tensor,
        exact: torch.Tensor | None,
        own: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k-NN similarity of checked features ``x`` to each segment of ``packed``: (B,S)
        float32, with the (B,S,k) neighbour rows (best first) and their distances in bits.

        ``own[i]`` is the row holding query i (-1: none) and is never its own neighbour.
        Scoring a calibration frame against a memory that holds it would make the threshold
        optimistic; holding frames out instead would leave a few-shot domain both a smaller
        memory and a noisier threshold (40 of 200 shots), so every frame stays in memory and
        is scored leave-one-out: its k+1 nearest rows, less itself.
        """
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
            return sim, rows, (1.0 - ang) * (self.dim / 2.0)
        if own is not None:  # the self row moves last; a query not in memory drops its (k+1)-th
            mine = own.view(-1, 1, 1)
            is_self = (rows == mine) & (mine >= 0)
            order = torch.argsort(is_self.to(torch.int8), dim=2, stable=True)
            dist = torch.gather(dist, 2, order)[:, :, : self.k]
            rows = torch.gather(rows, 2, order)[:, :, : self.k]
        return knn_similarity(dist, self.dim, self.reduce), rows, dist

    def _encode_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Memory rows for checked features: packed codes and, with rerank, the float16
        unit vectors the candidates are re-scored against."""
        z = self.encoder.normalise(x)
        exact = _unit(z).to(torch.float16) if self.rerank else None
        return self.encoder.pack_normalised(z), exact

    def _calibrate(
        self,
        x: torch.Tensor,
        keep: torch.Tensor,
        packed: torch.Tensor,
        exact: torch.Tensor | None,
        offset: int,
        seed: int,
    ) -> float:
        """Threshold from leave-one-out scores of (a sample of) ``x`` against one segment
        (``packed``, ``exact``), in which ``x[keep[j]]`` is row ``offset + j``."""
        own = torch.full((len(x),), -1, dtype=torch.int64)
        own[keep] = torch.arange(len(keep), dtype=torch.int64) + offset
        cal = self.calibration_rows(len(x), seed)
        off = torch.tensor([0, len(packed)], dtype=torch.int64)
        sim, _, _ = self._knn(x[cal], packed, off, exact, own[cal])
        return threshold_for_tpr(sim[:, 0].cpu().numpy(), self.tpr)

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
        :meth:`_knn`).
        """
        domain_id = int(domain_id)
        if domain_id in self.domain_ids:
            raise InputError(f"domain {domain_id} is already in the memory bank")
        if self.encoder.in_features is None:
            self.encoder.fit(features)
        x = check_features(features, self.encoder.in_features, device=self._device_for(features))
        y = check_labels(labels, len(x))
        if calib_features is None and len(x) < 2:
            raise InputError("add_domain needs calib_features or at least 2 training frames")
        keep = torch.from_numpy(
            select_exemplars(y.numpy(), self.max_exemplars, self.seed + domain_id)
        )
        packed, exact = self._encode_rows(x[keep])
        if calib_features is None:
            threshold = self._calibrate(x, keep, packed, exact, 0, self.seed + domain_id)
        else:
            calib = check_features(
                calib_features, self.encoder.in_features, name="calib_features", device=x.device
            )
            off = torch.tensor([0, len(packed)], dtype=torch.int64)
            sim, _, _ = self._knn(calib, packed, off, exact)
            threshold = threshold_for_tpr(sim[:, 0].cpu().numpy(), self.tpr)
        packed = packed.cpu()
        if exact is not None:
            exact = exact.cpu()
            self.exact = exact if self.exact is None else torch.cat([self.exact, exact])
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
        x = check_features(features, self.encoder.in_features, device=self._device_for(features))
        y = check_labels(labels, len(x))
        if len(x) < 2:
            raise InputError("extend_domain needs at least 2 frames")
        s = self.domain_ids.index(domain_id)
        seed = self.seed + domain_id + len(self.labels)
        keep = torch.from_numpy(select_exemplars(y.numpy(), self.max_exemplars, seed))
        packed, exact = self._encode_rows(x[keep])
        packed, exact = packed.cpu(), None if exact is None else exact.cpu()
        lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
        segment = torch.cat([self.packed[lo:hi], packed])
        seg_exact = None
        if exact is not None and self.exact is not None:
            seg_exact = torch.cat([self.exact[lo:hi], exact]).to(x.device)
            self.exact = torch.cat([self.exact[:hi], exact, self.exact[hi:]])
        new_thr = self._calibrate(x, keep, segment.to(x.device), seg_exact, hi - lo, seed)
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
        if self.exact is not None:
            self.exact = torch.cat([self.exact[:lo], self.exact[hi:]])
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
        return check_features(features, self.encoder.in_features, device=self._device_for(features))

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,S) float32 raw k-NN similarity to each domain (columns follow ``domain_ids``)."""
        return self._scores(features, calibrated=False)

    def calibrated_scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,S) float32 score minus each domain's threshold: >= 0 means in-distribution there."""
        return self._scores(features, calibrated=True)

    def _scores(self, features: np.ndarray | torch.Tensor, *, calibrated: bool) -> np.ndarray:
        fast = self._per_frame(features, calibrated=calibrated)
        if fast is not None:
            return fast
        x = self._checked(features)
        fused = self._fused(x, calibrated=calibrated)
        if fused is not None:
            return fused
        sim = self._knn(x, *self._memory(x.device))[0].cpu().numpy()
        return sim - np.asarray(self.thresholds, dtype=np.float32) if calibrated else sim

    def _fused_native(self) -> Any:
        """The native scorer when it applies to this bank on CPU, else None; looked up once per
        value of EDGE_RUNTIME_KERNEL_BACKEND (an override must be honoured)."""
        env = os.environ.get(_BACKEND_ENV)
        if self._fused_fn is None or self._fused_fn[0] != env:
            cpu = torch.device("cpu")
            ok = self.reduce in ("kth", "mean") and kernels.resolve_backend("auto", cpu) == "cpp"
            self._fused_fn = (env, cpp_backend.fused_bank_scores_into if ok else None)
        return self._fused_fn[1]

    def _fused_args(self, calibrated: bool) -> tuple | None:
        plan = self.encoder.fused_plan()
        if plan is None:
            return None
        return (
            plan.bounds,
            plan.weights,
            self.encoder.layer_norm,
            plan.signs,
            self.encoder.dim,
            self.packed,
            self.offsets,
            self.k,
            self.reduce,
            self._thresholds_tensor() if calibrated else self._zeros(),
            self.exact if self.rerank else None,
            self.candidates,
        )

    def _native(self, x: torch.Tensor, calibrated: bool) -> tuple[np.ndarray, int] | None:
        """Scores of a CPU float32 batch in one native call, and the count of its NaN/Inf rows
        (their scores are NaN); None when the settings or backend need the general path."""
        native = self._fused_native()
        args = self._fused_args(calibrated) if native is not None else None
        if args is None:
            return None
        out = _alloc.empty_numpy((len(x), len(self.domain_ids)))
        return out, native(torch.from_numpy(out), x, *args)

    def _per_frame(self, features: Any, *, calibrated: bool) -> np.ndarray | None:
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
            and self.domain_ids
        ):
            return None
        done = self._native(torch.from_numpy(features), calibrated)
        if done is None:
            return None
        out, bad = done
        if bad:
            check_features(features, self.encoder.in_features)  # names the bad rows
        return out

    def _fused(self, x: torch.Tensor, *, calibrated: bool) -> np.ndarray | None:
        """:meth:`_per_frame` for an already checked batch (e.g. a torch tensor), or None when
        the batch, settings or backend need the general path. The native norms are
        accumulated differently from torch's, so a score may differ from the general path's
        by float rounding (sign bits of near-zero projections); see tests/test_hdc_fastpath.py.
        """
        if len(x) > _FUSED_BATCH or x.device.type != "cpu":
            return None
        done = self._native(x.contiguous(), calibrated)
        return None if done is None else done[0]

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
        x = self._checked(features)
        sim, rows, dist = (t.cpu() for t in self._knn(x, *self._memory(x.device)))
        cal = sim.numpy() - np.asarray(self.thresholds, dtype=np.float32)
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
        if self.exact is not None:
            tensors["exact"] = self.exact.contiguous()
        config = {
            "k": self.k,
            "reduce": self.reduce,
            "max_exemplars": self.max_exemplars,
            "tpr": self.tpr,
            "seed": self.seed,
            "max_calibration": self.max_calibration,
            "rerank": self.rerank,
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
            rerank = int(cfg.get("rerank", 0))
            exact = t.get("exact")
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
        if rerank < 0 or (rerank and len(packed) and exact is None):
            raise CheckpointError("memory bank re-ranks but holds no exact exemplar vectors")
        if exact is not None and (
            not exact.dtype.is_floating_point
            or exact.ndim != 2
            or len(exact) != len(packed)
            or (enc.in_features is not None and exact.shape[1] != enc.normalised_width)
        ):
            raise CheckpointError(
                f"memory bank exact vectors {tuple(exact.shape)} do not match its exemplars"
            )
        self.k, self.reduce = int(cfg["k"]), str(cfg["reduce"])
        self.max_exemplars, self.tpr = int(cfg["max_exemplars"]), float(cfg["tpr"])
        self.seed = int(cfg["seed"])
        self.max_calibration = int(cfg.get("max_calibration", 2000))
        self.rerank = rerank
        self.exact = None if exact is None or not rerank else exact.to(torch.float16)
        self._fused_fn = None
        self._mirrors = {}
        self.encoder = enc
        self.packed, self.labels, self.offsets = (
            packed,
            labels.to(torch.int64),
            offsets.to(torch.int64),
        )
        self.domain_ids, self.thresholds = ids, thr
