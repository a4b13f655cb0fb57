"""Label sources: who answers the runtime's label requests.

The runtime marks, per served frame, whether it wants that frame's label
(``Decisions.label_request``); a :class:`LabelSource` answers. The serve loop calls
:meth:`LabelSource.answer` once per served batch with the frames asked about in that batch
(possibly none) and passes whatever comes back to ``Runtime.feedback``. A source may answer
fewer frames than it was asked about, and may answer frames asked about in earlier batches:
an operator's label inbox or the fleet's label loop answer later, or never. The runtime ignores
labels for frames it never asked about, so no source can spend more than the label budget.

:class:`StreamLabels` is the test-then-train replay of a stream file (docs/ARCHITECTURE.md,
"Protocol"): every frame asked about is answered at once from the stream's ``labels``, after
the frame was predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from edge_runtime.errors import InputError


class Labelled(NamedTuple):
    """Frames and their labels, as a label source hands them over (int64, same length)."""

    indices: np.ndarray
    labels: np.ndarray

    @classmethod
    def empty(cls) -> Labelled:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))


@runtime_checkable
class LabelSource(Protocol):
    """Answers label requests; see the module docstring for the contract."""

    def answer(self, indices: np.ndarray) -> Labelled: ...


@dataclass
class FlagLabels:
    """The labels a source revealed for one drift flag (``frame`` None: before any flag)."""

    frame: int | None
    indices: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def as_labelled(self) -> Labelled:
        return Labelled(np.asarray(self.indices, np.int64), np.asarray(self.labels, np.int64))


class StreamLabels:
    """Reveals the stream's label of every frame the runtime asks about, immediately.

    It also counts what it revealed per flag. It learns where a flag begins from the event
    log: it is an :class:`~edge_runtime.events.EventSink`, and each ``labels_requested`` event
    opens a new tally (attach it with ``rt.events.add_sink(labels)``). Labels revealed before
    any flag in this run (a runtime resumed mid-collection) go to a tally with ``frame=None``.
    """

    def __init__(self, labels: np.ndarray) -> None:
        self._labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.per_flag: list[FlagLabels] = []

    # ------------------------------------------------------------------ LabelSource
    def answer(self, indices: np.ndarray) -> Labelled:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            return Labelled.empty()
        if idx.min() < 0 or idx.max() >= len(self._labels):
            raise InputError(
                f"label request for frames outside the stream (0..{len(self._labels) - 1}): "
                f"{idx.min()}..{idx.max()}"
            )
        y = self._labels[idx]
        if not self.per_flag:
            self.per_flag.append(FlagLabels(None))
        tally = self.per_flag[-1]
        tally.indices.extend(idx.tolist())
        tally.labels.extend(y.tolist())
        return Labelled(idx, y)

    # ------------------------------------------------------------------ EventSink
    def write(self, event: dict[str, Any]) -> None:
        if event.get("type") == "labels_requested":
            self.per_flag.append(FlagLabels(int(event["frame"])))

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ counts
    @property
    def revealed(self) -> int:
        """How many labels were revealed in all."""
        return sum(len(t) for t in self.per_flag)

    @property
    def revealed_per_flag(self) -> list[int]:
        return [len(t) for t in self.per_flag]

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> list[dict[str, Any]]:
        """The per-flag tallies so far (``frame`` -1: before any flag)."""
        return [
            {
                "frame": -1 if t.frame is None else int(t.frame),
                "indices": np.asarray(t.indices, np.int64),
                "labels": np.asarray(t.labels, np.int64),
            }
            for t in self.per_flag
        ]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self.per_flag = [
            FlagLabels(
                None if int(rec["frame"]) < 0 else int(rec["frame"]),
                np.asarray(rec["indices"], np.int64).tolist(),
                np.asarray(rec["labels"], np.int64).tolist(),
            )
            for rec in state
        ]
