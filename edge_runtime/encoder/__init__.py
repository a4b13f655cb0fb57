"""The frozen encoder: MobileNetV2 definition, preprocessing and backends."""

from edge_runtime.encoder.backend import (
    DEFAULT_INPUT_SIZE,
    DEFAULT_LAYERS,
    Encoder,
    EncoderBackend,
    FeatureSpec,
    TorchBackend,
    build_feature_module,
)
from edge_runtime.encoder.export import export_encoder, read_manifest
from edge_runtime.encoder.mobilenet import MobileNetV2, PooledFeatures
from edge_runtime.encoder.onnx_backend import OnnxRuntimeBackend
from edge_runtime.encoder.preprocess import preprocess, validate_frames
from edge_runtime.encoder.select import select_backend
from edge_runtime.encoder.tensorrt_backend import TensorRTBackend
from edge_runtime.encoder.weights import default_weights_path, load_state_dict

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_LAYERS",
    "Encoder",
    "EncoderBackend",
    "FeatureSpec",
    "MobileNetV2",
    "OnnxRuntimeBackend",
    "PooledFeatures",
    "TensorRTBackend",
    "TorchBackend",
    "build_feature_module",
    "default_weights_path",
    "export_encoder",
    "load_state_dict",
    "preprocess",
    "read_manifest",
    "select_backend",
    "validate_frames",
]
