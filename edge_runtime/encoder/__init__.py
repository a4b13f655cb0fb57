"""The frozen encoder: MobileNetV2 definition, preprocessing and backends."""

from edge_runtime.encoder.backend import (
    DEFAULT_INPUT_SIZE,
    DEFAULT_LAYERS,
    TAP_BLOCKS,
    Encoded,
    Encoder,
    EncoderBackend,
    FeatureSpec,
    TorchBackend,
    build_feature_module,
    encoder_ms_per_frame,
    tap_shape,
)
from edge_runtime.encoder.condition import CONDITIONERS, condition
from edge_runtime.encoder.export import export_encoder, read_manifest
from edge_runtime.encoder.mobilenet import MobileNetV2, PooledFeatures, TappedFeatures
from edge_runtime.encoder.onnx_backend import OnnxRuntimeBackend
from edge_runtime.encoder.preprocess import preprocess, validate_frames
from edge_runtime.encoder.select import select_backend
from edge_runtime.encoder.tensorrt_backend import TensorRTBackend
from edge_runtime.encoder.weights import default_weights_path, load_state_dict

__all__ = [
    "CONDITIONERS",
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_LAYERS",
    "TAP_BLOCKS",
    "Encoded",
    "Encoder",
    "EncoderBackend",
    "FeatureSpec",
    "MobileNetV2",
    "OnnxRuntimeBackend",
    "PooledFeatures",
    "TappedFeatures",
    "TensorRTBackend",
    "TorchBackend",
    "build_feature_module",
    "condition",
    "default_weights_path",
    "encoder_ms_per_frame",
    "export_encoder",
    "load_state_dict",
    "preprocess",
    "read_manifest",
    "select_backend",
    "tap_shape",
    "validate_frames",
]
