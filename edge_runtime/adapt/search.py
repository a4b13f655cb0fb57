"""Architecture search plug point: which adaptor to grow for a new domain.

:data:`SEARCH_SPACE` lists the candidate heads (linear; MLPs of width 64/128/256 with one or two
hidden layers). An :class:`ArchitectureSearch` returns a :class:`SearchResult` for the collected
(features, labels) under a :class:`SearchBudget`. :class:`FixedArchitecture` (the default) always
returns one arch. A zero-shot NAS implements the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edge_runtime.adapt.adaptor import AdaptorArch
from edge_runtime.errors import InputError


def default_search_space(in_dim: int = 1280) -> list[AdaptorArch]:
    """Linear head plus MLPs (hidden 64/128/256, depth 1-2, dropout 0.1)."""
    space = [AdaptorArch("linear", in_dim)]
    for depth in (1, 2):
        for hidden in (64, 128, 256):
            space.append(AdaptorArch("mlp", in_dim, hidden=hidden, depth=depth, dropout=0.1))
    return space


SEARCH_SPACE: list[AdaptorArch] = default_search_space()


@dataclass(frozen=True)
class SearchBudget:
    """Limits a candidate must meet (None = no limit)."""

    max_params: int | None = None
    max_flops: int | None = None

    def allows(self, arch: AdaptorArch, n_classes: int) -> bool:
        if self.max_params is not None and arch.n_params(n_classes) > self.max_params:
            return False
        return self.max_flops is None or arch.flops(n_classes) <= self.max_flops


@dataclass
class SearchResult:
    arch: AdaptorArch
    method: str
    scores: list[dict[str, Any]] = field(default_factory=list)  # per candidate, for the report

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch.to_dict(), "method": self.method, "scores": self.scores}


@runtime_checkable
class ArchitectureSearch(Protocol):
    name: str

    def search(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        label_map: list[int],
        budget: SearchBudget | None = None,
    ) -> SearchResult: ...


class FixedArchitecture:
    """Always the same architecture (its ``in_dim`` follows the features)."""

    name = "fixed"

    def __init__(self, arch: AdaptorArch | None = None) -> None:
        self.arch = arch or AdaptorArch("linear")

    def search(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        label_map: list[int],
        budget: SearchBudget | None = None,
    ) -> SearchResult:
        if np.ndim(features) != 2:
            raise InputError(f"features must be (N, F), got shape {np.shape(features)}")
        arch = self.arch.with_in_dim(np.shape(features)[1])
        if budget is not None and not budget.allows(arch, len(label_map)):
            raise InputError(f"fixed adaptor {arch} exceeds the search budget {budget}")
        return SearchResult(arch, self.name)
