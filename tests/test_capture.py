"""The active-learning capture ring with real parts: the mini scenario served live through
``LiveServe`` (real drift flags), real PNG files and the real SQLite index; the rate and size
caps replayed over the same served batches with a stepped clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.cli.demo import cached_scenario
from edge_runtime.data.stream import load_stream
from edge_runtime.errors import InputError
from edge_runtime.runner.loop import ServedBatch
from edge_runtime.runtime import Runtime
from edge_runtime.serving import LiveServe, ServeOptions
from edge_runtime.serving.ring import DRIFT, LOW_CONFIDENCE, CaptureRing, RingConfig, list_capture
from edge_runtime.sources import FrameFormat

AROUND = 5


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ServedBatch]]:
    """One live serve of the mini scenario with a roomy ring; its output DIR and batches."""
    scenario = cached_scenario("fashion-drift-mini")
    stream = load_stream(scenario)
    cfg = Runtime().config.with_overrides(
        {"encoder.input_size": 32, "hdc.dim": 2048, "adapt.label_budget": 20, "adapt.steps": 30}
    )
    rt = Runtime(cfg, background=False)
    rt.fit_base(stream.train_images, stream.train_labels)
    out = tmp_path_factory.mktemp("serve")
    ring = RingConfig(around=AROUND, margin=0.02, per_minute=10_000, per_hour=10_000)
    opts = ServeOptions([str(scenario)], out, FrameFormat(28, 28, 1), ring=ring)
    batches: list[ServedBatch] = []
    with LiveServe(rt, opts, observers=[batches.append]) as server:
        server.run()
    rt.close()
    return out, batches


def test_drift_frames_around_each_flag_are_captured_and_indexed(
    served: tuple[Path, list[ServedBatch]],
) -> None:
    out, batches = served
    flags = [e["frame"] for b in batches for e in b.events if e["type"] in ("drift", "novel_class")]
    assert flags, "the mini scenario drifts; the monitor must flag it"
    rows = list_capture(out)
    drift = {r.frame_id for r in list_capture(out, reason=DRIFT)}
    for f in flags:  # the N frames before and after every flag (the flag's own frame too)
        assert set(range(f - AROUND, f + AROUND + 1)) <= drift, f
    assert all(r.flag_frame in flags for r in rows if r.reason == DRIFT)
    low = list_capture(out, reason=LOW_CONFIDENCE)
    assert low and all(abs(r.score) < 0.02 for r in low)
    # The index and the folder agree file for file, byte for byte.
    ring_dir = out / "capture" / "ring"
    assert {Path(r.path).name for r in rows} == {p.name for p in ring_dir.glob("*.png")}
    assert all(Path(r.path).stat().st_size == r.bytes for r in rows)
    assert all(r.source is not None and r.source_frame is not None for r in rows)
    # A captured PNG is the served frame itself.
    served_img = {int(i): b.batch.images[j] for b in batches for j, i in enumerate(b.batch.indices)}
    import av  # PyAV decodes PNG through FFmpeg: an independent decoder of what was written

    with av.open(rows[0].path) as c:
        img = next(c.decode(video=0)).to_ndarray(format="gray")
    assert np.array_equal(img, np.asarray(served_img[rows[0].frame_id]).reshape(img.shape))
    assert list_capture(out, since=rows[-1].time) == [r for r in rows if r.time >= rows[-1].time]


def _replay(root: Path, batches: list[ServedBatch], cfg: RingConfig, step_s: float) -> CaptureRing:
    now = [0.0]
    ring = CaptureRing(root, cfg, clock=lambda: now[0])
    for b in batches:
        ring(b)
        now[0] += step_s
    return ring


def test_rate_caps_hold_per_minute_and_per_hour_for_each_reason(
    tmp_path: Path, served: tuple[Path, list[ServedBatch]]
) -> None:
    _, batches = served
    # 36 batches, one every 10 s: six minutes. At most 3 a minute, 12 an hour, per reason.
    cfg = RingConfig(around=AROUND, margin=0.05, per_minute=3, per_hour=12)
    ring = _replay(tmp_path / "r", batches, cfg, 10.0)
    rows = list_capture(tmp_path / "r")
    for reason in (DRIFT, LOW_CONFIDENCE):
        times = np.array([r.time for r in rows if r.reason == reason])
        for t in times:
            assert np.count_nonzero((times > t - 60.0) & (times <= t)) <= 3
        assert len(times) <= 12
    assert ring.counts.rate_limited[LOW_CONFIDENCE] > 0
    # Low-confidence frames use up their own cap, never the drift frames': each flag's
    # neighbourhood still gets in (3 of its frames a minute here).
    assert ring.counts.captured[DRIFT] > 0
    ring.close()
    # A per-hour cap alone: never more than it, however many minutes pass.
    cfg = RingConfig(around=AROUND, margin=0.05, per_minute=1000, per_hour=7)
    ring = _replay(tmp_path / "h", batches, cfg, 10.0)
    low = list_capture(tmp_path / "h", reason=LOW_CONFIDENCE)
    assert len(low) == 7 == ring.counts.captured[LOW_CONFIDENCE]
    assert 0 < len(list_capture(tmp_path / "h", reason=DRIFT)) <= 7
    ring.close()


def test_size_caps_delete_the_oldest_files_and_rows(
    tmp_path: Path, served: tuple[Path, list[ServedBatch]]
) -> None:
    _, batches = served
    roomy = RingConfig(around=AROUND, margin=0.05, per_minute=10_000, per_hour=10_000)
    full = _replay(tmp_path / "all", batches, roomy, 1.0)
    everything = list_capture(tmp_path / "all")
    full.close()
    assert len(everything) > 20
    cfg = RingConfig(**{**vars(roomy), "max_files": 20})
    ring = _replay(tmp_path / "files", batches, cfg, 1.0)
    kept = list_capture(tmp_path / "files")
    assert len(kept) == 20 == len(list((tmp_path / "files").glob("*.png")))
    # the newest 20 survive: the same frames, in the same order, as the uncapped ring's last 20
    assert [r.frame_id for r in kept] == [r.frame_id for r in everything[-20:]]
    assert ring.counts.evicted == len(everything) - 20
    ring.close()
    cap = sum(r.bytes for r in everything[-15:])
    cfg = RingConfig(**{**vars(roomy), "max_bytes": cap})
    ring = _replay(tmp_path / "bytes", batches, cfg, 1.0)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "bytes").glob("*.png"))
    assert on_disk <= cap and on_disk == ring.counts.bytes
    assert len(list_capture(tmp_path / "bytes")) == 15
    ring.close()
    # A restarted ring picks up what is on disk and keeps enforcing the caps.
    again = CaptureRing(tmp_path / "bytes", cfg)
    assert again.counts.files == 15 and again.counts.bytes == on_disk
    again.close()


def test_bad_settings_and_missing_index_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="per_minute"):
        RingConfig(per_minute=-1)
    with pytest.raises(InputError, match="margin"):
        RingConfig(margin=0.0)
    with pytest.raises(InputError, match="no capture index"):
        list_capture(tmp_path)
    with pytest.raises(InputError, match="reason"):
        list_capture(tmp_path, reason="pretty")
