"""Active-learning capture: frames worth labelling later, in a bounded on-disk ring.

Two kinds of frame are kept, as PNGs in ``DIR/capture/ring/`` indexed in SQLite
(``index.sqlite``, WAL, so a labelling tool can read it while serving writes):

* ``drift``: the ``around`` frames before a drift or novel-class flag (from a small in-memory
  ring of recent frames: by the time the monitor flags, they have been served) and the
  ``around`` frames after it. These are the frames that show what changed;
* ``low_confidence``: frames whose calibrated OOD score is within ``margin`` of the threshold
  (0): the ones the detector was least sure about.

Bounds, so a device left alone for months cannot fill its disk or spend its CPU on PNGs:
at most ``per_minute`` and ``per_hour`` frames of each reason written (over the last 60 s and
3,600 s; frames over the cap are counted, not written: each reason has its own count, so a
stream of low-confidence frames cannot use up the cap before the frames of a drift arrive),
and at most ``max_files`` files and
``max_bytes`` bytes (the oldest are deleted, row and file together). :func:`list_capture`
lists what is there to build a labelling batch.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.errors import InputError
from edge_runtime.fleet.thumbnails import encode_png
from edge_runtime.state.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from edge_runtime.runner.loop import ServedBatch
    from edge_runtime.serving.mux import FrameOrigin

INDEX = "index.sqlite"
DRIFT, LOW_CONFIDENCE = "drift", "low_confidence"
REASONS = (DRIFT, LOW_CONFIDENCE)
FLAG_EVENTS = ("drift", "novel_class")
KEPT_MEMORY = 1024  # frames remembered as written (far more than one flag's neighbourhood)

_SCHEMA = """CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    frame_id INTEGER NOT NULL,
    source TEXT,
    source_frame INTEGER,
    time REAL NOT NULL,
    reason TEXT NOT NULL,
    score REAL,
    domain INTEGER,
    flag_frame INTEGER,
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL)"""


@dataclass(frozen=True)
class RingConfig:
    """What the capture ring keeps; ``edge-runtime serve --capture-*`` sets these."""

    around: int = 8  # frames kept before and after each drift flag (0: none)
    margin: float | None = 0.02  # |calibrated score| below this is low confidence; None: off
    per_minute: int = 30
    per_hour: int = 600
    max_files: int = 5_000
    max_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        for name in ("around", "per_minute", "per_hour", "max_files", "max_bytes"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"capture ring: {name} must be >= 0, got {getattr(self, name)}")
        if self.margin is not None and not self.margin > 0:
            raise InputError(f"capture ring: margin must be > 0 or None, got {self.margin}")


@dataclass(frozen=True)
class CapturedFrame:
    """One row of the index (``path`` is absolute)."""

    id: int
    frame_id: int
    source: str | None
    source_frame: int | None
    time: float
    reason: str
    score: float | None
    domain: int | None
    flag_frame: int | None
    path: str
    bytes: int


@dataclass
class _Recent:
    frame_id: int
    image: np.ndarray
    score: float
    domain: int
    origin: FrameOrigin | None


@dataclass
class RingCounts:
    captured: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    rate_limited: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    evicted: int = 0
    files: int = 0
    bytes: int = 0


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses at most a last row
    db.execute(_SCHEMA)
    db.execute("CREATE INDEX IF NOT EXISTS frames_time ON frames(time)")
    return db


class CaptureRing:
    """Serve-loop observer that writes the ring; see the module docstring."""

    def __init__(
        self,
        root: str | Path,
        config: RingConfig | None = None,
        *,
        origin: Callable[[int], FrameOrigin | None] = lambda i: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = config if config is not None else RingConfig()
        self.origin = origin
        self.clock = clock
        self.db = _connect(self.root / INDEX)
        self.counts = RingCounts()
        files, size = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM frames"
        ).fetchone()
        self.counts.files, self.counts.bytes = int(files), int(size)
        # Frames of the last few batches: a flag comes after the frames that caused it.
        self._recent: deque[_Recent] = deque(maxlen=max(1, self.config.around))
        self._after: list[tuple[int, int]] = []  # (flag frame, last frame to keep)
        # Recently written frames -> (row id, reason): a frame is written once; one kept as
        # low-confidence that turns out to precede a flag is relabelled drift in place.
        self._kept: dict[int, tuple[int, str]] = {}
        self._windows = {reason: (deque[float](), deque[float]()) for reason in REASONS}

    # ------------------------------------------------------------------ observer
    def __call__(self, item: ServedBatch) -> None:
        cfg = self.config
        dec = item.decisions
        flags = [int(e["frame"]) for e in item.events if e.get("type") in FLAG_EVENTS]
        images = np.asarray(item.batch.images)
        batch: list[_Recent] = []
        for j, i in enumerate(item.batch.indices.tolist()):
            if dec.rejected[j]:
                continue
            batch.append(
                _Recent(int(i), images[j], float(dec.ood_score[j]), int(dec.domain[j]), None)
            )
        if cfg.around > 0:
            for f in flags:
                self._after.append((f, f + cfg.around))
                for r in (*self._recent, *batch):
                    if f - cfg.around <= r.frame_id < f:
                        self._keep(r, DRIFT, f)
        for r in batch:
            flag = next((f for f, last in self._after if f <= r.frame_id <= last), None)
            if flag is not None:
                self._keep(r, DRIFT, flag)
            elif cfg.margin is not None and abs(r.score) < cfg.margin:
                self._keep(r, LOW_CONFIDENCE, None)
        self._after = [(f, last) for f, last in self._after if last > int(item.batch.indices[-1])]
        for r in batch[-self._recent.maxlen :] if self._recent.maxlen else ():
            # Only what a later flag may need is copied: the batch array is the loop's.
            r.image = np.array(r.image, copy=True)
            r.origin = self.origin(r.frame_id)
            self._recent.append(r)

    # ------------------------------------------------------------------ writing
    def _allowed(self, reason: str, now: float) -> bool:
        minute, hour = self._windows[reason]
        for window, span, cap in (
            (minute, 60.0, self.config.per_minute),
            (hour, 3600.0, self.config.per_hour),
        ):
            while window and window[0] <= now - span:
                window.popleft()
            if len(window) >= cap:
                return False
        return True

    def _keep(self, r: _Recent, reason: str, flag: int | None) -> None:
        seen = self._kept.get(r.frame_id)
        if seen is not None:
            if seen[1] == LOW_CONFIDENCE and reason == DRIFT:
                self.db.execute(
                    "UPDATE frames SET reason = ?, flag_frame = ? WHERE id = ?",
                    (DRIFT, flag, seen[0]),
                )
                self._kept[r.frame_id] = (seen[0], DRIFT)
            return
        now = self.clock()
        if not self._allowed(reason, now):
            self.counts.rate_limited[reason] += 1
            return
        for window in self._windows[reason]:
            window.append(now)
        o = r.origin if r.origin is not None else self.origin(r.frame_id)
        png = encode_png(r.image)
        name = f"{int(now * 1000):013d}-{r.frame_id:08d}.png"
        atomic_write_bytes(self.root / name, png)
        cur = self.db.execute(
            "INSERT INTO frames (frame_id, source, source_frame, time, reason, score, domain, "
            "flag_frame, path, bytes) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                r.frame_id,
                None if o is None else o.source,
                None if o is None else int(o.number),
                now,
                reason,
                r.score if np.isfinite(r.score) else None,
                r.domain if r.domain >= 0 else None,
                flag,
                name,
                len(png),
            ),
        )
        self._kept[r.frame_id] = (int(cur.lastrowid or 0), reason)
        while len(self._kept) > KEPT_MEMORY:
            del self._kept[next(iter(self._kept))]  # oldest first (dicts keep insertion order)
        self.counts.captured[reason] += 1
        self.counts.files += 1
        self.counts.bytes += len(png)
        self._evict()

    def _evict(self) -> None:
        """Oldest first until both the file and the byte cap hold again."""
        cfg = self.config
        while self.counts.files > cfg.max_files or self.counts.bytes > cfg.max_bytes:
            row = self.db.execute(
                "SELECT id, path, bytes FROM frames ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return
            rid, name, size = row
            (self.root / name).unlink(missing_ok=True)
            self.db.execute("DELETE FROM frames WHERE id = ?", (rid,))
            self.counts.files -= 1
            self.counts.bytes -= int(size)
            self.counts.evicted += 1

    def summary(self) -> dict[str, Any]:
        return {"dir": str(self.root), **asdict(self.counts)}

    def close(self) -> None:
        self.db.close()


def _index_of(path: str | Path) -> Path:
    """The index for a serve output DIR, its ``capture/ring`` folder, or the file itself."""
    p = Path(path)
    for cand in (p, p / INDEX, p / "capture" / "ring" / INDEX):
        if cand.is_file():
            return cand
    raise InputError(f"no capture index ({INDEX}) at {p}, {p}/{INDEX} or {p}/capture/ring/")


def list_capture(
    path: str | Path, reason: str | None = None, since: float | None = None
) -> list[CapturedFrame]:
    """The captured frames, oldest first; ``reason`` (drift or low_confidence) and ``since``
    (Unix time) filter. Opens the index read-only, so it is safe while serving writes."""
    if reason is not None and reason not in REASONS:
        raise InputError(f"reason must be one of {', '.join(REASONS)}, got {reason!r}")
    index = _index_of(path)
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        sql, args = "SELECT * FROM frames WHERE 1=1", []
        if reason is not None:
            sql, args = sql + " AND reason = ?", [*args, reason]
        if since is not None:
            sql, args = sql + " AND time >= ?", [*args, float(since)]
        rows = db.execute(sql + " ORDER BY id", args).fetchall()
    finally:
        db.close()
    out = []
    for row in rows:
        rec = CapturedFrame(*row)
        out.append(CapturedFrame(**{**asdict(rec), "path": str(index.parent / rec.path)}))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_runtime.serving.ring DIR [--reason R] [--since T]``: JSON lines."""
    p = argparse.ArgumentParser(
        prog="python -m edge_runtime.serving.ring", description=main.__doc__
    )
    p.add_argument("dir", help="serve --out DIR, or its capture/ring folder")
    p.add_argument("--reason", choices=REASONS)
    p.add_argument("--since", type=float, metavar="UNIX_TIME")
    args = p.parse_args(argv)
    for rec in list_capture(args.dir, args.reason, args.since):
        sys.stdout.write(json.dumps(asdict(rec)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
