"""HDC detector and memory bank on real data: frozen MobileNetV2 features of small slices.

Features go through the on-disk cache, so only the first run pays for extraction
(~1,600 frames at 64x64).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime import kernels
from edge_runtime.data.datasets import load_fashion_mnist, load_mnist_digits, load_sklearn_digits
from edge_runtime.encoder import Encoder, TorchBackend
from edge_runtime.encoder.cache import cached_features
from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.hdc import DomainMemoryBank, HDCDetector, auroc, select_exemplars
from edge_runtime.hdc.base import threshold_for_tpr

BASE = (0, 1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def feats() -> dict[str, np.ndarray]:
    """Train (80/class, classes 0-5), ID test (600), MNIST digits (200), sklearn digits (200)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    enc = Encoder(TorchBackend.mobilenet(input_size=64, layers=(18,)), batch_size=128)
    tr_x, tr_y = load_fashion_mnist("train")
    te_x, te_y = load_fashion_mnist("test")
    tr_idx = np.concatenate([np.flatnonzero(tr_y == c)[:80] for c in BASE])
    te_idx = np.flatnonzero(np.isin(te_y, BASE))[:600]
    mn_x = load_mnist_digits()[0][np.random.default_rng(0).choice(5000, 200, replace=False)]
    sk_x = load_sklearn_digits()[0][:200]
    return {
        "train": cached_features(enc, np.ascontiguousarray(tr_x[tr_idx]), "test-hdc-train"),
        "train_y": tr_y[tr_idx].astype(np.int64),
        "id": cached_features(enc, np.ascontiguousarray(te_x[te_idx]), "test-hdc-id"),
        "id_y": te_y[te_idx].astype(np.int64),
        "mnist": cached_features(enc, np.ascontiguousarray(mn_x), "test-hdc-mnist"),
        "sk": cached_features(enc, np.ascontiguousarray(sk_x), "test-hdc-skdigits"),
    }


@pytest.fixture(scope="module")
def fitted(feats: dict[str, np.ndarray]) -> HDCDetector:
    return HDCDetector(seed=0).fit(feats["train"], feats["train_y"])


def test_separates_shifted_set_from_id(fitted: HDCDetector, feats: dict[str, np.ndarray]) -> None:
    s_id = fitted.score(feats["id"])
    assert s_id.dtype == np.float32 and s_id.shape == (600,)
    assert auroc(s_id, fitted.score(feats["mnist"])) > 0.9
    assert auroc(s_id, fitted.score(feats["sk"])) > 0.9


def test_classify_is_a_usable_head(fitted: HDCDetector, feats: dict[str, np.ndarray]) -> None:
    acc = float(np.mean(fitted.classify(feats["id"]) == feats["id_y"]))
    assert acc > 0.7  # 6 classes: chance is 0.17


def test_threshold_gives_promised_tpr_on_heldout(
    fitted: HDCDetector, feats: dict[str, np.ndarray]
) -> None:
    x = feats["id"]
    perm = np.random.default_rng(0).permutation(len(x))
    cal, held = x[perm[:300]], x[perm[300:]]
    thr = fitted.calibrate(cal, tpr=0.95)
    assert fitted.threshold == thr
    assert np.mean(fitted.score(cal) >= thr) >= 0.95  # by construction on the calibration set
    tpr = float(np.mean(fitted.predict(held)))
    # Two independent samples of 300: quantile error plus test error, 3 sigma each side.
    tol = 3 * math.sqrt(2 * 0.95 * 0.05 / 300)
    assert abs(tpr - 0.95) <= tol, tpr
    # And the threshold rejects most far-OOD frames.
    assert np.mean(fitted.predict(feats["mnist"])) < 0.5


@pytest.mark.parametrize("reduce", ["kth", "mean"])
def test_knn_score_matches_exact_bipolar_cosine(reduce: str, feats: dict[str, np.ndarray]) -> None:
    det = HDCDetector(dim=2048, k=3, reduce=reduce, seed=1)
    det.fit(feats["train"][:120], feats["train_y"][:120])
    q = feats["id"][:20]
    packed_q = det.encoder.encode_packed(q)
    bits_q = kernels.unpack_bits(packed_q, det.dim).double() * 2 - 1
    bits_m = kernels.unpack_bits(det.exemplars.packed, det.dim).double() * 2 - 1
    cos = (bits_q @ bits_m.T) / det.dim
    top = cos.topk(3, dim=1).values
    expected = (top[:, -1] if reduce == "kth" else top.mean(dim=1)).float().numpy()
    np.testing.assert_allclose(det.score(q), expected, atol=1e-6)


