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


def _initdb() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1] if found else None


@pytest.fixture(scope="session")
def _pg_server():
    """``$EDGE_RUNTIME_TEST_PG``, else a private PostgreSQL cluster on a free loopback port
    (Debian's server binaries; run as the ``postgres`` user when the tests run as root, since
    PostgreSQL refuses to run as root). Stopped at the end of the session."""
    url = os.environ.get(PG_URL_ENV)
    if url:
        yield url
        return
    initdb = _initdb()
    if initdb is None:
        yield None
        return
    import shutil
    import subprocess
    import tempfile

    from edge_runtime.fleet.broker import free_port, wait_for_port

    # Not under pytest's tmp root: that is private to this user; the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="edge-pg-"))
    data, port = root / "data", free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    pg_ctl = str(initdb.parent / "pg_ctl")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*as_user, str(initdb), "-A", "trust", "-U", "edge", "-D", str(data)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-o", opts, "-w", "start"],
        check=True,
        capture_output=True,
    )
    wait_for_port(port)
    yield f"postgresql://edge@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(_pg_server: str | None) -> str:
    """A PostgreSQL URL whose public schema is emptied first (see ``_pg_server``)."""
    if not _pg_server:
        _missing(f"PostgreSQL (${PG_URL_ENV} or Debian's postgresql package)")
    try:
        import psycopg

        with psycopg.connect(_pg_server, connect_timeout=5, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
    except Exception as exc:
        _missing(f"PostgreSQL at {_pg_server} ({exc})")
    return str(_pg_server)
