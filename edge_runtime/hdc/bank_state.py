"""A memory bank's checkpoint state: to and from ``{"config": ..., "tensors": ...}``.

The config is JSON-able and the tensors are safetensors-ready, so the runtime's checkpoint
writes both as they are. A state is validated as a whole before a bank takes any of it, so a
corrupt checkpoint leaves the bank it was loaded into as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from edge_runtime import kernels
from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.hdc.projection import HypervectorEncoder
from edge_runtime.hdc.segments import DomainRows


@dataclass(frozen=True)
class BankState:
    """Everything a :class:`~edge_runtime.hdc.bank.DomainMemoryBank` saves and restores."""

    k: int
    reduce: str
    max_exemplars: int
    tpr: float
    seed: int
    max_calibration: int
    rerank: int
    encoder: HypervectorEncoder
    rows: DomainRows

    def to_dict(self) -> dict[str, Any]:
        """``{"config": JSON-able dict, "tensors": dict[str, Tensor]}``."""
        rows = self.rows
        tensors = {
            "packed": rows.packed.contiguous(),
            "labels": rows.labels.contiguous(),
            "offsets": rows.offsets.contiguous(),
        }
        tensors.update(self.encoder.tensors())
        if rows.exact is not None:
            tensors["exact"] = rows.exact.contiguous()
        config = {
            "k": self.k,
            "reduce": self.reduce,
            "max_exemplars": self.max_exemplars,
            "tpr": self.tpr,
            "seed": self.seed,
            "max_calibration": self.max_calibration,
            "rerank": self.rerank,
            "domain_ids": list(rows.domain_ids),
            "thresholds": list(rows.thresholds),
            "encoder": self.encoder.config(),
        }
        return {"config": config, "tensors": tensors}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> BankState:
        """The state :meth:`to_dict` wrote; CheckpointError if it is malformed or inconsistent."""
        try:
            cfg, t = state["config"], state["tensors"]
            encoder = HypervectorEncoder.from_state(cfg["encoder"], t)
            rows = DomainRows(
                packed=t["packed"],
                labels=t["labels"],
                offsets=t["offsets"],
                domain_ids=[int(i) for i in cfg["domain_ids"]],
                thresholds=[float(v) for v in cfg["thresholds"]],
                exact=t.get("exact"),
            )
            out = cls(
                rerank=int(cfg.get("rerank", 0)),
                k=int(cfg["k"]),
                reduce=str(cfg["reduce"]),
                max_exemplars=int(cfg["max_exemplars"]),
                tpr=float(cfg["tpr"]),
                seed=int(cfg["seed"]),
                max_calibration=int(cfg.get("max_calibration", 2000)),
                encoder=encoder,
                rows=rows,
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise CheckpointError(f"memory bank state is invalid: {exc}") from exc
        _check(rows, encoder, out.rerank)
        rows.labels, rows.offsets = rows.labels.to(torch.int64), rows.offsets.to(torch.int64)
        # only a re-ranking bank reads the exact vectors, and as float16
        exact = rows.exact
        rows.exact = None if exact is None or not out.rerank else exact.to(torch.float16)
        return out


def _check(rows: DomainRows, enc: HypervectorEncoder, rerank: int) -> None:
    """CheckpointError unless the rows fit each other, the encoder and ``rerank``."""
    packed, offsets, exact = rows.packed, rows.offsets, rows.exact
    if (
        packed.dtype != torch.int64
        or packed.ndim != 2
        or packed.shape[1] != kernels.words_for(enc.dim)
    ):
        raise CheckpointError(
            f"memory bank packed tensor {tuple(packed.shape)} does not match dim {enc.dim}"
        )
    if (
        len(rows.domain_ids) != len(rows.thresholds)
        or offsets.shape != (len(rows.domain_ids) + 1,)
        or int(offsets[-1]) != len(packed)
    ):
        raise CheckpointError("memory bank offsets, domains and thresholds disagree")
    if rows.labels.shape != (len(packed),):
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
