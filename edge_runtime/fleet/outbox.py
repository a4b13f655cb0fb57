"""The device's durable store-and-forward queue: every message bound for the fleet is a row here
until the broker has acknowledged it.

One SQLite file per device (``<outbox_dir>/<device_id>.sqlite``) in WAL mode with
``synchronous=FULL``: a ``put`` that returned has been fsynced, so a power cut cannot lose it.
Each row is a whole :class:`~edge_runtime.fleet.payloads.Envelope` JSON with its ``seq``; the
controller de-duplicates on ``(device_id, seq)``, so a row published twice (a PUBACK lost to a
disconnect) is stored once.

Sequence numbers come from a persisted counter, not from ``MAX(seq)``: deleting acknowledged or
dropped rows never lets a seq be reused, across any number of restarts.

Bound: when a ``put`` would push the outbox past ``max_messages`` rows, the oldest rows are
dropped (a device offline for days keeps its *newest* history) and an ``outbox_dropped`` alert
is stored first, naming how many rows went and their seq range, so the loss itself reaches the
controller. At least a tenth of the bound is dropped at a time, so a full outbox does not write
one drop alert per message.

A corrupt file (not a database, or failing ``PRAGMA quick_check``) is, by default, moved aside
to ``<name>.corrupt-<unix time>`` and a fresh outbox started; :attr:`Outbox.recovered_from`
names the moved file so the owner can emit an error event. The fresh outbox's seq counter
starts at the current time in microseconds, above any seq the lost file can have used, so the
controller's de-dup never mistakes new messages for old ones. ``on_corrupt="raise"`` raises
:class:`OutboxCorruptError` instead.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.fleet.payloads import ALERTS, CHANNELS, Envelope

log = logging.getLogger(__name__)

#: The alert type stored when rows had to be dropped to stay within the bound.
OUTBOX_DROPPED = "outbox_dropped"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    payload TEXT NOT NULL
);
"""

Body = dict[str, Any] | Callable[[int], dict[str, Any]]


class OutboxCorruptError(EdgeRuntimeError):
    """The outbox file is not a readable SQLite database; the message names the file."""


