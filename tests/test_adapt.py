"""Adaptors, initialisers, search plug point, domain registry, router and the worker."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_runtime.adapt import (
    AdaptationWorker,
    Adaptor,
    AdaptorArch,
    DomainRegistry,
    FixedArchitecture,
    PrototypeInit,
    RegistryFullError,
    Router,
    SearchBudget,
    WorkerBusyError,
    build_adaptor,
    default_search_space,
    train_adaptor,
)
from edge_runtime.data import load_fashion_mnist
from edge_runtime.encoder import Encoder, TorchBackend
from edge_runtime.encoder.cache import cached_features
from edge_runtime.errors import InputError


@pytest.fixture(scope="module")
def fashion_features() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real MobileNetV2 features of 600 Fashion-MNIST test frames (classes 0-4), split 300/300."""
    images, labels = load_fashion_mnist("test")
    keep = np.flatnonzero(labels < 5)[:600]
    enc = Encoder(TorchBackend.mobilenet(input_size=32, layers=(18,)))  # the 1,280-d heads below
    feats = cached_features(enc, np.ascontiguousarray(images[keep]), "test-adapt")
    y = labels[keep].astype(np.int64) + 100  # global ids need not start at 0
    return feats[:300], y[:300], feats[300:], y[300:]


LABELS = [100, 101, 102, 103, 104]


@pytest.mark.parametrize(
    "arch", [AdaptorArch("linear", 1280), AdaptorArch("mlp", 1280, hidden=64, depth=2, dropout=0.1)]
)
def test_adaptor_learns_real_features_and_round_trips(fashion_features, arch):
    xtr, ytr, xte, yte = fashion_features
    a = build_adaptor(arch, LABELS, seed=0)
    report = train_adaptor(a, xtr, ytr, steps=150, lr=1e-2, seed=0)
    assert report.steps == 150 and report.train_accuracy > 0.95
    acc = float((a.predict(xte) == yte).mean())
    assert acc > 0.7, acc  # 5 Fashion classes from 300 shots on frozen ImageNet features
    assert a.predict(xte).dtype == np.int64 and set(a.predict(xte)) <= set(LABELS)
    # Rebuild from description + tensors: identical logits.
    b = Adaptor.from_state(a.describe(), a.state_dict())
    assert np.array_equal(a.logits(xte), b.logits(xte))
    # Deterministic given the seed.
    c = build_adaptor(arch, LABELS, seed=0)
    train_adaptor(c, xtr, ytr, steps=150, lr=1e-2, seed=0)
    assert np.array_equal(a.logits(xte), c.logits(xte))


def test_train_restores_thread_count_and_rejects_bad_labels(fashion_features):
    xtr, ytr, _, _ = fashion_features
    before = torch.get_num_threads()
    a = build_adaptor(AdaptorArch("linear", 1280), LABELS)
    train_adaptor(a, xtr[:20], ytr[:20], steps=2)
    assert torch.get_num_threads() == before
    with pytest.raises(InputError, match="not in this adaptor's label map"):
        train_adaptor(a, xtr[:3], np.array([100, 101, 7]), steps=2)
    with pytest.raises(InputError, match="shape"):
        a.predict(xtr[:, :10])
    cancel = threading.Event()
    cancel.set()
    assert train_adaptor(a, xtr, ytr, steps=5, cancel=cancel).stopped_early


def test_prototype_init_is_a_working_classifier_before_training(fashion_features):
    xtr, ytr, xte, yte = fashion_features
    for arch in (AdaptorArch("linear", 1280), AdaptorArch("mlp", 1280, hidden=128, depth=1)):
        cold = build_adaptor(arch, LABELS, seed=1)
        cold.fit_normalizer(torch.as_tensor(xtr))
        warm = build_adaptor(arch, LABELS, seed=1)
        PrototypeInit().init(warm, xtr, ytr)
        cold_acc = float((cold.predict(xte) == yte).mean())
        warm_acc = float((warm.predict(xte) == yte).mean())
        assert warm_acc > 0.6 and warm_acc > cold_acc + 0.2, (arch.kind, cold_acc, warm_acc)


def test_search_space_and_fixed_architecture():
    space = default_search_space(256)
    assert space[0].kind == "linear" and {a.hidden for a in space[1:]} == {64, 128, 256}
    assert {a.depth for a in space[1:]} == {1, 2}
    res = FixedArchitecture().search(np.zeros((10, 96), np.float32), np.zeros(10), [0, 1])
    assert res.arch.in_dim == 96 and res.arch.kind == "linear"
    assert AdaptorArch("linear", 96).n_params(2) == 97 * 2
    mlp = AdaptorArch("mlp", 96, hidden=8, depth=2)
    assert mlp.n_params(3) == sum(p.numel() for p in build_adaptor(mlp, [0, 1, 2]).parameters())
    with pytest.raises(InputError, match="budget"):
        FixedArchitecture().search(
            np.zeros((4, 96)), np.zeros(4), [0, 1], SearchBudget(max_params=10)
        )
    with pytest.raises(InputError, match="kind"):
        AdaptorArch("transformer")


