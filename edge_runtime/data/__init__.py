"""Data: stream files, offline datasets, corruptions and built-in scenarios."""

from edge_runtime.data.corruptions import CORRUPTIONS, corrupt
from edge_runtime.data.datasets import (
    FASHION_CLASSES,
    load_fashion_mnist,
    load_mnist_digits,
    load_natural_images,
    load_sklearn_digits,
    natural_crops,
)
from edge_runtime.data.scenario import (
    SCENARIOS,
    ScenarioSpec,
    SegmentSpec,
    build_scenario,
    get_scenario,
    write_scenario,
)
from edge_runtime.data.stream import (
    REQUIRED_ARRAYS,
    FrameBatch,
    SegmentSummary,
    Stream,
    iter_batches,
    load_image_directory,
    load_stream,
    save_stream,
    validate_stream,
)

__all__ = [
    "CORRUPTIONS",
    "FASHION_CLASSES",
    "REQUIRED_ARRAYS",
    "SCENARIOS",
    "FrameBatch",
    "ScenarioSpec",
    "SegmentSpec",
    "SegmentSummary",
    "Stream",
    "build_scenario",
    "corrupt",
    "get_scenario",
    "iter_batches",
    "load_fashion_mnist",
    "load_image_directory",
    "load_mnist_digits",
    "load_natural_images",
    "load_sklearn_digits",
    "load_stream",
    "natural_crops",
    "save_stream",
    "validate_stream",
    "write_scenario",
]
