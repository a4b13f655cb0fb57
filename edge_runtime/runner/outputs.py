"""Output writing: ``frames.npz`` and ``metrics.json``, each replaced atomically.

``events.jsonl`` is not written here: the event log's :class:`~edge_runtime.events.JsonlSink`
writes it line by line as events happen. Both files here go through the project's one
atomic-write helper (:mod:`edge_runtime.state.atomic`), so a reader never sees half a file
and a crash leaves the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.scoring import ServedFrames
from edge_runtime.state.atomic import atomic_write, atomic_write_json


@dataclass(frozen=True)
class FrameOutputs:
    """``frames.npz``: the served frames' decisions (stream order), whether the runtime had
    adapted to each frame's segment, and the eval predictions."""

    served: ServedFrames
    adapted: np.ndarray  # bool, one per served frame
    eval_prediction: np.ndarray  # int64, one per eval frame

    def arrays(self) -> dict[str, np.ndarray]:
        s = self.served
        return {
            "prediction": np.asarray(s.prediction, np.int64),
            "ood_score": np.asarray(s.ood_score, np.float32),
            "domain": np.asarray(s.domain, np.int64),
            "is_ood": np.asarray(s.is_ood, bool),
            "adapted": np.asarray(self.adapted, bool),
            "rejected": np.asarray(s.rejected, bool),
            "eval_prediction": np.asarray(self.eval_prediction, np.int64),
        }


def write_frames(path: str | Path, frames: FrameOutputs) -> Path:
    arrays = frames.arrays()
    return atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> Path:
    """``metrics`` must be strict JSON already (no NaN; see ``events.strict_json``)."""
    return atomic_write_json(path, metrics, allow_nan=False)


def write_outputs(out_dir: str | Path, frames: FrameOutputs, metrics: dict[str, Any]) -> None:
    out = Path(out_dir)
    write_frames(out / "frames.npz", frames)
    write_metrics(out / "metrics.json", metrics)
