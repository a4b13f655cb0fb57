"""The runtime's side of the fleet, through its command queue: a domain learned on device A is
exported, installed on device B with no labels, and refused with a clear reason when it should be;
labels arrive as a command; every drift flag carries the HDC signature of its frames.

Real encoder (MobileNetV2 at 32x32) and real Fashion-MNIST frames. Device A and device B see the
same classes under heavy fog, on disjoint frames.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from small_runtime import small_config

from edge_runtime.adapt.bundle import bundle_manifest, read_bundle, sha256_hex
from edge_runtime.config import RuntimeConfig
from edge_runtime.data import load_fashion_mnist
from edge_runtime.data.corruptions import corrupt
from edge_runtime.drift.signature import similarity
from edge_runtime.errors import InputError
from edge_runtime.fleet.payloads import (
    MAX_REASON_CHARS,
    SCHEMA_VERSION,
    CommandMessage,
    PayloadError,
)
from edge_runtime.runtime import Runtime, build_encoder

CFG = small_config({"adapt.label_budget": 48})
CLEAN = 160  # each stream: CLEAN clean frames, then fogged ones
FLAGGED = 288  # both streams have flagged the fog by then (at about frame 175)
END = 360


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    x, y = load_fashion_mnist("train")
    keep = np.random.default_rng(0).permutation(np.flatnonzero(y < 6))

    def stream(clean: np.ndarray, shifted: np.ndarray, name: str, seed: int) -> tuple:
        frames = np.concatenate([x[clean], corrupt(x[shifted], name, 4, seed)])
        return frames, np.concatenate([y[clean], y[shifted]]).astype(np.int64)

    a_x, a_y = stream(keep[600:760], keep[760:960], "fog", 0)
    b_x, b_y = stream(keep[1000:1160], keep[1160:1360], "fog", 1)
    n_x, n_y = stream(keep[1000:1160], keep[1160:1360], "gaussian_noise", 2)
    return {
        "train_x": x[keep[:600]],
        "train_y": y[keep[:600]].astype(np.int64),
        "a_x": a_x,
        "a_y": a_y,
        "b_x": b_x,
        "b_y": b_y,
        "noise_x": n_x,
        "noise_y": n_y,
    }


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(CFG)


def _runtime(encoder, data, cfg: RuntimeConfig = CFG) -> Runtime:
    rt = Runtime(cfg, encoder, background=False)
    rt.fit_base(data["train_x"], data["train_y"])
    return rt


def _serve(rt: Runtime, x, y, start: int, stop: int, *, answer: bool) -> tuple[list, list]:
    events, decisions = [], []
    for a in range(start, stop, 32):
        idx = np.arange(a, min(a + 32, stop))
        dec = rt.process(x[idx], idx)
        if answer and dec.label_request.any():
            rt.feedback(idx[dec.label_request], y[idx[dec.label_request]])
        events += dec.events + rt.drain_events()
        decisions.append(dec)
    return events, decisions


@pytest.fixture(scope="module")
def device_a(encoder, data) -> dict:
    """Device A adapted to fog with labels, and its exported fog domain (through the command)."""
    rt = _runtime(encoder, data)
    events, _ = _serve(rt, data["a_x"], data["a_y"], 0, END, answer=True)
    assert sorted(rt.domains) == [0, 1]
    fut = rt.commands.submit("export_domain", command_id="exp-1", domain=1)
    rt.run_commands()
    done = [e for e in rt.drain_events() if e["type"] == "command_done"]
    return {"rt": rt, "events": events, "export": fut.result(0), "done": done}


def _flagged(encoder, data, stream: str = "b") -> tuple[Runtime, list]:
    """A fresh device that flagged the drift in ``stream`` and is waiting for labels."""
    rt = _runtime(encoder, data)
    events, _ = _serve(rt, data[f"{stream}_x"], data[f"{stream}_y"], 0, FLAGGED, answer=False)
    assert rt.wants_labels() and len(rt.signature) == rt.signature.window
    return rt, events


def _install(rt: Runtime, export: dict, command_id: str, **overrides):
    args = {
        "bundle": export["bundle"],
        "sha256": export["sha256"],
        "encoder_hash": rt.encoder_hash,
        "source_device": "device-a",
        "source_domain": export["domain"],
        **overrides,
    }
    return rt.commands.submit("install_adaptor", command_id=command_id, **args)


# ------------------------------------------------------------------------------ export, install


def test_export_domain_command_is_done_with_its_id_and_bytes_that_read_back(device_a) -> None:
    res, rt = device_a["export"], device_a["rt"]
    assert set(res) == {"bundle", "sha256", "domain", "version", "signature"}
    assert res["domain"] == 1 and res["version"] == 1 and res["sha256"] == sha256_hex(res["bundle"])
    # The event names the command and keeps the bytes out; the future holds them.
    (done,) = device_a["done"]
    assert done["command_id"] == "exp-1" and done["command"] == "export_domain"
    assert done["result"]["bundle"] == {"bytes": len(res["bundle"])}
    json.dumps(done)  # JSON-able, as every event sink needs
    bundle = read_bundle(
        res["bundle"],
        sha256=res["sha256"],
        encoder_hash=rt.encoder_hash,
        hdc_fingerprint=rt.hdc_fingerprint,
    )
    assert bundle.domain["id"] == 1 and bundle.signature == res["signature"]
    assert rt.export_domain(1) != b"" and bundle_manifest(rt.export_domain(1))["domain"]["id"] == 1


def test_second_device_adapts_to_the_shared_domain_with_zero_labels(
    encoder, data, device_a
) -> None:
    a, export = device_a["rt"], device_a["export"]
    b, _ = _flagged(encoder, data)
    fut = _install(b, export, "inst-1")
    events, decisions = _serve(b, data["b_x"], data["b_y"], FLAGGED, END, answer=False)
    result = fut.result(0)
    assert result["labels"] == 0 and result["activated"] and result["coverage"] >= 0.5
    assert result["cancelled_collection"]  # the labels the flag asked for are not needed
    installed = [e for e in events if e["type"] == "adaptor_installed"]
    assert [
        (e["domain"], e["labels"], e["source_device"], e["source_domain"]) for e in installed
    ] == [(result["domain"], 0, "device-a", 1)]
    assert any(e["type"] == "alert" and e["reason"] == "installed" for e in events)
    done = [e for e in events if e["type"] == "command_done"]
    assert done[0]["command_id"] == "inst-1"
    assert b.labels_used == 0 and not b.wants_labels()
    new = result["domain"]
    assert b.registry.get(new).metadata["source_device"] == "device-a"
    # B serves the fog with A's domain: same routes, same predictions.
    dom = np.concatenate([d.domain for d in decisions])
    assert np.mean(dom == new) > 0.9
    fog = data["b_x"][FLAGGED:END]
    pa, _, da = a.predict_eval(fog)
    pb, _, db = b.predict_eval(fog)
    assert np.mean(db == new) > 0.9 and np.mean(da == 1) > 0.9
    same = (da == 1) & (db == new)
    assert same.mean() > 0.9 and (pa[same] == pb[same]).all()


# ------------------------------------------------------------------------------ refusals


def _tampered(export: dict, change) -> tuple[bytes, str]:
    """The exported bundle with its tensors or manifest changed, re-saved and re-hashed (so only
    the content check can refuse it)."""
    manifest = bundle_manifest(export["bundle"])
    tensors = dict(st_load(export["bundle"]))
    change(tensors, manifest)
    data = st_save(tensors, metadata={"manifest": json.dumps(manifest)})
    return data, sha256_hex(data)


def test_bad_bundles_are_refused_by_command_and_serving_goes_on(encoder, data, device_a) -> None:
    export = device_a["export"]
    rows = bundle_manifest(export["bundle"])["memory"]["rows"]
    short, short_sha = _tampered(
        export, lambda t, m: t.__setitem__("memory.labels", t["memory.labels"][:-1])
    )
    other_seed, other_seed_sha = _tampered(
        export, lambda t, m: m["hdc"]["encoder"].__setitem__("seed", 7)
    )
    cases = {
        "checksum": ({"sha256": "0" * 64}, "adaptor bundle checksum mismatch: expected 0000"),
        "encoder": ({"encoder_hash": "f" * 64}, f"bundle was trained for encoder {'f' * 64}"),
        "truncated": (
            {"bundle": export["bundle"][:1000], "sha256": sha256_hex(export["bundle"][:1000])},
            "truncated",
        ),
        "garbage": (
            {"bundle": b"\x00" * 64, "sha256": sha256_hex(b"\x00" * 64)},
            "not a safetensors file",
        ),
        "shapes": (
            {"bundle": short, "sha256": short_sha},
            f"memory.labels is ({rows - 1},) torch.int64, expected ({rows},)",
        ),
        "fingerprint": (
            {"bundle": other_seed, "sha256": other_seed_sha},
            "built with other settings: encoder.seed=7 (this device 0)",
        ),
    }
    b, _ = _flagged(encoder, data)
    futures = {
        name: _install(b, export, f"bad-{name}", **args) for name, (args, _) in cases.items()
    }
    events, decisions = _serve(b, data["b_x"], data["b_y"], FLAGGED, FLAGGED + 32, answer=False)
    refused = {e["command_id"]: e for e in events if e["type"] == "command_refused"}
    for name, (_, message) in cases.items():
        with pytest.raises(InputError) as err:
            futures[name].result(0)
        assert message in str(err.value), (name, str(err.value))
        assert message in refused[f"bad-{name}"]["reason"]
    assert sum(e["type"] == "adaptor_refused" for e in events) == len(cases)
    assert sorted(b.domains) == [0] and b.wants_labels()  # nothing installed, still collecting
    assert not decisions[0].rejected.any() and (decisions[0].prediction >= 0).all()


def test_wrong_hdc_settings_on_the_device_refuse_the_bundle(encoder, data, device_a) -> None:
    b = _runtime(encoder, data, CFG.with_overrides({"hdc.k": 5}))
    fut = _install(b, device_a["export"], "k5")
    b.run_commands()
    with pytest.raises(InputError, match=r"k=10 \(this device 5\)"):
        fut.result(0)


def test_a_bundle_that_does_not_cover_the_recent_ood_frames_is_refused(
    encoder, data, device_a
) -> None:
    """Device C sees noise, not fog: A's fog domain accepts almost none of its OOD frames."""
    c, events = _flagged(encoder, data, "noise")
    fut = _install(c, device_a["export"], "noise-1")
    events, decisions = _serve(
        c, data["noise_x"], data["noise_y"], FLAGGED, FLAGGED + 32, answer=False
    )
    with pytest.raises(InputError, match=r"accepts \d+% of the 32 recent OOD frames"):
        fut.result(0)
    (refused,) = [e for e in events if e["type"] == "adaptor_refused"]
    assert refused["coverage"] < 0.5 and refused["source_device"] == "device-a"
    assert [e["command_id"] for e in events if e["type"] == "command_refused"] == ["noise-1"]
    assert sorted(c.domains) == [0] and (decisions[0].prediction >= 0).all()


