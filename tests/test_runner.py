"""The runner's parts: label sources, camera-rate pacing, the serve loop, adaptation delays,
and ``edge-runtime run --rate`` end to end on a small real Fashion-MNIST stream."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from run_args import FAST_RUN_ARGS

from edge_runtime import cli
from edge_runtime.data import Stream, save_stream
from edge_runtime.data.stream import iter_batches
from edge_runtime.errors import InputError
from edge_runtime.runner import (
    Labelled,
    LabelSource,
    Pacer,
    ServedCollector,
    ServeLoop,
    StreamLabels,
    adaptation_delays,
    delay_metrics,
)

FAST = [*FAST_RUN_ARGS, "--no-baselines"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.naps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.naps.append(s)
        self.now += s


# ------------------------------------------------------------------------------- pacing
def test_pacer_waits_for_arrival_and_never_sleeps_when_behind() -> None:
    clock = FakeClock()
    pacer = Pacer(10.0, clock=clock, sleep=clock.sleep, slice_s=0.05)
    t0 = pacer.start()
    assert pacer.arrival(0) == t0 and pacer.arrival(31) == pytest.approx(t0 + 3.1)
    assert pacer.wait_for(31)
    assert clock.now == pytest.approx(t0 + 3.1) and max(clock.naps) <= 0.05 + 1e-12
    clock.naps.clear()
    clock.now = t0 + 10.0  # the runtime fell behind: frame 63 arrived long ago
    assert pacer.wait_for(63) and clock.naps == []
    assert pacer.slept_s == pytest.approx(3.1)


def test_pacer_wait_stops_on_interrupt_and_rejects_bad_rates() -> None:
    clock = FakeClock()
    pacer = Pacer(1.0, clock=clock, sleep=clock.sleep, slice_s=0.05)
    pacer.start()
    calls = iter([False, False, True])
    assert pacer.wait_for(1000, lambda: next(calls)) is False
    assert len(clock.naps) == 2  # stopped within one slice, not after 1,000 s
    for bad in (0, -5, float("nan"), float("inf")):
        with pytest.raises(InputError):
            Pacer(bad)


# ------------------------------------------------------------------------------- labels
def test_stream_labels_reveal_and_count_per_flag() -> None:
    labels = StreamLabels(np.arange(100, dtype=np.int64) % 7)
    assert isinstance(labels, LabelSource)
    got = labels.answer(np.array([3, 4]))  # before any flag: a resumed collection
    assert got.indices.tolist() == [3, 4] and got.labels.tolist() == [3, 4]
    labels.write({"type": "drift", "frame": 10})
    labels.write({"type": "labels_requested", "frame": 10})
    labels.answer(np.array([11, 12, 13]))
    assert len(labels.answer(np.zeros(0, np.int64)).indices) == 0
    labels.write({"type": "labels_requested", "frame": 50})
    labels.answer(np.array([51]))
    assert [t.frame for t in labels.per_flag] == [None, 10, 50]
    assert labels.revealed_per_flag == [2, 3, 1] and labels.revealed == 6
    assert labels.per_flag[1].as_labelled().labels.tolist() == [4, 5, 6]
    with pytest.raises(InputError):
        labels.answer(np.array([100]))


# ------------------------------------------------------------------------------- serve loop
@dataclass
class _Decisions:
    indices: np.ndarray
    prediction: np.ndarray
    ood_score: np.ndarray
    domain: np.ndarray
    is_ood: np.ndarray
    rejected: np.ndarray
    label_request: np.ndarray
    features: np.ndarray
    events: list = field(default_factory=list)


class FakeRuntime:
    """Asks for the labels of frames 4..7 and records what feedback brought."""

    def __init__(self) -> None:
        self.fed: list[tuple[list[int], list[int]]] = []
        self.finished = False

    def process(self, frames: np.ndarray, indices: np.ndarray) -> _Decisions:
        n = len(indices)
        feats = np.repeat(indices[:, None].astype(np.float32), 3, axis=1)
        events = [{"type": "labels_requested", "frame": 4}] if indices[0] == 4 else []
        return _Decisions(
            indices,
            indices % 3,
            np.ones(n, np.float32),
            np.zeros(n, np.int64),
            np.zeros(n, bool),
            np.zeros(n, bool),
            (indices >= 4) & (indices < 8),
            feats,
            events,
        )

    def feedback(self, indices: np.ndarray, labels: np.ndarray) -> int:
        self.fed.append((indices.tolist(), labels.tolist()))
        return len(indices)

    def drain_events(self) -> list:
        return []

    def finish(self, wait: bool = True) -> None:
        self.finished = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        return True


class LateLabeller:
    """An operator who answers one batch late and skips one frame: a LabelSource too."""

    def __init__(self) -> None:
        self.waiting: list[int] = []

    def answer(self, indices: np.ndarray) -> Labelled:
        ready = [i for i in self.waiting if i != 5]
        self.waiting = indices.tolist()
        return Labelled(np.asarray(ready, np.int64), np.asarray(ready, np.int64) * 10)


def test_serve_loop_with_a_late_label_source_and_observers() -> None:
    rt = FakeRuntime()
    collector = ServedCollector(12, 3)
    seen: list[int] = []
    loop = ServeLoop(
        rt,  # type: ignore[arg-type]
        LateLabeller(),
        observers=[collector, lambda item: seen.append(item.batch.stop)],
    )
    outcome = loop.run(iter_batches(np.zeros((12, 2, 2), np.uint8), 4))
    assert outcome.served == 12 and not outcome.interrupted and rt.finished
    assert seen == [4, 8, 12]
    # Frames 4..7 were asked in batch 2, answered (without 5) after batch 3.
    assert rt.fed == [([4, 6, 7], [40, 60, 70])]
    assert collector.served == 12 and collector.prediction.tolist() == [i % 3 for i in range(12)]
    assert collector.features_of([4, 5, 6, 7])[:, 0].tolist() == [4.0, 6.0, 7.0]


def test_serve_loop_stops_between_batches() -> None:
    rt = FakeRuntime()
    served: list[int] = []
    loop = ServeLoop(
        rt,  # type: ignore[arg-type]
        StreamLabels(np.zeros(12, np.int64)),
        observers=[lambda item: served.append(item.batch.stop)],
        should_stop=lambda: len(served) >= 2,
    )
    outcome = loop.run(iter_batches(np.zeros((12, 2, 2), np.uint8), 4))
    assert outcome.interrupted and outcome.served == 8 and not rt.finished


# ------------------------------------------------------------------------------- delays
def test_adaptation_delays_from_events() -> None:
    events = [
        {"type": "drift", "frame": 100},
        {"type": "adaptation_started", "frame": 140, "trigger_frame": 100},
        {"type": "adaptation_finished", "frame": 150, "trigger_frame": 100, "domain": 1,
         "action": "grow", "train": {"steps": 0}},
        {"type": "drift", "frame": 300},
        {"type": "adaptor_trained", "frame": 310, "domain": 1},  # the earlier domain's head
        {"type": "adaptation_finished", "frame": 345, "trigger_frame": 300, "domain": 2,
         "action": "grow", "train": {"steps": 0}},
        {"type": "adaptor_trained", "frame": 390, "domain": 2},
        {"type": "domain_returned", "frame": 420, "domain": 0, "case": "confirmed",
         "evidence": {"alarm_frame": 400}},
        {"type": "adaptation_finished", "frame": 530, "trigger_frame": 500, "domain": 3,
         "action": "grow", "train": {"steps": 60}},  # a synchronous job: trained at install
        {"type": "adaptation_finished", "frame": 640, "trigger_frame": 600, "domain": 4,
         "action": "grow", "train": {"steps": 0}},  # its head never arrived
    ]  # fmt: skip
    d = adaptation_delays(events)
    got = [(x["trigger_frame"], x["domain"], x["installed_after"], x["trained_after"]) for x in d]
    assert got == [
        (100, 1, 50, 210),
        (300, 2, 45, 90),
        (400, 0, 20, None),
        (500, 3, 30, 30),
        (600, 4, 40, None),
    ]
    assert d[2]["action"] == "return" and d[2]["case"] == "confirmed"
    assert d[0]["labelled_frame"] == 140 and d[0]["trained_after_labels"] == 170
    assert d[0]["installed_after_labels"] == 10
    assert d[1]["labelled_frame"] is None and d[1]["trained_after_labels"] is None
    m = delay_metrics(events, 30.0)
    assert m["rate_fps"] == 30.0 and m["adaptation_delay_frames"] == d
    assert m["median_installed_after_frames"] == 42.5  # returns excluded
    assert m["median_trained_after_frames"] == 90.0
    assert m["median_trained_after_labels_frames"] == 170.0
    assert delay_metrics([], None)["median_trained_after_frames"] is None


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def small_stream_path(mini_stream: Stream, tmp_path_factory: pytest.TempPathFactory):
    """The first two segments of fashion-drift-mini (clean, then fog): 420 real frames."""
    n = 420
    eval_keep = mini_stream.eval_segment < 2
    small = Stream(
        images=mini_stream.images[:n],
        labels=mini_stream.labels[:n],
        segment=mini_stream.segment[:n],
        segment_is_shift=mini_stream.segment_is_shift[:2],
        is_novel=mini_stream.is_novel[:n],
        train_images=mini_stream.train_images,
        train_labels=mini_stream.train_labels,
        eval_images=mini_stream.eval_images[eval_keep],
        eval_labels=mini_stream.eval_labels[eval_keep],
        eval_segment=mini_stream.eval_segment[eval_keep],
        meta={"name": "fashion-drift-mini-head"},
    )
    return save_stream(small, tmp_path_factory.mktemp("streams") / "small.npz")


def test_run_rate_paces_and_reports_delays(small_stream_path, tmp_path) -> None:
    out = tmp_path / "paced"
    rate = 150.0
    t0 = time.perf_counter()
    argv = ["run", "--stream", str(small_stream_path), "--out", str(out), "--rate", str(rate)]
    assert cli.main([*argv, *FAST]) == 0
    wall = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    n = m["frames_served"]
    assert n == 420 and m["rate_fps"] == rate
    # The last frame arrives (n - 1) / rate after the first; nothing is served before it.
    assert m["serving_seconds"] >= (n - 1) / rate and wall >= (n - 1) / rate
    assert m["frames_per_second"] <= rate * 1.01
    # Waiting for frames is not a serving stall.
    assert m["max_serving_gap_s"] < m["serving_seconds"] / 2

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    finished = {e["trigger_frame"]: e for e in events if e["type"] == "adaptation_finished"}
    assert finished, "the fog shift must be adapted to"
    delays = m["adaptation_delay_frames"]
    built = [d for d in delays if d["action"] != "return"]
    assert {d["trigger_frame"] for d in built} == set(finished)
    for d in built:
        fin = finished[d["trigger_frame"]]
        assert d["domain"] == fin["domain"]
        assert d["installed_after"] == fin["frame"] - d["trigger_frame"] > 0
        trained = [
            e["frame"]
            for e in events
            if e["type"] == "adaptor_trained" and e["domain"] == d["domain"]
        ]
        assert d["trained_after"] is not None  # finish() waits for the head
        assert d["trained_frame"] == min(trained) or d["trained_frame"] == fin["frame"]
        assert d["trained_after"] >= d["installed_after"]
        start = [
            e
            for e in events
            if e["type"] == "adaptation_started" and e["trigger_frame"] == d["trigger_frame"]
        ]
        assert d["labelled_frame"] == start[-1]["frame"]
        assert d["trained_after_labels"] == d["trained_frame"] - d["labelled_frame"] >= 0
    assert m["median_installed_after_frames"] == float(
        np.median([d["installed_after"] for d in built])
    )
    assert m["median_trained_after_frames"] == float(np.median([d["trained_after"] for d in built]))


def test_run_max_frames_serves_a_prefix(small_stream_path, tmp_path) -> None:
    out = tmp_path / "prefix"
    argv = ["run", "--stream", str(small_stream_path), "--out", str(out), "--max-frames", "100"]
    assert cli.main([*argv, *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["frames_served"] == 100 and not m["interrupted"] and m["rate_fps"] is None
    assert m["adaptation_delay_frames"] == [] and m["median_trained_after_frames"] is None
    assert np.load(out / "frames.npz")["prediction"].shape == (100,)
