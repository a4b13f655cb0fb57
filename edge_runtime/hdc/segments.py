"""The memory bank's rows: every domain's exemplars, one contiguous segment per domain.

Segments packed back to back behind one ``offsets`` array let a single kernel call scan a batch
against every domain. The rows stay on the CPU, where checkpoints and the runtime's budget read
them; the scorer mirrors them to its device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from edge_runtime.errors import InputError


class Segments(NamedTuple):
    """Exemplar rows cut into per-domain segments: what one k-NN query scans."""

    packed: torch.Tensor  # (M, W) int64 packed sign codes
    offsets: torch.Tensor  # (S+1,) int64: segment s is rows offsets[s]:offsets[s+1]
    exact: torch.Tensor | None  # (M, F) float16 unit vectors, with rerank; else None

    @classmethod
    def one(cls, packed: torch.Tensor, exact: torch.Tensor | None) -> Segments:
        """All of ``packed`` as a single segment."""
        return cls(packed, torch.tensor([0, len(packed)], dtype=torch.int64), exact)

    def to(self, device: torch.device) -> Segments:
        """A copy on ``device`` (made per call: for a segment scanned once)."""
        return Segments(*(None if t is None else t.to(device) for t in self))


@dataclass(eq=False)
class DomainRows:
    """Each domain's id, threshold and exemplar rows, kept in step.

    Row ``i`` of ``packed``, ``labels`` and ``exact`` (present with rerank) is one exemplar;
    domain ``domain_ids[s]`` holds rows ``offsets[s]:offsets[s+1]``. Every edit replaces the
    tensors rather than writing into them, which is how the scorer's device mirrors tell that
    they are stale.
    """

    domain_ids: list[int]
    thresholds: list[float]
    packed: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    exact: torch.Tensor | None

    @classmethod
    def empty(cls, words: int) -> DomainRows:
        """No domains, for codes of ``words`` int64 words."""
        return cls(
            domain_ids=[],
            thresholds=[],
            packed=torch.zeros(0, words, dtype=torch.int64),
            labels=torch.zeros(0, dtype=torch.int64),
            offsets=torch.zeros(1, dtype=torch.int64),
            exact=None,
        )

    @property
    def nbytes(self) -> int:
        extra = 0 if self.exact is None else self.exact.numel() * self.exact.element_size()
        return int(self.packed.numel() * 8 + extra)

    def segments(self) -> Segments:
        return Segments(self.packed, self.offsets, self.exact)

    def index(self, domain_id: int) -> int:
        """The segment of ``domain_id``; InputError if it holds none."""
        if int(domain_id) not in self.domain_ids:
            raise InputError(f"domain {domain_id} is not in the memory bank")
        return self.domain_ids.index(int(domain_id))

    def bounds(self, s: int) -> tuple[int, int]:
        return int(self.offsets[s]), int(self.offsets[s + 1])

    def joined(self, s: int, packed: torch.Tensor, exact: torch.Tensor | None) -> Segments:
        """Segment ``s`` followed by new rows, as one segment (what extending it would hold)."""
        lo, hi = self.bounds(s)
        both = None
        if exact is not None and self.exact is not None:
            both = torch.cat([self.exact[lo:hi], exact])
        return Segments.one(torch.cat([self.packed[lo:hi], packed]), both)

    def append(
        self,
        domain_id: int,
        threshold: float,
        packed: torch.Tensor,
        labels: torch.Tensor,
        exact: torch.Tensor | None,
    ) -> None:
        """A new last domain."""
        if exact is not None:
            self.exact = exact if self.exact is None else torch.cat([self.exact, exact])
        self.packed = torch.cat([self.packed, packed])
        self.labels = torch.cat([self.labels, labels])
        self.offsets = torch.cat([self.offsets, self.offsets[-1:] + len(packed)])
        self.domain_ids.append(domain_id)
        self.thresholds.append(threshold)

    def extend(
        self,
        s: int,
        threshold: float,
        packed: torch.Tensor,
        labels: torch.Tensor,
        exact: torch.Tensor | None,
    ) -> None:
        """New rows at the end of segment ``s``; later segments shift by their number."""
        hi = self.bounds(s)[1]
        if exact is not None and self.exact is not None:
            self.exact = torch.cat([self.exact[:hi], exact, self.exact[hi:]])
        self.packed = torch.cat([self.packed[:hi], packed, self.packed[hi:]])
        self.labels = torch.cat([self.labels[:hi], labels, self.labels[hi:]])
        self.offsets = self.offsets.clone()
        self.offsets[s + 1 :] += len(packed)
        self.thresholds[s] = threshold

    def remove(self, s: int) -> None:
        """Segment ``s`` and its domain gone; later segments shift down."""
        lo, hi = self.bounds(s)
        self.packed = torch.cat([self.packed[:lo], self.packed[hi:]])
        if self.exact is not None:
            self.exact = torch.cat([self.exact[:lo], self.exact[hi:]])
        self.labels = torch.cat([self.labels[:lo], self.labels[hi:]])
        sizes = torch.diff(self.offsets)
        sizes = torch.cat([sizes[:s], sizes[s + 1 :]])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
        del self.domain_ids[s]
        del self.thresholds[s]
