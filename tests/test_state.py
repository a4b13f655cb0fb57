"""Checkpoints: exact round trip, atomic replace, corrupt or mismatched -> CheckpointError."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_runtime.errors import CheckpointError
from edge_runtime.state import (
    VERSION,
    flatten_state,
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
