"""Built-in scenarios and the `edge-runtime scenario` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.cli import main
from edge_runtime.data import Stream, load_stream
from edge_runtime.data.scenario import SCENARIOS, ScenarioSpec, SegmentSpec, build_scenario
from edge_runtime.errors import InputError


def _hashes(images: np.ndarray) -> set[bytes]:
    return {im.tobytes() for im in images}


def test_mini_structure(mini_stream: Stream) -> None:
    s = mini_stream
    assert s.num_segments == 6
    assert s.segment_is_shift.tolist() == [False, True, True, True, True, True]
    novel = [float(s.is_novel[s.segment == k].mean()) for k in range(6)]
    assert novel == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    labels = [set(np.unique(s.labels[s.segment == k]).tolist()) for k in range(6)]
    assert labels[0] == labels[1] == labels[2] == labels[5] == set(range(6))
    assert labels[3] == {6, 7, 8, 9}
    assert labels[4] == set(range(10, 20))
    assert set(np.unique(s.train_labels).tolist()) == set(range(6))
    assert np.bincount(s.train_labels).tolist() == [100] * 6
    for k in range(6):
        assert np.count_nonzero(s.eval_segment == k) == 60
        assert set(np.unique(s.eval_labels[s.eval_segment == k]).tolist()) == labels[k]
    assert s.images.shape[1:] == (28, 28) and s.images.dtype == np.uint8
    assert s.meta["segments"][1]["corruption"] == "fog"


def test_mini_frames_are_disjoint(mini_stream: Stream) -> None:
    s = mini_stream
    train = _hashes(s.train_images)
    clean = _hashes(s.images[(s.segment == 0) | (s.segment == 5)])
    assert not train & clean
    first, last = _hashes(s.images[s.segment == 0]), _hashes(s.images[s.segment == 5])
    assert not first & last
    assert not _hashes(s.eval_images) & (train | clean)


def test_corrupted_segments_differ_from_clean(mini_stream: Stream) -> None:
    s = mini_stream
    clean = s.images[s.segment == 0].astype(float)
    fog = s.images[s.segment == 1].astype(float)
    noise = s.images[s.segment == 2].astype(float)
    assert fog.mean() > clean.mean() + 40  # haze brightens
    # Sensor noise: large pixel-to-pixel differences in the (normally flat) background.
    rough = lambda a: np.abs(np.diff(a, axis=2)).mean()  # noqa: E731
    assert rough(noise) > 1.5 * rough(clean)
    # Eval frames of a segment get the same transform.
    assert (
        s.eval_images[s.eval_segment == 1].mean() > s.eval_images[s.eval_segment == 0].mean() + 40
    )


def test_deterministic_in_seed(mini_stream: Stream) -> None:
    again = build_scenario("fashion-drift-mini", seed=0)
    for name, arr in mini_stream.arrays().items():
        assert np.array_equal(arr, getattr(again, name)), name
    other = build_scenario("fashion-drift-mini", seed=1)
    assert not np.array_equal(other.images, mini_stream.images)
    assert other.segment_is_shift.tolist() == mini_stream.segment_is_shift.tolist()


def test_full_scenario_sizes() -> None:
    spec = SCENARIOS["fashion-drift"]
    assert [seg.frames for seg in spec.segments] == [2000, 1500, 1500, 1500, 1500, 1500]
    s = build_scenario(spec, seed=0)
    assert len(s) == 9500 and len(s.train_images) == 6000 and len(s.eval_images) == 1800
    assert not _hashes(s.train_images) & _hashes(s.images[s.segment == 0])


def test_custom_spec_and_errors() -> None:
    spec = ScenarioSpec(
        name="tiny",
        description="base + sklearn digits",
        base_source="fashion",
        base_classes=(0, 1),
        train_per_class=5,
        segments=(
            SegmentSpec("a", "fashion", (0, 1), 10, 4, False),
            SegmentSpec("digits", "sklearn_digits", (3, 4), 10, 4, True, "blur", 2),
            SegmentSpec("photos", "natural", (0,), 6, 2, True),
        ),
    )
    s = build_scenario(spec, seed=3)
    assert s.images.shape == (26, 28, 28)  # 8x8 digits resized to the stream's size
    assert set(s.labels[s.segment == 1].tolist()) == {23, 24}
    assert set(s.labels[s.segment == 2].tolist()) == {30}
    assert s.is_novel.tolist() == [False] * 10 + [True] * 16

    with pytest.raises(InputError, match="unknown scenario"):
        build_scenario("nope")
    bad = ScenarioSpec(
        "x", "", "fashion", (0,), 5, (SegmentSpec("a", "fashion", (0,), 5, 1, True),)
    )
    with pytest.raises(InputError, match="segment 0 cannot be a shift"):
        build_scenario(bad)
    greedy = ScenarioSpec(
        "x", "", "mnist", (0,), 600, (SegmentSpec("a", "mnist", (0,), 5, 1, False),)
    )
    with pytest.raises(InputError, match="only 500 remain"):
        build_scenario(greedy)


# --------------------------------------------------------------------------- CLI


def test_cli_list(capsys) -> None:
    assert main(["scenario", "list"]) == 0
    out = capsys.readouterr().out
    assert "fashion-drift " in out and "fashion-drift-mini" in out


def test_cli_build_and_inspect(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s.npz"
    assert (
        main(["-q", "scenario", "build", "fashion-drift-mini", "--out", str(out), "--seed", "2"])
        == 0
    )
    assert "1140 frames" in capsys.readouterr().out
    s = load_stream(out)
    assert s.meta["seed"] == 2 and len(s) == 1140
    assert main(["scenario", "inspect", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 8
    row4 = table[2 + 4].split()
    assert row4[:6] == ["4", "780", "180", "yes", "1.00", "60"] and row4[6] == "10-19"


def test_cli_inspect_malformed(mini_stream: Stream, tmp_path: Path, capsys) -> None:
    arrays = {k: np.array(v) for k, v in mini_stream.arrays().items()}
    arrays["eval_labels"] = arrays["eval_labels"][:-1]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    assert main(["scenario", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "eval_labels" in err and "Traceback" not in err


def test_cli_inspect_malformed_subprocess(mini_stream: Stream, tmp_path: Path) -> None:
    arrays = {k: np.array(v) for k, v in mini_stream.arrays().items()}
    arrays["labels"] = arrays["labels"].astype(np.float32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    proc = subprocess.run(
        [sys.executable, "-m", "edge_runtime", "scenario", "inspect", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "'labels'" in lines[0] and "float" in lines[0]
    assert "Traceback" not in proc.stderr