def test_a_device_that_saw_no_drift_installs_without_activating(encoder, data, device_a) -> None:
    rt = _runtime(encoder, data)
    fut = _install(rt, device_a["export"], "quiet")
    rt.run_commands()
    result = fut.result(0)
    assert result["coverage"] is None and not result["activated"]
    assert sorted(rt.domains) == [0, 1] and rt.active_domain == 0
    # the shared memory claims fog frames as soon as they come, with no labels
    _, _, domain = rt.predict_eval(data["b_x"][FLAGGED:END])
    assert np.mean(domain == 1) > 0.9


# ------------------------------------------------------------------------------ labels, signature


def test_labels_command_feeds_labels_like_feedback(encoder, data) -> None:
    direct, _ = _flagged(encoder, data)
    by_command, _ = _flagged(encoder, data)
    asked = np.array(sorted(direct.labels._pending))
    assert asked.tolist() == sorted(by_command.labels._pending)
    labels = data["b_y"][asked]
    accepted = direct.feedback(asked, labels)
    fut = by_command.commands.submit(
        "labels", command_id="lab-1", request_id="r1", frames=asked.tolist(), labels=labels.tolist()
    )
    by_command.run_commands()
    assert fut.result(0) == {"accepted": accepted, "request_id": "r1"} and accepted == 48
    done = [e for e in by_command.drain_events() if e["type"] == "command_done"]
    assert done[0]["command_id"] == "lab-1" and done[0]["result"]["accepted"] == 48
    direct.run_commands()  # install the adaptation, as the command path's next batch does
    by_command.run_commands()
    assert sorted(direct.domains) == sorted(by_command.domains) == [0, 1]
    assert direct.labels_used == by_command.labels_used == 48
    fog = data["b_x"][FLAGGED:END]
    np.testing.assert_array_equal(direct.predict_eval(fog)[0], by_command.predict_eval(fog)[0])
    with pytest.raises(InputError, match="needs argument"):
        by_command.commands.submit("labels", frames=[1])


