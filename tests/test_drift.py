"""Drift detectors and monitor on synthetic indicator/score streams (fast, no encoder)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.config import load_config
from edge_runtime.drift import (
    BernoulliCUSUM,
    DriftMonitor,
    NoveltyClassifier,
    PageHinkley,
    cusum_threshold_for_arl,
    make_detector,
)
from edge_runtime.errors import ConfigError


def _run(det, xs) -> list[int]:
    return [i for i, x in enumerate(xs) if det.update(x)]


def test_threshold_solves_the_arl_equation():
    h = cusum_threshold_for_arl(1e4, 0.2)
    assert np.isclose((np.exp(h) - h - 1) / 0.2, 1e4)


def test_no_false_alarm_on_a_long_in_control_stream():
    # 20,000 frames at the in-control rate, false-alarm rate 1e-5 per frame (ARL0 = 100,000).
    det = BernoulliCUSUM(false_alarm_rate=1e-5, warmup=200)
    xs = np.random.default_rng(0).random(20_000) < 0.05
    assert _run(det, xs) == []
    assert det.p0 >= 0.05  # the floor holds


def test_false_alarm_rate_matches_the_configured_rate():
    # 400,000 in-control frames at the default rate 1e-4: expect about 40 alarms if the ARL
    # approximation were exact; it is conservative, but not wildly so.
    det = BernoulliCUSUM(false_alarm_rate=1e-4, warmup=0)
    xs = np.random.default_rng(1).random(400_000) < 0.05
    alarms = len(_run(det, xs))
    assert alarms < 400_000 / 5_000  # fewer than one per 5,000 in-distribution frames
    assert alarms >= 5  # and the threshold is not absurdly high


def test_a_step_to_half_ood_is_detected_within_100_frames():
    rng = np.random.default_rng(2)
    delays = []
    for _ in range(50):
        det = BernoulliCUSUM(warmup=200)
        pre = rng.random(1_000) < 0.05
        post = rng.random(400) < 0.5
        flags = _run(det, np.concatenate([pre, post]))
        assert flags, "change not detected"
        assert flags[0] >= 1_000, "false alarm before the change"
        delays.append(flags[0] - 1_000)
    assert max(delays) < 100
    assert np.median(delays) < 30


def test_a_step_to_the_minimum_rate_has_median_delay_below_100():
    rng = np.random.default_rng(3)
    delays = []
    for _ in range(50):
        det = BernoulliCUSUM(warmup=0, min_ood_rate=0.3)
        xs = np.concatenate([rng.random(500) < 0.05, rng.random(1_000) < 0.3])
        flags = [f for f in _run(det, xs) if f >= 500]
        delays.append(flags[0] - 500 if flags else 10_000)
    assert np.median(delays) < 100


def test_warmup_estimates_a_higher_in_control_rate():
    det = BernoulliCUSUM(warmup=2_000)
    _run(det, np.random.default_rng(4).random(2_000) < 0.12)
    assert 0.09 < det.p0 < 0.15
    assert det.p1 >= 2 * det.p0  # alternative kept clearly above the in-control rate


def test_page_hinkley_detects_a_score_drop_and_not_noise():
    rng = np.random.default_rng(5)
    det = PageHinkley(warmup=200, false_alarm_rate=1e-5)
    assert _run(det, rng.normal(0.0, 1.0, 20_000)) == []
    det.reset()
    flags = _run(det, rng.normal(-1.5, 1.0, 200))
    assert flags and flags[0] < 50


def test_registry_and_bad_names():
    assert isinstance(make_detector("cusum"), BernoulliCUSUM)
    assert isinstance(make_detector("page_hinkley"), PageHinkley)
    with pytest.raises(ConfigError, match="unknown detector"):
        make_detector("adwin")
    with pytest.raises(ConfigError, match="false_alarm_rate"):
        make_detector("cusum", false_alarm_rate=2.0)


def test_monitor_event_pause_and_state_roundtrip():
    cfg = load_config(None)
    mon = DriftMonitor.from_config(cfg.drift, p0_floor=1 - cfg.hdc.tpr)
    rng = np.random.default_rng(6)
    ind = np.concatenate([rng.random(600) < 0.05, rng.random(300) < 0.6])
    events = mon.update_batch(np.arange(len(ind)), ind, np.where(ind, -1.0, 1.0))
    assert len(events) >= 1
    ev = events[0]
    # flagged after the alarm's confirmation window
    assert 600 + cfg.drift.confirm_frames <= ev.frame < 700 + cfg.drift.confirm_frames
    assert ev.frame == ev.evidence["alarm_frame"] + cfg.drift.confirm_frames
    assert ev.evidence["confirm_ood_rate"] >= cfg.drift.min_ood_rate
    assert ev.kind == "domain_shift"
    assert ev.evidence["statistic"] >= ev.evidence["threshold"]
    assert ev.evidence["ood_rate_since_change"] > 0.3
    assert 590 <= ev.evidence["estimated_change_frame"] <= ev.frame
    json.dumps(ev.to_dict())  # JSON-able for events.jsonl / MQTT

    # Paused: no flags however strong the evidence.
    mon.pause()
    assert mon.update_batch(np.arange(900, 1_200), np.ones(300, bool), -np.ones(300)) == []
    mon.resume()
    assert mon.detector.statistic == 0.0

    state = json.loads(json.dumps(mon.state_dict()))
    other = DriftMonitor(make_detector("page_hinkley"))
    other.load_state_dict(state)
    assert isinstance(other.detector, BernoulliCUSUM)
    assert other.detector.threshold == pytest.approx(mon.detector.threshold)
    more = rng.random(400) < 0.6
    a = mon.update_batch(np.arange(400), more, np.zeros(400))
    b = other.update_batch(np.arange(400), more, np.zeros(400))
    assert [e.frame for e in a] == [e.frame for e in b]


def test_monitor_dismisses_an_unconfirmed_alarm():
    # A burst of OOD frames trips the detector, then the stream is in control again.
    mon = DriftMonitor(BernoulliCUSUM(warmup=0, p0=0.05), confirm_frames=20, confirm_rate=0.3)
    burst = np.zeros(300, bool)
    burst[100:108] = True
    assert mon.update_batch(np.arange(300), burst, np.zeros(300)) == []
    assert mon.n_dismissed == 1
    # The same burst followed by a sustained shift is flagged once the window confirms it.
    shift = burst.copy()
    shift[108:] = True
    mon.reset()
    events = mon.update_batch(np.arange(300), shift, np.zeros(300))
    assert events and events[0].frame == events[0].evidence["alarm_frame"] + 20
    assert events[0].evidence["confirm_ood_rate"] == 1.0
    # Without confirmation the burst alone is a flag: the window is what removed it above.
    bare = DriftMonitor(BernoulliCUSUM(warmup=0, p0=0.05))
    assert len(bare.update_batch(np.arange(300), burst, np.zeros(300))) == 1


def test_monitor_uses_the_novelty_classifier():
    rng = np.random.default_rng(7)
    nov = NoveltyClassifier().fit(rng.normal(0, 1, (500, 4)))
    mon = DriftMonitor(BernoulliCUSUM(warmup=0), novelty=nov)
    n = 200
    ind = rng.random(n) < 0.7
    near = mon.update_batch(np.arange(n), ind, np.zeros(n), rng.normal(0, 1, (n, 4)))
    assert near and near[0].kind == "novel_class"
    mon.reset()
    far = mon.update_batch(np.arange(n), ind, np.zeros(n), rng.normal(4, 1, (n, 4)))
    assert far and far[0].kind == "domain_shift"
    assert "outside" in far[0].evidence["kind_reason"]
    restored = NoveltyClassifier.from_state_dict(json.loads(json.dumps(nov.state_dict())))
    x = rng.normal(0, 2, (50, 4))
    assert np.allclose(restored.distances(x), nov.distances(x))


def test_pending_alarm_survives_a_checkpoint():
    burst = np.zeros(200, bool)
    burst[100:] = True  # a real shift: the alarm fires, then awaits 20 confirming frames
    mon = DriftMonitor(BernoulliCUSUM(warmup=0, p0=0.05), confirm_frames=20, confirm_rate=0.3)
    assert mon.update_batch(np.arange(108), burst[:108], np.zeros(108)) == []
    state = json.loads(json.dumps(mon.state_dict()))
    assert state["candidate"] is not None and state["confirm_frames"] == 20
    other = DriftMonitor(BernoulliCUSUM(warmup=0, p0=0.05))
    other.load_state_dict(state)
    a = mon.update_batch(np.arange(108, 200), burst[108:], np.zeros(92))
    b = other.update_batch(np.arange(108, 200), burst[108:], np.zeros(92))
    assert a and [e.frame for e in a] == [e.frame for e in b]
    assert a[0].evidence["alarm_frame"] == b[0].evidence["alarm_frame"]
