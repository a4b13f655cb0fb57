"""The per-frame fast paths of the HDC scoring step equal the plain (checked, torch) paths bit
for bit: normalisation, unchecked projection and top-k, the numpy k-NN similarity and the
memory bank's scores end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_runtime import kernels
from edge_runtime.hdc.bank import DomainMemoryBank
from edge_runtime.hdc.memory import PAD_DISTANCE, knn_similarity, knn_similarity_np
from edge_runtime.hdc.projection import HypervectorEncoder

LAYERS = (24, 1280)  # MobileNetV2 layers 3 and 18, pooled


def _features(n: int, seed: int) -> np.ndarray:
    """Pooled-ReLU-like features: sparse, skewed, one row scaled up and one all zero."""
    rng = np.random.default_rng(seed)
    x = rng.exponential(1.0, (n, sum(LAYERS))) * (rng.random((n, sum(LAYERS))) > 0.3)
    x = x.astype(np.float32)
    x[0] *= 1000.0
    if n > 1:
        x[1] = 0.0
    return x


def _reference_packed(enc: HypervectorEncoder, x: np.ndarray) -> torch.Tensor:
    """Packed codes through the reference normalisation and the checked kernels API."""
    z = enc._normalise_reference(torch.from_numpy(x))
    if enc.projection == "hadamard":
        signs = kernels.hadamard_signs(z.shape[1], enc.dim, enc.seed)
        return kernels.hadamard_project_pack(z, signs, enc.dim)
    return kernels.sign_project_pack(z, enc.weight)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"early_weight": 0.25},
        {"layer_weights": (2.0, 1.0), "center": True},
        {"layer_weights": (0.0, 1.0)},
        {"layer_norm": False},
        {"layer_weights": (0.3, 0.7)},  # not float32-exact: must take the reference path
    ],
)
@pytest.mark.parametrize("projection", ["hadamard", "gaussian"])
def test_encoder_fast_path_matches_reference(settings: dict, projection: str) -> None:
    enc = HypervectorEncoder(dim=1000, layer_dims=LAYERS, projection=projection, **settings)
    enc.fit(_features(64, 0))
    for n in (1, 5, 33):
        x = _features(n, n)
        fast = enc.normalise(torch.from_numpy(x))
        ref = enc._normalise_reference(torch.from_numpy(x))
        assert fast.dtype == ref.dtype and torch.equal(fast, ref)
        assert torch.equal(enc.encode_packed(x), _reference_packed(enc, x))


def test_plan_cache_follows_setting_changes() -> None:
    enc = HypervectorEncoder(dim=512, layer_dims=LAYERS, projection="hadamard").fit(_features(8, 0))
    x = _features(4, 1)
    before = enc.encode_packed(x)
    enc.early_weight = 2.0  # fields stay assignable: the cached plan must not go stale
    after = enc.encode_packed(x)
    assert torch.equal(after, _reference_packed(enc, x))
    assert not torch.equal(before, after)
    enc.seed = 3
    assert torch.equal(enc.encode_packed(x), _reference_packed(enc, x))


@pytest.mark.parametrize("dim", [1000, 4096, 10000])
@pytest.mark.parametrize("reduce", ["kth", "mean"])
def test_knn_similarity_np_matches_torch(dim: int, reduce: str) -> None:
    g = torch.Generator().manual_seed(dim)
    for shape in ((1, 2, 10), (32, 3, 10), (7, 1, 1)):
        dist = torch.randint(0, dim + 1, shape, generator=g, dtype=torch.int32)
        dist = dist.sort(dim=2).values
        assert np.array_equal(
            knn_similarity_np(dist, dim, reduce), knn_similarity(dist, dim, reduce).numpy()
        )
        padded = dist.clone()
        padded[0, 0, -1:] = PAD_DISTANCE  # a short segment takes the general path
        padded[-1, -1, :] = PAD_DISTANCE  # and an empty one scores -inf
        assert np.array_equal(
            knn_similarity_np(padded, dim, reduce), knn_similarity(padded, dim, reduce).numpy()
        )


def _bank(dim: int, projection: str, reduce: str) -> DomainMemoryBank:
    bank = DomainMemoryBank(
        dim=dim, k=10, reduce=reduce, max_exemplars=400, layer_dims=LAYERS, projection=projection
    )
    rng = np.random.default_rng(7)
    bank.add_domain(0, _features(500, 10), rng.integers(0, 5, 500))
    bank.add_domain(4, _features(200, 11), rng.integers(0, 3, 200))
    bank.add_domain(9, _features(8, 12), rng.integers(0, 2, 8))  # fewer than k exemplars
    return bank


def _reference_calibrated(bank: DomainMemoryBank, x: np.ndarray) -> np.ndarray:
    """Scores through the checked kernels API, the reference normalisation and torch k-NN."""
    q = _reference_packed(bank.encoder, x)
    dist = torch.cat(
        [
            kernels.segmented_hamming_topk(q[s : s + 512], bank.packed, bank.offsets, bank.k)[0]
            for s in range(0, len(q), 512)
        ]
    )
    sim = knn_similarity(dist, bank.dim, bank.reduce).numpy()
    return sim - np.asarray(bank.thresholds, dtype=np.float32)


@pytest.mark.parametrize(
    ("dim", "projection", "reduce"),
    [(4096, "hadamard", "mean"), (10000, "hadamard", "kth"), (1000, "gaussian", "mean")],
)
def test_bank_scores_match_reference_path(dim: int, projection: str, reduce: str) -> None:
    bank = _bank(dim, projection, reduce)
    for n in (1, 32, 600):  # 600: more than one query chunk
        x = _features(n, 100 + n)
        got = bank.calibrated_scores(x)
        assert got.dtype == np.float32
        assert np.array_equal(got, _reference_calibrated(bank, x))
        # a float64 tensor input goes through the torch validation branch
        assert np.array_equal(bank.calibrated_scores(torch.from_numpy(x).double()), got)


def test_bank_unchecked_path_follows_backend_override(monkeypatch: pytest.MonkeyPatch) -> None:
    bank = _bank(2048, "hadamard", "mean")
    x = _features(3, 5)
    fast = bank.calibrated_scores(x)
    monkeypatch.setenv("EDGE_RUNTIME_KERNEL_BACKEND", "torch")
    assert kernels.api.unchecked("segmented_hamming_topk", torch.device("cpu")) is (
        kernels.api._module("torch").segmented_hamming_topk
    )
    assert np.array_equal(bank.calibrated_scores(x), fast)
