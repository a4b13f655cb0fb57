"""Label-request capture folders: what an operator is shown when the runtime asks for labels.

One folder per drift flag, ``CAPTURE/<request>/``: a PNG per requested frame (named by its
stream index, the ``frame_id`` the operator answers with) and ``manifest.json``, rewritten
atomically as frames are added, answered or the request expires, so a labelling tool can
watch it. The manifest says where each frame came from (source, the source's own frame number,
file name for a folder source), the answer format and the inbox to drop it in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.fleet.thumbnails import encode_png
from edge_runtime.state.atomic import atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"


@dataclass
class CaptureRequest:
    """One open label request (one drift flag's collection) and its folder."""

    id: str
    folder: Path
    flag_frame: int
    kind: str
    budget: int
    created: float
    deadline: float | None
    inbox: str
    frames: dict[int, dict[str, Any]] = field(default_factory=dict)
    answered: set[int] = field(default_factory=set)
    status: str = "open"  # open | answered | expired

    @property
    def pending(self) -> set[int]:
        return set(self.frames) - self.answered

    def manifest(self) -> dict[str, Any]:
        return {
            "request": self.id,
            "status": self.status,
            "flag_frame": self.flag_frame,
            "kind": self.kind,
            "labels_wanted": self.budget,
            "created": self.created,
            "deadline": self.deadline,
            "answer": {
                "inbox": self.inbox,
                "format": "CSV with a header line frame_id,label; one row per frame",
            },
            "frames": [
                {**meta, "answered": i in self.answered} for i, meta in sorted(self.frames.items())
            ],
        }


class CaptureWriter:
    """Creates request folders under ``root`` and keeps their manifests current."""

    def __init__(self, root: str | Path, inbox: str | Path) -> None:
        self.root = Path(root)
        self.inbox = str(inbox)
        self.root.mkdir(parents=True, exist_ok=True)

    def open_request(
        self, flag_frame: int, kind: str, budget: int, deadline_s: float | None
    ) -> CaptureRequest:
        now = time.time()
        rid = f"req-{int(flag_frame):08d}-{int(now * 1000) % 100000:05d}"
        folder = self.root / rid
        folder.mkdir(parents=True, exist_ok=True)
        req = CaptureRequest(
            rid,
            folder,
            int(flag_frame),
            str(kind),
            int(budget),
            now,
            None if deadline_s is None else now + float(deadline_s),
            self.inbox,
        )
        self.save(req)
        return req

    def add_frame(self, req: CaptureRequest, frame_id: int, image: np.ndarray, **meta: Any) -> None:
        name = f"{int(frame_id):08d}.png"
        png = encode_png(image)
        atomic_write_bytes(req.folder / name, png)
        req.frames[int(frame_id)] = {"frame_id": int(frame_id), "file": name, **meta}

    def save(self, req: CaptureRequest) -> None:
        atomic_write_json(req.folder / MANIFEST, req.manifest())