def test_drift_events_carry_a_signature_that_matches_the_same_domain(
    encoder, data, device_a
) -> None:
    """Measured here: A's fog flag vs B's fog flag 0.917, B's fog flag vs A's fog bundle 0.909;
    C's noise flag vs A's fog flag 0.688, vs the fog bundle 0.655. (Other corruptions against
    fog: rotation 0.65-0.67, blur 0.69-0.73, contrast 0.75-0.78, inversion 0.80-0.82.)"""
    rt_a, export = device_a["rt"], device_a["export"]
    bits = rt_a.config.hdc.dim

    def signature(events: list) -> str:
        flag = next(e for e in events if e["type"] in ("drift", "novel_class"))
        sig = flag["evidence"]["signature"]
        assert isinstance(sig, str) and len(sig) == bits // 4
        int(sig, 16)
        return sig

    a = signature(device_a["events"])
    b = signature(_flagged(encoder, data)[1])
    noise = signature(_flagged(encoder, data, "noise")[1])
    same = similarity(a, b, bits)
    assert same > 0.88 and similarity(b, export["signature"], bits) > 0.88
    assert similarity(noise, a, bits) < same - 0.1
    assert similarity(noise, export["signature"], bits) < similarity(b, export["signature"], bits)


# ------------------------------------------------------------------------------ expire_labels


