"""A broker on loopback for the demo, the tests and the benchmark: Mosquitto when it is
installed, else the embedded amqtt broker.

Production fleets run their own broker (Mosquitto, EMQX, HiveMQ); this only starts one so that
``edge-runtime demo`` and the tests exercise the real protocol on one machine. Mosquitto gets a
generated config file: one listener on 127.0.0.1, optional password file and ACL file, and
persistence in its work folder (sessions and queued messages survive a restart).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def wait_for_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def password_file(path: Path, users: dict[str, str]) -> Path:
    """Write a Mosquitto password file with ``mosquitto_passwd`` (hashes, never plain text)."""
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path.write_text("")
    path.chmod(0o600)
    for user, pw in users.items():
        subprocess.run([tool, "-b", str(path), user, pw], check=True, capture_output=True)
    return path


@dataclass
class Broker:
    """A broker process on ``127.0.0.1:port``; ``stop``/``start`` simulate an outage."""

    port: int = 0
    password_file: Path | None = None
    acl_file: Path | None = None
    kind: str = "auto"  # "mosquitto", "amqtt" or "auto"
    # (ca_file, cert_file, key_file): the listener speaks TLS only; with require_certificate
    # the client must present a certificate the CA signed (mutual TLS).
    tls_files: tuple[Path, Path, Path] | None = None
    require_certificate: bool = False
    workdir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()
        if self.kind == "auto":
            self.kind = "mosquitto" if find_mosquitto() else "amqtt"
        if self.kind == "amqtt" and (self.password_file or self.acl_file or self.tls_files):
            raise ValueError("passwords, ACLs and TLS need Mosquitto (the mosquitto package)")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="edge-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls_files else "mqtt"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        assert self.workdir is not None
        if self.kind == "mosquitto":
            exe = find_mosquitto()
            if exe is None:
                raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
            lines = [
                f"listener {self.port} 127.0.0.1",
                # The controller's persistent session, and the QoS 1 messages queued for it while
                # it is away, must survive a broker restart: a device deletes an alert from its
                # outbox once the broker has it, so the broker must then keep it. Saved on a clean
                # stop and every 2 s.
                "persistence true",
                f"persistence_location {self.workdir}/",
                "autosave_interval 2",
                # Mosquitto's default (1,000 queued per client) drops a fleet's burst.
                "max_queued_messages 100000",
            ]
            if os.geteuid() == 0:
                # Started as root, Mosquitto switches to its own user before it opens its files,
                # which sit in this (private) work folder; stay root instead.
                lines.append("user root")
            if self.password_file is not None:
                lines += ["allow_anonymous false", f"password_file {self.password_file}"]
            else:
                lines.append("allow_anonymous true")
            if self.acl_file is not None:
                lines.append(f"acl_file {self.acl_file}")
            if self.tls_files is not None:
                ca, cert, key = self.tls_files
                lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
                lines.append(f"require_certificate {str(self.require_certificate).lower()}")
            conf = self.workdir / "mosquitto.conf"
            conf.write_text("\n".join(lines) + "\n")
            return [exe, "-c", str(conf)]
        return [sys.executable, "-m", "edge_runtime.fleet.amqtt_broker", str(self.port)]

    def start(self, timeout_s: float = 10.0) -> Broker:
        if self.running:
            return self
        assert self.workdir is not None
        logf = open(self.workdir / f"{self.kind}.log", "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(self._command(), stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        if not wait_for_port(self.port, timeout_s):
            self.stop()
            raise RuntimeError(f"{self.kind} did not listen on port {self.port} in {timeout_s}s")
        log.info("%s broker on 127.0.0.1:%d", self.kind, self.port)
        return self

    def stop(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
