"""Domains and their registry: one adaptor per learned distribution, with a capacity limit.

:class:`DomainRegistry` holds :class:`Domain` records in creation order. ``max_adaptors`` is
enforced on :meth:`DomainRegistry.add`: with ``eviction="refuse"`` a full registry raises
:class:`RegistryFullError`; with ``eviction="oldest"`` the oldest drift-grown domain, with
``"least_used"`` the one that served the fewest frames (:meth:`DomainRegistry.count_served`; ties
go to the oldest) is removed -- never the base -- and reported as an :class:`EvictionEvent`.
The registry serialises to a flat tensor dict (safetensors-compatible keys
``domain.<id>.<param>``; earlier adaptor versions under ``history.<id>.<version>.<param>``;
replay buffers under ``replay.<id>.features|labels|images``) plus
JSON-able metadata.

A domain's adaptor can be replaced by a new version (e.g. one that also predicts new classes);
:meth:`DomainRegistry.update_adaptor` keeps the previous versions so
:meth:`DomainRegistry.rollback` can restore them. Each domain may hold a small class-balanced
replay buffer of encoder features (see :mod:`edge_runtime.adapt.replay`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edge_runtime.adapt.adaptor import Adaptor
from edge_runtime.errors import CheckpointError, EdgeRuntimeError, InputError

ORIGINS = ("base", "drift", "fleet")
EVICTION_POLICIES = ("refuse", "oldest", "least_used")


class RegistryFullError(EdgeRuntimeError):
    """The registry holds ``max_adaptors`` domains and the policy is to refuse new ones."""


@dataclass
class Domain:
    id: int
    name: str
    adaptor: Adaptor
    labels: tuple[int, ...]
    created_at_frame: int = -1
    origin: str = "base"  # "base" | "drift"
    kind: str = "base"  # "base" | "domain_shift" | "novel_class" | "shipped" ...
    metadata: dict[str, Any] = field(default_factory=dict)
    history: list[Adaptor] = field(default_factory=list)  # earlier adaptor versions, oldest first
    replay_features: np.ndarray | None = None  # (R, F) float32 class-balanced sample
    replay_labels: np.ndarray | None = None  # (R,) int64 global labels
    # The replay rows' frames (same order), for adaptors trained on the encoder's intermediate
    # maps rather than on the pooled features above; None when the domain was fitted on
    # features only.
    replay_images: np.ndarray | None = None
    served: int = 0  # frames routed to this domain (the least-used eviction policy reads it)

    @property
    def version(self) -> int:
        """1 for the first adaptor, +1 per :meth:`DomainRegistry.update_adaptor`."""
        return len(self.history) + 1

    @property
    def replay(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.replay_features is None or self.replay_labels is None:
            return None
        return self.replay_features, self.replay_labels

    def __post_init__(self) -> None:
        if self.origin not in ORIGINS:
            raise InputError(f"domain origin must be one of {ORIGINS}, got {self.origin!r}")
        self.labels = tuple(int(v) for v in self.labels)

    def describe(self) -> dict[str, Any]:
        """JSON-able record (no tensors)."""
        return {
            "id": self.id,
            "name": self.name,
            "labels": list(self.labels),
            "created_at_frame": self.created_at_frame,
            "origin": self.origin,
            "kind": self.kind,
            "metadata": self.metadata,
            "adaptor": self.adaptor.describe(),
            "version": self.version,
            "history": [a.describe() for a in self.history],
            "replay": 0 if self.replay_labels is None else len(self.replay_labels),
            "replay_images": self.replay_images is not None,
            "served": self.served,
        }


@dataclass
class EvictionEvent:
    evicted: Domain
    reason: str


class DomainRegistry:
    def __init__(self, max_adaptors: int = 8, eviction: str = "refuse") -> None:
        if max_adaptors < 1:
            raise InputError(f"max_adaptors must be >= 1, got {max_adaptors}")
        if eviction not in EVICTION_POLICIES:
            raise InputError(f"eviction must be one of {EVICTION_POLICIES}, got {eviction!r}")
        self.max_adaptors = int(max_adaptors)
        self.eviction = eviction
        self._domains: dict[int, Domain] = {}
        self._next_id = 0

    # -- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._domains)

    def __iter__(self) -> Iterator[Domain]:
        return iter(self.list())

    def __contains__(self, domain_id: object) -> bool:
        return domain_id in self._domains

    def list(self) -> list[Domain]:
        """Domains in creation order (ids ascending)."""
        return [self._domains[k] for k in sorted(self._domains)]

    def ids(self) -> list[int]:
        return sorted(self._domains)

    def get(self, domain_id: int) -> Domain:
        try:
            return self._domains[int(domain_id)]
        except KeyError:
            raise InputError(f"no domain with id {domain_id}; known ids {self.ids()}") from None

    def next_id(self) -> int:
        return self._next_id

    def all_labels(self) -> list[int]:
        """Every global label any domain predicts, sorted."""
        return sorted({lab for d in self._domains.values() for lab in d.labels})

    @property
    def full(self) -> bool:
        return len(self._domains) >= self.max_adaptors

    # -- changes -------------------------------------------------------------------------------
    def add(
        self,
        adaptor: Adaptor,
        *,
        name: str | None = None,
        created_at_frame: int = -1,
        origin: str = "drift",
        kind: str = "domain_shift",
        metadata: dict[str, Any] | None = None,
        domain_id: int | None = None,
        replay: tuple[np.ndarray, np.ndarray] | None = None,
        replay_images: np.ndarray | None = None,
    ) -> tuple[Domain, list[EvictionEvent]]:
        """Register a new domain; returns it and any domains evicted to make room."""
        did = self._next_id if domain_id is None else int(domain_id)
        if did in self._domains:
            raise InputError(f"domain id {did} is already registered")
        events: list[EvictionEvent] = []
        if self.full:
            if self.eviction == "refuse":
                raise RegistryFullError(
                    f"adapt.max_adaptors={self.max_adaptors} reached; refusing to add a new adaptor"
                )
            victims = [d for d in self.list() if d.origin != "base"]
            if not victims:
                raise RegistryFullError(
                    f"adapt.max_adaptors={self.max_adaptors} reached and only base domains are held"
                )
            if self.eviction == "least_used":
                victim = min(victims, key=lambda d: (d.served, d.id))
                why = f"evicted the least-used domain ({victim.served} frames served)"
            else:
                victim = victims[0]
                why = "evicted the oldest drift domain"
            self.remove(victim.id)
            events.append(EvictionEvent(victim, f"max_adaptors={self.max_adaptors}: {why}"))
        domain = Domain(
            id=did,
            name=name or f"domain-{did}",
            adaptor=adaptor,
            labels=tuple(adaptor.label_map),
            created_at_frame=int(created_at_frame),
            origin=origin,
            kind=kind,
            metadata=dict(metadata or {}),
        )
        if replay is not None:
            domain.replay_features, domain.replay_labels = _replay_arrays(*replay)
            domain.replay_images = _replay_images(replay_images, len(domain.replay_labels))
        self._domains[did] = domain
        self._next_id = max(self._next_id, did + 1)
        return domain, events

    def update_adaptor(
        self,
        domain_id: int,
        adaptor: Adaptor,
        *,
        replay: tuple[np.ndarray, np.ndarray] | None = None,
        replay_images: np.ndarray | None = None,
    ) -> Domain:
        """Install a new adaptor version for a domain; the previous one goes to its history."""
        domain = self.get(domain_id)
        domain.history.append(domain.adaptor)
        domain.adaptor = adaptor
        domain.labels = tuple(int(v) for v in adaptor.label_map)
        if replay is not None:
            domain.replay_features, domain.replay_labels = _replay_arrays(*replay)
            domain.replay_images = _replay_images(replay_images, len(domain.replay_labels))
        return domain

    def rollback(self, domain_id: int, version: int | None = None) -> Domain:
        """Restore an earlier adaptor version of a domain: ``version`` (1 = its first), or the
        previous one when None. InputError if there is no such earlier version. The versions
        after it are dropped."""
        domain = self.get(domain_id)
        if not domain.history:
            raise InputError(f"domain {domain.id} has no earlier adaptor version to roll back to")
        target = domain.version - 1 if version is None else int(version)
        if not 1 <= target < domain.version:
            raise InputError(
                f"domain {domain.id} is at adaptor version {domain.version}; it can roll back to "
                f"versions 1..{domain.version - 1}, not {target}"
            )
        while domain.version > target:
            domain.adaptor = domain.history.pop()
        domain.labels = tuple(int(v) for v in domain.adaptor.label_map)
        return domain

    def count_served(self, domain: np.ndarray) -> None:
        """Add a batch's routing (one domain id per frame; -1 for none) to the usage counts."""
        ids, counts = np.unique(np.asarray(domain, dtype=np.int64), return_counts=True)
        for d, c in zip(ids.tolist(), counts.tolist(), strict=True):
            if d in self._domains:
                self._domains[d].served += int(c)

    def remove(self, domain_id: int) -> Domain:
        domain = self.get(domain_id)
        del self._domains[domain.id]
        return domain

    # -- serialisation -------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata): tensors keyed ``domain.<id>.<param>``, contiguous CPU float."""
        tensors: dict[str, torch.Tensor] = {}
        for d in self.list():
            for key, t in d.adaptor.state_dict().items():
                tensors[f"domain.{d.id}.{key}"] = t.detach().cpu().contiguous().clone()
            for v, old in enumerate(d.history, start=1):
                for key, t in old.state_dict().items():
                    tensors[f"history.{d.id}.{v}.{key}"] = t.detach().cpu().contiguous().clone()
            if d.replay is not None:
                tensors[f"replay.{d.id}.features"] = torch.from_numpy(d.replay[0].copy())
                tensors[f"replay.{d.id}.labels"] = torch.from_numpy(d.replay[1].copy())
            if d.replay_images is not None:
                tensors[f"replay.{d.id}.images"] = torch.from_numpy(d.replay_images.copy())
        meta = {
            "max_adaptors": self.max_adaptors,
            "eviction": self.eviction,
            "next_id": self._next_id,
            "domains": [d.describe() for d in self.list()],
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> DomainRegistry:
        try:
            reg = cls(int(meta["max_adaptors"]), str(meta["eviction"]))
            for rec in meta["domains"]:
                prefix = f"domain.{rec['id']}."
                state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                adaptor = Adaptor.from_state(rec["adaptor"], state)
                domain = Domain(
                    id=int(rec["id"]),
                    name=rec["name"],
                    adaptor=adaptor,
                    labels=tuple(rec["labels"]),
                    created_at_frame=int(rec["created_at_frame"]),
                    origin=rec["origin"],
                    kind=rec["kind"],
                    metadata=dict(rec.get("metadata", {})),
                    served=int(rec.get("served", 0)),
                )
                for v, desc in enumerate(rec.get("history", []), start=1):
                    hp = f"history.{rec['id']}.{v}."
                    hstate = {k[len(hp) :]: t for k, t in tensors.items() if k.startswith(hp)}
                    domain.history.append(Adaptor.from_state(desc, hstate))
                rk = f"replay.{rec['id']}."
                if rk + "features" in tensors:
                    domain.replay_features, domain.replay_labels = _replay_arrays(
                        tensors[rk + "features"].numpy(), tensors[rk + "labels"].numpy()
                    )
                    if rk + "images" in tensors:
                        domain.replay_images = _replay_images(
                            tensors[rk + "images"].numpy(), len(domain.replay_labels)
                        )
                reg._domains[domain.id] = domain
            reg._next_id = int(meta["next_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"domain registry metadata is malformed: {exc!r}") from exc
        return reg


def _replay_arrays(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    y = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
    if x.ndim != 2 or y.shape != (len(x),):
        raise InputError(f"replay features {x.shape} and labels {y.shape} do not match")
    return x, y


def _replay_images(images: Any, rows: int) -> np.ndarray | None:
    if images is None:
        return None
    arr = np.ascontiguousarray(np.asarray(images))
    if arr.ndim not in (3, 4) or len(arr) != rows:
        raise InputError(f"replay images {arr.shape} do not match {rows} replay rows")
    return arr
