"""The stream .npz format: round trip, validation of every malformed case, frame sources."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.data import (
    REQUIRED_ARRAYS,
    Stream,
    iter_batches,
    load_image_directory,
    load_stream,
    save_stream,
    validate_stream,
)
from edge_runtime.errors import InputError, StreamFormatError


def _arrays(stream: Stream) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in stream.arrays().items()}


def test_round_trip(mini_stream: Stream, tmp_path: Path) -> None:
    path = save_stream(mini_stream, tmp_path / "s.npz")
    loaded = load_stream(path)
    for name in REQUIRED_ARRAYS:
        a, b = getattr(mini_stream, name), getattr(loaded, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert loaded.meta == json.loads(json.dumps(mini_stream.meta))
    assert loaded.meta["name"] == "fashion-drift-mini"
    # No temp files left behind by the atomic write.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_save_is_durable_and_a_failed_save_keeps_the_old_file(
    mini_stream: Stream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream file goes through the one atomic-write helper: fsync the file, rename, fsync
    the folder; a save that dies before its rename leaves the previous file as it was."""
    import os
    import stat

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = save_stream(mini_stream, tmp_path / "s.npz", compress=False)
    assert events == ["fsync-file", "replace", "fsync-dir"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    before = path.read_bytes()

    def crash(src, dst) -> None:
        raise OSError(5, "simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_stream(mini_stream, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]


def test_save_rejects_invalid_and_bad_suffix(mini_stream: Stream, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"\.npz"):
        save_stream(mini_stream, tmp_path / "s.bin")
    arrays = _arrays(mini_stream)
    arrays["labels"] = arrays["labels"].astype(np.float32)
    with pytest.raises(StreamFormatError, match="labels"):
        save_stream(Stream(**arrays), tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def _set(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    def edit(a: dict) -> None:
        a[name] = fn(a[name])

    return edit


def _drop(name: str) -> Callable[[dict], None]:
    return lambda a: a.pop(name)


def _segment_not_increasing(a: dict) -> None:
    seg = a["segment"].copy()
    seg[5] = 1  # segment 0 ... 1 ... 0 ...
    a["segment"] = seg


def _segment_gap(a: dict) -> None:
    a["segment"] = np.where(a["segment"] >= 3, a["segment"] + 1, a["segment"])
    a["segment_is_shift"] = np.ones(len(a["segment_is_shift"]) + 1, bool)


def _first_shift(a: dict) -> None:
    s = a["segment_is_shift"].copy()
    s[0] = True
    a["segment_is_shift"] = s


def _negative_label(a: dict) -> None:
    y = a["labels"].copy()
    y[10] = -1
    a["labels"] = y


def _empty(a: dict) -> None:
    for k in ("images", "labels", "segment", "is_novel"):
        a[k] = a[k][:0]


MALFORMED = {
    "missing images": (_drop("images"), "'images'"),
    "missing eval_segment": (_drop("eval_segment"), "'eval_segment'"),
    "images float": (_set("images", lambda x: x.astype(np.float32)), "'images'.*uint8"),
    "images rank 2": (_set("images", lambda x: x.reshape(len(x), -1)), "'images'.*rank"),
    "images 2 channels": (
        _set("images", lambda x: np.stack([x, x], axis=-1)),
        "'images'.*channels",
    ),
    "labels float": (_set("labels", lambda y: y.astype(np.float64)), "'labels'.*float"),
    "labels int32": (_set("labels", lambda y: y.astype(np.int32)), "'labels'.*int64.*int32"),
    "labels too short": (_set("labels", lambda y: y[:-1]), "'labels'.*length"),
    "labels rank 2": (_set("labels", lambda y: y[:, None]), "'labels'.*rank"),
    "negative label": (_negative_label, "'labels'.*negative"),
    "segment wrong length": (_set("segment", lambda s: s[1:]), "'segment'.*length"),
    "segment float": (_set("segment", lambda s: s.astype(np.float32)), "'segment'"),
    "segment decreasing": (_segment_not_increasing, "'segment'.*non-decreasing"),
    "segment gap": (_segment_gap, "'segment'.*gaps"),
    "segment starts at 1": (_set("segment", lambda s: s + 1), "'segment'.*start at 0"),
    "shift wrong length": (_set("segment_is_shift", lambda s: s[:-1]), "'segment_is_shift'"),
    "shift int": (_set("segment_is_shift", lambda s: s.astype(np.int64)), "'segment_is_shift'"),
    "segment 0 shift": (_first_shift, "'segment_is_shift'.*segment 0"),
    "is_novel int": (_set("is_novel", lambda s: s.astype(np.uint8)), "'is_novel'.*bool"),
    "is_novel short": (_set("is_novel", lambda s: s[:3]), "'is_novel'.*length"),
    "train frame shape": (_set("train_images", lambda x: x[:, :20, :20]), "'train_images'"),
    "train labels short": (_set("train_labels", lambda y: y[:-2]), "'train_labels'"),
    "train empty": (
        lambda a: a.update(train_images=a["train_images"][:0], train_labels=a["train_labels"][:0]),
        "'train_images'.*empty",
    ),
    "eval labels short": (_set("eval_labels", lambda y: y[:-1]), "'eval_labels'.*length"),
    "eval segment out of range": (_set("eval_segment", lambda s: s + 10), "'eval_segment'"),
    "eval images float": (_set("eval_images", lambda x: x.astype(np.float64)), "'eval_images'"),
    "empty stream": (_empty, "'images'.*empty"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_names_the_array(case: str, mini_stream: Stream, tmp_path: Path) -> None:
    edit, pattern = MALFORMED[case]
    arrays = _arrays(mini_stream)
    edit(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(StreamFormatError, match=pattern):
        load_stream(path)
    # The in-memory validator agrees with the file loader.
    with pytest.raises(StreamFormatError, match=pattern):
        validate_stream(arrays)


def test_object_array_is_refused_without_unpickling(mini_stream: Stream, tmp_path: Path) -> None:
    arrays = _arrays(mini_stream)
    arrays["labels"] = np.array([object()] * len(arrays["labels"]), dtype=object)
    path = tmp_path / "pickle.npz"
    np.savez(path, **arrays)  # stores labels as a pickle
    with pytest.raises(StreamFormatError, match=r"'labels'.*pickle"):
        load_stream(path)


def test_bad_meta(mini_stream: Stream, tmp_path: Path) -> None:
    arrays = _arrays(mini_stream)
    path = tmp_path / "meta.npz"
    np.savez(path, **arrays, meta=np.array(["{not json"]))
    with pytest.raises(StreamFormatError, match=r"'meta'.*JSON"):
        load_stream(path)
    np.savez(path, **arrays)  # meta is optional
    assert load_stream(path).meta == {}


def test_unreadable_files(mini_stream_path: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all")
    with pytest.raises(StreamFormatError, match=r"not an \.npz"):
        load_stream(garbage)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(mini_stream_path.read_bytes()[:2000])
    with pytest.raises(StreamFormatError, match=r"truncated\.npz"):
        load_stream(truncated)
    npy = tmp_path / "single.npz"
    with npy.open("wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(StreamFormatError, match=r"single \.npy"):
        load_stream(npy)
    with pytest.raises(StreamFormatError, match="does not exist"):
        load_stream(tmp_path / "missing.npz")
    with pytest.raises(StreamFormatError, match="not a file"):
        load_stream(tmp_path)
    # A zip that holds no arrays at all.
    empty_zip = tmp_path / "empty.npz"
    with zipfile.ZipFile(empty_zip, "w"):
        pass
    with pytest.raises(StreamFormatError, match="missing"):
        load_stream(empty_zip)


def test_rgb_stream_and_empty_eval(mini_stream: Stream) -> None:
    arrays = _arrays(mini_stream)
    for k in ("images", "train_images", "eval_images"):
        arrays[k] = np.repeat(arrays[k][..., None], 3, axis=3)
    validate_stream(arrays)
    arrays["eval_images"] = arrays["eval_images"][:0]
    arrays["eval_labels"] = arrays["eval_labels"][:0]
    arrays["eval_segment"] = arrays["eval_segment"][:0]
    validate_stream(arrays)


def test_segments_and_summary(mini_stream: Stream) -> None:
    segs = mini_stream.segments()
    assert [s.id for s in segs] == list(range(mini_stream.num_segments))
    assert sum(s.frames for s in segs) == len(mini_stream)
    assert segs[0].start == 0 and not segs[0].is_shift
    for s in segs:
        start, stop = mini_stream.segment_bounds(s.id)
        assert (mini_stream.segment[start:stop] == s.id).all()
    text = mini_stream.summary()
    assert len(text.splitlines()) == 2 + mini_stream.num_segments
    assert "10-19" in text  # MNIST label range, compacted


def test_iter_batches(mini_stream: Stream) -> None:
    batches = list(iter_batches(mini_stream, 100))
    assert [b.start for b in batches] == list(range(0, len(mini_stream), 100))
    assert np.array_equal(np.concatenate([b.images for b in batches]), mini_stream.images)
    assert np.array_equal(np.concatenate([b.indices for b in batches]), np.arange(len(mini_stream)))
    assert len(batches[-1].images) == (len(mini_stream) % 100 or 100)
    with pytest.raises(InputError):
        next(iter_batches(mini_stream, 0))


def test_load_image_directory(tmp_path: Path, fashion_slice) -> None:
    from PIL import Image

    x = fashion_slice[0][:5]
    for i, im in enumerate(x):
        Image.fromarray(im).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    gray = load_image_directory(tmp_path)
    assert gray.shape == (5, 28, 28) and gray.dtype == np.uint8
    assert np.array_equal(gray, x)  # PNG is lossless, order is by name
    assert load_image_directory(tmp_path, size=16).shape == (5, 16, 16)

    Image.fromarray(np.zeros((20, 30, 3), np.uint8) + 200).save(tmp_path / "99.png")
    with pytest.raises(InputError, match="different sizes"):
        load_image_directory(tmp_path)
    mixed = load_image_directory(tmp_path, size=(24, 32))
    assert mixed.shape == (6, 24, 32, 3)
    assert np.array_equal(mixed[0, ..., 0], mixed[0, ..., 2])  # gray promoted to RGB

    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"broken\.jpg"):
        load_image_directory(tmp_path, size=8)
    with pytest.raises(InputError, match="no images"):
        load_image_directory(_empty_dir(tmp_path))
    with pytest.raises(InputError, match="does not exist"):
        load_image_directory(tmp_path / "nope")


def _empty_dir(root: Path) -> Path:
    d = root / "empty"
    d.mkdir()
    return d
