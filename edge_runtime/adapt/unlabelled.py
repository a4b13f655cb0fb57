"""UnlabelledPool: a new domain's own served frames, kept for its self-training refit.

From the moment a grown (or extended) domain is installed, the pool collects the frames the
router sends to that domain and its memory accepts (in-distribution for it), with their features and
compacted images (an adaptor below the last layer re-encodes them at its tap). When ``size``
frames are in, :meth:`update` says so and :meth:`take` hands them over once.

One domain at a time: the controller opens the pool for the newest domain, and a pool still
filling for an older one is dropped (its head keeps its labelled training). Not checkpointed:
a resumed runtime serves the head it had, without the refit (an optimisation, not state).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from edge_runtime.adapt.adaptor import Adaptor
from edge_runtime.adapt.jobs import TrainSet
from edge_runtime.labels import stack_uniform


@dataclass
class Pool:
    """What :meth:`UnlabelledPool.take` hands over."""

    domain_id: int
    version: int
    train: TrainSet
    head: Adaptor | None  # the head trained on ``train`` (a copy), if there was one yet
    features: np.ndarray  # (N, F) float32 pooled features
    images: np.ndarray | None  # (N, ...) compacted frames; None when any frame lacked one


class UnlabelledPool:
    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.domain_id: int | None = None
        self._version = 0
        self._train: TrainSet | None = None
        self._head: Adaptor | None = None
        self._x: list[np.ndarray] = []
        self._img: list[np.ndarray | None] = []

    def open(
        self, domain_id: int, version: int, train: TrainSet, head: Adaptor | None = None
    ) -> None:
        """Collect for ``domain_id`` (at ``version``), whose head is trained on ``train``
        (``head``: that trained head, when it already is)."""
        self.reset()
        self.domain_id, self._version, self._train = int(domain_id), int(version), train
        # A copy: the refit runs on the worker thread while the serving thread uses the head.
        self._head = None if head is None else copy.deepcopy(head)

    def wants(self, domain_id: int) -> bool:
        return self.domain_id is not None and int(domain_id) == self.domain_id and not self.full

    @property
    def full(self) -> bool:
        return len(self._x) >= self.size

    def update(self, features: np.ndarray, image: np.ndarray | None) -> bool:
        """One frame the pool's domain served (and accepted); True once the pool is full."""
        if self.domain_id is None or self.full:
            return self.full
        self._x.append(np.array(features, dtype=np.float32, copy=True))
        self._img.append(None if image is None else np.array(image, copy=True))
        return self.full

    def take(self) -> Pool | None:
        """The full pool (and closes it), else None."""
        if self.domain_id is None or not self.full or self._train is None:
            return None
        pool = Pool(
            self.domain_id,
            self._version,
            self._train,
            self._head,
            np.stack(self._x),
            stack_uniform(self._img),
        )
        self.reset()
        return pool

    def reset(self) -> None:
        self.domain_id, self._version, self._train, self._head = None, 0, None, None
        self._x, self._img = [], []

    def __len__(self) -> int:
        return len(self._x)
