"""The per-frame fast paths of the HDC scoring step equal the plain (checked, torch) paths bit
for bit: normalisation, unchecked projection and top-k, the numpy k-NN similarity and the
memory bank's scores end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_runtime import kernels
from edge_runtime.errors import BackendUnavailableError, InputError
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


# ---------------------------------------------------------------- fused small-batch scorer
# kernels.fused_bank_scores normalises in native code with its own norm accumulation, so its
# codes may differ from the torch path's in the sign of a near-zero projection: the tests
# bound that (bits, scores) and require exact equality wherever the codes agree.


def _fused_codes_distance(enc: HypervectorEncoder, x: np.ndarray, backend: str) -> np.ndarray:
    """Per row, the Hamming distance between the fused kernel's code and the reference code:
    each reference code is its own one-row segment, k=1, so score (i, i) = 1 - 2 d_i / D."""
    ref = _reference_packed(enc, x)
    plan = enc.fused_plan()
    assert plan is not None
    n = len(x)
    sim = kernels.fused_bank_scores(
        torch.from_numpy(x),
        plan.bounds,
        plan.weights,
        enc.layer_norm,
        plan.signs,
        enc.dim,
        ref,
        torch.arange(n + 1, dtype=torch.int64),
        1,
        "kth",
        torch.zeros(n, dtype=torch.float32),
        backend=backend,
    ).numpy()
    d = (1.0 - np.diag(sim).astype(np.float64)) * enc.dim / 2.0
    assert np.allclose(d, np.round(d), atol=1e-3)
    return np.round(d).astype(np.int64)


@pytest.mark.parametrize(
    "settings",
    [{}, {"early_weight": 0.25}, {"layer_weights": (0.0, 1.0)}, {"layer_norm": False}],
)
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_fused_codes_match_reference_bits(settings: dict, backend: str) -> None:
    enc = HypervectorEncoder(dim=4096, layer_dims=LAYERS, projection="hadamard", **settings)
    enc.fit(_features(8, 0))
    x = _features(64, 21)
    d = _fused_codes_distance(enc, x, backend)
    assert d.sum() <= 0.001 * d.size * enc.dim  # at least 99.9 % of bits identical


@pytest.mark.parametrize(("dim", "reduce"), [(4096, "mean"), (10000, "kth"), (1000, "mean")])
def test_fused_bank_scores_match_general_path(dim: int, reduce: str) -> None:
    bank = _bank(dim, "hadamard", reduce)
    for n in (1, 3, 64):
        x = _features(n, 300 + n)
        got = bank.calibrated_scores(x)
        ref = _reference_calibrated(bank, x)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.array_equal(np.isneginf(got), np.isneginf(ref))
        finite = np.isfinite(ref)
        assert np.abs(got[finite] - ref[finite]).max() <= 1e-6
        # identical codes give identical top-k distances, hence identical scores, bit for bit
        same = _fused_codes_distance(bank.encoder, x, "cpp") == 0
        assert same.mean() >= 0.9
        assert np.array_equal(got[same], ref[same])
        raw = bank.scores(x)
        thr = np.asarray(bank.thresholds, dtype=np.float32)
        assert np.array_equal(raw - thr, got)


def test_fused_api_cpp_matches_composed_and_poison() -> None:
    bank = _bank(2048, "hadamard", "mean")
    plan = bank.encoder.fused_plan()
    assert plan is not None
    x = torch.from_numpy(_features(9, 4))
    thr = torch.tensor(bank.thresholds, dtype=torch.float32)
    args = (x, plan.bounds, plan.weights, True, plan.signs, bank.dim, bank.packed, bank.offsets)
    with kernels._alloc.poisoned_outputs():  # every output element must be written
        fast = kernels.fused_bank_scores(*args, bank.k, "mean", thr, backend="cpp")
    composed = kernels.fused_bank_scores(*args, bank.k, "mean", thr, backend="torch")
    assert not torch.isnan(fast).any()
    assert torch.allclose(fast, composed, rtol=0, atol=1e-6)
    with pytest.raises(InputError):
        kernels.fused_bank_scores(*args, bank.k, "median", thr)
    with pytest.raises(InputError):
        kernels.fused_bank_scores(*args, bank.k, "mean", thr[:1])


def test_fused_path_follows_domain_and_threshold_changes() -> None:
    bank = _bank(2048, "hadamard", "kth")
    x = _features(4, 8)

    def check() -> None:
        got, ref = bank.calibrated_scores(x), _reference_calibrated(bank, x)
        assert got.shape == ref.shape
        finite = np.isfinite(ref)
        assert np.abs(got[finite] - ref[finite]).max() <= 1e-6

    check()
    bank.set_threshold(4, -0.5)  # the cached thresholds tensor must follow
    check()
    bank.thresholds[0] = 0.25  # even a direct list edit
    check()
    bank.add_domain(12, _features(50, 13), np.zeros(50, dtype=np.int64))
    check()
    bank.remove_domain(0)
    check()
    bank.extend_domain(4, _features(30, 14), np.ones(30, dtype=np.int64))
    check()


def test_fused_path_not_taken_for_centring_or_large_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edge_runtime.kernels import cpp_backend

    bank = _bank(1024, "hadamard", "mean")
    calls: list[int] = []
    real = cpp_backend.fused_bank_scores_into

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpp_backend, "fused_bank_scores_into", spy)
    bank.calibrated_scores(_features(64, 1))
    assert len(calls) == 1
    bank.calibrated_scores(_features(65, 1))  # above the fused batch limit
    assert len(calls) == 1
    bank.calibrated_scores(torch.from_numpy(_features(3, 1)))  # a tensor: checked, then fused
    assert len(calls) == 2
    bank.encoder.center = True  # centring needs the general path
    bank.calibrated_scores(_features(2, 1))
    assert len(calls) == 2


@pytest.mark.parametrize("rerank", [0, 16])
def test_per_frame_path_reports_nan_and_inf_rows(rerank: int) -> None:
    bank = DomainMemoryBank(
        dim=1024, k=5, max_exemplars=100, layer_dims=LAYERS, projection="hadamard", rerank=rerank
    )
    bank.add_domain(0, _features(120, 2), np.zeros(120, dtype=np.int64))
    x = _features(6, 3)
    good = bank.calibrated_scores(x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[4, 17] = bad
        with pytest.raises(InputError, match=r"NaN or Inf values \(rows \[4\]\)"):
            bank.calibrated_scores(y)
        with pytest.raises(InputError, match="NaN or Inf"):
            bank.scores(y[4:5])
    assert np.array_equal(bank.calibrated_scores(x), good)  # nothing was left behind


# ---------------------------------------------------------------- device of the features
# The bank and its encoder score a torch batch on that batch's device (or on the bank's
# configured device) through the kernels' dispatch; only numpy batches stay on the CPU's
# fast paths. "meta" tensors (shapes, no data) run the device-agnostic pieces here, where
# there is no GPU: anything the encoder kept on the CPU would raise on them.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    ("projection", "center"), [("hadamard", False), ("hadamard", True), ("gaussian", True)]
)
def test_encoder_keeps_the_batch_on_its_device(projection: str, center: bool) -> None:
    enc = HypervectorEncoder(dim=1000, layer_dims=LAYERS, projection=projection, center=center)
    enc.fit(_features(16, 0))
    x = torch.from_numpy(_features(3, 1)).to("meta")
    z = enc.normalise(x)
    packed = enc.pack_normalised(z)
    assert z.device.type == "meta" and packed.device.type == "meta"
    assert packed.shape == (3, kernels.words_for(1000)) and packed.dtype == torch.int64
    # the CPU copies stay where checkpoints read them
    assert enc._signs(enc.normalised_width).device.type == "cpu"
    if center:
        assert enc.mean is not None and enc.mean.device.type == "cpu"


def test_rerank_similarity_runs_on_the_inputs_device() -> None:
    rows = torch.randint(-1, 40, (5, 2, 8)).to("meta")
    zq, zm = torch.randn(5, 37).to("meta"), torch.randn(40, 37).to("meta")
    own = torch.full((5,), -1, dtype=torch.int64).to("meta")
    sim, top, ang = kernels.rerank_similarity(rows, zq, zm, 3, "mean", own)
    assert {sim.device.type, top.device.type, ang.device.type} == {"meta"}
    assert sim.shape == (5, 2) and top.shape == ang.shape == (5, 2, 3)


def _dispatch_spy(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """Records the device every kernel dispatch is asked to pick a backend for."""
    seen: list[torch.device] = []
    real = kernels.api.resolve_backend

    def spy(backend: str, device: torch.device) -> str:
        seen.append(torch.device(device))
        return real(backend, device)

    monkeypatch.setattr(kernels.api, "resolve_backend", spy)
    return seen


@pytest.mark.parametrize("rerank", [0, 16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_bank_scores_a_tensor_on_its_device_through_the_dispatch(
    monkeypatch: pytest.MonkeyPatch, device: str, rerank: int
) -> None:
    bank = DomainMemoryBank(
        dim=2048, k=5, max_exemplars=300, layer_dims=LAYERS, projection="hadamard", rerank=rerank
    )
    rng = np.random.default_rng(3)
    bank.add_domain(0, _features(300, 20), rng.integers(0, 4, 300))
    bank.add_domain(1, _features(40, 21), rng.integers(0, 2, 40))
    x = _features(80, 22)  # above the fused batch: the general, dispatched path
    expect = bank.calibrated_scores(x)
    seen = _dispatch_spy(monkeypatch)
    got = bank.calibrated_scores(torch.from_numpy(x).to(device))
    assert seen and {d.type for d in seen} == {device}
    routed = bank.route(torch.from_numpy(x).to(device))
    if device == "cpu":
        assert np.array_equal(got, expect)
    else:  # GPU float rounding may flip the sign of a near-zero projection: 2/D per bit
        assert np.abs(got - expect).max() < 0.02
        assert torch.device(device) in bank._mirrors
        mirror = bank._memory(torch.device(device))
        assert bank._memory(torch.device(device))[0] is mirror[0]  # copied once, not per call
    assert routed.domain.shape == (80,) and bank.packed.device.type == "cpu"


def test_bank_refuses_a_device_it_cannot_use() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(BackendUnavailableError, match="needs CUDA"):
        DomainMemoryBank(dim=1024, layer_dims=LAYERS, device="cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_bank_with_a_configured_device_scores_numpy_there(
    monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    def build(dev: str | None) -> DomainMemoryBank:
        bank = DomainMemoryBank(
            dim=2048, k=5, max_exemplars=200, layer_dims=LAYERS, projection="hadamard", device=dev
        )
        rng = np.random.default_rng(4)
        bank.add_domain(0, _features(200, 30), rng.integers(0, 4, 200))
        bank.extend_domain(0, _features(30, 31), rng.integers(4, 6, 30))
        bank.add_domain(2, _features(50, 32), rng.integers(0, 2, 50))
        return bank

    plain, placed = build(None), build(device)
    assert placed.device == torch.device(device)
    assert placed.packed.device.type == "cpu"  # checkpoints and budgets read the CPU copy
    x = _features(5, 33)
    seen = _dispatch_spy(monkeypatch)
    got = placed.calibrated_scores(x)
    assert {d.type for d in seen} <= {device}  # on CPU, the native per-frame scorer (cached)
    if device == "cpu":
        assert np.array_equal(got, plain.calibrated_scores(x))
        assert np.array_equal(placed.packed, plain.packed) and placed.thresholds == plain.thresholds
    else:
        assert seen
        assert np.abs(got - plain.calibrated_scores(x)).max() < 0.02
    state = placed.state_dict()
    assert all(t.device.type == "cpu" for t in state["tensors"].values())
