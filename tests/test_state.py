"""Checkpoints: exact round trip, atomic replace, corrupt or mismatched -> CheckpointError;
the atomic-write helper every writer uses, and what a crash at each step leaves loadable."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.errors import CheckpointError
from edge_runtime.state import (
    VERSION,
    aside_path,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    flatten_state,
    has_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    unflatten_state,
)
from edge_runtime.state.checkpoint import MANIFEST, TENSORS


def _state() -> dict:
    rng = np.random.default_rng(0)
    return {
        "name": "x",
        "n": 3,
        "rate": 0.25,
        "flag": True,
        "none": None,
        "nan": float("nan"),
        "arr": rng.standard_normal((4, 5)).astype(np.float32),
        "bits": rng.integers(0, 2**63, size=(3, 2), dtype=np.uint64),
        "mask": np.array([True, False, True]),
        "nested": {"list": [1, "two", np.arange(3, dtype=np.int64)], "t": torch.arange(6.0)},
    }


def test_flatten_round_trip_in_memory() -> None:
    tree, tensors = flatten_state(_state())
    json.dumps(tree)  # the tree is plain JSON
    back = unflatten_state(tree, tensors)
    assert back["nested"]["list"][1] == "two"
    assert isinstance(back["nested"]["t"], torch.Tensor)
    np.testing.assert_array_equal(back["bits"], _state()["bits"])


def test_save_load_exact(tmp_path) -> None:
    state = _state()
    path = save_checkpoint(tmp_path / "ck", state, kind="test")
    back = load_checkpoint(path, kind="test")
    for key in ("arr", "bits", "mask"):
        assert back[key].dtype == state[key].dtype
        np.testing.assert_array_equal(back[key], state[key])
    assert torch.equal(back["nested"]["t"], state["nested"]["t"])
    assert back["nested"]["list"][:2] == [1, "two"]
    assert (back["name"], back["n"], back["rate"], back["flag"], back["none"]) == (
        "x",
        3,
        0.25,
        True,
        None,
    )
    assert np.isnan(back["nan"])
    assert read_manifest(path)["version"] == VERSION


def test_overwrite_is_atomic_and_leaves_no_temp(tmp_path) -> None:
    save_checkpoint(tmp_path / "ck", {"v": np.zeros(2)}, kind="test")
    save_checkpoint(tmp_path / "ck", {"v": np.ones(2)}, kind="test")
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "ck", kind="test")["v"], np.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_failed_save_keeps_old_checkpoint(tmp_path) -> None:
    save_checkpoint(tmp_path / "ck", {"v": np.zeros(2)}, kind="test")
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "ck", {"v": object()}, kind="test")
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "ck", kind="test")["v"], np.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_corrupt_tensors(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "ck", {"v": np.arange(100.0)}, kind="test")
    raw = bytearray((path / TENSORS).read_bytes())
    raw[-8] ^= 0xFF
    (path / TENSORS).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, kind="test")


def test_corrupt_manifest_missing_and_wrong_kind(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "ck", {"v": np.arange(3)}, kind="test")
    with pytest.raises(CheckpointError, match="holds 'test'"):
        load_checkpoint(path, kind="other")
    (path / MANIFEST).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, kind="test")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", kind="test")


def test_future_version_is_refused(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "ck", {"v": np.arange(3)}, kind="test")
    m = json.loads((path / MANIFEST).read_text())
    m["version"] = VERSION + 1
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(path, kind="test")


# -- crash safety: one atomic-write helper, fsync of file and folder, the directory swap ------


class _Journal:
    """Records fsyncs (file or folder) and renames in order, then does them for real."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[str] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
            self.events.append(f"fsync-{kind}")
            real_fsync(fd)

        def replace(src, dst) -> None:
            self.events.append("replace")
            real_replace(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)


def _fail_replace(monkeypatch: pytest.MonkeyPatch, *, from_call: int, until: int | None) -> None:
    """os.replace raises OSError on calls ``from_call`` .. ``until`` (None: every later call, as
    when the process has died and nothing after the crash happens)."""
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst) -> None:
        calls["n"] += 1
        if calls["n"] >= from_call and (until is None or calls["n"] <= until):
            raise OSError(5, "simulated crash in os.replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_atomic_write_fsyncs_file_then_renames_then_fsyncs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = _Journal(monkeypatch)
    path = atomic_write_json(tmp_path / "m.json", {"a": 1, "x": float("nan")})
    assert journal.events == ["fsync-file", "replace", "fsync-dir"]
    assert json.loads(path.read_text())["a"] == 1 and path.read_text().endswith("}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    journal.events.clear()
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    with atomic_path(tmp_path / "p.onnx") as tmp:
        tmp.write_bytes(b"model")
    assert journal.events == ["fsync-file", "replace", "fsync-dir"] * 3
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "p.onnx").read_bytes() == b"model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "m.json", "p.onnx", "t.txt"]


def test_atomic_write_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = atomic_write_text(tmp_path / "f.txt", "old")

    def broken(fh) -> None:
        fh.write(b"half of the new")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    with pytest.raises(TypeError):  # not serialisable: fails before any file is touched
        atomic_write_json(path, {"x": object()})
    _fail_replace(monkeypatch, from_call=1, until=None)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left behind


def test_checkpoint_save_fsyncs_every_file_and_the_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path / "ck", {"v": np.zeros(2)}, kind="test")
    journal = _Journal(monkeypatch)
    save_checkpoint(tmp_path / "ck", {"v": np.ones(2)}, kind="test")
    events = journal.events
    # Both files and the new directory are durable before the first rename ...
    first = events.index("replace")
    assert events[:first].count("fsync-file") == 2 and "fsync-dir" in events[:first]
    # ... and each rename is followed by a fsync of the parent folder.
    assert events.count("replace") == 2
    for i, event in enumerate(events):
        if event == "replace":
            assert events[i + 1] == "fsync-dir"


