"""Growth in full: class- and domain-incremental segments in one run, the evidence behind
extend-or-separate, the adaptor cap's eviction policy, and adaptors below the last layer.

Real encoder (MobileNetV2 at 32x32), real Fashion-MNIST frames, the real zero-shot search.
"""

from __future__ import annotations

import numpy as np
import pytest
from small_runtime import small_config
from test_runtime import _serve  # the same test-then-train batch loop

from edge_runtime.adapt.domains import DomainSet
from edge_runtime.adapt.planner import EXTEND, GROW, AdaptationPlanner, Budgets
from edge_runtime.adapt.registry import DomainRegistry
from edge_runtime.data import load_fashion_mnist
from edge_runtime.data.corruptions import corrupt
from edge_runtime.drift import NOVEL_CLASS
from edge_runtime.labels import Shots, Trigger
from edge_runtime.runtime import Runtime, build_encoder, make_bank, make_registry

CFG = small_config({"adapt.label_budget": 60})


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    x, y = load_fashion_mnist("train")
    rng = np.random.default_rng(1)
    base = rng.permutation(np.flatnonzero(y < 6))
    novel = rng.permutation(np.flatnonzero(y >= 6))
    tr, clean, shifted = base[:600], base[600:760], base[760:1000]
    new = novel[:240]
    look = corrupt(x[shifted], "gaussian_noise", 5, 0)
    return {
        "train_x": x[tr],
        "train_y": y[tr].astype(np.int64),
        "stream_x": np.concatenate([x[clean], x[new], look]),
        "stream_y": np.concatenate([y[clean], y[new], y[shifted]]).astype(np.int64),
        # segment starts: clean 0, new classes 160, new look 400; end 640
        "bounds": np.array([0, 160, 400, 640]),
    }


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(CFG)


def test_class_and_domain_incremental_segments_in_one_run(encoder, data) -> None:
    """New label ids get an adaptor of their own (the event says why); the same labels in a
    new look get another; each segment's frames are then served by its own adaptor."""
    # A small base replay keeps the conv candidates' training short on 2 cores.
    rt = Runtime(CFG, encoder, background=False, base_replay_per_class=20)
    rt.fit_base(data["train_x"], data["train_y"])
    b = data["bounds"]
    decs = _serve(rt, data, 0, b[1])
    # Flags as an operator raises them, at the segment starts (the monitor's own flags at
    # this tiny size are tested elsewhere): the same path as a drift or novel-class flag.
    rt.request_adaptation(NOVEL_CLASS, frame=int(b[1]))
    decs += _serve(rt, data, b[1], b[2])
    rt.request_adaptation("domain_shift", frame=int(b[2]))
    decs += _serve(rt, data, b[2], b[3])
    rt.finish()
    events = [e for d in decs for e in d.events] + rt.drain_events()
    finished = [e for e in events if e["type"] == "adaptation_finished"]
    assert [(e["kind"], e["action"], e["domain"]) for e in finished] == [
        (NOVEL_CLASS, "grow", 1),
        ("domain_shift", "grow", 2),
    ]
    assert "adaptor and memory of their own" in finished[0]["why"]
    assert finished[0]["evidence"]["known_label_share"] == 0.0
    # The search ran and its report travels in the event.
    for e in finished:
        assert e["search"] == "zero-shot" and e["search_report"]["candidates"] > 1
    # Each new head also predicts the base classes (it trains on the base's replay too).
    assert set(rt.registry.get(1).labels) == set(range(10))
    assert set(rt.registry.get(2).labels) == set(range(6))
    dom = np.concatenate([d.domain for d in decs])
    pred = np.concatenate([d.prediction for d in decs])
    y = data["stream_y"]
    for seg, want in ((1, 1), (2, 2)):
        at = next(e["frame"] for e in finished if e["domain"] == want)
        tail = np.arange(max(at, b[seg] + CFG.adapt.label_budget), b[seg + 1])
        assert np.mean(dom[tail] == want) > 0.7, f"segment {seg} served by its adaptor"
        assert np.mean(pred[tail] == y[tail]) > 0.5
    # The clean segment stayed on the base.
    assert np.mean(dom[60 : b[1]] == 0) > 0.8


def _shots(x: np.ndarray, y: np.ndarray) -> Shots:
    return Shots(x, y, list(range(len(y))), Trigger(0, NOVEL_CLASS, {}))


