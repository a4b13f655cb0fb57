"""Crash-safe resume, in process: the checkpoint series (keep the last K, skip a damaged one
with a warning, refuse an incompatible one whole), the signature window in the runtime state,
and ``run_stream`` resumed after a crash mid-stream giving the outputs of one uninterrupted
run. The same with real SIGKILLs of real processes is tests/test_kill.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.config import RuntimeConfig
from edge_runtime.data.stream import Stream
from edge_runtime.drift.signature import DomainSignature
from edge_runtime.errors import CheckpointError
from edge_runtime.runner import run_stream
from edge_runtime.runner.resume import CHECKPOINTS, RUN_KIND
from edge_runtime.runtime import Runtime
from edge_runtime.state import IncompatibleCheckpoint
from edge_runtime.state.checkpoint import MANIFEST
from edge_runtime.state.series import CheckpointSeries


def _config() -> RuntimeConfig:
    return RuntimeConfig().with_overrides(
        {
            "encoder.input_size": "32",
            "hdc.dim": "2048",
            "adapt.steps": "60",
            "adapt.label_budget": "40",
        }
    )


def test_series_keeps_the_last_k_and_skips_a_damaged_one(tmp_path: Path, caplog) -> None:
    series = CheckpointSeries(tmp_path, keep=3)
    for i in range(5):
        series.save({"i": i, "x": np.full(4, i, np.float32)}, kind="k")
    paths = series.paths()
    assert [p.name for p in paths] == ["ckpt-000005", "ckpt-000004", "ckpt-000003"]
    (paths[0] / MANIFEST).write_text((paths[0] / MANIFEST).read_text()[:-40])  # cut short
    with caplog.at_level(logging.WARNING):
        path, state = series.load_newest(kind="k")
    assert path == paths[1] and state["i"] == 3
    assert f"skipping damaged checkpoint {paths[0]}" in caplog.text


def test_series_refuses_another_format_version_whole(tmp_path: Path) -> None:
    series = CheckpointSeries(tmp_path)
    series.save({"i": 1}, kind="k")
    newest = series.save({"i": 2}, kind="k")
    manifest = json.loads((newest / MANIFEST).read_text())
    manifest["version"] = 99
    (newest / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IncompatibleCheckpoint, match="format version 99"):
        series.load_newest(kind="k")  # not the older one: it would be just as wrong


def test_a_flipped_digit_in_the_manifest_is_caught(tmp_path: Path) -> None:
    series = CheckpointSeries(tmp_path)
    path = series.save({"threshold": 0.123456}, kind="k")
    text = (path / MANIFEST).read_text()
    (path / MANIFEST).write_text(text.replace("0.123456", "0.923456"))
    assert series.load_newest(kind="k") is None  # the only one, damaged: nothing to resume


def test_signature_window_round_trips() -> None:
    sig = DomainSignature(window=8)
    rng = np.random.default_rng(0)
    x = rng.random((12, 5), dtype=np.float32)
    sig.update(x, np.arange(12) % 3 != 0)
    again = DomainSignature()
    again.load_state_dict(sig.state_dict())
    assert again.window == 8 and len(again) == len(sig)
    np.testing.assert_array_equal(again.recent(), sig.recent())


def test_runtime_state_holds_the_signature_and_refuses_another_encoder(
    mini_stream: Stream, tmp_path: Path
) -> None:
    rt = Runtime(_config(), background=False)
    rt.fit_base(mini_stream.train_images[:200], mini_stream.train_labels[:200])
    rt.process(mini_stream.images[480:560])  # a shifted segment: OOD frames to sign
    state = rt.state_dict()
    assert len(state["signature"]["recent"]) == len(rt.signature) > 0
    back = Runtime.from_state(state, "test", rt.encoder, background=False)
    np.testing.assert_array_equal(back.signature.recent(), rt.signature.recent())
    other = Runtime(_config().with_overrides({"encoder.input_size": "40"}), background=False)
    with pytest.raises(IncompatibleCheckpoint, match="was made with encoder"):
        Runtime.from_state(state, "test", other.encoder, background=False)
    for r in (rt, back, other):
        r.close()


class _Crash(Exception):
    pass


def _frames(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "frames.npz") as z:
        return {k: z[k] for k in z.files}


def _events(out: Path) -> list[tuple[str, int]]:
    lines = (out / "events.jsonl").read_text().splitlines()
    return [(e["type"], e["frame"]) for e in map(json.loads, lines)]


@pytest.mark.parametrize("crash_at", [200, 500])
def test_resume_after_a_crash_gives_one_uninterrupted_run(
    mini_stream: Stream, tmp_path: Path, crash_at: int
) -> None:
    # No baselines: they take most of a run's time here, and what they need from a resumed
    # run (the collector's features) is checked by test_collector_state_round_trips.
    ref = tmp_path / "ref"
    run_stream(mini_stream, _config(), ref, progress=False, checkpoint_every=96, baselines=False)

    out = tmp_path / "crashed"

    def crash(served: int, rt: Runtime) -> None:
        if served >= crash_at:
            raise _Crash  # the process dies here: no outputs, events.jsonl past the checkpoint

    with pytest.raises(_Crash):
        run_stream(mini_stream, _config(), out, progress=False, checkpoint_every=96, on_batch=crash)
    assert not (out / "frames.npz").exists()
    assert CheckpointSeries(out / CHECKPOINTS).paths()
    run_stream(
        mini_stream,
        _config(),
        out,
        progress=False,
        resume=True,
        checkpoint_every=96,
        baselines=False,
    )
    got, want = _frames(out), _frames(ref)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert _events(out) == _events(ref)
    m, r = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    for key in ("prequential_accuracy", "mean_final_accuracy", "adaptors", "labels_used"):
        assert m[key] == r[key], key


def test_collector_state_round_trips() -> None:
    from edge_runtime.runner.metrics import ServedCollector

    rng = np.random.default_rng(1)
    c = ServedCollector(50, 6, keep_features=True)
    c.prediction[:30] = rng.integers(0, 9, 30)
    c.ood_score[:30] = rng.random(30)
    c.rejected[[3, 7]] = True
    c.features[:30] = rng.random((30, 6))
    c.served = 30
    c._asked = {29: rng.random(6).astype(np.float32)}
    c._revealed = {4: rng.random(6).astype(np.float32), 9: rng.random(6).astype(np.float32)}
    back = ServedCollector(50, 6, keep_features=True)
    back.load_state_dict(c.state_dict())
    for name in ("prediction", "ood_score", "rejected", "features"):
        np.testing.assert_array_equal(getattr(back, name)[:30], getattr(c, name)[:30])
    np.testing.assert_array_equal(back.features_of([9, 4]), c.features_of([9, 4]))
    assert back.has_features(4) and not back.has_features(29) and back.served == 30


def test_resume_refuses_a_checkpoint_of_another_stream(mini_stream: Stream, tmp_path: Path) -> None:
    import dataclasses

    run_stream(
        mini_stream,
        _config(),
        tmp_path,
        progress=False,
        checkpoint_every=256,
        max_frames=300,
        baselines=False,
    )
    other = dataclasses.replace(mini_stream, labels=mini_stream.labels[::-1].copy())
    with pytest.raises(CheckpointError, match="another stream"):
        run_stream(other, _config(), tmp_path, progress=False, resume=True)
    found = CheckpointSeries(tmp_path / CHECKPOINTS).load_newest(kind=RUN_KIND)
    assert found is not None  # untouched
