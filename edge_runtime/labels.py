"""The label protocol: which frames the runtime asks a person about, the budget, and feedback.

After a flag that needs labels, the next ``budget`` served frames (rejected frames excepted) are
*requested*: their features wait in ``pending`` until :meth:`LabelProtocol.feedback` reveals
their labels (test-then-train: a frame is always predicted before its label can arrive). When
every requested label is in, :meth:`LabelProtocol.take` hands the collected :class:`Shots` to the
adaptation planner. Labels for frames that were never requested are ignored, so a label source
cannot spend more than the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.errors import InputError


def stack_uniform(images: list[np.ndarray | None]) -> np.ndarray | None:
    """Kept frames stacked, or None unless there are some and every one is there with one
    shape and dtype (frames from cameras of different sizes train pooled heads only)."""
    if not images or any(im is None for im in images):
        return None
    if len({(im.shape, im.dtype.str) for im in images if im is not None}) != 1:
        return None
    return np.stack(images)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Trigger:
    """What a label collection is for: the flag's frame, its kind and its evidence."""

    frame: int
    kind: str
    evidence: dict[str, Any]


@dataclass
class Shots:
    """The labelled frames of one collection."""

    features: np.ndarray  # (N, F) float32
    labels: np.ndarray  # (N,) int64
    frames: list[int]
    trigger: Trigger
    # The frames themselves (at most the encoder's input size: pipeline.compact_image), so
    # an adaptor below the last layer can be trained on the encoder's intermediate maps of the
    # same shots; None when the labels came with features only.
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


