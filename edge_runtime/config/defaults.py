"""Defaults that more than one part needs, kept free of imports so any part may use them.

The encoder's layers and input size are read by the config schema, the encoder backends,
``edge-runtime export`` and the backend selection. A second copy would let an exported model
drift from the one the default runtime serves, so every one of them imports these.
"""

from __future__ import annotations

# MobileNetV2 blocks whose pooled outputs form the features: block 3 (24 channels) feeds the
# novelty classifier (domain shift vs new classes), block 18 (1,280 channels) the adaptors.
DEFAULT_LAYERS: tuple[int, ...] = (3, 18)
DEFAULT_INPUT_SIZE = 64
