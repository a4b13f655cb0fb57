"""Labels from a person: capture folders out, CSV answers in, as a :class:`LabelSource`.

:class:`OperatorLabels` plugs into the serve loop's label seam (:mod:`edge_runtime.runner.labels`)
exactly where the fleet's label loop (:class:`~edge_runtime.fleet.labels.FleetLabels`) does:

* as an event sink it sees ``labels_requested`` (a drift flag's collection starts) and opens a
  capture request (:mod:`.capture`);
* as a serve-loop observer it writes each frame the runtime then asks about into that
  request's folder;
* as the label source, once per served batch, it reads any CSV (``frame_id,label``) an
  operator dropped into the inbox, hands the labels of frames still waiting to
  ``Runtime.feedback`` (through the loop), and moves the file to ``inbox/done/`` so it is
  read once. A malformed file goes to ``inbox/rejected/`` with a ``label_inbox_error``
  event saying which line is wrong; serving goes on;
* a request whose labels are not all in by its deadline expires with a
  ``label_request_expired`` event and the ``expire`` callback (the server's: the runtime's
  ``expire_labels``, which adapts on the labels already in or else resumes the drift monitor,
  so a later drift is flagged again); labels for it that come later are ignored.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.runner.labels import Labelled
from edge_runtime.serving.capture import CaptureRequest, CaptureWriter

if TYPE_CHECKING:
    from edge_runtime.runner.loop import ServedBatch
    from edge_runtime.serving.mux import FrameOrigin

Emit = Callable[..., Any]


class CsvError(ValueError):
    pass


def parse_label_csv(text: str) -> list[tuple[int, int]]:
    """``frame_id,label`` rows (a header line is optional) -> pairs; CsvError names the line."""
    rows: list[tuple[int, int]] = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not cells or all(not c for c in cells) or cells[0].startswith("#"):
            continue
        if lineno == 1 and cells[0].lower() == "frame_id":
            continue
        if len(cells) != 2:
            raise CsvError(f"line {lineno}: expected 2 columns frame_id,label, got {len(cells)}")
        try:
            frame, label = int(cells[0]), int(cells[1])
        except ValueError:
            raise CsvError(f"line {lineno}: frame_id and label must be integers: {row}") from None
        if frame < 0 or label < 0:
            raise CsvError(f"line {lineno}: frame_id and label must be >= 0: {row}")
        rows.append((frame, label))
    return rows


class OperatorLabels:
    """LabelSource + serve-loop observer + event sink; see the module docstring."""

    def __init__(
        self,
        capture_dir: str | Path,
        inbox_dir: str | Path,
        *,
        emit: Emit,
        position: Callable[[], int],
        origin: Callable[[int], FrameOrigin | None] = lambda i: None,
        deadline_s: float | None = None,
        expire: Callable[[CaptureRequest], Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inbox = Path(inbox_dir)
        for sub in ("", "done", "rejected"):
            (self.inbox / sub).mkdir(parents=True, exist_ok=True)
        self.capture = CaptureWriter(capture_dir, self.inbox)
        self.emit = emit
        self.position = position
        self.origin = origin
        self.deadline_s = deadline_s
        self.on_expire = expire
        self.clock = clock
        self.requests: list[CaptureRequest] = []
        self._opened: list[tuple[int, str, int]] = []  # flags seen, folders not yet made
        self.counts = {"requested": 0, "answered": 0, "ignored": 0, "expired": 0, "files": 0}

    # ------------------------------------------------------------------ EventSink
    def write(self, event: dict[str, Any]) -> None:
        # Called under the event log's lock: only note the flag; emitting here would deadlock.
        if event.get("type") == "labels_requested":
            self._opened.append((int(event["frame"]), str(event.get("kind")), int(event["labels"])))

    def close(self) -> None:
        pass

    def _open_pending(self) -> None:
        while self._opened:
            frame, kind, budget = self._opened.pop(0)
            req = self.capture.open_request(frame, kind, budget, self.deadline_s)
            self.requests.append(req)
            self.emit(
                "label_request_opened",
                frame,
                request=req.id,
                folder=str(req.folder),
                labels=budget,
                deadline=req.deadline,
            )

    @property
    def current(self) -> CaptureRequest | None:
        return self.requests[-1] if self.requests and self.requests[-1].status == "open" else None

    # ------------------------------------------------------------------ observer
    def __call__(self, item: ServedBatch) -> None:
        self._open_pending()
        mask = np.asarray(item.decisions.label_request, dtype=bool).reshape(-1)
        req = self.current
        if not mask.any() or req is None:
            return
        images = np.asarray(item.batch.images)
        for j in np.flatnonzero(mask):
            i = int(item.batch.indices[j])
            o = self.origin(i)
            meta = {} if o is None else {"source": o.source, "source_frame": o.number}
            if o is not None and o.tag is not None:
                meta["file_at_source"] = o.tag
            self.capture.add_frame(req, i, images[j], **meta)
            self.counts["requested"] += 1
        self.capture.save(req)

    # ------------------------------------------------------------------ LabelSource
    def answer(self, indices: np.ndarray) -> Labelled:
        """Labels that arrived in the inbox for frames still waiting (the ``indices`` of this
        batch are captured by the observer; answers for them come in later batches)."""
        self._open_pending()
        self._expire()
        got: dict[int, int] = {}
        for path in sorted(self.inbox.glob("*.csv")):
            self.counts["files"] += 1
            try:
                rows = parse_label_csv(path.read_text(encoding="utf-8", errors="replace"))
            except (CsvError, OSError) as exc:
                self.emit("label_inbox_error", self.position(), file=path.name, error=str(exc))
                path.replace(self.inbox / "rejected" / path.name)
                continue
            accepted = 0
            for frame, label in rows:
                req = self._request_waiting_for(frame)
                if req is None:
                    self.counts["ignored"] += 1
                    continue
                req.answered.add(frame)
                got[frame] = label
                accepted += 1
            self.emit(
                "label_inbox_read",
                self.position(),
                file=path.name,
                rows=len(rows),
                accepted=accepted,
                ignored=len(rows) - accepted,
            )
            path.replace(self.inbox / "done" / path.name)
        if not got:
            return Labelled.empty()
        for req in self.requests:
            full = len(req.frames) >= req.budget
            if req.status == "open" and full and not req.pending:
                req.status = "answered"
            self.capture.save(req)
        self.counts["answered"] += len(got)
        idx = np.fromiter(got.keys(), np.int64, len(got))
        return Labelled(idx, np.fromiter(got.values(), np.int64, len(got)))

    def _request_waiting_for(self, frame: int) -> CaptureRequest | None:
        for req in self.requests:
            if req.status == "open" and frame in req.frames and frame not in req.answered:
                return req
        return None

    def _expire(self) -> None:
        now = self.clock()
        for req in self.requests:
            if req.status != "open" or req.deadline is None or now < req.deadline:
                continue
            req.status = "expired"
            self.counts["expired"] += 1
            self.capture.save(req)
            self.emit(
                "label_request_expired",
                self.position(),
                request=req.id,
                flag_frame=req.flag_frame,
                answered=len(req.answered),
                missing=len(req.pending),
            )
            if self.on_expire is not None:
                self.on_expire(req)

    def tick(self) -> None:
        """Between batches, with no frames coming: open folders and expire requests."""
        self._open_pending()
        self._expire()

    def summary(self) -> dict[str, Any]:
        return {
            **self.counts,
            "open": sum(1 for r in self.requests if r.status == "open"),
            "requests": [
                {
                    "id": r.id,
                    "status": r.status,
                    "frames": len(r.frames),
                    "answered": len(r.answered),
                }
                for r in self.requests
            ],
        }
