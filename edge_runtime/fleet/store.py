"""The fleet controller's store: devices, alerts, label requests and shared adaptors.

One schema and one set of queries serve two backends, chosen by URL:

- ``sqlite:///relative/path.sqlite`` or ``sqlite:////absolute/path.sqlite`` (SQLAlchemy's
  spelling): one file, WAL journal, ``synchronous=NORMAL`` and a busy timeout, for a single
  controller on one machine;
- ``postgresql://user:pass@host:port/db``: psycopg 3, for several controllers sharing one
  subscription (``$share/...``) and one database.

Queries are written once with ``?`` placeholders and adapted to psycopg's ``%s``; the only
dialect feature used beyond SQL-92 is ``INSERT ... ON CONFLICT``, which both backends speak.
Alerts are keyed on ``(device_id, seq)``: a device's ``seq`` is strictly increasing across
restarts, so a QoS 1 redelivery or an outbox replay lands on the same key and is dropped, and
the store holds every alert exactly once.

A store object holds one connection guarded by a lock, so it can be shared between threads;
the controller writes from one writer thread in batches (:meth:`FleetStore.add_alerts`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from edge_runtime.errors import InputError
from edge_runtime.fleet.payloads import Envelope, PayloadError

#: Bumped when a table changes; stored in ``fleet_meta`` so a newer schema is refused.
STORE_SCHEMA_VERSION = 1

#: Alert types that open a drift episode (the ones adaptor sharing reacts to).
DRIFT_TYPES = ("drift", "novel_class")

SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS fleet_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # status_seq orders births: a retained birth re-delivered after a newer one must not win.
    """CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY,
        online INTEGER NOT NULL DEFAULT 0,
        bd_seq BIGINT,
        status_seq BIGINT,
        birth TEXT,
        encoder_hash TEXT,
        last_seen DOUBLE PRECISION,
        last_heartbeat DOUBLE PRECISION,
        telemetry TEXT)""",
    """CREATE TABLE IF NOT EXISTS alerts (
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        type TEXT NOT NULL,
        frame BIGINT,
        time DOUBLE PRECISION NOT NULL,
        lifecycle TEXT,
        phase TEXT,
        body TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device_id, seq))""",
    "CREATE INDEX IF NOT EXISTS alerts_type ON alerts (type, device_id)",
    """CREATE TABLE IF NOT EXISTS label_requests (
        device_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        frames TEXT NOT NULL,
        thumbnails TEXT NOT NULL,
        body TEXT NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        answered INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (device_id, request_id))""",
    """CREATE TABLE IF NOT EXISTS adaptors (
        device_id TEXT NOT NULL,
        domain BIGINT NOT NULL,
        version BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        encoder_hash TEXT NOT NULL,
        signature TEXT NOT NULL,
        lifecycle TEXT,
        bundle TEXT NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device_id, domain, version))""",
    "CREATE INDEX IF NOT EXISTS adaptors_encoder ON adaptors (encoder_hash)",
    # One row per drift episode of the target: an adaptor is offered once, however often the
    # drift alert is redelivered or however many controllers see it.
    """CREATE TABLE IF NOT EXISTS offers (
        target_device TEXT NOT NULL,
        lifecycle TEXT NOT NULL,
        source_device TEXT NOT NULL,
        source_domain BIGINT NOT NULL,
        version BIGINT NOT NULL,
        similarity DOUBLE PRECISION,
        time DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (target_device, lifecycle))""",
)

# ------------------------------------------------------------------------------------- queries
# Written once with "?" placeholders; FleetStore._sql adapts them for psycopg.

_TOUCH_DEVICE = """INSERT INTO devices (device_id, last_seen) VALUES (?, ?)
    ON CONFLICT (device_id) DO UPDATE SET last_seen = CASE
        WHEN excluded.last_seen > COALESCE(devices.last_seen, 0) THEN excluded.last_seen
        ELSE devices.last_seen END"""

_INSERT_ALERT = """INSERT INTO alerts
    (device_id, seq, type, frame, time, lifecycle, phase, body, received_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"""

_SET_BIRTH = """INSERT INTO devices
    (device_id, online, bd_seq, status_seq, birth, encoder_hash, last_seen)
    VALUES (?, 1, ?, ?, ?, ?, ?)
    ON CONFLICT (device_id) DO UPDATE SET online = 1, bd_seq = excluded.bd_seq,
        status_seq = excluded.status_seq, birth = excluded.birth,
        encoder_hash = excluded.encoder_hash,
        last_seen = CASE WHEN excluded.last_seen > COALESCE(devices.last_seen, 0)
            THEN excluded.last_seen ELSE devices.last_seen END
    WHERE devices.status_seq IS NULL OR devices.status_seq <= excluded.status_seq"""

# A Last Will carries the bd_seq of the session that set it; after a reconnect the device has
# a new bd_seq, and the old session's Will (delivered late) must not mark it offline.
_SET_DEATH = "UPDATE devices SET online = 0 WHERE device_id = ? AND bd_seq = ?"

_SET_HEARTBEAT = """INSERT INTO devices (device_id, last_heartbeat, telemetry, last_seen)
    VALUES (?, ?, ?, ?)
    ON CONFLICT (device_id) DO UPDATE SET last_heartbeat = excluded.last_heartbeat,
        telemetry = excluded.telemetry,
        last_seen = CASE WHEN excluded.last_seen > COALESCE(devices.last_seen, 0)
            THEN excluded.last_seen ELSE devices.last_seen END
    WHERE devices.last_heartbeat IS NULL OR devices.last_heartbeat <= excluded.last_heartbeat"""

_INSERT_LABEL_REQUEST = """INSERT INTO label_requests
    (device_id, request_id, seq, frames, thumbnails, body, time) VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT DO NOTHING"""

_INSERT_ADAPTOR = """INSERT INTO adaptors
    (device_id, domain, version, sha256, encoder_hash, signature, lifecycle, bundle, time)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (device_id, domain, version) DO UPDATE SET
        sha256 = excluded.sha256, signature = excluded.signature, bundle = excluded.bundle,
        lifecycle = excluded.lifecycle, time = excluded.time
    WHERE adaptors.time < excluded.time"""

_INSERT_OFFER = """INSERT INTO offers
    (target_device, lifecycle, source_device, source_domain, version, similarity, time)
    VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"""

_ADAPTOR_COLUMNS = "device_id, domain, version, sha256, encoder_hash, signature, lifecycle, time"

# {where} narrows it to one device; the alerts_type index serves the inner query.
_LAST_DRIFT = (
    "SELECT a.device_id, a.seq, a.type, a.time, a.lifecycle FROM alerts a "
    "JOIN (SELECT device_id, MAX(seq) AS seq FROM alerts "
    f"WHERE type IN ({', '.join('?' for _ in DRIFT_TYPES)}){{where}} GROUP BY device_id) m "
    "ON a.device_id = m.device_id AND a.seq = m.seq"
)


class StoreURLError(InputError):
    """A store URL that names no backend, no path, or a database that cannot be opened."""


def default_store_url() -> str:
    """SQLite under the user's data directory: ``$XDG_DATA_HOME`` or ``~/.local/share``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    path = Path(base).expanduser() / "edge_runtime" / "fleet.sqlite"
    return f"sqlite:///{path}"


def redact(url: str) -> str:
    """The URL with its password replaced, fit for an error message or a log line."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(url: str) -> FleetStore:
    """Open (and create the schema of) the store at ``url``; StoreURLError says what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise StoreURLError("empty store URL; use sqlite:///PATH or postgresql://USER:PASS@HOST/DB")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        return FleetStore(_connect_sqlite(url), "sqlite", url)
    if scheme in ("postgresql", "postgres"):
        return FleetStore(_connect_postgres(url), "postgresql", url)
    raise StoreURLError(
        f"store URL {redact(url)!r}: unknown scheme {scheme or '(none)'!r}; "
        "use sqlite:///PATH or postgresql://USER:PASS@HOST/DB"
    )


def _connect_sqlite(url: str) -> sqlite3.Connection:
    head = "sqlite:///"
    if not url.startswith(head) or len(url) == len(head):
        raise StoreURLError(
            f"store URL {url!r}: SQLite URLs are sqlite:///relative/path or "
            "sqlite:////absolute/path"
        )
    name = url[len(head) :]
    if name != ":memory:":
        path = Path(name).expanduser()
        if path.is_dir():
            raise StoreURLError(f"store URL {url!r}: {path} is a directory, not a database file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreURLError(f"store URL {url!r}: cannot create {path.parent}: {exc}") from None
        name = str(path)
    try:
        # isolation_level=None: transactions are explicit (FleetStore._tx), never implicit.
        conn = sqlite3.connect(name, timeout=10.0, isolation_level=None, check_same_thread=False)
        # WAL lets readers (a dashboard, the benchmark) run while the writer commits; NORMAL
        # fsyncs at checkpoints only, which WAL keeps consistent (a crash may lose the last
        # commits, never corrupt the file) and which makes small batched commits cheap.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
    except sqlite3.Error as exc:
        raise StoreURLError(f"store URL {url!r}: cannot open SQLite database: {exc}") from None
    return conn


def _connect_postgres(url: str) -> Any:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency of the fleet extra
        raise StoreURLError(
            f"store URL {redact(url)!r} needs psycopg 3 (pip install 'psycopg[binary]')"
        ) from None
    try:
        # autocommit: every write goes through an explicit transaction block (FleetStore._tx),
        # and reads do not leave an idle transaction open between calls.
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except (psycopg.Error, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreURLError(f"store URL {redact(url)!r}: cannot connect: {msg}") from None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _require(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise PayloadError(f"{what}: body field {name!r} is missing or has the wrong type")
    return value


class FleetStore:
    """Devices, alerts, label requests, adaptors and offers in SQLite or PostgreSQL."""

    def __init__(self, conn: Any, backend: str, url: str) -> None:
        self._conn = conn
        self.backend = backend
        self.url = redact(url)
        self._lock = threading.RLock()
        self._closed = False
        self._create_schema()

    def __repr__(self) -> str:
        return f"FleetStore({self.url!r})"

    # --------------------------------------------------------------------------- plumbing

    def _sql(self, query: str) -> str:
        return query if self.backend == "sqlite" else query.replace("?", "%s")

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """One transaction on the store's connection, under its lock; a cursor inside."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self.backend == "sqlite":
                cur = self._conn.cursor()
                # IMMEDIATE takes the write lock up front, so a second writer waits on the busy
                # timeout instead of failing half-way with SQLITE_BUSY on upgrade.
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
            else:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    yield cur

    def _query(self, query: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            cur = self._conn.cursor()
            try:
                cur.execute(self._sql(query), tuple(params))
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            finally:
                cur.close()

    def _create_schema(self) -> None:
        with self._tx() as cur:
            if self.backend == "postgresql":
                # CREATE TABLE IF NOT EXISTS races in PostgreSQL when two controllers start at
                # once (a unique violation on pg_type); the advisory lock serialises them.
                cur.execute("SELECT pg_advisory_xact_lock(7313370001)")
            for statement in SCHEMA:
                cur.execute(statement)
            cur.execute(
                self._sql(
                    "INSERT INTO fleet_meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING"
                ),
                ("schema_version", str(STORE_SCHEMA_VERSION)),
            )
            cur.execute(
                self._sql("SELECT value FROM fleet_meta WHERE key = ?"), ("schema_version",)
            )
            found = int(cur.fetchone()[0])
        if found != STORE_SCHEMA_VERSION:
            raise StoreURLError(
                f"store {self.url!r} has fleet schema {found}; this controller speaks "
                f"{STORE_SCHEMA_VERSION}"
            )

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> FleetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- alerts

    def add_alerts(self, rows: Sequence[Envelope], received_at: float | None = None) -> int:
        """Insert alerts in one transaction; returns how many were new (not duplicates)."""
        if not rows:
            return 0
        now = time.time() if received_at is None else received_at
        params = []
        last_seen: dict[str, float] = {}
        for env in rows:
            body = env.body
            kind = body.get("type")
            params.append(
                (
                    env.device_id,
                    env.seq,
                    kind if isinstance(kind, str) else env.type,
                    _int_or_none(body.get("frame")),
                    env.time,
                    str(body["lifecycle"]) if body.get("lifecycle") is not None else None,
                    str(body["phase"]) if body.get("phase") is not None else None,
                    _dumps(body),
                    now,
                )
            )
            last_seen[env.device_id] = max(env.time, last_seen.get(env.device_id, env.time))
        # Sorted keys: two controllers writing overlapping devices into one PostgreSQL take row
        # locks in the same order, so they cannot deadlock.
        params.sort(key=lambda p: (p[0], p[1]))
        with self._tx() as cur:
            cur.executemany(self._sql(_TOUCH_DEVICE), sorted(last_seen.items()))
            before = self._changes(cur)
            cur.executemany(self._sql(_INSERT_ALERT), params)
            inserted = self._changes(cur) - before if self.backend == "sqlite" else cur.rowcount
        return int(inserted)

    def _changes(self, cur: Any) -> int:
        # sqlite3's executemany rowcount is unreliable across versions with upserts; the
        # connection's running total of changed rows is exact.
        if self.backend != "sqlite":
            return 0
        cur.execute("SELECT total_changes()")
        return int(cur.fetchone()[0])

    def alerts(
        self,
        device_id: str | None = None,
        limit: int | None = None,
        *,
        types: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Alerts ordered by ``(device_id, seq)``, ``body`` decoded."""
        query = (
            "SELECT device_id, seq, type, frame, time, lifecycle, phase, body, received_at "
            "FROM alerts"
        )
        where, params = [], []
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if types:
            where.append(f"type IN ({', '.join('?' for _ in types)})")
            params.extend(types)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY device_id, seq"
        if limit is not None:
            query += " LIMIT ?"
            params.append(int(limit))
        rows = self._query(query, params)
        for row in rows:
            row["body"] = json.loads(row["body"])
        return rows

    def alert_counts(self) -> tuple[int, int]:
        """``(rows, distinct (device_id, seq))`` in the alerts table: equal unless broken."""
        rows = self._query(
            "SELECT COUNT(*) AS n, COUNT(DISTINCT device_id || '/' || CAST(seq AS TEXT)) AS d "
            "FROM alerts"
        )
        return int(rows[0]["n"]), int(rows[0]["d"])

    # ---------------------------------------------------------------------------- devices

    def set_birth(self, env: Envelope) -> bool:
        """Record a birth (status ``online``); False if a newer birth is already stored."""
        body = env.body
        hash_ = body.get("encoder_hash")
        with self._tx() as cur:
            cur.execute(
                self._sql(_SET_BIRTH),
                (
                    env.device_id,
                    _int_or_none(body.get("bd_seq")),
                    env.seq,
                    _dumps(body),
                    hash_ if isinstance(hash_, str) else None,
                    env.time,
                ),
            )
            return bool(cur.rowcount)

    def set_death(self, device_id: str, bd_seq: int | None) -> bool:
        """Mark the device offline if ``bd_seq`` is its current birth's; a stale Will is not."""
        if bd_seq is None:
            return False
        with self._tx() as cur:
            cur.execute(self._sql(_SET_DEATH), (device_id, int(bd_seq)))
            return bool(cur.rowcount)

    def set_heartbeat(self, env: Envelope) -> None:
        with self._tx() as cur:
            cur.execute(
                self._sql(_SET_HEARTBEAT),
                (env.device_id, env.time, _dumps(env.body), env.time),
            )

    def device(self, device_id: str) -> dict[str, Any] | None:
        found = self.devices(device_id)
        return found[0] if found else None

    def devices(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """Every device seen (or one), with its birth's domains, its last drift and its adaptor
        count."""
        where, params = ("", ()) if device_id is None else (" WHERE device_id = ?", (device_id,))
        rows = self._query(
            "SELECT device_id, online, bd_seq, birth, encoder_hash, last_seen, last_heartbeat, "
            f"telemetry FROM devices{where} ORDER BY device_id",
            params,
        )
        drift_where = "" if device_id is None else " AND device_id = ?"
        drifts = {
            r["device_id"]: r
            for r in self._query(_LAST_DRIFT.format(where=drift_where), (*DRIFT_TYPES, *params))
        }
        counts = {
            r["device_id"]: int(r["n"])
            for r in self._query(
                f"SELECT device_id, COUNT(*) AS n FROM adaptors{where} GROUP BY device_id", params
            )
        }
        for row in rows:
            birth = json.loads(row["birth"]) if row["birth"] else None
            row["online"] = bool(row["online"])
            row["birth"] = birth
            row["telemetry"] = json.loads(row["telemetry"]) if row["telemetry"] else None
            domains = birth.get("domains") if isinstance(birth, dict) else None
            row["domains"] = domains if isinstance(domains, list) else []
            drift = drifts.get(row["device_id"])
            row["last_drift"] = (
                {k: drift[k] for k in ("seq", "type", "time", "lifecycle")} if drift else None
            )
            row["adaptors"] = counts.get(row["device_id"], 0)
        return rows

    # --------------------------------------------------------------------- label requests

    def add_label_request(self, env: Envelope) -> bool:
        """Store a label request; False if ``(device_id, request_id)`` is already stored."""
        body = env.body
        what = f"label request from {env.device_id!r}"
        request_id = _require(body, "request_id", str, what)
        frames = _require(body, "frames", list, what)
        thumbnails = body.get("thumbnails", [])
        if not isinstance(thumbnails, list):
            raise PayloadError(f"{what}: body field 'thumbnails' must be a list")
        with self._tx() as cur:
            cur.execute(self._sql(_TOUCH_DEVICE), (env.device_id, env.time))
            cur.execute(
                self._sql(_INSERT_LABEL_REQUEST),
                (
                    env.device_id,
                    request_id,
                    env.seq,
                    _dumps(frames),
                    _dumps(thumbnails),
                    _dumps(body),
                    env.time,
                ),
            )
            return bool(cur.rowcount)

    def _label_rows(self, where: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT device_id, request_id, seq, frames, thumbnails, body, time, answered "
            f"FROM label_requests {where} ORDER BY device_id, seq",
            params,
        )
        for row in rows:
            row["frames"] = json.loads(row["frames"])
            row["thumbnails"] = json.loads(row["thumbnails"])
            row["body"] = json.loads(row["body"])
            row["answered"] = bool(row["answered"])
        return rows

    def label_request(self, device_id: str, request_id: str) -> dict[str, Any] | None:
        rows = self._label_rows("WHERE device_id = ? AND request_id = ?", (device_id, request_id))
        return rows[0] if rows else None

    def label_requests(
        self, device_id: str | None = None, unanswered: bool = False
    ) -> list[dict[str, Any]]:
        where, params = [], []
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if unanswered:
            where.append("answered = 0")
        return self._label_rows(("WHERE " + " AND ".join(where)) if where else "", params)

    def mark_answered(self, device_id: str, request_id: str) -> bool:
        """Mark a label request answered; False if there is no such request."""
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "UPDATE label_requests SET answered = 1 WHERE device_id = ? AND request_id = ?"
                ),
                (device_id, request_id),
            )
            return bool(cur.rowcount)

    # ---------------------------------------------------------------------------- adaptors

    def add_adaptor(self, env: Envelope) -> bool:
        """Store a shared adaptor bundle; False if this (device, domain, version) is stored
        with a bundle at least as new. A domain's version is exported twice: when it is
        installed (its initialised head) and when its head is trained; the newer replaces the
        older, and a redelivered older message changes nothing."""
        body = env.body
        what = f"adaptor from {env.device_id!r}"
        domain = _require(body, "domain", int, what)
        version = body.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise PayloadError(f"{what}: body field 'version' must be an integer")
        lifecycle = body.get("lifecycle")
        with self._tx() as cur:
            cur.execute(self._sql(_TOUCH_DEVICE), (env.device_id, env.time))
            cur.execute(
                self._sql(_INSERT_ADAPTOR),
                (
                    env.device_id,
                    domain,
                    version,
                    _require(body, "sha256", str, what),
                    _require(body, "encoder_hash", str, what),
                    _require(body, "signature", str, what),
                    str(lifecycle) if lifecycle is not None else None,
                    _require(body, "bundle", str, what),
                    env.time,
                ),
            )
            return bool(cur.rowcount)

    def adaptors(
        self, encoder_hash: str | None = None, *, with_bundle: bool = False
    ) -> list[dict[str, Any]]:
        """Stored adaptors (newest first), optionally for one encoder; bundles only on request,
        since each can be megabytes and matching needs only the signatures."""
        columns = _ADAPTOR_COLUMNS + (", bundle" if with_bundle else "")
        query = f"SELECT {columns} FROM adaptors"
        params: list[Any] = []
        if encoder_hash is not None:
            query += " WHERE encoder_hash = ?"
            params.append(encoder_hash)
        return self._query(query + " ORDER BY time DESC, device_id, domain, version", params)

    def adaptor(self, device_id: str, domain: int, version: int) -> dict[str, Any] | None:
        """One adaptor with its bundle."""
        rows = self._query(
            f"SELECT {_ADAPTOR_COLUMNS}, bundle FROM adaptors "
            "WHERE device_id = ? AND domain = ? AND version = ?",
            (device_id, domain, version),
        )
        return rows[0] if rows else None

    def record_offer(
        self,
        target_device: str,
        lifecycle: str,
        source_device: str,
        source_domain: int,
        version: int,
        *,
        similarity: float | None = None,
        time_s: float | None = None,
    ) -> bool:
        """Note that an adaptor is offered for this drift episode; False if one already was."""
        with self._tx() as cur:
            cur.execute(
                self._sql(_INSERT_OFFER),
                (
                    target_device,
                    lifecycle,
                    source_device,
                    source_domain,
                    version,
                    similarity,
                    time.time() if time_s is None else time_s,
                ),
            )
            return bool(cur.rowcount)

    def offers(self, target_device: str | None = None) -> list[dict[str, Any]]:
        query = (
            "SELECT target_device, lifecycle, source_device, source_domain, version, similarity, "
            "time FROM offers"
        )
        params: list[Any] = []
        if target_device is not None:
            query += " WHERE target_device = ?"
            params.append(target_device)
        return self._query(query + " ORDER BY target_device, time", params)