def test_auto_policy_extends_when_shots_mix_known_classes(encoder, data) -> None:
    """Shots that mix the base's classes with new ones are the base's look: extend, and say
    why; shots of new classes only grow a domain of their own."""
    rt = Runtime(CFG, encoder, background=False)
    rt.fit_base(data["train_x"], data["train_y"])
    planner = AdaptationPlanner(Budgets.from_config(CFG, rt.feature_dim), novel_policy="auto")
    x = encoder.features(data["stream_x"][100:220])
    y = data["stream_y"][100:220]  # 60 clean frames of classes 0-5, then 60 of 6-9
    plan = planner.plan(_shots(x, y), rt.domains_set, 1)
    assert plan.action == EXTEND and plan.domain_id == 0
    assert "already predicts" in plan.reason and plan.report["known_label_share"] == 0.5
    only_new = planner.plan(_shots(x[60:], y[60:]), rt.domains_set, 1)
    assert only_new.action == GROW and "of their own" in only_new.reason


def test_the_cap_evicts_the_least_used_domain_never_the_base(encoder, data) -> None:
    cfg = CFG.with_overrides({"adapt.max_adaptors": 3, "adapt.eviction": "least_used"})
    rt = Runtime(cfg, encoder, background=False)
    rt.fit_base(data["train_x"], data["train_y"])
    ds: DomainSet = rt.domains_set
    x = encoder.features(data["stream_x"][:120])
    y = data["stream_y"][:120]
    base = ds.get(0).adaptor
    for did in (1, 2):
        bank = ds.bank_copy()
        bank.add_domain(did, x, y)
        ds.install_new(did, base, bank, frame=did, kind="domain_shift")
    ds.registry.count_served(np.array([1, 1, 1, 2, 0, 0]))
    bank = ds.bank_copy()
    bank.add_domain(3, x, y)
    evicted = ds.install_new(3, base, bank, frame=3, kind="domain_shift")
    assert [e.evicted.id for e in evicted] == [2]
    assert "least-used" in evicted[0].reason
    assert ds.ids() == [0, 1, 3] and sorted(ds.bank.domain_ids) == [0, 1, 3]
    # The planner does not refuse at the cap when the policy evicts.
    planner = AdaptationPlanner(Budgets.from_config(cfg, rt.feature_dim))
    assert planner.growth_refusal(ds) is None
    # With "refuse" it does.
    strict = AdaptationPlanner(
        Budgets.from_config(CFG.with_overrides({"adapt.max_adaptors": 3}), 1)
    )
    assert "max_adaptors=3" in (strict.growth_refusal(ds) or "")
    # The base is never a victim.
    reg = make_registry(cfg)
    assert isinstance(reg, DomainRegistry) and reg.eviction == "least_used"
    assert make_bank(cfg, encoder.spec) is not None


def test_a_tap_adaptor_serves_and_survives_a_checkpoint(encoder, data, tmp_path) -> None:
    """A conv adaptor on an intermediate tap, forced by the search budget's family, is served
    from the encoder's maps, keeps its replay frames and reloads exactly."""
    from edge_runtime.adapt.nas import ZeroShotSearch
    from edge_runtime.adapt.space import default_space

    space = [
        a for a in default_space(encoder.spec.dim, encoder.spec.input_size) if a.kind == "conv"
    ]
    search = ZeroShotSearch(space=space[:4], seed=0)
    rt = Runtime(CFG, encoder, background=False, search=search, base_replay_per_class=20)
    rt.fit_base(data["train_x"], data["train_y"])
    assert rt.registry.get(0).replay_images is not None
    b = data["bounds"]
    _serve(rt, data, 0, b[1])
    rt.request_adaptation("domain_shift", frame=int(b[1]))
    decs = _serve(rt, data, b[2] - 200, b[2])  # any frames: labels are what matter here
    rt.finish()
    assert len(rt.domains) == 2
    arch = rt.registry.get(1).adaptor.arch
    assert arch.kind == "conv" and arch.tap is not None
    assert rt.domains_set.taps_in_use() == ((arch.tap,) if arch.condition == "none" else ())
    frames = data["stream_x"][b[2] : b[2] + 64]
    before = rt.predict_eval(frames)
    clone = Runtime.load(rt.save(tmp_path / "ck"), encoder, background=False, search=search)
    after = clone.predict_eval(frames)
    for a, c in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, c)
    assert clone.registry.get(1).replay_images is not None
    assert decs