class LabelProtocol:
    def __init__(self, budget: int, feature_dim: int) -> None:
        if budget < 1:
            raise InputError(f"label budget must be >= 1, got {budget}")
        self.budget = int(budget)
        self.feature_dim = int(feature_dim)
        self.used = 0
        self.trigger: Trigger | None = None
        self._to_request = 0
        self._pending: dict[int, np.ndarray] = {}
        self._x: list[np.ndarray] = []
        self._y: list[int] = []
        self._i: list[int] = []
        self._images: dict[int, np.ndarray] = {}  # frame -> its (compacted) image

    # -- state of the collection -------------------------------------------------------------
    @property
    def collecting(self) -> bool:
        """A collection is under way (frames still to request, or labels still to arrive)."""
        return self.trigger is not None

    @property
    def wants_labels(self) -> bool:
        return self._to_request > 0 or bool(self._pending)

    @property
    def wants_more(self) -> bool:
        """Frames are still to be requested (the next served frames will be)."""
        return self._to_request > 0

    @property
    def complete(self) -> bool:
        return self.trigger is not None and self._to_request == 0 and not self._pending

    def summary(self) -> dict[str, int]:
        return {
            "budget": self.budget,
            "to_request": self._to_request,
            "awaiting": len(self._pending),
            "collected": len(self._y),
            "used": self.used,
        }

    # -- the protocol --------------------------------------------------------------------------
    def start(self, trigger: Trigger) -> None:
        if self.trigger is not None:
            raise InputError("a label collection is already under way")
        self.trigger = trigger
        self._to_request = self.budget

    def request(self, frame: int, features: np.ndarray, image: np.ndarray | None = None) -> bool:
        """Called for each served frame in order; True if its label is wanted. ``image``: the
        frame (compacted by the caller), kept until its label arrives or the collection ends."""
        if self._to_request <= 0:
            return False
        self._pending[int(frame)] = np.array(features, dtype=np.float32, copy=True)
        if image is not None:
            self._images[int(frame)] = np.array(image, copy=True)
        self._to_request -= 1
        return True

    def feedback(self, indices: Any, labels: Any) -> int:
        """Labels of requested frames; returns how many were accepted."""
        idx = np.asarray(indices).reshape(-1)
        lab = np.asarray(labels).reshape(-1)
        if len(idx) != len(lab):
            raise InputError(f"feedback: {len(idx)} indices but {len(lab)} labels")
        if len(idx) and not np.issubdtype(idx.dtype, np.integer):
            raise InputError(f"feedback indices must be integers, got dtype {idx.dtype}")
        if len(lab) and not np.issubdtype(lab.dtype, np.integer):
            raise InputError(f"feedback labels must be integers, got dtype {lab.dtype}")
        if len(lab) and lab.min() < 0:
            raise InputError("feedback labels must be >= 0")
        accepted = 0
        for i, y in zip(idx.tolist(), lab.tolist(), strict=True):
            x = self._pending.pop(int(i), None)
            if x is None:
                continue
            self._x.append(x)
            self._y.append(int(y))
            self._i.append(int(i))
            accepted += 1
        self.used += accepted
        return accepted

    def stop_requesting(self) -> None:
        """No more frames will come (end of stream): what was asked and answered is all."""
        self._to_request = 0
        for i in self._pending:
            self._images.pop(i, None)
        self._pending.clear()

    def take(self) -> Shots | None:
        """The collected shots once the collection is complete (and ends it), else None.

        A complete collection with no label at all (end of stream) just ends.
        """
        if not self.complete:
            return None
        trigger = self.trigger
        assert trigger is not None
        x = (
            np.stack(self._x).astype(np.float32)
            if self._x
            else np.zeros((0, self.feature_dim), np.float32)
        )
        shots = Shots(
            x, np.asarray(self._y, dtype=np.int64), list(self._i), trigger, self._shot_images()
        )
        self.cancel()
        return shots if len(shots) else None

    def _shot_images(self) -> np.ndarray | None:
        """The labelled frames' images in shot order, or None unless every shot has one of one
        shape (a collection across cameras of different sizes trains pooled heads only)."""
        return stack_uniform([self._images.get(i) for i in self._i])

    def cancel(self) -> None:
        self.trigger = None
        self._to_request = 0
        self._pending.clear()
        self._images.clear()
        self._x, self._y, self._i = [], [], []

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        pend = sorted(self._pending)
        t = self.trigger
        return {
            "budget": self.budget,
            "used": self.used,
            "trigger": None
            if t is None
            else {"frame": t.frame, "kind": t.kind, "evidence": dict(t.evidence)},
            "to_request": self._to_request,
            "pending_frames": np.asarray(pend, dtype=np.int64),
            "pending_features": np.stack([self._pending[i] for i in pend])
            if pend
            else np.zeros((0, self.feature_dim), np.float32),
            "frames": np.asarray(self._i, dtype=np.int64),
            "labels": np.asarray(self._y, dtype=np.int64),
            "features": np.stack(self._x)
            if self._x
            else np.zeros((0, self.feature_dim), np.float32),
            **self._images_state(),
        }

    def _images_state(self) -> dict[str, np.ndarray]:
        """Kept frames' images, when they all share one shape (else none are checkpointed: the
        resumed collection trains pooled heads only, as a mixed-size one would)."""
        keys = sorted(self._images)
        images = stack_uniform([self._images[i] for i in keys])
        if images is None:
            return {}
        return {"image_frames": np.asarray(keys, dtype=np.int64), "images": images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget = int(state["budget"])
        self.used = int(state["used"])
        t = state["trigger"]
        self.trigger = (
            None if t is None else Trigger(int(t["frame"]), str(t["kind"]), dict(t["evidence"]))
        )
        self._to_request = int(state["to_request"])
        pf = np.asarray(state["pending_frames"], dtype=np.int64)
        px = np.asarray(state["pending_features"], dtype=np.float32)
        if len(pf) != len(px):
            raise InputError("label collection: pending frames and features disagree")
        self._pending = {int(i): px[k].copy() for k, i in enumerate(pf.tolist())}
        bx = np.asarray(state["features"], dtype=np.float32)
        self._x = [bx[k].copy() for k in range(len(bx))]
        self._y = [int(v) for v in np.asarray(state["labels"]).tolist()]
        self._i = [int(v) for v in np.asarray(state["frames"]).tolist()]
        if not len(self._x) == len(self._y) == len(self._i):
            raise InputError("label collection: collected frames, labels and features disagree")
        imf = np.asarray(state.get("image_frames", np.zeros(0)), dtype=np.int64)
        ims = state.get("images")
        if len(imf) and (ims is None or len(ims) != len(imf)):
            raise InputError("label collection: image frames and images disagree")
        self._images = {int(i): np.asarray(ims[k]).copy() for k, i in enumerate(imf.tolist())}
