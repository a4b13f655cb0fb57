"""sd_notify against a real unix datagram socket bound by the test (path and abstract)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from edge_runtime.serving.sdnotify import SdNotify


def _recv(sock: socket.socket) -> str:
    sock.settimeout(2.0)
    return sock.recv(4096).decode()


def test_ready_status_watchdog_over_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        n = SdNotify(path)
        assert n.enabled
        assert n.ready("serving 2 source(s)")
        assert _recv(sock) == "READY=1\nSTATUS=serving 2 source(s)"
        assert n.watchdog(force=True)
        assert _recv(sock) == "WATCHDOG=1"
        assert not n.watchdog()  # rate-limited: a second ping right away is not sent
        assert n.status("stopped: max_frames")
        assert _recv(sock) == "STATUS=stopped: max_frames"
        n.close()


def test_abstract_socket_name_with_at_sign() -> None:
    name = f"edge-runtime-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        n = SdNotify("@" + name)
        assert n.ready()
        assert _recv(sock) == "READY=1"
        n.close()


def test_no_socket_is_a_no_op_and_a_dead_socket_does_not_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not SdNotify().enabled and not SdNotify().ready()
    n = SdNotify(str(tmp_path / "nobody-listens.sock"))
    assert not n.ready()  # logged, not raised: serving must not die with systemd


def test_watchdog_interval_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert SdNotify("").watchdog_s == 20.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert SdNotify("").watchdog_s is None
