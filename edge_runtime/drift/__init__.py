"""Drift detection: sequential change detectors on the served stream and the drift monitor."""

from edge_runtime.drift.detectors import (
    DETECTORS,
    BernoulliCUSUM,
    ChangeDetector,
    PageHinkley,
    cusum_threshold_for_arl,
    make_detector,
    register_detector,
)
from edge_runtime.drift.monitor import DOMAIN_SHIFT, NOVEL_CLASS, DriftEvent, DriftMonitor
from edge_runtime.drift.novelty import NoveltyClassifier, NoveltyDecision, pixel_statistics

__all__ = [
    "DETECTORS",
    "DOMAIN_SHIFT",
    "NOVEL_CLASS",
    "BernoulliCUSUM",
    "ChangeDetector",
    "DriftEvent",
    "DriftMonitor",
    "NoveltyClassifier",
    "NoveltyDecision",
    "PageHinkley",
    "cusum_threshold_for_arl",
    "make_detector",
    "pixel_statistics",
    "register_detector",
]
