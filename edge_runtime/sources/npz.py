"""Stream files (``.npz``, :mod:`edge_runtime.data.stream`): their ``images`` in order."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edge_runtime.data.stream import load_stream
from edge_runtime.errors import StreamFormatError
from edge_runtime.sources.base import BaseSource, RawFrame, SourceError


class NpzSource(BaseSource):
    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.path = uri[len("npz:") :] if uri.startswith("npz:") else uri
        self._images: np.ndarray | None = None

    def open(self) -> None:
        try:
            self._images = load_stream(self.path).images
        except StreamFormatError as exc:
            raise SourceError(f"{self.name}: {exc}") from exc

    def frames(self) -> Iterator[RawFrame]:
        if self._images is None:
            raise SourceError(f"{self.name}: not open")
        for i, img in enumerate(self._images):
            if self.closed:
                return
            yield RawFrame(img, i)


def open_npz(uri: str) -> NpzSource:
    return NpzSource(uri)