def test_packed_memory_costs_1_25_kb_per_exemplar(fitted: HDCDetector) -> None:
    assert fitted.exemplars is not None
    assert fitted.exemplars.nbytes == len(fitted.exemplars) * 157 * 8  # ceil(10000/64) words


def test_exemplar_cap_is_class_balanced() -> None:
    labels = np.array([0] * 500 + [1] * 100 + [2] * 30)
    idx = select_exemplars(labels, 200, seed=0)
    assert len(idx) == 200 and len(np.unique(idx)) == 200
    counts = np.bincount(labels[idx])
    assert counts[2] == 30 and counts[0] == counts[1] == 85


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"memory": "prototype"},
        {"memory": "prototype", "prototypes_per_class": 4, "layer_dims": (640, 640)},
    ],
)
def test_save_load_round_trips_exactly(
    kwargs: dict, feats: dict[str, np.ndarray], tmp_path: Path
) -> None:
    det = HDCDetector(dim=3000, **kwargs).fit(feats["train"], feats["train_y"])
    det.calibrate(feats["id"][:200])
    path = det.save(tmp_path / "hdc.safetensors")
    back = HDCDetector.load(path)
    assert back.config() == det.config()
    assert back.threshold == det.threshold
    for name, t in det.state_tensors().items():
        assert torch.equal(back.state_tensors()[name], t), name
    np.testing.assert_array_equal(back.score(feats["id"]), det.score(feats["id"]))
    np.testing.assert_array_equal(back.classify(feats["mnist"]), det.classify(feats["mnist"]))
    np.testing.assert_array_equal(back.predict(feats["sk"]), det.predict(feats["sk"]))


def test_bad_inputs_raise_input_error(fitted: HDCDetector, feats: dict[str, np.ndarray]) -> None:
    x = feats["id"][:4].copy()
    with pytest.raises(InputError, match="rank 2"):
        fitted.score(x[0])
    with pytest.raises(InputError, match="empty"):
        fitted.score(x[:0])
    with pytest.raises(InputError, match="width"):
        fitted.score(x[:, :100])
    x[2, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fitted.score(x)
    with pytest.raises(InputError, match="not fitted"):
        HDCDetector().score(feats["id"][:2])
    with pytest.raises(InputError, match="labels"):
        HDCDetector(dim=500).fit(feats["train"], feats["train_y"][:-1])
    with pytest.raises(InputError, match="threshold"):
        HDCDetector(dim=500).fit(feats["train"], feats["train_y"]).predict(feats["id"][:2])
    with pytest.raises(InputError):
        HDCDetector(memory="bogus")


def test_corrupt_or_mismatched_checkpoint_raises(fitted: HDCDetector, tmp_path: Path) -> None:
    path = fitted.save(tmp_path / "ok.safetensors")
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not a checkpoint" * 10)
    for name in ("trunc", "garbage", "missing"):
        with pytest.raises(CheckpointError):
            HDCDetector.load(tmp_path / f"{name}.safetensors")
    # A valid safetensors file that is not an HDC checkpoint.
    from safetensors.torch import save_file

    save_file(
        {"x": torch.zeros(3)}, str(tmp_path / "other.safetensors"), metadata={"format": "other"}
    )
    with pytest.raises(CheckpointError, match="not an HDC"):
        HDCDetector.load(tmp_path / "other.safetensors")
    # Right format, tensors that disagree with the config (dim mismatch).
    tensors = fitted.state_tensors()
    tensors["exemplars.packed"] = tensors["exemplars.packed"][:, :10].contiguous()
    import json

    meta = {
        "format": "edge_runtime.hdc.HDCDetector",
        "version": "1",
        "config": json.dumps(fitted.config()),
    }
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError):
        HDCDetector.load(tmp_path / "bad.safetensors")