@pytest.mark.parametrize("dies", [False, True], ids=["rename-fails", "process-dies"])
def test_crash_between_the_two_renames_still_loads_a_checkpoint(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    dies: bool,
) -> None:
    ck = tmp_path / "ck"
    save_checkpoint(ck, {"v": np.zeros(2)}, kind="test")
    # Call 1 moves the old checkpoint aside; call 2 would rename the new one in.
    _fail_replace(monkeypatch, from_call=2, until=None if dies else 2)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(ck, {"v": np.ones(2)}, kind="test")
    monkeypatch.undo()
    assert has_checkpoint(ck)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.state.checkpoint"):
        back = load_checkpoint(ck, kind="test")
    np.testing.assert_array_equal(back["v"], np.zeros(2))  # the old, complete checkpoint
    if dies:  # the old one is only aside: loaded from there, and the log says so
        assert not ck.exists() and aside_path(ck).is_dir()
        assert any(str(aside_path(ck)) in r.getMessage() for r in caplog.records)
    else:  # the failed swap put the old one back
        assert ck.is_dir() and not caplog.records
    # The next save completes normally and leaves nothing else behind.
    save_checkpoint(ck, {"v": np.full(2, 2.0)}, kind="test")
    np.testing.assert_array_equal(load_checkpoint(ck, kind="test")["v"], np.full(2, 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_crash_after_the_swap_loads_the_new_checkpoint(tmp_path: Path) -> None:
    """Killed before the aside copy was deleted: the new checkpoint wins, the old one goes."""
    ck = tmp_path / "ck"
    save_checkpoint(ck, {"v": np.zeros(2)}, kind="test")
    shutil.copytree(ck, aside_path(ck))
    save_checkpoint(tmp_path / "new", {"v": np.ones(2)}, kind="test")
    shutil.rmtree(ck)
    (tmp_path / "new").rename(ck)
    np.testing.assert_array_equal(load_checkpoint(ck, kind="test")["v"], np.ones(2))
    (tmp_path / ".ck.tmp-cut-short").mkdir()  # a build that a crash interrupted
    save_checkpoint(ck, {"v": np.full(2, 3.0)}, kind="test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_damaged_checkpoint_falls_back_to_the_aside_copy_only_when_incomplete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ck = tmp_path / "ck"
    save_checkpoint(ck, {"v": np.ones(2)}, kind="test")
    save_checkpoint(aside_path(ck), {"v": np.zeros(2)}, kind="test")
    (ck / TENSORS).write_bytes(b"torn")
    with caplog.at_level(logging.WARNING, logger="edge_runtime.state.checkpoint"):
        np.testing.assert_array_equal(load_checkpoint(ck, kind="test")["v"], np.zeros(2))
    assert "corrupt" in caplog.text and str(aside_path(ck)) in caplog.text
    # A checkpoint of another kind is a caller's mistake, not damage: no stand-in.
    save_checkpoint(ck, {"v": np.ones(2)}, kind="other")
    save_checkpoint(aside_path(ck), {"v": np.zeros(2)}, kind="test")
    with pytest.raises(CheckpointError, match="holds 'other'"):
        load_checkpoint(ck, kind="test")
    # Both damaged: the error is about the checkpoint that was asked for.
    shutil.rmtree(ck)
    (aside_path(ck) / MANIFEST).write_text("{", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"does not exist") as info:
        load_checkpoint(ck, kind="test")
    assert str(ck) in str(info.value)
    assert not has_checkpoint(tmp_path / "never")


def test_hdc_detector_save_is_atomic_and_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_runtime.hdc.detector import HDCDetector

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 32)).astype(np.float32)
    det = HDCDetector(dim=256, k=3, seed=0).fit(x, np.arange(60) % 3)
    path = tmp_path / "hdc.safetensors"
    journal = _Journal(monkeypatch)
    det.save(path)
    assert journal.events == ["fsync-file", "replace", "fsync-dir"]
    monkeypatch.undo()
    np.testing.assert_allclose(HDCDetector.load(path).score(x[:5]), det.score(x[:5]))
    before = path.read_bytes()
    _fail_replace(monkeypatch, from_call=1, until=None)
    with pytest.raises(OSError, match="simulated"):
        HDCDetector(dim=128, k=3, seed=1).fit(x, np.arange(60) % 3).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["hdc.safetensors"]
