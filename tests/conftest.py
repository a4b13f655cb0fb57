"""Shared pytest fixtures (other areas may add theirs here).

Data fixtures are session-scoped: the mini scenario is built once per test run
(~1 s) and handed out read-only, so tests that need a stream do not each pay
for building one. Copy arrays before modifying them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.data import Stream, load_fashion_mnist, save_stream
from edge_runtime.data.scenario import build_scenario


def _freeze(stream: Stream) -> Stream:
    for arr in stream.arrays().values():
        arr.setflags(write=False)
    return stream


@pytest.fixture(scope="session")
def mini_stream() -> Stream:
    """The built-in ``fashion-drift-mini`` scenario (seed 0), arrays read-only."""
    return _freeze(build_scenario("fashion-drift-mini", seed=0))


@pytest.fixture(scope="session")
def mini_stream_path(mini_stream: Stream, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fashion-drift-mini`` saved as a stream ``.npz`` (do not modify the file)."""
    return save_stream(mini_stream, tmp_path_factory.mktemp("streams") / "mini.npz")


@pytest.fixture(scope="session")
def fashion_slice() -> tuple[np.ndarray, np.ndarray]:
    """The first 256 Fashion-MNIST test images (uint8 (256,28,28)) and int64 labels."""
    x, y = load_fashion_mnist("test")
    return x[:256], y[:256]
