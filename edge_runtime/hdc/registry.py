"""Detectors by name (pytorch-ood style): ``get_detector("knn", k=50)``."""

from __future__ import annotations

from typing import Any

from edge_runtime.errors import InputError
from edge_runtime.hdc.base import OODDetector
from edge_runtime.hdc.baselines import (
    EnergyDetector,
    KNNDetector,
    MahalanobisDetector,
    MSPDetector,
    ViMDetector,
)
from edge_runtime.hdc.detector import HDCDetector

DETECTORS: dict[str, type[OODDetector]] = {
    "hdc": HDCDetector,
    "msp": MSPDetector,
    "energy": EnergyDetector,
    "mahalanobis": MahalanobisDetector,
    "knn": KNNDetector,
    "vim": ViMDetector,
}


def get_detector(name: str, **kwargs: Any) -> OODDetector:
    """A new, unfitted detector of the named kind."""
    try:
        cls = DETECTORS[name.lower()]
    except KeyError:
        raise InputError(
            f"unknown OOD detector {name!r}: choose from {sorted(DETECTORS)}"
        ) from None
    return cls(**kwargs)