def _expire_payload(args: dict, cid: str = "exp-l") -> str:
    return json.dumps(
        {"schema": SCHEMA_VERSION, "command": "expire_labels", "args": args, "id": cid}
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"trigger_frame": "175"}, "field 'trigger_frame' must be int"),
        ({"trigger_frame": 17.5}, "field 'trigger_frame' must be int"),
        ({"trigger_frame": True}, "field 'trigger_frame' must be int"),
        ({"trigger_frame": -1}, "trigger_frame must be a non-negative frame"),
        ({"reason": 3}, "field 'reason' must be str"),
        ({"reason": "x" * (MAX_REASON_CHARS + 1)}, "reason is 201 characters"),
        ({"reason": "deadline", "domain": 1}, "takes no argument(s) ['domain']"),
    ],
)
def test_malformed_expire_labels_is_refused_with_a_clear_error(args: dict, message: str) -> None:
    with pytest.raises(PayloadError, match=re.escape(message)):
        CommandMessage.from_json(_expire_payload(args))
    # Well-formed: both arguments are optional.
    assert CommandMessage.from_json(_expire_payload({})).args == {}


def test_expire_labels_from_the_fleet_reaches_the_runtime(encoder, data) -> None:
    rt, events = _flagged(encoder, data)
    (flag,) = [e for e in events if e["type"] == "drift"]
    assert rt.wants_labels()
    # A command naming another flag leaves the collection alone.
    other = CommandMessage.from_json(_expire_payload({"trigger_frame": flag["frame"] + 1}, "x1"))
    fut = rt.commands.submit(other.command, command_id=other.id, **other.args)
    rt.run_commands()
    assert fut.result(0) is None and rt.wants_labels()
    msg = CommandMessage.from_json(
        _expire_payload({"reason": "operator deadline", "trigger_frame": flag["frame"]}, "x2")
    )
    fut = rt.commands.submit(msg.command, command_id=msg.id, **msg.args)
    rt.run_commands()
    res = fut.result(0)
    assert res is not None and res["reason"] == "operator deadline"
    assert res["trigger_frame"] == flag["frame"] and res["labels"] == 0 and not res["adapted"]
    assert not rt.wants_labels()  # the monitor watches the stream again
    drained = rt.drain_events()
    assert [e["type"] for e in drained if e["type"] == "label_collection_expired"] == [
        "label_collection_expired"
    ]
    done = [e for e in drained if e["type"] == "command_done"]
    assert [d["command_id"] for d in done] == ["x1", "x2"]
