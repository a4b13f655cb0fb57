"""The stream ``.npz`` file: the unit of work for ``edge-runtime run``.

Layout (docs/ARCHITECTURE.md, "Stream file"); every array is required except ``meta``:

=================== ======= ============ ==========================================
array               dtype   shape        meaning
=================== ======= ============ ==========================================
images              uint8   (N,H,W[,C])  the stream, in order
labels              int64   (N,)         true label of each frame (>= 0)
segment             int64   (N,)         segment id: non-decreasing, covers 0..S-1
segment_is_shift    bool    (S,)         segment begins a new distribution ([0] False)
is_novel            bool    (N,)         frame of a class/domain unseen so far
train_images        uint8   (M,H,W[,C])  base training set
train_labels        int64   (M,)
eval_images         uint8   (E,H,W[,C])  held-out frames, scored at the end
eval_labels         int64   (E,)
eval_segment        int64   (E,)         segment each eval frame belongs to
meta                str     (1,)         optional JSON object (names, descriptions)
=================== ======= ============ ==========================================

``segment``, ``segment_is_shift`` and ``is_novel`` are ground truth for scoring
only. Files are always read with ``allow_pickle=False``: a stream file may come
from anywhere, and a pickle inside an ``.npz`` runs code on load.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import InputError, StreamFormatError
from edge_runtime.state.atomic import atomic_write

# Image channel counts the encoder's preprocessing accepts (gray, gray, RGB, RGBA).
_CHANNELS = (1, 3, 4)

REQUIRED_ARRAYS: tuple[str, ...] = (
    "images",
    "labels",
    "segment",
    "segment_is_shift",
    "is_novel",
    "train_images",
    "train_labels",
    "eval_images",
    "eval_labels",
    "eval_segment",
)
_DTYPES: dict[str, type] = {
    "images": np.uint8,
    "labels": np.int64,
    "segment": np.int64,
    "segment_is_shift": np.bool_,
    "is_novel": np.bool_,
    "train_images": np.uint8,
    "train_labels": np.int64,
    "eval_images": np.uint8,
    "eval_labels": np.int64,
    "eval_segment": np.int64,
}


@dataclass(frozen=True)
class SegmentSummary:
    """Per-segment facts shown by ``edge-runtime scenario inspect``."""

    id: int
    start: int
    frames: int
    is_shift: bool
    novel_fraction: float
    labels: tuple[int, ...]
    eval_frames: int
    name: str = ""
    description: str = ""


@dataclass(frozen=True)
class FrameBatch:
    """A consecutive slice ``[start, stop)`` of stream frames (labels deliberately absent:
    the test-then-train protocol reveals them separately)."""

    start: int
    stop: int
    images: np.ndarray

    @property
    def indices(self) -> np.ndarray:
        return np.arange(self.start, self.stop, dtype=np.int64)


@dataclass
class Stream:
    """All arrays of a stream file; see the module docstring for the contract."""

    images: np.ndarray
    labels: np.ndarray
    segment: np.ndarray
    segment_is_shift: np.ndarray
    is_novel: np.ndarray
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    eval_segment: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_segments(self) -> int:
        return len(self.segment_is_shift)

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def arrays(self) -> dict[str, np.ndarray]:
        """The required arrays by name (without ``meta``)."""
        return {name: getattr(self, name) for name in REQUIRED_ARRAYS}

    def validate(self) -> Stream:
        validate_stream(self.arrays())
        return self

    def segment_bounds(self, seg: int) -> tuple[int, int]:
        """``[start, stop)`` frame range of segment ``seg``."""
        if not 0 <= seg < self.num_segments:
            raise InputError(f"segment {seg} out of range 0..{self.num_segments - 1}")
        start = int(np.searchsorted(self.segment, seg, side="left"))
        stop = int(np.searchsorted(self.segment, seg, side="right"))
        return start, stop

    def segments(self) -> list[SegmentSummary]:
        seg_meta = self.meta.get("segments", []) if isinstance(self.meta, dict) else []
        out = []
        for s in range(self.num_segments):
            start, stop = self.segment_bounds(s)
            info = seg_meta[s] if s < len(seg_meta) and isinstance(seg_meta[s], dict) else {}
            out.append(
                SegmentSummary(
                    id=s,
                    start=start,
                    frames=stop - start,
                    is_shift=bool(self.segment_is_shift[s]),
                    novel_fraction=float(self.is_novel[start:stop].mean()),
                    labels=tuple(int(v) for v in np.unique(self.labels[start:stop])),
                    eval_frames=int(np.count_nonzero(self.eval_segment == s)),
                    name=str(info.get("name", "")),
                    description=str(info.get("description", "")),
                )
            )
        return out

    def summary(self) -> str:
        """A human-readable table: one line per segment plus totals."""
        title = self.meta.get("name", "stream") if isinstance(self.meta, dict) else "stream"
        lines = [
            f"{title}: {len(self)} frames of shape {self.frame_shape}, "
            f"{self.num_segments} segments, {len(self.train_images)} train frames "
            f"(labels {_label_set(self.train_labels)}), {len(self.eval_images)} eval frames",
            f"{'id':>3} {'start':>6} {'frames':>6} {'shift':>5} {'novel':>6} {'eval':>5}  "
            f"{'labels':<16} name",
        ]
        for s in self.segments():
            lines.append(
                f"{s.id:>3} {s.start:>6} {s.frames:>6} {'yes' if s.is_shift else 'no':>5} "
                f"{s.novel_fraction:>6.2f} {s.eval_frames:>5}  {_label_set(s.labels):<16} "
                f"{s.name}" + (f" — {s.description}" if s.description else "")
            )
        return "\n".join(lines)


def _label_set(labels: np.ndarray | tuple[int, ...]) -> str:
    """Compact label set: contiguous runs as ranges, e.g. ``0-5,10-19``."""
    vals = sorted({int(v) for v in labels})
    if not vals:
        return "-"
    runs: list[str] = []
    lo = prev = vals[0]
    for v in [*vals[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(str(lo) if lo == prev else f"{lo}-{prev}")
        if v is not None:
            lo = prev = v
    return ",".join(runs)


# --------------------------------------------------------------------------- validation


def _check_dtype(name: str, arr: np.ndarray) -> None:
    want = _DTYPES[name]
    if arr.dtype == want:
        return
    if want is np.int64 and np.issubdtype(arr.dtype, np.floating):
        raise StreamFormatError(
            f"array '{name}' must be int64 class ids, got float dtype {arr.dtype}"
        )
    raise StreamFormatError(
        f"array '{name}' must have dtype {np.dtype(want).name}, got {arr.dtype}"
    )


def _check_images(name: str, arr: np.ndarray, *, allow_empty: bool) -> None:
    _check_dtype(name, arr)
    if arr.ndim not in (3, 4):
        raise StreamFormatError(
            f"array '{name}' must have rank 3 (N,H,W) or 4 (N,H,W,C), got shape {arr.shape}"
        )
    if arr.ndim == 4 and arr.shape[3] not in _CHANNELS:
        raise StreamFormatError(
            f"array '{name}' must have 1, 3 or 4 channels last, got shape {arr.shape}"
        )
    if arr.shape[1] < 2 or arr.shape[2] < 2:
        raise StreamFormatError(f"array '{name}' frames are too small: shape {arr.shape}")
    if not allow_empty and arr.shape[0] == 0:
        raise StreamFormatError(f"array '{name}' is empty (zero frames)")


def _check_vector(name: str, arr: np.ndarray, length: int, against: str) -> None:
    _check_dtype(name, arr)
    if arr.ndim != 1:
        raise StreamFormatError(f"array '{name}' must have rank 1, got shape {arr.shape}")
    if len(arr) != length:
        raise StreamFormatError(
            f"array '{name}' has length {len(arr)} but '{against}' has {length} frames"
        )


def _check_labels(name: str, arr: np.ndarray, length: int, against: str) -> None:
    _check_vector(name, arr, length, against)
    if len(arr) and int(arr.min()) < 0:
        idx = int(np.flatnonzero(arr < 0)[0])
        raise StreamFormatError(f"array '{name}' has negative label {int(arr[idx])} at index {idx}")


def validate_stream(arrays: dict[str, np.ndarray] | Stream) -> None:
    """Check every array of a stream; raise :class:`StreamFormatError` naming the one at fault."""
    if isinstance(arrays, Stream):
        arrays = arrays.arrays()
    missing = [name for name in REQUIRED_ARRAYS if name not in arrays]
    if missing:
        raise StreamFormatError(f"stream is missing array(s) {', '.join(repr(m) for m in missing)}")
    a = {name: arrays[name] for name in REQUIRED_ARRAYS}
    for name, arr in a.items():
        if not isinstance(arr, np.ndarray):
            raise StreamFormatError(
                f"array '{name}' must be a numpy array, got {type(arr).__name__}"
            )

    images = a["images"]
    _check_images("images", images, allow_empty=False)
    n = len(images)
    frame_shape = images.shape[1:]
    _check_labels("labels", a["labels"], n, "images")

    segment = a["segment"]
    _check_vector("segment", segment, n, "images")
    if int(segment[0]) != 0:
        raise StreamFormatError(f"array 'segment' must start at 0, got {int(segment[0])}")
    steps = np.diff(segment)
    if (steps < 0).any():
        idx = int(np.flatnonzero(steps < 0)[0]) + 1
        raise StreamFormatError(
            f"array 'segment' must be non-decreasing: {int(segment[idx - 1])} -> "
            f"{int(segment[idx])} at frame {idx}"
        )
    if (steps > 1).any():
        idx = int(np.flatnonzero(steps > 1)[0]) + 1
        raise StreamFormatError(
            f"array 'segment' must cover 0..S-1 without gaps: jumps "
            f"{int(segment[idx - 1])} -> {int(segment[idx])} at frame {idx}"
        )
    num_segments = int(segment[-1]) + 1

    shift = a["segment_is_shift"]
    _check_dtype("segment_is_shift", shift)
    if shift.ndim != 1 or len(shift) != num_segments:
        raise StreamFormatError(
            f"array 'segment_is_shift' must have one entry per segment ({num_segments}), "
            f"got shape {shift.shape}"
        )
    if bool(shift[0]):
        raise StreamFormatError("array 'segment_is_shift' must be False for segment 0")

    _check_vector("is_novel", a["is_novel"], n, "images")

    train = a["train_images"]
    _check_images("train_images", train, allow_empty=False)
    if train.shape[1:] != frame_shape:
        raise StreamFormatError(
            f"array 'train_images' frames have shape {train.shape[1:]}, "
            f"but 'images' frames have {frame_shape}"
        )
    _check_labels("train_labels", a["train_labels"], len(train), "train_images")

    ev = a["eval_images"]
    _check_images("eval_images", ev, allow_empty=True)
    if len(ev) and ev.shape[1:] != frame_shape:
        raise StreamFormatError(
            f"array 'eval_images' frames have shape {ev.shape[1:]}, "
            f"but 'images' frames have {frame_shape}"
        )
    _check_labels("eval_labels", a["eval_labels"], len(ev), "eval_images")
    ev_seg = a["eval_segment"]
    _check_vector("eval_segment", ev_seg, len(ev), "eval_images")
    if len(ev_seg) and (int(ev_seg.min()) < 0 or int(ev_seg.max()) >= num_segments):
        raise StreamFormatError(
            f"array 'eval_segment' has ids outside 0..{num_segments - 1} "
            f"(min {int(ev_seg.min())}, max {int(ev_seg.max())})"
        )


# --------------------------------------------------------------------------- load / save


def _decode_meta(raw: np.ndarray) -> dict[str, Any]:
    if raw.dtype.kind not in ("U", "S") or raw.size != 1:
        raise StreamFormatError(
            f"array 'meta' must hold one JSON string, got dtype {raw.dtype} shape {raw.shape}"
        )
    text = raw.reshape(-1)[0]
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        meta = json.loads(str(text))
    except json.JSONDecodeError as exc:
        raise StreamFormatError(f"array 'meta' is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise StreamFormatError("array 'meta' must be a JSON object")
    return meta


def load_stream(path: str | os.PathLike[str]) -> Stream:
    """Read and validate a stream ``.npz``; raises :class:`StreamFormatError` if malformed."""
    p = Path(path)
    if not p.exists():
        raise StreamFormatError(f"stream file {p} does not exist")
    if not p.is_file():
        raise StreamFormatError(f"stream path {p} is not a file")
    # np.load falls back to unpickling anything that is neither zip nor .npy, and its
    # error then talks about pickles; check the zip magic first for a clearer message.
    with p.open("rb") as fh:
        magic = fh.read(6)
    if magic == b"\x93NUMPY":
        raise StreamFormatError(
            f"stream file {p} is a single .npy array, not an .npz archive of named arrays"
        )
    if magic[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise StreamFormatError(f"stream file {p} is not an .npz archive (no zip header)")
    try:
        npz = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise StreamFormatError(f"stream file {p} is not a readable .npz archive: {exc}") from exc
    arrays: dict[str, np.ndarray] = {}
    with npz:
        for name in [*REQUIRED_ARRAYS, "meta"]:
            if name not in npz.files:
                continue
            try:
                arrays[name] = npz[name]
            except ValueError as exc:  # object arrays need pickle, which we refuse
                raise StreamFormatError(
                    f"array '{name}' in {p} cannot be read without pickle (object dtype?): {exc}"
                ) from exc
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                # zlib.error: a damaged deflate stream inside an intact zip directory.
                raise StreamFormatError(f"array '{name}' in {p} is corrupt: {exc}") from exc
    try:
        validate_stream(arrays)
    except StreamFormatError as exc:
        raise StreamFormatError(f"{p}: {exc}") from None
    meta = _decode_meta(arrays.pop("meta")) if "meta" in arrays else {}
    return Stream(**arrays, meta=meta)


def save_stream(stream: Stream, path: str | os.PathLike[str], *, compress: bool = True) -> Path:
    """Validate and write ``stream`` to ``path`` atomically and durably (see
    :func:`edge_runtime.state.atomic_write`): a crash leaves the old file or the new one."""
    validate_stream(stream)
    p = Path(path)
    if p.suffix != ".npz":
        raise InputError(f"stream path {p} must end in .npz")
    payload: dict[str, np.ndarray] = dict(stream.arrays())
    payload["meta"] = np.array([json.dumps(stream.meta, sort_keys=True)])
    savez = np.savez_compressed if compress else np.savez
    return atomic_write(p, lambda fh: savez(fh, **payload))


# --------------------------------------------------------------------------- frame sources


def iter_batches(source: Stream | np.ndarray, batch_size: int) -> Iterator[FrameBatch]:
    """Yield the frames of a stream (or an image array) in order, ``batch_size`` at a time."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    images = source.images if isinstance(source, Stream) else source
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        yield FrameBatch(start=start, stop=stop, images=images[start:stop])


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def load_image_directory(
    path: str | os.PathLike[str], size: int | tuple[int, int] | None = None
) -> np.ndarray:
    """Load every image in a directory (sorted by name) as one uint8 batch.

    Returns (N,H,W) when every image is grayscale, else (N,H,W,3). Without
    ``size`` all images must share one size; with ``size`` (an int for a square,
    or (height, width)) each is resized bilinearly.
    """
    from PIL import Image, UnidentifiedImageError

    d = Path(path)
    if not d.is_dir():
        raise InputError(f"image directory {d} does not exist or is not a directory")
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(
            f"image directory {d} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    target: tuple[int, int] | None = None
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        if h < 2 or w < 2:
            raise InputError(f"image size must be at least 2x2, got {size}")
        target = (int(w), int(h))  # PIL sizes are (width, height)
    pictures = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
                im = im.convert("L" if gray else "RGB")
                if target is not None and im.size != target:
                    im = im.resize(target, Image.Resampling.BILINEAR)
                pictures.append(np.asarray(im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"cannot read image {f}: {exc}") from exc
    shapes = {p.shape[:2] for p in pictures}
    if len(shapes) > 1:
        raise InputError(
            f"images in {d} have different sizes {sorted(shapes)}: pass size= to resize them"
        )
    if all(p.ndim == 2 for p in pictures):
        return np.stack(pictures)
    return np.stack([np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p for p in pictures])
