"""DomainSet: what the device knows, as one object: adaptors (registry), HDC memories (bank),
the router and the active domain.

Every change to what is known goes through an install method here, on the serving thread
between batches, so serving never sees a domain with a memory but no adaptor (or the reverse).
Growth works on a copy of the bank (:meth:`DomainSet.bank_copy`) that an install swaps in whole.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edge_runtime.adapt.adaptor import Adaptor
from edge_runtime.adapt.registry import Domain, DomainRegistry
from edge_runtime.adapt.router import Router
from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.hdc.bank import DomainMemoryBank

BASE_DOMAIN = 0


@dataclass
class Routed:
    """Routing of a batch: best domain, its calibrated score, and the active domain's score."""

    domain: np.ndarray  # (N,) int64, -1 when no domain claims anything
    score: np.ndarray  # (N,) float32 calibrated: >= 0 is in-distribution
    active_score: np.ndarray  # (N,) float32

    @property
    def is_ood(self) -> np.ndarray:
        return self.score < 0.0


class BatchInputs(Protocol):
    """A served batch in every adaptor's input space: pooled features, the encoder's maps at a
    tap, or either after an input filter (a second encoder pass over the frames that need it)."""

    features: np.ndarray

    def rows(self, tap: int | None, condition: str, mask: np.ndarray) -> np.ndarray: ...


class PooledOnly:
    """Features without frames: enough for adaptors on pooled features, and a clear error for
    one below the last layer."""

    def __init__(self, features: np.ndarray) -> None:
        self.features = features

    def rows(self, tap: int | None, condition: str, mask: np.ndarray) -> np.ndarray:
        if tap is not None or condition != "none":
            raise InputError(
                f"an adaptor on encoder tap {tap} (input filter {condition!r}) needs the frames, "
                "not only their pooled features"
            )
        return self.features[mask]


class DomainSet:
    def __init__(self, bank: DomainMemoryBank, registry: DomainRegistry) -> None:
        self.bank = bank
        self.registry = registry
        self.router = Router()
        self.active = BASE_DOMAIN

    # -- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.registry)

    def ids(self) -> list[int]:
        return self.registry.ids()

    def get(self, domain_id: int) -> Domain:
        return self.registry.get(domain_id)

    def route(self, features: np.ndarray) -> Routed:
        scores = np.asarray(self.bank.calibrated_scores(features), dtype=np.float32)
        ids = np.asarray(self.bank.domain_ids, dtype=np.int64)
        dec = self.router.route(scores, ids)
        col = np.flatnonzero(ids == self.active)
        active = scores[:, col[0]] if len(col) else np.full(len(scores), -np.inf, np.float32)
        return Routed(dec.domain, dec.score, active)

    def predict(self, inputs: BatchInputs | np.ndarray, domain: np.ndarray) -> np.ndarray:
        """Each frame's prediction by the adaptor of the domain it was routed to, on that
        adaptor's own input (``inputs``; plain features serve pooled-feature adaptors only)."""
        if isinstance(inputs, np.ndarray):
            inputs = PooledOnly(inputs)
        out = np.full(len(inputs.features), -1, dtype=np.int64)
        adaptors = {d.id: d.adaptor for d in self.registry}
        for d in np.unique(domain):
            if int(d) in adaptors:
                m = domain == d
                arch = adaptors[int(d)].arch
                out[m] = adaptors[int(d)].predict(inputs.rows(arch.tap, arch.condition, m))
        return out

    def taps_in_use(self) -> tuple[int, ...]:
        """Encoder taps that serving adaptors read unfiltered (computed in the main pass)."""
        taps = {
            d.adaptor.arch.tap
            for d in self.registry
            if d.adaptor.arch.tap is not None and d.adaptor.arch.condition == "none"
        }
        return tuple(sorted(t for t in taps if t is not None))

    def bank_copy(self) -> DomainMemoryBank:
        return copy.deepcopy(self.bank)

    def replay_of(self, domain_id: int, feature_dim: int) -> tuple[np.ndarray, np.ndarray]:
        replay = self.registry.get(domain_id).replay
        if replay is None:
            return np.zeros((0, feature_dim), np.float32), np.zeros(0, np.int64)
        return replay

    def bytes_per_shot(self) -> float:
        return self.bank.nbytes / max(1, len(self.bank.labels))

    # -- installs (serving thread, between batches) --------------------------------------------
    def install_new(
        self,
        domain_id: int,
        adaptor: Adaptor,
        bank: DomainMemoryBank,
        *,
        frame: int,
        kind: str,
        origin: str = "drift",
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
        replay: tuple[np.ndarray, np.ndarray] | None = None,
        activate: bool = True,
        replay_images: np.ndarray | None = None,
    ) -> list[Any]:
        """Register ``domain_id``'s adaptor and swap in ``bank`` (which holds its memory);
        ``activate=False`` keeps the active domain (a shared domain no frame here has asked for
        yet). Returns the domains evicted to make room (registry policy ``adapt.eviction``);
        their memories leave the bank with them."""
        _, evicted = self.registry.add(
            adaptor,
            domain_id=domain_id,
            name=name,
            created_at_frame=frame,
            origin=origin,
            kind=kind,
            metadata=metadata or {},
            replay=replay,
            replay_images=replay_images,
        )
        for ev in evicted:
            if ev.evicted.id in bank.domain_ids:
                bank.remove_domain(ev.evicted.id)
            if self.active == ev.evicted.id:
                self.active = BASE_DOMAIN
        self.bank = bank
        if activate:
            self.active = domain_id
        return evicted

    def install_version(
        self,
        domain_id: int,
        adaptor: Adaptor,
        bank: DomainMemoryBank,
        replay: tuple[np.ndarray, np.ndarray] | None = None,
        replay_images: np.ndarray | None = None,
    ) -> None:
        self.registry.update_adaptor(domain_id, adaptor, replay=replay, replay_images=replay_images)
        self.bank = bank
        self.active = domain_id

    def swap_head(self, domain_id: int, adaptor: Adaptor) -> bool:
        """Replace a domain's serving head by its trained one (False if the domain is gone)."""
        if domain_id not in self.registry:
            return False
        self.registry.get(domain_id).adaptor = adaptor
        return True

    def activate(self, domain_id: int) -> None:
        self.registry.get(domain_id)  # raises for an unknown id
        self.active = int(domain_id)

    def rollback(self, domain_id: int, version: int | None = None) -> Domain:
        return self.registry.rollback(domain_id, version)

    def set_threshold(self, domain_id: int, threshold: float) -> None:
        self.registry.get(domain_id)
        self.bank.set_threshold(domain_id, threshold)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        tensors, meta = self.registry.to_state()
        return {
            "registry": {"tensors": tensors, "meta": meta},
            "bank": self.bank.state_dict(),
            "active": self.active,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        reg = state["registry"]
        self.registry = DomainRegistry.from_state(reg["tensors"], reg["meta"])
        if self.registry.ids() != sorted(int(i) for i in self.bank.domain_ids):
            raise CheckpointError("checkpoint domains and HDC memories disagree")
        self.active = int(state["active"])
        if self.active not in self.registry:
            raise CheckpointError(f"checkpoint's active domain {self.active} is not registered")
