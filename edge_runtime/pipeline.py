"""The serving pipeline: frames -> encoder features -> every domain's score -> route -> predict.

Stateless apart from the parts it is given: it decides nothing about drift or labels. Frames
that cannot be served (NaN/Inf in a float frame) are rejected one by one (prediction -1, domain
-1, score -inf, ``is_ood``) and the rest of the batch goes on; a batch of the wrong rank, dtype
or channel count is refused whole with an :class:`~edge_runtime.errors.InputError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_runtime.adapt.domains import DomainSet
from edge_runtime.drift import pixel_statistics
from edge_runtime.encoder import Encoder, FeatureSpec
from edge_runtime.encoder.backend import Encoded
from edge_runtime.errors import InputError

#: Width of :func:`~edge_runtime.drift.pixel_statistics` (4 moments + a 16-bin histogram).
PIXEL_STATS_DIM = 4 + 16


@dataclass
class Served:
    """One batch through the pipeline, one entry per frame."""

    features: np.ndarray  # (N, F) float32, zeros for rejected frames
    prediction: np.ndarray  # int64, -1 if rejected
    ood_score: np.ndarray  # float32 calibrated, -inf if rejected
    domain: np.ndarray  # int64, -1 if rejected
    active_score: np.ndarray  # float32, the active domain's calibrated score
    rejected: np.ndarray  # bool
    descriptors: np.ndarray | None  # (N, D) low-level descriptors for the novelty classifier

    @property
    def is_ood(self) -> np.ndarray:
        return self.ood_score < 0.0


class FrameInputs:
    """A served batch in every adaptor's input space (see
    :class:`~edge_runtime.adapt.domains.BatchInputs`): the taps in use come from the main
    encoder pass; an adaptor behind an input filter costs a second pass over its frames only."""

    def __init__(self, encoder: Encoder, frames: np.ndarray, encoded: Encoded) -> None:
        self.encoder = encoder
        self.frames = frames
        self.features = encoded.features
        self.maps = encoded.maps

    def rows(self, tap: int | None, condition: str, mask: np.ndarray) -> np.ndarray:
        if condition == "none" and tap is None:
            return self.features[mask]
        if condition == "none" and tap in self.maps:
            m = self.maps[tap][mask]
            return m.reshape(len(m), -1)
        enc = self.encoder.encode(
            self.frames[mask], taps=() if tap is None else (tap,), condition=condition
        )
        if tap is None:
            return enc.features
        m = enc.maps[tap]
        return m.reshape(len(m), -1)


def compact_image(frame: np.ndarray, size: int) -> np.ndarray:
    """A frame kept for training (a label request): as it is when it is no larger than the
    encoder's input, else resized to it (the encoder would resize it anyway; a 640x480 camera
    frame kept 200 times would hold 180 MB)."""
    h, w = frame.shape[:2]
    if max(h, w) <= size:
        return np.array(frame, copy=True)
    t = torch.as_tensor(np.asarray(frame, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(t, size=(size, size), mode="area")[0]
    arr = out[0].numpy() if frame.ndim == 2 else out.permute(1, 2, 0).numpy()
    if frame.dtype == np.uint8:
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr.astype(frame.dtype)


class ServingPipeline:
    def __init__(self, encoder: Encoder, domains: DomainSet) -> None:
        self.encoder = encoder
        self.domains = domains
        slices = encoder.spec.slices()
        # Novel class vs domain shift is told from the earliest layer's pooled features when
        # the encoder has more than one layer (measured right for fog, noise, rotation and new
        # classes); a one-layer encoder falls back to pixel statistics.
        self.descriptor_slice: slice | None = slices[0] if len(slices) > 1 else None

    @property
    def feature_dim(self) -> int:
        return self.encoder.spec.dim

    def descriptors_of(self, features: np.ndarray, images: np.ndarray | None) -> np.ndarray | None:
        """The novelty classifier's input for frames (features and, for pixels, the images)."""
        if self.descriptor_slice is not None:
            return features[:, self.descriptor_slice]
        if images is not None and images.dtype == np.uint8:
            return pixel_statistics(images)
        return None

    def labelled_features(
        self, images: np.ndarray | None, labels: Any, features: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of a labelled set given as frames or as features, checked."""
        if labels is None:
            raise InputError("a labelled set needs labels")
        if features is None:
            if images is None:
                raise InputError("a labelled set needs images or features")
            features = self.encoder.features(check_batch(images, self.encoder.spec))
        x = np.ascontiguousarray(features, dtype=np.float32)
        y = np.asarray(labels, dtype=np.int64)
        if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
            raise InputError(f"features {x.shape} and labels {y.shape} do not match")
        return x, y

    def serve(self, frames: Any, *, descriptors: bool = False) -> Served:
        """One batch; ``descriptors``: also the novelty classifier's input (once it is fitted)."""
        frames = check_batch(frames, self.encoder.spec)
        n = len(frames)
        ok = finite_frames(frames)
        feats = np.zeros((n, self.feature_dim), dtype=np.float32)
        prediction = np.full(n, -1, dtype=np.int64)
        domain = np.full(n, -1, dtype=np.int64)
        score = np.full(n, -np.inf, dtype=np.float32)
        active = np.full(n, -np.inf, dtype=np.float32)
        desc: np.ndarray | None = None
        if ok.any():
            good = frames if ok.all() else frames[ok]
            taps = self.domains.taps_in_use()
            enc = self.encoder.encode(good, taps=taps)
            f = enc.features
            feats[ok] = f
            routed = self.domains.route(f)
            domain[ok], score[ok], active[ok] = routed.domain, routed.score, routed.active_score
            inputs = FrameInputs(self.encoder, good, enc)
            prediction[ok] = self.domains.predict(inputs, routed.domain)
            if descriptors and self.descriptor_slice is not None:
                desc = feats[:, self.descriptor_slice]
            elif descriptors and good.dtype == np.uint8:
                desc = np.zeros((n, PIXEL_STATS_DIM), dtype=np.float32)
                desc[ok] = pixel_statistics(good)
        return Served(feats, prediction, score, domain, active, ~ok, desc)

    def predict(
        self, features: np.ndarray, frames: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, ood_score, domain) for features, with no side effects. ``frames`` (the
        same frames, finite) serve adaptors below the last layer; without them such a domain's
        frames raise InputError."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if len(features) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
        routed = self.domains.route(features)
        inputs: Any = features
        if frames is not None:
            frames = check_batch(frames, self.encoder.spec)
            if len(frames) != len(features):
                raise InputError(f"{len(frames)} frames for {len(features)} feature rows")
            # No maps up front: each tap domain's frames are encoded at its tap on demand.
            inputs = FrameInputs(self.encoder, frames, Encoded(features, {}))
        return self.domains.predict(inputs, routed.domain), routed.score, routed.domain


def check_batch(frames: Any, spec: FeatureSpec) -> np.ndarray:
    """Rank/dtype check of a batch; NaN frames pass (they are rejected one by one)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise InputError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.ndim not in (3, 4):
        raise InputError(
            f"frames must have rank 3 (N,H,W) or 4 (N,H,W,C), got shape {tuple(frames.shape)}"
        )
    if len(frames) == 0:
        raise InputError("frames is an empty batch (zero frames)")
    if frames.ndim == 4 and frames.shape[3] not in (1, 3, 4):
        raise InputError(f"frames must have 1, 3 or 4 channels last, got {tuple(frames.shape)}")
    if frames.dtype != np.uint8 and not np.issubdtype(frames.dtype, np.floating):
        raise InputError(f"frames must be uint8 or float, got dtype {frames.dtype}")
    return frames


def finite_frames(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return np.ones(len(frames), dtype=bool)
    return np.isfinite(frames.reshape(len(frames), -1)).all(axis=1)
