"""Exact re-ranking of the packed scan's candidates (kernels.rerank_similarity, the C++ fused
scorer and DomainMemoryBank(rerank=...)) against brute-force float64 angles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_runtime import kernels
from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.hdc.bank import DomainMemoryBank
from edge_runtime.hdc.base import threshold_for_tpr
from edge_runtime.hdc.memory import select_exemplars

LAYERS = (24, 1280)


def _features(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.exponential(1.0, (n, sum(LAYERS))) * (rng.random((n, sum(LAYERS))) > 0.3)
    return x.astype(np.float32)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _angles(zq: np.ndarray, zm: np.ndarray) -> np.ndarray:
    cos = np.clip(zq.astype(np.float64) @ zm.astype(np.float64).T, -1.0, 1.0)
    return 1.0 - 2.0 * np.arccos(cos) / math.pi


@pytest.mark.parametrize("reduce", ["mean", "kth"])
def test_rerank_similarity_matches_brute_force(reduce: str) -> None:
    rng = np.random.default_rng(0)
    zm = _unit(rng.normal(size=(40, 37))).astype(np.float32)
    zq = _unit(rng.normal(size=(5, 37))).astype(np.float32)
    rows = np.stack([rng.permutation(40)[:12] for _ in range(5 * 2)]).reshape(5, 2, 12)
    rows[1, 0, 7:] = -1  # a short candidate list
    rows[2, 1, :] = -1  # a segment with no candidate at all
    own = np.array([rows[0, 0, 3], -1, -1, rows[3, 1, 0], 39])
    sim, top_rows, _top = kernels.rerank_similarity(
        torch.from_numpy(rows),
        torch.from_numpy(zq),
        torch.from_numpy(zm),
        4,
        reduce,
        torch.from_numpy(own),
    )
    ang = _angles(zq, zm)
    for i in range(5):
        for s in range(2):
            cand = [r for r in rows[i, s] if r >= 0 and r != own[i]]
            best = sorted(cand, key=lambda r: -ang[i, r])[:4]
            if not best:
                assert sim[i, s] == -np.inf and (top_rows[i, s] == -1).all()
                continue
            want = ang[i, best[-1]] if reduce == "kth" else np.mean(ang[i, best])
            assert sim[i, s].item() == pytest.approx(want, abs=1e-6)
            assert top_rows[i, s, : len(best)].tolist() == best
            assert (top_rows[i, s, len(best) :] == -1).all()


def _bank(rerank: int, reduce: str = "mean") -> DomainMemoryBank:
    bank = DomainMemoryBank(
        dim=2048,
        k=5,
        reduce=reduce,
        max_exemplars=150,
        layer_dims=LAYERS,
        projection="hadamard",
        rerank=rerank,
    )
    rng = np.random.default_rng(7)
    bank.add_domain(0, _features(200, 10), rng.integers(0, 5, 200))
    bank.add_domain(3, _features(60, 11), rng.integers(0, 3, 60))
    bank.add_domain(8, _features(4, 12), rng.integers(0, 2, 4))  # fewer than k exemplars
    return bank


def test_bank_rerank_threshold_is_exact_leave_one_out() -> None:
    x = _features(90, 3)
    x[5] = x[4]  # a duplicate: its twin is a neighbour, itself is not
    y = np.random.default_rng(3).integers(0, 3, 90)
    bank = DomainMemoryBank(
        dim=4096, k=5, max_exemplars=60, layer_dims=LAYERS, projection="hadamard", rerank=90
    )
    thr = bank.add_domain(0, x, y)
    keep = select_exemplars(y, 60, bank.seed)
    z = _unit(bank.encoder.normalise(torch.from_numpy(x)).numpy().astype(np.float64))
    # rerank=90 >= memory size: every row is a candidate, so the result is the exact k-NN
    ang = _angles(z, _unit(z[keep].astype(np.float16).astype(np.float64)))
    ang[keep, np.arange(len(keep))] = -np.inf
    want = threshold_for_tpr(np.sort(ang, axis=1)[:, ::-1][:, :5].mean(axis=1), bank.tpr)
    assert thr == pytest.approx(want, abs=1e-5)
    assert bank.exact is not None and bank.exact.dtype == torch.float16
    assert bank.exact.shape == (60, sum(LAYERS)) and bank.nbytes == 60 * (4096 // 8 + 2 * 1304)


@pytest.mark.parametrize("reduce", ["mean", "kth"])
def test_bank_rerank_fused_matches_general_path(reduce: str) -> None:
    bank = _bank(12, reduce)
    x = _features(70, 20)
    general = bank.calibrated_scores(x)  # 70 frames: above the fused batch limit
    assert general.shape == (70, 3) and np.isneginf(general).sum() == 0
    for n in (1, 7, 64):
        with kernels._alloc.poisoned_outputs():
            got = bank.calibrated_scores(x[:n])
        assert not np.isnan(got).any()
        # the fused kernel's codes may differ from torch's in a near-zero projection's sign;
        # all rows agree to float rounding wherever both keep the same candidates
        close = np.isclose(got, general[:n], rtol=0, atol=2e-5)
        assert close.mean() >= 0.95
    composed = kernels.fused_bank_scores(
        torch.from_numpy(x[:9]), *_fused_args(bank), backend="torch"
    )
    native = kernels.fused_bank_scores(torch.from_numpy(x[:9]), *_fused_args(bank), backend="cpp")
    assert torch.allclose(native, composed, rtol=0, atol=2e-5)


def _fused_args(bank: DomainMemoryBank) -> tuple:
    plan = bank.encoder.fused_plan()
    assert plan is not None
    thr = torch.tensor(bank.thresholds, dtype=torch.float32)
    return (
        plan.bounds,
        plan.weights,
        True,
        plan.signs,
        bank.dim,
        bank.packed,
        bank.offsets,
        bank.k,
        bank.reduce,
        thr,
        bank.exact,
        bank.candidates,
    )


def test_bank_rerank_routes_like_exact_knn_and_survives_edits() -> None:
    bank = _bank(40)
    x = _features(30, 30)
    r = bank.route(x)
    assert r.label.shape == (30,) and set(np.unique(r.best_domain)) <= {0, 3, 8}
    bank.extend_domain(3, _features(20, 31), np.full(20, 4))
    assert len(bank.exact) == len(bank.packed)
    bank.remove_domain(0)
    assert len(bank.exact) == len(bank.packed) == int(bank.offsets[-1])
    assert np.isfinite(bank.calibrated_scores(x)).all()


def test_bank_rerank_state_roundtrip_and_corrupt_exact() -> None:
    bank = _bank(12)
    x = _features(5, 40)
    state = bank.state_dict()
    other = DomainMemoryBank()
    other.load_state_dict(state)
    assert other.rerank == 12 and np.array_equal(
        other.calibrated_scores(x), bank.calibrated_scores(x)
    )
    bad = {"config": state["config"], "tensors": dict(state["tensors"])}
    bad["tensors"]["exact"] = state["tensors"]["exact"][:-1]
    with pytest.raises(CheckpointError, match="exact"):
        DomainMemoryBank().load_state_dict(bad)
    del bad["tensors"]["exact"]
    with pytest.raises(CheckpointError, match="exact"):
        DomainMemoryBank().load_state_dict(bad)
    with pytest.raises(InputError, match="rerank"):
        DomainMemoryBank(rerank=-1)
    with pytest.raises(InputError, match="candidates"):
        kernels.fused_bank_scores(torch.from_numpy(x), *_fused_args(bank)[:-1], 3)
