"""Architecture search plug point: which adaptor to grow for a new domain.

An :class:`ArchitectureSearch` gets the labelled shots as :class:`CandidateInputs` -- rows in
each family's input space, computed lazily: pooled features for heads, a flattened encoder tap
map for conv adaptors, optionally after an input filter (``condition``) -- and returns a
:class:`SearchResult` under a :class:`SearchBudget`. :class:`FixedArchitecture` (the default)
always returns one arch; :class:`edge_runtime.adapt.nas.ZeroShotSearch` ranks a search space by
a training-free proxy.

:func:`default_search_space` and :data:`SEARCH_SPACE` are the pooled-head space of the first
release (linear; MLPs of width 64/128/256, one or two hidden layers); the full EAR-style space is
:func:`edge_runtime.adapt.space.default_space`.
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


# -- inputs -------------------------------------------------------------------------------------
@runtime_checkable
class CandidateInputs(Protocol):
    """The labelled shots in every family's input space, computed on demand."""

    n: int

    def get(self, tap: int | None, condition: str = "none") -> np.ndarray:
        """(n, in_dim) float32: pooled features (``tap=None``) or the flattened map of ``tap``,
        of the shots after the input filter ``condition``."""
        ...


class ArrayInputs:
    """Inputs a caller already has: pooled features plus optional ``{(tap, condition): rows}``.

    Maps may be given as (n, C, h, w) or already flattened; :meth:`shape` reports (C, h, w) for
    4-D ones so a search space can be built from them.
    """

    def __init__(
        self,
        pooled: np.ndarray,
        maps: dict[tuple[int | None, str], np.ndarray] | None = None,
    ) -> None:
        pooled = np.asarray(pooled, dtype=np.float32)
        if pooled.ndim != 2:
            raise InputError(f"features must be (N, F), got shape {pooled.shape}")
        self.n = len(pooled)
        self._rows: dict[tuple[int | None, str], np.ndarray] = {(None, "none"): pooled}
        self._shapes: dict[tuple[int | None, str], tuple[int, ...]] = {}
        for key, arr in (maps or {}).items():
            arr = np.asarray(arr, dtype=np.float32)
            if len(arr) != self.n:
                raise InputError(f"maps[{key}] has {len(arr)} rows, the features {self.n}")
            self._shapes[key] = tuple(arr.shape[1:])
            self._rows[key] = arr.reshape(self.n, -1)

    def shape(self, tap: int | None, condition: str = "none") -> tuple[int, ...] | None:
        return self._shapes.get((tap, condition))

    def available(self) -> list[tuple[int | None, str]]:
        return list(self._rows)

    def get(self, tap: int | None, condition: str = "none") -> np.ndarray:
        try:
            return self._rows[(tap, condition)]
        except KeyError:
            raise InputError(
                f"no inputs for tap={tap}, condition={condition!r}; "
                f"have {sorted(map(str, self._rows))}"
            ) from None


class EncodedInputs:
    """Lazy inputs: each distinct (tap, condition) costs one encoder pass over the shots.

    ``encoder.encode(images, taps=(tap,), condition=cond)`` (the encoder's tap API) returns an
    ``Encoded`` with ``features`` and ``maps``; the map is flattened and cached here so a search
    over many candidates on the same tap pays for it once. ``pooled`` are the features the
    runtime already has for these shots (no pass for pooled heads without conditioning).
    """

    def __init__(self, encoder: Any, images: np.ndarray, pooled: np.ndarray) -> None:
        self.encoder = encoder
        self.images = images
        pooled = np.asarray(pooled, dtype=np.float32)
        if pooled.ndim != 2 or len(pooled) != len(images):
            raise InputError(
                f"pooled features must be (len(images), F), got {pooled.shape} for "
                f"{len(images)} images"
            )
        self.n = len(images)
        self._rows: dict[tuple[int | None, str], np.ndarray] = {(None, "none"): pooled}
        self.passes = 0  # encoder passes made (for the search report)

    def get(self, tap: int | None, condition: str = "none") -> np.ndarray:
        key = (tap, condition)
        if key not in self._rows:
            taps = () if tap is None else (int(tap),)
            enc = self.encoder.encode(self.images, taps=taps, condition=condition)
            self.passes += 1
            if tap is None:
                rows = np.asarray(enc.features, dtype=np.float32)
            else:
                rows = np.asarray(enc.maps[int(tap)], dtype=np.float32).reshape(self.n, -1)
            self._rows[key] = rows
            # The pooled features of a conditioned pass come for free with its maps.
            if tap is not None and (None, condition) not in self._rows:
                self._rows[(None, condition)] = np.asarray(enc.features, dtype=np.float32)
        return self._rows[key]


