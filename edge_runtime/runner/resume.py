"""Crash-safe runs: periodic run checkpoints, and ``--resume`` from the newest intact one.

A *run checkpoint* (``<out>/checkpoints/ckpt-NNNNNN/``, a
:class:`~edge_runtime.state.series.CheckpointSeries` keeping the last few) is one safetensors +
JSON-manifest checkpoint holding:

* ``runtime``: the whole runtime state (:meth:`Runtime.state_dict`: adaptors and versions,
  HDC memories and thresholds, drift monitor with its window, return detector, label collection
  in progress, the domain signature's window, the stream position);
* ``run``: what the runner had made of the stream so far: the decisions served
  (:class:`~edge_runtime.runner.metrics.ServedCollector`), the labels revealed per flag, how
  many events ``events.jsonl`` holds, the base setup's figures, the serving time so far, and,
  with the fleet on, the outbox's last seq and how many of this run's events it holds.

On resume the runtime and the runner's parts are rebuilt from it, ``events.jsonl`` is cut back
to the checkpoint's event count, and serving continues at the checkpoint's frame. Adaptation
runs synchronously in a checkpointed run (``background=False``), so serving frames ``k..n``
after a resume makes the same decisions and the same events as the uninterrupted run did: the
outputs at the end are those of one run, with no frame served twice and no event lost or
repeated.

The fleet outbox is durable on its own. The events it received after the checkpoint are
emitted again by the replay; :class:`OutboxGuard` drops those from the outbox (each alert row is
stored together with the count of this run's events it holds, in one SQLite transaction), so
the controller's store gets each alert once. Adaptor exports are asked for again; the store
keeps one row per (device, domain, version).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.data.stream import FrameBatch, Stream
from edge_runtime.errors import CheckpointError
from edge_runtime.events import Event
from edge_runtime.state.atomic import atomic_write_text, fsync_file
from edge_runtime.state.checkpoint import IncompatibleCheckpoint
from edge_runtime.state.series import DEFAULT_KEEP, CheckpointSeries

if TYPE_CHECKING:
    from edge_runtime.config.schema import RuntimeConfig
    from edge_runtime.fleet.client import FleetClient
    from edge_runtime.runner.labels import StreamLabels
    from edge_runtime.runner.loop import ServedBatch
    from edge_runtime.runner.metrics import ServedCollector
    from edge_runtime.runtime import Runtime

log = logging.getLogger(__name__)

RUN_KIND = "edge_runtime.run"
RUN_STATE_VERSION = 1
CHECKPOINTS = "checkpoints"
#: Events after which a checkpoint is written at once: the runtime learned something.
ADAPTED = frozenset({"adaptation_finished", "adaptor_trained", "domain_returned"})
#: Outbox meta key: ``{"run": id, "events": n}``, the count of this run's events it holds.
OUTBOX_EVENTS_KEY = "run_events"


def stream_digest(stream: Stream) -> dict[str, Any]:
    """Enough of a stream to tell that a resume is pointed at the same one."""
    import hashlib

    h = hashlib.sha256()
    for arr in (stream.labels, stream.segment):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(np.ascontiguousarray(stream.images[:: max(1, len(stream) // 64)]).tobytes())
    return {"frames": len(stream), "sha256": h.hexdigest()}


def batches_from(images: np.ndarray, start: int, batch_size: int) -> Iterator[FrameBatch]:
    """The batches of ``images`` from frame ``start`` on, on the same boundaries as
    ``iter_batches`` (a checkpoint is taken after a batch, so ``start`` is one)."""
    for lo in range(start, len(images), batch_size):
        hi = min(lo + batch_size, len(images))
        yield FrameBatch(start=lo, stop=hi, images=images[lo:hi])


@dataclass
class ResumePoint:
    """What a run checkpoint restores (the runtime itself is rebuilt separately)."""

    path: Path
    run_id: str
    position: int
    finished: bool
    run: dict[str, Any]


@dataclass
class RunCheckpointer:
    """Serve-loop observer writing run checkpoints every ``every`` frames and after each
    adaptation; :meth:`save` is also called at the end of the stream."""

    series: CheckpointSeries
    run_id: str
    every: int | None
    runtime: Runtime
    collector: ServedCollector
    labels: StreamLabels
    events: list[Event]  # the run's events so far (the ListSink's list)
    events_path: Path
    setup: dict[str, Any]
    stream_id: dict[str, Any]
    serving_before_s: float = 0.0  # serving time of earlier processes of this run
    guard: OutboxGuard | None = None
    written: int = 0
    seconds: float = 0.0  # spent writing checkpoints
    _last_at: int = 0
    _loop_t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self._last_at = self.collector.served

    def __call__(self, item: ServedBatch) -> None:
        stop = item.batch.stop
        adapted = any(e.get("type") in ADAPTED for e in item.events)
        due = self.every is not None and stop - self._last_at >= self.every
        if adapted or due:
            self.save()

    def save(self, *, finished: bool = False) -> Path:
        t0 = time.perf_counter()
        rt = self.runtime
        runtime_state = rt.state_dict()  # may install finished work, emitting events: first
        # The checkpoint counts these lines as written; make them durable before it says so.
        try:
            fsync_file(self.events_path)
        except OSError:
            log.warning("could not fsync %s before a checkpoint", self.events_path)
        run: dict[str, Any] = {
            "version": RUN_STATE_VERSION,
            "run_id": self.run_id,
            "stream": self.stream_id,
            "position": int(self.collector.served),
            "finished": bool(finished),
            "events": len(self.events),
            "collector": self.collector.state_dict(),
            "labels": self.labels.state_dict(),
            "setup": self.setup,
            "serving_seconds": self.serving_before_s + (time.perf_counter() - self._loop_t0),
            "outbox": None if self.guard is None else self.guard.position(),
        }
        path = self.series.save({"runtime": runtime_state, "run": run}, kind=RUN_KIND)
        self._last_at = self.collector.served
        self.written += 1
        self.seconds += time.perf_counter() - t0
        return path


def new_run_id() -> str:
    return uuid.uuid4().hex


def run_id_for(out: Path) -> str:
    """The run's id, made once per output folder and kept in ``checkpoints/run.json``: the
    outbox's event count is per run, and a restart before the first checkpoint must know it
    is the same run."""
    path = out / CHECKPOINTS / "run.json"
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rec, dict) and isinstance(rec.get("run_id"), str):
            return str(rec["run_id"])
    except (OSError, ValueError):
        pass
    rid = new_run_id()
    atomic_write_text(path, json.dumps({"run_id": rid}) + "\n")
    return rid


def load_resume(
    out: Path,
    config: RuntimeConfig,
    stream: Stream,
    *,
    keep: int = DEFAULT_KEEP,
) -> tuple[Runtime, ResumePoint] | None:
    """The runtime and run state of the newest intact run checkpoint under ``out``, or None.

    A damaged checkpoint is skipped with a warning naming it; one from another encoder, state
    or format version raises :class:`IncompatibleCheckpoint`; one of another stream raises
    :class:`CheckpointError`.
    """
    from edge_runtime.runtime import Runtime, build_encoder

    series = CheckpointSeries(out / CHECKPOINTS, keep=keep)
    if not series.paths():
        return None
    # The encoder the operator's config asks for: a checkpoint made with another is refused.
    encoder = build_encoder(config)
    events_path = out / "events.jsonl"
    want = stream_digest(stream)

    def build(state: Any, path: Path) -> tuple[Runtime, ResumePoint]:
        try:
            run = state["run"]
            version = run.get("version")
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint {path} has no run state ({exc!r})") from None
        if version != RUN_STATE_VERSION:
            raise IncompatibleCheckpoint(
                f"checkpoint {path} has run state version {version!r}; this build reads "
                f"{RUN_STATE_VERSION}"
            )
        if run.get("stream") != want:
            raise IncompatibleCheckpoint(
                f"checkpoint {path} was made on another stream ({run.get('stream')}); this one "
                f"is {want}. Use a fresh --out folder for another stream."
            )
        count = int(run["events"])
        if _count_lines(events_path) < count:
            raise CheckpointError(f"{events_path} holds fewer than the checkpoint's {count} events")
        rt = Runtime.from_state(state["runtime"], str(path), encoder, background=False)
        return rt, ResumePoint(
            path, str(run["run_id"]), int(run["position"]), bool(run["finished"]), run
        )

    found = series.load_newest(kind=RUN_KIND, build=build)
    if found is None:
        log.warning("no intact checkpoint under %s: starting the run from frame 0", series.root)
        return None
    path, (rt, point) = found
    saved, given = rt.config.model_dump(mode="json"), config.model_dump(mode="json")
    saved.pop("fleet", None), given.pop("fleet", None)  # the link may change (broker, port)
    if saved != given:
        changed = sorted(k for k in set(saved) | set(given) if saved.get(k) != given.get(k))
        log.warning(
            "resuming with the config saved in %s; the config given differs in %s (ignored: a "
            "resumed run keeps the settings it started with)",
            path,
            ", ".join(changed),
        )
    _truncate_events(events_path, int(point.run["events"]))
    log.info("resuming from %s at frame %d", path, point.position)
    return rt, point


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.endswith(b"\n"))


def _truncate_events(path: Path, count: int) -> list[Event]:
    """Cut ``events.jsonl`` back to its first ``count`` lines (the checkpoint's), atomically;
    returns those events. Lines after them were written by the process that died after the
    checkpoint: the replay writes them again."""
    kept: list[bytes] = []
    if path.exists():
        with open(path, "rb") as fh:
            for line in fh:
                if len(kept) == count or not line.endswith(b"\n"):
                    break
                kept.append(line)
    atomic_write_text(path, b"".join(kept).decode("utf-8"))
    return [json.loads(line) for line in kept]


def read_events(path: Path) -> list[Event]:
    """The events of ``events.jsonl`` (after :func:`_truncate_events`, every line is whole)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class OutboxGuard:
    """Keeps a resumed run's replayed events out of the fleet outbox when it has them already.

    It wraps the client's :class:`~edge_runtime.fleet.outbox.Outbox` (``client.outbox``): each
    alert row this run puts is stored with ``{"run": id, "events": n}`` in the same
    transaction, ``n`` being the event's 1-based ordinal in the run. After a restart, an event
    whose ordinal is at most the stored ``n`` is in the outbox (or was delivered) already: its
    put is skipped, and only the client's bookkeeping (lifecycle, exports) runs again.

    It must be the first event sink (before the client), so it numbers each event before the
    client stores it.
    """

    def __init__(self, client: FleetClient, run_id: str, events_before: int) -> None:
        self.client = client
        self.inner = client.outbox
        self.run_id = run_id
        self._n = int(events_before)  # ordinal of the last event numbered
        self._current: tuple[int, int] | None = None  # (thread, ordinal) being written
        self.held = self._stored()
        self.skipped = 0
        client.outbox = self  # type: ignore[assignment]

    def _stored(self) -> int:
        try:
            rec = json.loads(self.inner.get_meta(OUTBOX_EVENTS_KEY) or "null")
        except ValueError:
            return 0
        if isinstance(rec, dict) and rec.get("run") == self.run_id:
            return int(rec.get("events", 0))
        return 0

    def position(self) -> dict[str, Any]:
        return {"last_seq": int(self.inner.last_seq()), "events": self._n}

    # ---------------------------------------------------------------- EventSink (first)
    def write(self, event: Event) -> None:
        if event.get("cause") == "command":
            # A command's events (an offered adaptor refused, a rollback) come from outside
            # the stream: a resumed run does not replay them, so they take no ordinal (else
            # every later replayed event would be numbered off by one) and are always put.
            self._current = None
            return
        self._n += 1
        self._current = (threading.get_ident(), self._n)

    def close(self) -> None:
        pass

    # ---------------------------------------------------------------- Outbox
    def put(self, channel: str, type: str, body: Any, *, meta: Any = None) -> Any:
        from edge_runtime.fleet.payloads import ALERTS, Envelope

        cur = self._current
        if channel != ALERTS or cur is None or cur[0] != threading.get_ident():
            return self.inner.put(channel, type, body, meta=meta)
        self._current = None
        n = cur[1]
        if n <= self.held:
            self.skipped += 1
            # Stored before the restart: the client gets the envelope it would have had
            # (seq unknown here: 0), and the outbox is left as it is.
            return Envelope(self.inner.device_id, 0, type, body(0) if callable(body) else body)
        merged = dict(meta or {})
        merged[OUTBOX_EVENTS_KEY] = json.dumps({"run": self.run_id, "events": n})
        self.held = n
        return self.inner.put(channel, type, body, meta=merged)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)
