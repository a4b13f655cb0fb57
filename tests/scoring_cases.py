"""Shared by the scoring and acceptance tests: ``score_run`` on a synthetic stream whose eval
set is one frame per segment (label 0, predicted 0), for tests about the served frames."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_runtime.scoring import ServedFrames, score_run


def score_served(served: ServedFrames, *, segment: np.ndarray, **kwargs: Any) -> dict[str, Any]:
    n_seg = int(segment.max()) + 1
    kwargs.setdefault("eval_labels", np.zeros(n_seg, np.int64))
    kwargs.setdefault("eval_segment", np.arange(n_seg))
    kwargs.setdefault("eval_prediction", np.zeros(n_seg, np.int64))
    kwargs.setdefault("eval_prediction_before_drift", None)
    return score_run(served, segment=segment, **kwargs)
