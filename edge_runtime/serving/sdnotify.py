"""systemd's sd_notify protocol, the few lines of it a service needs, with no dependency.

systemd passes a unix datagram socket in ``$NOTIFY_SOCKET`` (a path, or an abstract socket
name written with a leading ``@``); the service sends ``KEY=VALUE`` lines to it: ``READY=1``
once it serves (``Type=notify``), ``WATCHDOG=1`` at least every ``WatchdogSec`` (systemd
restarts a service that stops sending), and ``STATUS=...`` for ``systemctl status``. Outside
systemd there is no socket and every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class SdNotify:
    """A connection to ``$NOTIFY_SOCKET`` (or ``address``); all sends are best effort."""

    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = addr
        self._sock: socket.socket | None = None
        if addr:
            # Abstract names ("@name") live in the kernel, not on disk: a leading NUL byte.
            self._target = "\0" + addr[1:] if addr.startswith("@") else addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.watchdog_s = _watchdog_interval()
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``lines``; False (logged once per failure) if it did not go."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode("utf-8"), self._target)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self, *, force: bool = False) -> bool:
        """``WATCHDOG=1``, at most every half watchdog interval (systemd's advice) unless
        ``force``; call it as often as convenient from the serving loop."""
        now = time.monotonic()
        interval = self.watchdog_s / 2 if self.watchdog_s else 1.0
        if not force and now - self._last_ping < interval:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval() -> float | None:
    """``$WATCHDOG_USEC`` in seconds when it is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None
