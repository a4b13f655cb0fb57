"""Resource budgets under pressure: with resident memory near ``device.memory_budget_mb`` the
runtime sheds optional work (a smaller batch, adaptation postponed, new adaptors refused with
an alert) and keeps serving; it is not left to be killed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_runtime.config import RuntimeConfig
from edge_runtime.data.stream import Stream
from edge_runtime.runner import run_stream
from edge_runtime.runner.labels import StreamLabels
from edge_runtime.runner.pressure import NORMAL, SHED, MemoryGovernor
from edge_runtime.runtime import Runtime


def _config(**more: str) -> RuntimeConfig:
    return RuntimeConfig().with_overrides(
        {
            "encoder.input_size": "32",
            "hdc.dim": "2048",
            "adapt.steps": "60",
            "adapt.label_budget": "40",
            **more,
        }
    )


def test_a_low_budget_sheds_work_and_refuses_new_adaptors_but_serves_every_frame(
    mini_stream: Stream, tmp_path: Path
) -> None:
    # 64 MB: far below what this process holds (the encoder alone is more), the real RSS.
    cfg = _config(**{"device.memory_budget_mb": "64"})
    result = run_stream(mini_stream, cfg, tmp_path, progress=False, baselines=False)
    m = result.metrics
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    pressure = [e for e in events if e["type"] == "memory_pressure"]
    assert pressure and pressure[0]["level"] == SHED and pressure[0]["budget_mb"] == 64.0
    assert pressure[0]["batch_size"] == 16 and "adaptation_postponed" in pressure[0]["shed"]
    refused = [e for e in events if e["type"] == "adaptation_refused"]
    assert refused and all("memory_budget_mb=64" in e["reason"] for e in refused)
    assert m["adaptors"] == 1  # only the base domain: no new adaptor was built
    assert m["memory"]["level"] == SHED and m["memory"]["batch_size_now"] == 16
    with np.load(tmp_path / "frames.npz") as z:
        assert len(z["prediction"]) == len(mini_stream)  # every frame served
    assert not result.interrupted


def test_adaptation_is_postponed_while_memory_is_short(mini_stream: Stream) -> None:
    rt = Runtime(_config(), background=False)
    rss = [100.0]
    gov = MemoryGovernor(rt, budget_mb=1000.0, batch_size=32, probe=lambda: rss[0])
    labels = gov.wrap(StreamLabels(mini_stream.labels))
    try:
        assert gov.check(0) == NORMAL and gov.current_batch == 32
        rss[0] = 900.0  # 90 % of the budget
        assert gov.check(32) == SHED and gov.current_batch == 16
        rt.frames_seen = 40
        assert len(labels.answer(np.array([33, 34])).indices) == 0  # held back
        rss[0] = 200.0
        assert gov.check(48) == NORMAL and gov.current_batch == 32
        late = labels.answer(np.zeros(0, np.int64))
        assert late.indices.tolist() == [33, 34]
        assert late.labels.tolist() == mini_stream.labels[[33, 34]].tolist()
        # Held no longer than max_postpone_frames, even if the pressure stays.
        rss[0] = 900.0
        gov.check(64)
        rt.frames_seen = 70
        assert len(labels.answer(np.array([65])).indices) == 0
        rt.frames_seen = 70 + gov.max_postpone_frames
        assert labels.answer(np.zeros(0, np.int64)).indices.tolist() == [65]
        events = [e for e in rt.drain_events() if e["type"] == "memory_pressure"]
        assert [e["level"] for e in events] == [SHED, NORMAL, SHED]
        assert gov.summary()["labels_postponed"] == 3
    finally:
        rt.close()
