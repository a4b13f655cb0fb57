"""HDC out-of-distribution detection: hypervector encoders, memories, scores, thresholds.

``HDCDetector`` is the one-domain detector; ``DomainMemoryBank`` scores a frame
against every domain's memory in one kernel call; ``get_detector(name)`` builds
the HDC detector or a baseline (MSP, energy, Mahalanobis, KNN, ViM) by name.
"""

from edge_runtime.hdc.bank import DomainMemoryBank, Routing
from edge_runtime.hdc.base import OODDetector, threshold_for_tpr
from edge_runtime.hdc.baselines import (
    EnergyDetector,
    KNNDetector,
    LinearHead,
    MahalanobisDetector,
    MSPDetector,
    ViMDetector,
)
from edge_runtime.hdc.detector import HDCDetector
from edge_runtime.hdc.memory import ExemplarMemory, PrototypeMemory, select_exemplars
from edge_runtime.hdc.metrics import aupr_in, aupr_out, auroc, fpr_at_tpr, ood_metrics
from edge_runtime.hdc.projection import HypervectorEncoder, check_features, random_projection
from edge_runtime.hdc.registry import DETECTORS, get_detector

__all__ = [
    "DETECTORS",
    "DomainMemoryBank",
    "EnergyDetector",
    "ExemplarMemory",
    "HDCDetector",
    "HypervectorEncoder",
    "KNNDetector",
    "LinearHead",
    "MSPDetector",
    "MahalanobisDetector",
    "OODDetector",
    "PrototypeMemory",
    "Routing",
    "ViMDetector",
    "aupr_in",
    "aupr_out",
    "auroc",
    "check_features",
    "fpr_at_tpr",
    "get_detector",
    "ood_metrics",
    "random_projection",
    "select_exemplars",
    "threshold_for_tpr",
]