def _adaptor(labels: list[int], in_dim: int = 8, seed: int = 0) -> Adaptor:
    return build_adaptor(AdaptorArch("mlp", in_dim, hidden=4, depth=1), labels, seed=seed)


def test_registry_capacity_eviction_and_safetensors_roundtrip(tmp_path):
    reg = DomainRegistry(max_adaptors=3, eviction="refuse")
    _base, _ = reg.add(_adaptor([0, 1]), name="base", origin="base", kind="base")
    d1, _ = reg.add(_adaptor([0, 1], seed=1), created_at_frame=500, metadata={"delay": 12})
    _d2, _ = reg.add(_adaptor([2, 3], seed=2), created_at_frame=900, kind="novel_class")
    assert [d.id for d in reg] == [0, 1, 2] and reg.all_labels() == [0, 1, 2, 3]
    with pytest.raises(RegistryFullError, match="max_adaptors=3"):
        reg.add(_adaptor([4]))
    reg.eviction = "oldest"
    d3, events = reg.add(_adaptor([4], seed=3), created_at_frame=1200)
    assert [e.evicted.id for e in events] == [d1.id]  # the oldest drift domain, never the base
    assert reg.ids() == [0, 2, 3] and d3.id == 3

    tensors, meta = reg.to_state()
    save_file(tensors, tmp_path / "reg.safetensors")

    (tmp_path / "reg.json").write_text(json.dumps(meta))
    back = DomainRegistry.from_state(
        load_file(tmp_path / "reg.safetensors"), json.loads((tmp_path / "reg.json").read_text())
    )
    assert back.ids() == reg.ids() and back.next_id() == 4
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    for d in reg:
        e = back.get(d.id)
        assert (e.name, e.labels, e.kind, e.origin) == (d.name, d.labels, d.kind, d.origin)
        assert np.array_equal(e.adaptor.logits(x), d.adaptor.logits(x))
    assert back.get(2).kind == "novel_class" and back.get(0).origin == "base"
    with pytest.raises(InputError, match="no domain with id 1"):
        back.get(1)


def test_router_ties_empty_and_nan():
    r = Router()
    dec = r.route(
        np.array([[0.5, 0.5, -1.0], [-0.2, -0.1, np.nan], [np.nan, np.nan, np.nan]]), [3, 5, 7]
    )
    assert dec.domain.tolist() == [3, 5, -1]  # tie -> earlier column; all-NaN -> no domain
    assert dec.is_ood.tolist() == [False, True, True]
    assert dec.score[0] == pytest.approx(0.5)
    empty = r.route(np.zeros((4, 0), np.float32))
    assert (
        empty.domain.tolist() == [-1] * 4 and empty.is_ood.all() and np.isneginf(empty.score).all()
    )
    with pytest.raises(InputError):
        r.route(np.zeros(3))
    # One frame takes a plain-Python path: it must decide exactly as the batched one.
    rng = np.random.default_rng(0)
    s = rng.normal(0, 0.2, (200, 4)).astype(np.float32)
    s[rng.random(s.shape) < 0.1] = np.nan
    s[rng.random(s.shape) < 0.1] = -np.inf
    s[5, :] = 0.0  # a tie at the threshold itself
    s[6, :] = np.nan
    for thr in (0.0, 0.1):
        rt = Router(threshold=thr)
        batch = rt.route(s, [2, 4, 6, 8])
        for i in range(len(s)):
            one = rt.route(s[i : i + 1], [2, 4, 6, 8])
            assert one.domain.dtype == np.int64 and one.score.dtype == np.float32
            assert one.domain[0] == batch.domain[i] and one.is_ood[0] == batch.is_ood[i]
            assert np.array_equal(one.score, batch.score[i : i + 1])


def test_worker_done_failed_timeout_and_busy():
    w = AdaptationWorker()
    assert w.status == "idle" and w.poll() is None
    gate = threading.Event()
    w.submit(lambda cancel: gate.wait(5) and torch.get_num_threads(), name="ok", meta={"frame": 7})
    assert w.status == "running" and w.poll() is None
    with pytest.raises(WorkerBusyError):
        w.submit(lambda cancel: None)
    gate.set()
    assert w.wait(5)
    res = w.poll()
    assert res is not None and res.ok and res.value == 1 and res.meta == {"frame": 7}
    assert w.poll() is None and w.status == "idle"

    def boom(cancel):
        raise RuntimeError("bad shots")

    w.submit(boom, name="boom")
    w.wait(5)
    res = w.poll()
    assert res.status == "failed" and "RuntimeError: bad shots" in res.error and res.traceback

    def slow(cancel):
        while not cancel.is_set():
            time.sleep(0.01)
        return "late"

    w.submit(slow, name="slow", timeout_s=0.05)
    time.sleep(0.1)
    res = w.poll()
    assert res.status == "timeout" and res.value is None
    assert w.wait(5)  # the job saw the cancel event and ended
    assert w.poll() is None and w.status == "idle"