def test_bank_routes_domains_and_flags_ood(feats: dict[str, np.ndarray]) -> None:
    mn = feats["mnist"]
    bank = DomainMemoryBank(dim=4000, k=5, seed=0)
    bank.add_domain(0, feats["train"], feats["train_y"], calib_features=feats["id"][:200])
    # Second domain: MNIST digits as a new domain (its labels offset past the base classes).
    bank.add_domain(7, mn[:120], np.full(120, 6), calib_features=mn[120:160])
    assert bank.domain_ids == [0, 7] and bank.offsets.tolist() == [0, 480, 600]
    cal = bank.calibrated_scores(feats["id"][200:])
    assert cal.shape == (400, 2)
    route_id = bank.route(feats["id"][200:])
    assert np.mean(route_id.best_domain == 0) > 0.95
    assert 0.85 < np.mean(route_id.domain == 0) <= 1.0  # ~95% TPR, held-out
    route_mn = bank.route(mn[160:])
    assert np.mean(route_mn.best_domain == 7) > 0.9
    assert (
        np.mean(route_id.label[route_id.domain == 0] == feats["id_y"][200:][route_id.domain == 0])
        > 0.7
    )
    # sklearn 8x8 digits are a different domain from both: mostly OOD once MNIST is removed.
    bank.remove_domain(7)
    assert bank.domain_ids == [0] and bank.offsets.tolist() == [0, 480]
    assert np.mean(bank.route(feats["sk"]).domain == -1) > 0.8


def test_bank_state_dict_round_trip(feats: dict[str, np.ndarray]) -> None:
    bank = DomainMemoryBank(dim=2000, k=3)
    bank.add_domain(0, feats["train"], feats["train_y"])
    bank.add_domain(1, feats["mnist"], np.zeros(200, dtype=np.int64))
    state = bank.state_dict()
    back = DomainMemoryBank()
    back.load_state_dict(state)
    np.testing.assert_array_equal(
        back.calibrated_scores(feats["sk"]), bank.calibrated_scores(feats["sk"])
    )
    assert back.thresholds == bank.thresholds
    bad = {"config": dict(state["config"]), "tensors": dict(state["tensors"])}
    bad["config"]["thresholds"] = [0.1]
    with pytest.raises(CheckpointError):
        DomainMemoryBank().load_state_dict(bad)
    with pytest.raises(InputError, match="already"):
        bank.add_domain(0, feats["train"], feats["train_y"])


def _brute_loo_threshold(bank: DomainMemoryBank, x: np.ndarray, keep: np.ndarray) -> float:
    """Exact leave-one-out threshold from a full numpy Hamming matrix (no kernels)."""
    codes = bank.encoder.encode_packed(x).numpy().view(np.uint64)
    bits = np.unpackbits(codes.view(np.uint8), axis=1)[:, : codes.shape[1] * 64]
    dist = (bits[:, None, :] != bits[None, keep, :]).sum(axis=2).astype(np.float64)
    dist[keep, np.arange(len(keep))] = np.inf  # a frame is never its own neighbour
    near = np.sort(dist, axis=1)[:, : bank.k]
    scores = (1.0 - 2.0 * near / bank.dim).mean(axis=1)
    return threshold_for_tpr(scores, bank.tpr)


@pytest.mark.parametrize("max_exemplars", [1000, 60])
def test_bank_threshold_is_leave_one_out(max_exemplars: int) -> None:
    rng = np.random.default_rng(3)
    x = rng.exponential(1.0, (90, 40)).astype(np.float32)
    x[5] = x[4]  # a duplicate: its twin is a real neighbour at distance 0, itself is not
    y = rng.integers(0, 3, 90)
    bank = DomainMemoryBank(dim=300, k=5, max_exemplars=max_exemplars, reduce="mean")
    thr = bank.add_domain(0, x, y)
    keep = select_exemplars(y, max_exemplars, bank.seed)
    assert len(bank.packed) == len(keep)  # every kept frame stays in memory
    assert thr == pytest.approx(_brute_loo_threshold(bank, x, keep), abs=1e-6)
