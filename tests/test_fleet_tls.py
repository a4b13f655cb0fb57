"""TLS end to end: a Mosquitto TLS listener with a CA of the test's own (openssl), the device
client with ``fleet.tls`` and ``fleet.ca_file``, the controller over ``mqtts://`` with a client
certificate (mutual TLS); a client that does not trust the CA, or has no certificate where one
is required, never gets through."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from edge_runtime.commands import CommandQueue
from edge_runtime.config.schema import FleetConfig
from edge_runtime.events import EventLog
from edge_runtime.fleet.broker import Broker, find_mosquitto
from edge_runtime.fleet.client import FleetClient
from edge_runtime.fleet.controller import FleetController
from edge_runtime.fleet.store import open_store

pytestmark = pytest.mark.skipif(
    find_mosquitto() is None or shutil.which("openssl") is None,
    reason="needs mosquitto and openssl",
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _pki(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    root.mkdir()
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edge-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt", cwd=root,
    )  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=edge-test-{name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=root,
        )  # fmt: skip
        extfile = root / f"{name}.ext"
        extfile.write_text(ext + "\n" if ext else "basicConstraints=CA:FALSE\n")
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", str(extfile), "-out", f"{name}.crt",
            cwd=root,
        )  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in root.iterdir()}


def _client(cfg: FleetConfig, events: EventLog | None = None) -> FleetClient:
    return FleetClient(
        cfg,
        events=events if events is not None else EventLog(),
        commands=CommandQueue(),
        position=lambda: 0,
        software_version="test",
        encoder_hash="enc",
    )


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_device_and_controller_over_mutual_tls(tmp_path: Path) -> None:
    pki = _pki(tmp_path / "pki")
    broker = Broker(
        kind="mosquitto",
        workdir=tmp_path / "broker",
        tls_files=(pki["ca_crt"], pki["server_crt"], pki["server_key"]),
        require_certificate=True,
    ).start()
    assert broker.url.startswith("mqtts://")
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    ctx = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    ctx.load_cert_chain(str(pki["client_crt"]), str(pki["client_key"]))
    ctl = FleetController(broker.url, store, tls=ctx)
    events = EventLog()
    base = {
        "device_id": "dev-tls",
        "port": broker.port,
        "outbox_dir": tmp_path / "outbox",
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
        "tls": True,
        "ca_file": pki["ca_crt"],
    }
    device = _client(
        FleetConfig(**base, cert_file=pki["client_crt"], key_file=pki["client_key"]), events
    )
    events.add_sink(device)
    # Without the client certificate the broker refuses the handshake: nothing gets through.
    anonymous = _client(
        FleetConfig(**{**base, "device_id": "dev-nocert", "outbox_dir": tmp_path / "o2"})
    )
    try:
        ctl.start()
        assert ctl.wait_ready(10)
        device.start()
        anonymous.start()
        for frame in range(5):
            events.emit("drift", frame, kind="domain_shift", evidence={})
        assert _wait(lambda: len(store.alerts(device_id="dev-tls")) == 5, 15)
        assert [a["frame"] for a in store.alerts(device_id="dev-tls")] == list(range(5))
        assert not anonymous.connected
        assert store.device("dev-nocert") is None
    finally:
        anonymous.stop(0)
        device.stop(5)
        ctl.stop()
        store.close()
        broker.stop()


def test_a_device_that_does_not_trust_the_broker_never_connects(tmp_path: Path) -> None:
    pki = _pki(tmp_path / "pki")
    broker = Broker(
        kind="mosquitto",
        workdir=tmp_path / "broker",
        tls_files=(pki["ca_crt"], pki["server_crt"], pki["server_key"]),
    ).start()
    # No ca_file: the system's CAs do not know the test CA, so verification fails.
    client = _client(
        FleetConfig(device_id="dev-x", port=broker.port, outbox_dir=tmp_path / "o", tls=True)
    )
    try:
        client.start()
        time.sleep(1.5)
        assert not client.connected
    finally:
        client.stop(0)
        broker.stop()