def test_registry_adaptor_versions_rollback_and_replay_roundtrip(tmp_path):
    from edge_runtime.adapt.replay import balanced_sample, merge_replay

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    rx, ry = balanced_sample(x, y, per_class=20, seed=1)
    assert np.bincount(ry).tolist() == [20, 20, 20] and rx.shape == (60, 8)
    reg = DomainRegistry(max_adaptors=2)
    reg.add(_adaptor([0, 1, 2]), origin="base", kind="base", replay=(rx, ry))
    v1 = reg.get(0).adaptor
    new = merge_replay((rx, ry), (x[:30], np.full(30, 7)), per_class=20)
    d = reg.update_adaptor(0, _adaptor([0, 1, 2, 7], seed=5), replay=new)
    assert d.version == 2 and d.labels == (0, 1, 2, 7) and d.history == [v1]
    assert np.bincount(d.replay[1]).tolist()[-1] == 20  # the new class joined the buffer
    tensors, meta = reg.to_state()
    save_file(tensors, tmp_path / "reg.safetensors")
    back = DomainRegistry.from_state(load_file(tmp_path / "reg.safetensors"), meta)
    b = back.get(0)
    assert b.version == 2 and b.labels == (0, 1, 2, 7)
    np.testing.assert_array_equal(b.replay[0], d.replay[0])
    np.testing.assert_array_equal(b.replay[1], d.replay[1])
    np.testing.assert_array_equal(b.history[0].logits(x), v1.logits(x))
    back.rollback(0)
    assert back.get(0).labels == (0, 1, 2) and back.get(0).version == 1
    np.testing.assert_array_equal(back.get(0).adaptor.logits(x), v1.logits(x))
    with pytest.raises(InputError, match="no earlier adaptor version"):
        back.rollback(0)


def test_registry_rolls_back_to_a_named_version() -> None:
    """The fleet's rollback command names the version to restore (v3 -> v1 in one step)."""
    reg = DomainRegistry(max_adaptors=2)
    reg.add(_adaptor([0, 1, 2]), origin="base", kind="base")
    v1 = reg.get(0).adaptor
    reg.update_adaptor(0, _adaptor([0, 1, 2, 7], seed=5))
    reg.update_adaptor(0, _adaptor([0, 1, 2, 7, 8], seed=6))
    assert reg.get(0).version == 3
    for bad in (3, 4, 0):
        with pytest.raises(InputError, match=f"versions 1..2, not {bad}"):
            reg.rollback(0, bad)
    d = reg.rollback(0, 1)
    assert d.version == 1 and d.adaptor is v1 and d.labels == (0, 1, 2)


def test_train_adaptor_threads_default_leaves_torch_alone(monkeypatch) -> None:
    """threads=None trains with the caller's thread count (the profile's); a number is scoped."""
    import edge_runtime.adapt.adaptor as adaptor_module

    seen: list[int] = []
    real_train = adaptor_module._train

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(adaptor_module, "_train", spy)
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    y = np.arange(40) % 4
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train_adaptor(build_adaptor(AdaptorArch("linear", 16), [0, 1, 2, 3]), x, y, steps=2)
        train_adaptor(
            build_adaptor(AdaptorArch("linear", 16), [0, 1, 2, 3]), x, y, steps=2, threads=3
        )
        assert torch.get_num_threads() == 2  # restored after the scoped count
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 3]


def test_train_adaptor_anneals_the_step_size_unless_asked_not_to() -> None:
    """Cosine: the first step at ``lr``, the last near 0; constant: every step at ``lr``.
    Two steps tell them apart (the second cosine step is at lr / 2), one step does not."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    y = np.repeat(np.arange(4), 10)

    def weights(steps: int, schedule: str) -> torch.Tensor:
        head = build_adaptor(AdaptorArch("linear", 8), [0, 1, 2, 3], seed=0)
        train_adaptor(head, x, y, steps=steps, lr=0.1, seed=0, schedule=schedule)
        return head.head.weight.detach().clone()

    assert torch.equal(weights(1, "cosine"), weights(1, "constant"))
    assert not torch.allclose(weights(2, "cosine"), weights(2, "constant"))
    with pytest.raises(InputError, match="schedule"):
        weights(1, "linear-warmup")


def test_the_runtime_trains_with_the_configured_schedule() -> None:
    from edge_runtime.config import load_profile
    from edge_runtime.runtime import Runtime

    cfg = load_profile("x86-dev")
    assert cfg.adapt.lr_schedule == "cosine"
    cfg = cfg.model_copy(update={"adapt": cfg.adapt.model_copy(update={"lr_schedule": "constant"})})
    assert Runtime(cfg).executor.lr_schedule == "constant"