def as_inputs(inputs: CandidateInputs | np.ndarray) -> CandidateInputs:
    """A plain (N, F) array is pooled features (the search protocol's first release)."""
    if isinstance(inputs, np.ndarray):
        return ArrayInputs(inputs)
    return inputs


# -- budget and result --------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchBudget:
    """Limits a candidate must meet (None = no limit). ``max_flops`` is kept for old callers."""

    max_params: int | None = None
    max_macs: int | None = None
    max_latency_ms: float | None = None
    max_flops: int | None = None

    def allows(self, arch: AdaptorArch, n_classes: int, latency_ms: float | None = None) -> bool:
        """Whether ``arch`` fits; ``latency_ms`` (per frame, serving cost included) is checked
        only when both it and ``max_latency_ms`` are given."""
        return not self.violations(arch, n_classes, latency_ms)

    def violations(
        self, arch: AdaptorArch, n_classes: int, latency_ms: float | None = None
    ) -> list[str]:
        out = []
        if self.max_params is not None and arch.n_params(n_classes) > self.max_params:
            out.append(f"params {arch.n_params(n_classes)} > {self.max_params}")
        if self.max_macs is not None and arch.macs(n_classes) > self.max_macs:
            out.append(f"macs {arch.macs(n_classes)} > {self.max_macs}")
        if self.max_flops is not None and arch.flops(n_classes) > self.max_flops:
            out.append(f"flops {arch.flops(n_classes)} > {self.max_flops}")
        if (
            self.max_latency_ms is not None
            and latency_ms is not None
            and latency_ms > self.max_latency_ms
        ):
            out.append(f"latency {latency_ms:.3f} ms > {self.max_latency_ms} ms")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_params": self.max_params,
            "max_macs": self.max_macs,
            "max_latency_ms": self.max_latency_ms,
            "max_flops": self.max_flops,
        }


@dataclass
class SearchResult:
    arch: AdaptorArch
    method: str
    scores: list[dict[str, Any]] = field(default_factory=list)  # per candidate, for the report
    report: dict[str, Any] = field(default_factory=dict)  # JSON-able; the adaptation event's

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch.to_dict(),
            "method": self.method,
            "scores": self.scores,
            "report": self.report,
        }


@runtime_checkable
class ArchitectureSearch(Protocol):
    name: str

    def search(
        self,
        inputs: CandidateInputs,
        labels: np.ndarray,
        label_map: list[int],
        budget: SearchBudget | None = None,
    ) -> SearchResult: ...


class FixedArchitecture:
    """Always the same architecture (a pooled head's ``in_dim`` follows the inputs)."""

    name = "fixed"

    def __init__(self, arch: AdaptorArch | None = None) -> None:
        self.arch = arch or AdaptorArch("linear")

    def search(
        self,
        inputs: CandidateInputs | np.ndarray,
        labels: np.ndarray,
        label_map: list[int],
        budget: SearchBudget | None = None,
    ) -> SearchResult:
        rows = as_inputs(inputs).get(self.arch.tap, self.arch.condition)
        if np.ndim(rows) != 2:
            raise InputError(f"features must be (N, F), got shape {np.shape(rows)}")
        arch = self.arch.with_in_dim(np.shape(rows)[1])
        if budget is not None and not budget.allows(arch, len(label_map)):
            raise InputError(f"fixed adaptor {arch} exceeds the search budget {budget}")
        return SearchResult(arch, self.name, report={"method": self.name, "arch": arch.to_dict()})