class Outbox:
    """Durable, bounded, thread-safe FIFO of envelopes (see the module docstring).

    Thread contract: every method may be called from any thread; one lock serialises them over
    one connection (the serving thread puts, the network thread acks).
    """

    def __init__(
        self,
        path: str | Path,
        device_id: str,
        max_messages: int = 100_000,
        clock: Callable[[], float] = time.time,
        on_corrupt: Literal["move", "raise"] = "move",
    ) -> None:
        if max_messages < 2:
            # Room for one message and the drop alert that may have to precede it.
            raise ValueError(f"max_messages must be at least 2, got {max_messages}")
        self.path = Path(path).expanduser()
        self.device_id = device_id
        self.max_messages = int(max_messages)
        self.clock = clock
        self.recovered_from: Path | None = None
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if on_corrupt == "raise":
                raise OutboxCorruptError(f"outbox {self.path} is corrupt: {exc}") from None
            self.recovered_from = self._move_aside(exc)
            self._db = self._open()
            # Seqs above anything the lost file used, so the controller's de-dup keeps them.
            base = str(int(self.clock() * 1_000_000))
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (base,))
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('bd_seq', ?)", (base,))

    # ------------------------------------------------------------------------------ opening
    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE) so that a put's seq
        # bump, deletes and insert commit together or not at all.
        db = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
        )
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.DatabaseError(f"cannot use WAL mode (got {mode!r})")
            db.execute("PRAGMA synchronous=FULL")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', '1')")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('bd_seq', '0')")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _move_aside(self, exc: Exception) -> Path:
        dest = self.path.with_name(f"{self.path.name}.corrupt-{int(self.clock())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.replace(Path(str(dest) + suffix))
        log.error(
            "outbox %s is corrupt (%s); moved it to %s and started afresh", self.path, exc, dest
        )
        return dest

    # ------------------------------------------------------------------------------ meta
    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        """A small persisted value (the client keeps its open lifecycle here)."""
        with self._lock:
            return self._meta(key)

    def set_meta(self, key: str, value: str | None) -> None:
        """Set (or, with None, delete) a persisted value, durably."""
        with self._lock, self._db:
            self._set_meta(key, value)

    # ------------------------------------------------------------------------------ queue
    def put(
        self,
        channel: str,
        type: str,
        body: Body,
        *,
        meta: Mapping[str, str | None] | None = None,
    ) -> Envelope:
        """Store one envelope under the next seq, durably, and return it.

        ``body`` may be a callable taking the assigned seq (a one-off alert's lifecycle id names
        its seq). ``meta`` values are written in the same transaction (the client's open
        lifecycle changes atomically with the event that changed it).
        """
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; known: {', '.join(CHANNELS)}")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = int(self._meta("next_seq") or 1)
                count = int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
                if count + 1 > self.max_messages:
                    seq = self._drop_oldest(seq, count)
                env = Envelope(
                    self.device_id,
                    seq,
                    type,
                    body(seq) if callable(body) else body,
                    time=self.clock(),
                )
                self._db.execute(
                    "INSERT INTO messages VALUES (?, ?, ?)", (seq, channel, env.to_json())
                )
                self._set_meta("next_seq", str(seq + 1))
                for key, value in (meta or {}).items():
                    self._set_meta(key, value)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return env

    def _drop_oldest(self, seq: int, count: int) -> int:
        """Drop enough of the oldest rows for the drop alert and one message; store the alert
        under ``seq``; return the seq for the message. Inside put's transaction."""
        n = max(count + 2 - self.max_messages, self.max_messages // 10)
        n = min(n, count)
        first, last = self._db.execute(
            "SELECT MIN(seq), MAX(seq) FROM (SELECT seq FROM messages ORDER BY seq LIMIT ?)",
            (n,),
        ).fetchone()
        self._db.execute(
            "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages ORDER BY seq LIMIT ?)",
            (n,),
        )
        now = self.clock()
        body = {
            "type": OUTBOX_DROPPED,
            # Not tied to a stream frame: the outbox does not know where the stream is.
            "frame": None,
            "time": now,
            "count": n,
            "first_seq": first,
            "last_seq": last,
            "max_messages": self.max_messages,
            "lifecycle": f"{self.device_id}:{OUTBOX_DROPPED}:{seq}",
            "phase": "end",
        }
        env = Envelope(self.device_id, seq, OUTBOX_DROPPED, body, time=now)
        self._db.execute("INSERT INTO messages VALUES (?, ?, ?)", (seq, ALERTS, env.to_json()))
        log.warning(
            "outbox %s full: dropped %d oldest rows (seq %s..%s)", self.path, n, first, last
        )
        return seq + 1

    def pending(self, limit: int = 100, after: int = 0) -> list[tuple[int, str, str]]:
        """Up to ``limit`` rows ``(seq, channel, payload_json)`` with seq > ``after``, oldest
        first (``after``: the last seq already handed to the network)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, channel, payload FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (int(after), int(limit)),
            ).fetchall()
        return [(int(s), str(c), str(p)) for s, c, p in rows]

    def ack(self, seq: int) -> None:
        """Delete a row the broker has acknowledged (a seq not there is ignored)."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM messages WHERE seq = ?", (int(seq),))

    def ack_many(self, seqs: list[int]) -> None:
        """Delete several acknowledged rows in one transaction (one fsync, not one per row)."""
        if not seqs:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "DELETE FROM messages WHERE seq = ?", [(int(s),) for s in seqs]
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def last_seq(self) -> int:
        """The highest seq assigned so far (0: none); not an allocation."""
        with self._lock:
            return int(self._meta("next_seq") or 1) - 1

    def next_birth_seq(self) -> int:
        """Increment and return the persisted birth/death sequence (one per connection)."""
        with self._lock, self._db:
            value = int(self._meta("bd_seq") or 0) + 1
            self._set_meta("bd_seq", str(value))
        return value

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_payload(payload_json: str) -> dict[str, Any]:
    """A stored row's envelope as a dict (for tools and tests)."""
    return dict(json.loads(payload_json))
