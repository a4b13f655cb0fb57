"""Domain bundles and signatures on their own: the safetensors blob round trips exactly, every
check of :func:`read_bundle` refuses what it should with a message that says why, the bank takes
packed rows only of its own width, and the signature buffer keeps the last OOD frames in order.

Real encoder (MobileNetV2 at 32x32) and real Fashion-MNIST frames, small slices.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edge_runtime.adapt.bundle import (
    BundleError,
    bundle_manifest,
    export_bundle,
    hdc_fingerprint,
    read_bundle,
    sha256_hex,
)
from edge_runtime.config import RuntimeConfig
from edge_runtime.drift.signature import DomainSignature, prototype_hex, similarity
from edge_runtime.errors import InputError
from edge_runtime.runtime import Runtime, build_encoder

CFG = RuntimeConfig().with_overrides(
    {"encoder.input_size": 32, "encoder.batch_size": 32, "hdc.dim": 2048}
)


@pytest.fixture(scope="module")
def runtime(fashion_slice) -> Runtime:
    x, y = fashion_slice
    rt = Runtime(CFG, build_encoder(CFG), background=False)
    rt.fit_base(x[:200], y[:200])
    return rt


def _read(rt: Runtime, data: bytes, **kw):
    args = {
        "sha256": sha256_hex(data),
        "encoder_hash": rt.encoder_hash,
        "hdc_fingerprint": rt.hdc_fingerprint,
        **kw,
    }
    return read_bundle(data, **args)


def test_bundle_round_trips_adaptor_memory_and_manifest(runtime, fashion_slice) -> None:
    out = export_bundle(runtime.domains_set, 0, runtime.encoder_hash, source={"device": "a"})
    b = _read(runtime, out.data)
    packed, labels, exact, threshold = runtime.bank.domain_rows(0)
    assert torch.equal(b.packed, packed) and torch.equal(b.labels, labels)
    assert b.exact is not None and exact is not None and torch.equal(b.exact, exact)
    assert b.threshold == threshold and b.sha256 == out.sha256 == sha256_hex(out.data)
    m = bundle_manifest(out.data)
    assert m["encoder_hash"] == runtime.encoder_hash and m["hdc"] == hdc_fingerprint(runtime.bank)
    assert m["domain"]["kind"] == "base" and m["source"]["device"] == "a"
    assert b.signature == prototype_hex(packed) and len(b.signature) == CFG.hdc.dim // 4
    feats = runtime.encoder.features(fashion_slice[0][200:256])
    np.testing.assert_array_equal(
        b.adaptor.predict(feats), runtime.registry.get(0).adaptor.predict(feats)
    )
    # The memory goes into a bank as it is: a copy with it scores as the original domain does.
    bank = runtime.domains_set.bank_copy()
    bank.add_packed_domain(5, b.packed, b.labels, b.exact, b.threshold)
    s = bank.calibrated_scores(feats)
    np.testing.assert_allclose(s[:, 1], s[:, 0], atol=1e-6)


def test_read_bundle_refuses_what_it_cannot_trust(runtime) -> None:
    data = runtime.export_domain(0)
    with pytest.raises(BundleError, match="the limit is 1000"):
        _read(runtime, data, max_bytes=1000)
    with pytest.raises(BundleError, match="must be bytes"):
        read_bundle(
            "text",  # type: ignore[arg-type]
            sha256="0",
            encoder_hash=runtime.encoder_hash,
            hdc_fingerprint=runtime.hdc_fingerprint,
        )
    with pytest.raises(BundleError, match=r"checksum mismatch: expected abc, got [0-9a-f]{64}"):
        _read(runtime, data, sha256="abc")
    with pytest.raises(BundleError, match="this device runs other"):
        _read(runtime, data, encoder_hash="other")
    fp = runtime.hdc_fingerprint
    fp["encoder"]["projection"] = "gaussian"
    with pytest.raises(BundleError, match=r"encoder.projection='hadamard' \(this device 'gaussian"):
        _read(runtime, data, hdc_fingerprint=fp)

    def resaved(change) -> bytes:
        manifest = bundle_manifest(data)
        tensors = dict(st_load(data))
        change(tensors, manifest)
        return st_save(tensors, metadata={"manifest": json.dumps(manifest)})

    cases = [
        (lambda t, m: m.__setitem__("version", 99), "version 99; this build reads 1"),
        (lambda t, m: t.pop("memory.exact"), "expected ['memory.exact', 'memory.labels'"),
        (
            lambda t, m: t.__setitem__("memory.packed", t["memory.packed"][:, :-1].contiguous()),
            "memory.packed is (200, 31)",
        ),
        (
            lambda t, m: t.__setitem__("memory.exact", t["memory.exact"].float()),
            "memory.exact is (200, 1304) torch.float32",
        ),
        (lambda t, m: m["memory"].__setitem__("threshold", None), "threshold must be finite"),
        (
            lambda t, m: t.__setitem__("adaptor.head.weight", t["adaptor.head.weight"][:1]),
            "adaptor does not match its tensors",
        ),
        (
            lambda t, m: t["adaptor.head.bias"].__setitem__(0, float("nan")),
            "adaptor.head.bias is not finite",
        ),
        (
            lambda t, m: t.__setitem__("memory.labels", t["memory.labels"] + 100),
            "labels its adaptor does not predict",
        ),
    ]
    for change, message in cases:
        bad = resaved(change)
        with pytest.raises(BundleError) as err:
            _read(runtime, bad)
        assert message in str(err.value), (message, str(err.value))
    with pytest.raises(BundleError, match="no manifest"):
        _read(runtime, st_save({"x": torch.zeros(1)}))


def test_bank_takes_packed_rows_of_its_own_width_only(runtime) -> None:
    bank = runtime.domains_set.bank_copy()
    packed, labels, exact, thr = bank.domain_rows(0)
    with pytest.raises(InputError, match="do not fit this bank's"):
        bank.add_packed_domain(3, packed[:, :8].contiguous(), labels, exact, thr)
    with pytest.raises(InputError, match="re-ranks"):
        bank.add_packed_domain(3, packed, labels, None, thr)
    with pytest.raises(InputError, match="already in the memory bank"):
        bank.add_packed_domain(0, packed, labels, exact, thr)
    with pytest.raises(InputError, match="finite"):
        bank.add_packed_domain(3, packed, labels, exact, float("inf"))
    bank.add_packed_domain(3, packed, labels, exact, thr)
    assert bank.domain_ids == [0, 3] and len(bank.packed) == 2 * len(packed)


def test_signature_buffer_keeps_the_last_ood_frames_in_order(runtime, fashion_slice) -> None:
    sig = DomainSignature(window=4)
    assert sig.signature(runtime.bank.encoder) is None and sig.recent().shape == (0, 0)
    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    sig.update(x[:3], np.array([True, False, True]))
    sig.update(x[3:], np.array([True, True, True, False]))
    np.testing.assert_array_equal(sig.recent()[:, 0], [4, 6, 8, 10])  # frames 2, 3, 4, 5
    sig.reset()
    assert len(sig) == 0
    with pytest.raises(InputError, match="do not match"):
        sig.update(x, np.ones(3, bool))
    feats = runtime.encoder.features(fashion_slice[0][:64])
    sig.update(feats, np.ones(len(feats), bool))
    hexsig = sig.signature(runtime.bank.encoder)
    assert hexsig == prototype_hex(runtime.bank.encoder.encode_packed(feats[-4:]))
    assert similarity(hexsig, hexsig) == 1.0
    with pytest.raises(InputError, match="cannot be compared"):
        similarity(hexsig, "00")
