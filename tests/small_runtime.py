"""The small runtime the unit tests share, and its fogged Fashion-MNIST stream.

A 32 px encoder, a 2,048-bit HDC memory and drift detection scaled down with the warm-up, so a
drift -> labels -> adaptation cycle fits in a few hundred real frames on 2 cores."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_runtime.config import RuntimeConfig
from edge_runtime.data import load_fashion_mnist
from edge_runtime.data.corruptions import corrupt

SMALL = {
    "encoder.input_size": 32,
    "encoder.batch_size": 32,
    "hdc.dim": 2048,
    "drift.warmup": 60,
    "drift.confirm_frames": 10,  # scaled down with the warm-up and the label budget
    "adapt.steps": 60,
}


def small_config(overrides: dict[str, Any]) -> RuntimeConfig:
    return RuntimeConfig().with_overrides({**SMALL, **overrides})


def fog_stream(shifted: int) -> dict[str, np.ndarray]:
    """600 clean training frames of classes 0-5, then a stream of 160 clean frames followed by
    ``shifted`` frames under heavy fog (severity 4), all from Fashion-MNIST's train split."""
    x, y = load_fashion_mnist("train")
    keep = np.random.default_rng(0).permutation(np.flatnonzero(y < 6))
    tr, clean, fogged = keep[:600], keep[600:760], keep[760 : 760 + shifted]
    return {
        "train_x": x[tr],
        "train_y": y[tr].astype(np.int64),
        "stream_x": np.concatenate([x[clean], corrupt(x[fogged], "fog", 4, 0)]),
        "stream_y": np.concatenate([y[clean], y[fogged]]).astype(np.int64),
    }
