"""Shared pytest fixtures (other areas may add theirs here).

Data fixtures are session-scoped: the mini scenario is built once per test run
(~1 s) and handed out read-only, so tests that need a stream do not each pay
for building one. Copy arrays before modifying them.
"""

from __future__ import annotations

import os
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


# ------------------------------------------------------------------------------ fleet services
# The fleet tests use the real parts: a Mosquitto process per test (so one test can kill it) and
# the PostgreSQL that .ci/run starts. Off CI a missing service skips; on CI it fails, so the
# fleet tests can never pass by not running.
PG_URL_ENV = "EDGE_RUNTIME_TEST_PG"


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required on CI (.ci/run starts it)")
    pytest.skip(f"{what} is not available")


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A Mosquitto broker on a free loopback port, stopped after the test."""
    from edge_runtime.fleet.broker import Broker, find_mosquitto

    if find_mosquitto() is None:
        _missing("mosquitto")
    broker = Broker(kind="mosquitto", workdir=tmp_path / "broker").start()
    yield broker
    broker.stop()


@pytest.fixture
def pg_url() -> str:
    """A PostgreSQL URL (``$EDGE_RUNTIME_TEST_PG``) whose fleet tables are emptied first."""
    url = os.environ.get(PG_URL_ENV)
    if not url:
        _missing(f"PostgreSQL (${PG_URL_ENV})")
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is "not available"
        _missing(f"PostgreSQL at {url} ({exc})")
    return str(url)
