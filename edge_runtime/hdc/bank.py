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

The parts: :class:`~edge_runtime.hdc.segments.DomainRows` holds the rows (on the CPU),
:class:`~edge_runtime.hdc.scoring.BankScorer` scores them (on the features' device, or the
bank's configured ``device``), :mod:`edge_runtime.hdc.calibration` sets thresholds and
:class:`~edge_runtime.hdc.bank_state.BankState` is the checkpoint state. This class decides
what goes into the memory: which exemplars a domain keeps, at which threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edge_runtime import kernels
from edge_runtime.errors import InputError
from edge_runtime.hdc.bank_state import BankState
from edge_runtime.hdc.base import check_labels
from edge_runtime.hdc.calibration import Calibration, calibration_rows
from edge_runtime.hdc.memory import select_exemplars
from edge_runtime.hdc.projection import HypervectorEncoder, check_features
from edge_runtime.hdc.scoring import BankScorer, Routing
from edge_runtime.hdc.segments import DomainRows, Segments


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
        self.max_exemplars, self.tpr = int(max_exemplars), float(tpr)
        if max_calibration <= 0:
            raise InputError(f"max_calibration must be > 0, got {max_calibration}")
        self.seed, self.max_calibration = int(seed), int(max_calibration)
        if rerank < 0:
            raise InputError(f"rerank must be >= 0 (0 = off), got {rerank}")
        encoder = HypervectorEncoder(
            dim=dim,
            layer_dims=layer_dims,
            layer_weights=layer_weights,
            early_weight=early_weight,
            center=center,
            seed=seed,
            projection=projection,
        )
        self._scorer = BankScorer(encoder, k, reduce, rerank, device)
        self._rows = DomainRows.empty(kernels.words_for(dim))

    # The scoring settings live in the scorer and the memory in the rows; a checkpoint
    # replaces each whole.
    @property
    def encoder(self) -> HypervectorEncoder:
        return self._scorer.encoder

    @property
    def k(self) -> int:
        return self._scorer.k

    @property
    def reduce(self) -> str:
        return self._scorer.reduce

    @property
    def rerank(self) -> int:
        return self._scorer.rerank

    @property
    def candidates(self) -> int:
        """Rows per segment the packed scan keeps: k, or ``rerank`` (at least k) to re-score."""
        return self._scorer.candidates

    @property
    def device(self) -> torch.device | None:
        """Where every batch is scored (None: where its features are)."""
        return self._scorer.device

    @property
    def domain_ids(self) -> list[int]:
        return self._rows.domain_ids

    @property
    def thresholds(self) -> list[float]:
        """One per domain, in ``domain_ids`` order; an edit of this list takes effect."""
        return self._rows.thresholds

    @property
    def packed(self) -> torch.Tensor:
        return self._rows.packed

    @property
    def labels(self) -> torch.Tensor:
        return self._rows.labels

    @property
    def offsets(self) -> torch.Tensor:
        return self._rows.offsets

    @property
    def exact(self) -> torch.Tensor | None:
        """With rerank: unit-norm float16 copies of each exemplar's normalised features, row
        for row with ``packed`` (see kernels/knn.py); None until the first domain."""
        return self._rows.exact

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __len__(self) -> int:
        return len(self.domain_ids)

    @property
    def nbytes(self) -> int:
        return self._rows.nbytes

    # tests/test_hdc_fastpath.py reads the scoring device's mirror through these two
    def _memory(self, device: torch.device) -> Segments:
        return self._scorer.on_device(self._rows.segments(), device)

    @property
    def _mirrors(self) -> frozenset[torch.device]:
        return self._scorer.mirrored

    # ------------------------------------------------------------------ domains
    def calibration_rows(self, n: int, seed: int) -> torch.Tensor:
        """Rows of ``n`` frames used to calibrate a threshold: all of them, or a random
        ``max_calibration`` of them for a large domain (each costs one scan of the memory)."""
        return calibration_rows(n, seed, self.max_calibration)

    def _checked(
        self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = self._scorer.device_for(features)
        x = check_features(features, self.encoder.in_features, device=device)
        return x, check_labels(labels, len(x))

    def _calibration(self) -> Calibration:
        return Calibration(self._scorer, self.tpr, self.max_calibration)

    def _exemplars(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        """The rows of a domain's frames it keeps as exemplars."""
        return torch.from_numpy(select_exemplars(y.numpy(), self.max_exemplars, seed))

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
        :mod:`edge_runtime.hdc.calibration`).
        """
        domain_id = int(domain_id)
        if domain_id in self.domain_ids:
            raise InputError(f"domain {domain_id} is already in the memory bank")
        if self.encoder.in_features is None:
            self.encoder.fit(features)
        x, y = self._checked(features, labels)
        if calib_features is None and len(x) < 2:
            raise InputError("add_domain needs calib_features or at least 2 training frames")
        seed = self.seed + domain_id
        keep = self._exemplars(y, seed)
        packed, exact = self._scorer.encode_rows(x[keep])
        segment = Segments.one(packed, exact)
        if calib_features is None:
            threshold = self._calibration().leave_one_out(x, keep, segment, 0, seed)
        else:
            calib = check_features(
                calib_features, self.encoder.in_features, name="calib_features", device=x.device
            )
            threshold = self._calibration().threshold(calib, segment)
        exact = None if exact is None else exact.cpu()
        self._rows.append(domain_id, threshold, packed.cpu(), y[keep], exact)
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
        s = self._rows.index(domain_id)
        x, y = self._checked(features, labels)
        if len(x) < 2:
            raise InputError("extend_domain needs at least 2 frames")
        seed = self.seed + domain_id + len(self.labels)
        keep = self._exemplars(y, seed)
        packed, exact = self._scorer.encode_rows(x[keep])
        packed, exact = packed.cpu(), None if exact is None else exact.cpu()
        extended = self._rows.joined(s, packed, exact).to(x.device)
        old = len(extended.packed) - len(packed)  # the new rows follow the domain's old ones
        new = self._calibration().leave_one_out(x, keep, extended, old, seed)
        threshold = min(self.thresholds[s], new)
        self._rows.extend(s, threshold, packed, y[keep], exact)
        return threshold

    def add_packed_domain(
        self,
        domain_id: int,
        packed: torch.Tensor,
        labels: torch.Tensor,
        exact: torch.Tensor | None,
        threshold: float,
    ) -> None:
        """Append a domain whose rows another bank encoded (a fleet bundle), as they are.

        No re-encoding and no re-calibration: the rows and the threshold only mean the same here
        when both banks share the hypervector settings (the bundle's HDC fingerprint says so);
        this checks what it can see, the row widths. InputError if they do not fit.
        """
        domain_id = int(domain_id)
        if domain_id in self.domain_ids:
            raise InputError(f"domain {domain_id} is already in the memory bank")
        if self.encoder.in_features is None:
            raise InputError("the memory bank has no fitted encoder yet: fit the base domain first")
        words = kernels.words_for(self.dim)
        if packed.dtype != torch.int64 or packed.ndim != 2 or packed.shape[1] != words:
            raise InputError(
                f"packed rows {tuple(packed.shape)} {packed.dtype} do not fit this bank's "
                f"(M, {words}) int64 codes of dim {self.dim}"
            )
        if len(packed) == 0:
            raise InputError("a domain needs at least one exemplar")
        labels = labels.to(torch.int64)
        if labels.shape != (len(packed),):
            raise InputError(f"labels {tuple(labels.shape)} do not match {len(packed)} rows")
        if self.rerank:
            width = self.encoder.normalised_width
            if exact is None or exact.ndim != 2 or tuple(exact.shape) != (len(packed), width):
                got = None if exact is None else tuple(exact.shape)
                raise InputError(
                    f"this bank re-ranks: it needs ({len(packed)}, {width}) exact rows, got {got}"
                )
            exact = exact.to(torch.float16).contiguous().cpu()
        else:
            exact = None  # a bank that does not re-rank never reads them
        if not np.isfinite(float(threshold)):
            raise InputError(f"threshold must be finite, got {threshold}")
        rows = packed.contiguous().cpu().clone()
        self._rows.append(domain_id, float(threshold), rows, labels.cpu().clone(), exact)

    def domain_rows(
        self, domain_id: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
        """(packed, labels, exact or None, threshold) of one domain: copies, for export."""
        s = self._rows.index(domain_id)
        lo, hi = self._rows.bounds(s)
        exact = None if self.exact is None else self.exact[lo:hi].clone()
        return (
            self.packed[lo:hi].clone(),
            self.labels[lo:hi].clone(),
            exact,
            float(self.thresholds[s]),
        )

    def remove_domain(self, domain_id: int) -> None:
        """Drop a domain's exemplars and threshold (e.g. an operator rolls back an adaptor)."""
        self._rows.remove(self._rows.index(domain_id))

    def set_threshold(self, domain_id: int, threshold: float) -> None:
        """Override a domain's threshold (a fleet 'set threshold' command)."""
        self.thresholds[self._rows.index(domain_id)] = float(threshold)

    # ------------------------------------------------------------------ scoring
    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,S) float32 raw k-NN similarity to each domain (columns follow ``domain_ids``)."""
        return self._scorer.scores(features, self._rows, calibrated=False)

    def calibrated_scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,S) float32 score minus each domain's threshold: >= 0 means in-distribution there."""
        return self._scorer.scores(features, self._rows, calibrated=True)

    def route(self, features: np.ndarray | torch.Tensor) -> Routing:
        """Best domain per frame (-1 if every calibrated score is < 0) and its k-NN class."""
        return self._scorer.route(features, self._rows)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """``{"config": JSON-able dict, "tensors": dict[str, Tensor]}`` (safetensors-ready)."""
        return BankState(
            k=self.k,
            reduce=self.reduce,
            max_exemplars=self.max_exemplars,
            tpr=self.tpr,
            seed=self.seed,
            max_calibration=self.max_calibration,
            rerank=self.rerank,
            encoder=self.encoder,
            rows=self._rows,
        ).to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; CheckpointError if inconsistent (the bank is then
        left as it was)."""
        s = BankState.from_dict(state)
        self.max_exemplars, self.tpr = s.max_exemplars, s.tpr
        self.seed, self.max_calibration = s.seed, s.max_calibration
        self._scorer = BankScorer(s.encoder, s.k, s.reduce, s.rerank, self.device)
        self._rows = s.rows
