"""The operator's label loop, device side: label requests out through the outbox, labels back
later as a ``labels`` command.

:class:`FleetLabels` is both halves the serve loop needs. As a
:class:`~edge_runtime.runner.labels.LabelSource` it answers nothing at once (an operator answers
minutes later, or never; the runtime tolerates that). As a serve-loop observer it sees each
:class:`~edge_runtime.runner.loop.ServedBatch` and, for the frames the runtime asked about,
queues ``label_request`` messages on ``labels/request``: frame indices with PNG thumbnails, at
most ``frames_per_request`` frames each, tagged with the open drift lifecycle so the controller
files them under the episode that asked. The answers come back on ``cmd`` and go through the
runtime's command queue like every other command, so they are applied on the owner thread.
"""

from __future__ import annotations

import base64
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.fleet.payloads import LABEL_REQUEST
from edge_runtime.fleet.thumbnails import thumbnail
from edge_runtime.runner.labels import Labelled

if TYPE_CHECKING:
    from edge_runtime.fleet.client import FleetClient
    from edge_runtime.runner.loop import ServedBatch

LABEL_REQUEST_TYPE = "label_request"


class FleetLabels:
    """LabelSource + ServeLoop observer that asks the fleet's operator for labels."""

    def __init__(self, client: FleetClient, thumbnail_px: int, frames_per_request: int) -> None:
        if frames_per_request < 1:
            raise ValueError(f"frames_per_request must be positive, got {frames_per_request}")
        self.client = client
        self.thumbnail_px = int(thumbnail_px)
        self.frames_per_request = int(frames_per_request)
        self.requested = 0  # frames asked about so far (for the run summary)

    # ------------------------------------------------------------------ LabelSource
    def answer(self, indices: np.ndarray) -> Labelled:
        """Nothing now: the operator's labels arrive later as a ``labels`` command."""
        return Labelled.empty()

    # ------------------------------------------------------------------ observer
    def __call__(self, item: ServedBatch) -> None:
        mask = np.asarray(item.decisions.label_request, dtype=bool).reshape(-1)
        if not mask.any():
            return
        frames = item.batch.indices[mask]
        images = np.asarray(item.batch.images)[mask]
        self.request(frames, images)

    def request(self, frames: np.ndarray, images: np.ndarray) -> list[str]:
        """Queue label requests for ``frames`` (stream indices) with their ``images``; returns
        the request ids, one per message."""
        ids: list[str] = []
        step = self.frames_per_request
        for start in range(0, len(frames), step):
            chunk = frames[start : start + step]
            thumbs = [
                base64.b64encode(thumbnail(img, self.thumbnail_px)).decode("ascii")
                for img in images[start : start + step]
            ]
            request_id = uuid.uuid4().hex
            body: dict[str, Any] = {
                "request_id": request_id,
                "frames": [int(f) for f in chunk],
                "thumbnails": thumbs,
                "lifecycle": self.client.lifecycle,
            }
            self.client.put(LABEL_REQUEST, LABEL_REQUEST_TYPE, body)
            ids.append(request_id)
        self.requested += len(frames)
        return ids
