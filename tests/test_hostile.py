"""Hostile input, property-based (hypothesis): whatever a camera, a file or the network hands
the device either works or is refused with the project's own error (an ``EdgeRuntimeError``
that says what is wrong), and the runtime goes on serving.

Covered: frames of any dtype and shape with NaN/Inf and extreme values through
``Runtime.process``; stream files (``load_stream`` on mutated ``.npz``); configs (random YAML and
``--set`` overrides); checkpoints (byte flips, truncation, deleted files); MQTT command
payloads (``CommandMessage.from_json``, then the runtime's command handler). The real encoder,
fitted on the mini scenario. A fixed profile (derandomised, bounded examples) keeps it
reproducible and under a minute on 2 cores.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from edge_runtime.config import RuntimeConfig, load_config  # noqa: E402
from edge_runtime.config.schema import parse_override_args  # noqa: E402
from edge_runtime.data.stream import Stream, load_stream, save_stream  # noqa: E402
from edge_runtime.errors import CheckpointError, EdgeRuntimeError, InputError  # noqa: E402
from edge_runtime.fleet.payloads import COMMAND_ARGS, CommandMessage, PayloadError  # noqa: E402
from edge_runtime.runtime import Runtime  # noqa: E402

settings.register_profile(
    "edge_runtime_hostile",
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same examples on every run and machine: CI is reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
HOSTILE = settings.get_profile("edge_runtime_hostile")


def _config() -> RuntimeConfig:
    return RuntimeConfig().with_overrides(
        {
            "encoder.input_size": "32",
            "hdc.dim": "2048",
            "adapt.steps": "20",
            "adapt.label_budget": "8",
        }
    )


@pytest.fixture(scope="module")
def runtime(mini_stream: Stream) -> Runtime:
    rt = Runtime(_config(), background=False)
    rt.fit_base(mini_stream.train_images[:200], mini_stream.train_labels[:200])
    yield rt
    rt.close()


def _still_serves(rt: Runtime, stream: Stream) -> None:
    dec = rt.process(stream.images[:4])
    assert len(dec) == 4 and not dec.rejected.any()


# ------------------------------------------------------------------------------ frames

DTYPES = st.sampled_from(
    [
        np.uint8,
        np.int8,
        np.int16,
        np.int64,
        np.uint16,
        np.float16,
        np.float32,
        np.float64,
        np.bool_,
        np.complex64,
    ]
)


@st.composite
def frames(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=12))
    if draw(st.booleans()) and len(shape) in (3, 4):
        # Plausible camera frames most of the time, so the serving path itself is exercised.
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, 40)), draw(st.integers(1, 40)))
        shape = shape + ((draw(st.sampled_from([1, 3, 4])),) if draw(st.booleans()) else ())
    elements = None
    if dtype.kind == "f":
        elements = st.floats(
            allow_nan=True, allow_infinity=True, width=min(64, dtype.itemsize * 8)
        ) | st.sampled_from([0.0, 1.0, 255.0, -1e30, 1e30, float("nan"), float("inf")])
    return draw(hnp.arrays(dtype, shape, elements=elements, fill=st.nothing()))


@settings(HOSTILE, max_examples=250)
@given(batch=frames())
def test_any_frames_are_served_or_refused(
    runtime: Runtime, mini_stream: Stream, batch: np.ndarray
) -> None:
    try:
        dec = runtime.process(batch)
    except InputError:
        pass  # refused with a message; nothing served
    else:
        assert len(dec) == len(batch)
        if batch.dtype.kind == "f":
            bad = ~np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)
            assert np.array_equal(dec.rejected, bad)  # NaN/Inf frames, and only they
            rejected = [e for e in dec.events if e["type"] == "frame_rejected"]
            assert sorted(e["frame"] for e in rejected) == dec.indices[bad].tolist()
            assert (dec.prediction[bad] == -1).all()
    _still_serves(runtime, mini_stream)


def test_rejected_frames_are_counted_in_metrics_and_events(
    mini_stream: Stream, tmp_path: Path
) -> None:
    """run_stream on a stream whose frames are float with NaN/Inf rows (a camera glitch)."""
    import dataclasses

    from edge_runtime.runner import run_stream

    images = mini_stream.images[:300].astype(np.float32)
    images[[5, 17, 200]] = np.nan
    images[42, 3, 3] = np.inf
    arrays = {
        **{f.name: getattr(mini_stream, f.name) for f in dataclasses.fields(mini_stream)},
        "images": images,
        "labels": mini_stream.labels[:300],
        "segment": mini_stream.segment[:300],
        "is_novel": mini_stream.is_novel[:300],
    }
    stream = Stream(**arrays)
    result = run_stream(stream, _config(), tmp_path, progress=False, baselines=False)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["rejected_frames"] == 4 and m["rejected_events"] == 4
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert sorted(e["frame"] for e in events if e["type"] == "frame_rejected") == [5, 17, 42, 200]
    with np.load(tmp_path / "frames.npz") as z:
        assert np.flatnonzero(z["rejected"]).tolist() == [5, 17, 42, 200]
    assert not result.interrupted


# ------------------------------------------------------------------------------ stream files


@pytest.fixture(scope="module")
def small_stream_bytes(mini_stream: Stream, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    import dataclasses

    n = 64  # segment 0 only: a small file, so each mutated copy is quick to write and read
    fields = {f.name: getattr(mini_stream, f.name) for f in dataclasses.fields(mini_stream)}
    keep = mini_stream.eval_segment == 0
    fields.update(
        images=mini_stream.images[:n],
        labels=mini_stream.labels[:n],
        segment=mini_stream.segment[:n],
        is_novel=mini_stream.is_novel[:n],
        segment_is_shift=mini_stream.segment_is_shift[:1],
        eval_images=mini_stream.eval_images[keep][:16],
        eval_labels=mini_stream.eval_labels[keep][:16],
        eval_segment=mini_stream.eval_segment[keep][:16],
        train_images=mini_stream.train_images[:32],
        train_labels=mini_stream.train_labels[:32],
    )
    path = save_stream(Stream(**fields), tmp_path_factory.mktemp("hostile") / "s.npz")
    return path.read_bytes()


def _npz_members(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


MUTATIONS = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 20)),
    st.tuples(st.just("dtype"), st.integers(0, 20), DTYPES),
    st.tuples(st.just("shape"), st.integers(0, 20), st.integers(0, 3)),
    st.tuples(st.just("nan"), st.integers(0, 20)),
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("object"), st.integers(0, 20)),
)


@HOSTILE
@given(mutation=MUTATIONS)
def test_mutated_stream_files_load_or_are_refused(
    small_stream_bytes: bytes, tmp_path_factory: pytest.TempPathFactory, mutation: tuple
) -> None:
    path = tmp_path_factory.mktemp("mut") / "s.npz"
    kind = mutation[0]
    if kind in ("flip", "truncate"):
        data = bytearray(small_stream_bytes)
        if kind == "flip":
            data[mutation[1] % len(data)] ^= mutation[2]
        else:
            data = data[: int(len(data) * mutation[1])]
        path.write_bytes(bytes(data))
    else:
        arrays = _npz_members(small_stream_bytes)
        key = sorted(arrays)[mutation[1] % len(arrays)]
        if kind == "drop":
            del arrays[key]
        elif kind == "dtype":
            try:
                arrays[key] = arrays[key].astype(mutation[2])
            except (ValueError, TypeError, OverflowError):
                return  # not a mutation a file can have (text that is no number)
        elif kind == "shape":
            arrays[key] = arrays[key].reshape(-1)[: mutation[2]]
        elif kind == "nan":
            arrays[key] = np.full(arrays[key].shape, np.nan)
        elif kind == "object":
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:  # a pickled member: must never be unpickled
                member = io.BytesIO()
                np.save(member, np.array([{"x": 1}], dtype=object), allow_pickle=True)
                zf.writestr(f"{key}.npy", member.getvalue())
                for other, arr in arrays.items():
                    if other != key:
                        m = io.BytesIO()
                        np.save(m, arr)
                        zf.writestr(f"{other}.npy", m.getvalue())
            path.write_bytes(buf.getvalue())
        if kind != "object":
            np.savez(path, **arrays)
    try:
        stream = load_stream(path)
    except EdgeRuntimeError as exc:
        assert str(exc)
    else:
        assert len(stream) == len(stream.labels)


# ------------------------------------------------------------------------------ configs

YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    ["encoder", "hdc", "adapt", "drift", "fleet", "device", "input_size", "dim"]
                )
                | st.text(max_size=8),
                inner,
                max_size=4,
            )
        ),
        max_leaves=12,
    ).map(json.dumps),  # JSON is YAML: structured documents reach the schema
)
KEYS = st.sampled_from(
    [
        "encoder.input_size",
        "encoder.batch_size",
        "hdc.dim",
        "hdc.tpr",
        "adapt.label_budget",
        "drift.detector",
        "fleet.port",
        "device.memory_budget_mb",
        "nope.nothing",
        "encoder",
        "",
    ]
)


@HOSTILE
@given(text=YAML_TEXT)
def test_random_config_files_load_or_are_refused(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path)
    except EdgeRuntimeError as exc:
        assert str(exc)
    else:
        assert isinstance(cfg, RuntimeConfig)


@HOSTILE
@given(items=st.lists(st.tuples(KEYS, st.text(max_size=12)), max_size=4))
def test_random_overrides_apply_or_are_refused(items: list[tuple[str, str]]) -> None:
    try:
        cfg = RuntimeConfig().with_overrides(parse_override_args([f"{k}={v}" for k, v in items]))
    except EdgeRuntimeError as exc:
        assert str(exc)
    else:
        assert isinstance(cfg, RuntimeConfig)


# ------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def saved(runtime: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runtime.save(tmp_path_factory.mktemp("ckpt") / "rt")


DAMAGE = st.one_of(
    st.tuples(
        st.just("flip"),
        st.sampled_from(["manifest.json", "tensors.safetensors"]),
        st.integers(0, 10**9),
        st.integers(1, 255),
    ),
    st.tuples(
        st.just("truncate"),
        st.sampled_from(["manifest.json", "tensors.safetensors"]),
        st.floats(0.0, 0.999),
    ),
    st.tuples(st.just("delete"), st.sampled_from(["manifest.json", "tensors.safetensors"])),
)


@HOSTILE
@given(damage=DAMAGE)
def test_damaged_checkpoints_are_refused_never_half_loaded(
    runtime: Runtime, saved: Path, tmp_path_factory: pytest.TempPathFactory, damage: tuple
) -> None:
    path = tmp_path_factory.mktemp("dmg") / "rt"
    shutil.copytree(saved, path)
    target = path / damage[1]
    data = bytearray(target.read_bytes())
    if damage[0] == "flip":
        data[damage[2] % len(data)] ^= damage[3]
        target.write_bytes(bytes(data))
    elif damage[0] == "truncate":
        target.write_bytes(bytes(data[: int(len(data) * damage[2])]))
    else:
        target.unlink()
    try:
        loaded = Runtime.load(path, runtime.encoder, background=False)
    except CheckpointError as exc:
        assert str(exc)
    else:
        # Only a byte outside both checksums (the manifest's "created" time) can load.
        assert loaded.state_dict()["domains"]["active"] == runtime.state_dict()["domains"]["active"]
        loaded.close()


# ------------------------------------------------------------------------------ commands

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
# Every command the device knows (so the handler itself is reached), and one it does not.
COMMAND_NAMES = st.sampled_from([*sorted(COMMAND_ARGS), "nope"])
ARG_NAMES = st.sampled_from(sorted({a for spec in COMMAND_ARGS.values() for a in spec} | {"x"}))
_OF_TYPE = {
    int: st.integers(-(2**63), 2**63),
    float: st.floats(allow_nan=True, allow_infinity=True),
    str: st.text(max_size=16) | st.sampled_from(["", "domain_shift", "novel_class", "AAAA"]),
    list: st.lists(st.integers(-3, 2000) | st.text(max_size=3) | st.none(), max_size=6),
}


def _typed_args(name: str) -> st.SearchStrategy[dict]:
    """Arguments of the right types and arbitrary values: these pass the payload check and
    reach the command handler, which must refuse bad values itself."""
    return st.fixed_dictionaries(
        {arg: st.one_of(*(_OF_TYPE[k] for k in kinds)) for arg, kinds in COMMAND_ARGS[name].items()}
    )


WELL_TYPED = st.sampled_from(sorted(COMMAND_ARGS)).flatmap(
    lambda name: st.builds(
        lambda args, cid: json.dumps({"command": name, "args": args, "id": cid}),
        _typed_args(name),
        st.text(min_size=1, max_size=8),
    )
)

COMMAND = st.one_of(
    WELL_TYPED,
    WELL_TYPED,
    st.binary(max_size=64),
    JSONISH.map(json.dumps),
    st.fixed_dictionaries(
        {"command": COMMAND_NAMES},
        optional={
            "args": st.dictionaries(ARG_NAMES, JSONISH, max_size=4),
            "id": JSONISH,
            "schema": JSONISH,
        },
    ).map(json.dumps),
)


@HOSTILE
@given(raw=COMMAND)
def test_random_command_payloads_run_or_are_refused(
    runtime: Runtime, mini_stream: Stream, raw: str | bytes
) -> None:
    try:
        msg = CommandMessage.from_json(raw)
    except PayloadError as exc:
        assert str(exc)
    else:
        try:
            future = runtime.commands.submit(msg.command, command_id=msg.id, **msg.args)
        except InputError:
            pass
        else:
            runtime.run_commands()  # runs it on the owning thread; must not raise
            assert future.done()
            exc = future.exception()
            assert exc is None or isinstance(exc, EdgeRuntimeError), repr(exc)
    _still_serves(runtime, mini_stream)
