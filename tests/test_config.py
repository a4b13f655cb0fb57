"""Config schema and loader: defaults, validation messages, overrides, file errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from edge_runtime.config import (
    RuntimeConfig,
    load_config,
    parse_override_args,
    validate_config,
)
from edge_runtime.config.schema import NOT_IMPLEMENTED
from edge_runtime.errors import ConfigError


def _write(tmp_path: Path, data: object, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_match_the_documented_schema() -> None:
    cfg = load_config(None)
    assert cfg.device.name == "x86-dev"
    assert cfg.device.memory_budget_mb == 4096
    assert cfg.encoder.precision == "fp32" and cfg.encoder.layers == [3, 18]
    assert cfg.hdc.dim == 2048 and cfg.hdc.projection == "hadamard" and cfg.hdc.packed is True
    assert cfg.hdc.rerank == 16 and cfg.drift.confirm_frames == 20
    assert cfg.drift.method == "cusum" and cfg.drift.false_alarm_rate == 1e-4
    assert cfg.adapt.label_budget == 200 and cfg.adapt.max_adaptors == 8
    assert cfg.fleet.port == 1883 and cfg.fleet.qos == 1 and cfg.fleet.topic_prefix == "edge"
    assert cfg.telemetry.interval_s == 5.0
    # Fields whose readers are not written yet default to off.
    assert not cfg.fleet.enabled and not cfg.telemetry.enabled
    assert cfg.adapt.init == "prototype" and cfg.adapt.meta_init is None
    assert cfg.device.power_budget_w is None
    # The zero-shot search is on by default, inside a per-adaptor parameter limit.
    assert cfg.adapt.nas and cfg.adapt.max_adaptor_params == 300_000
    # "~" is expanded once, at validation.
    assert "~" not in str(cfg.fleet.outbox_dir) and cfg.fleet.outbox_dir.is_absolute()


def test_model_dump_and_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None).with_overrides({"hdc.dim": 512, "fleet.ca_file": "/etc/ca.crt"})
    assert RuntimeConfig(**cfg.model_dump()) == cfg
    path = _write(tmp_path, cfg.to_yaml())
    assert load_config(path) == cfg


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, {"hdc": {"dim": 4096}}))
    assert cfg.hdc.dim == 4096 and cfg.hdc.k == 10 and cfg.adapt.label_budget == 200


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == RuntimeConfig()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"adapt": {"labl_budget": 5}}, "adapt.labl_budget: unknown key"),
        ({"hdcc": {}}, "hdcc: unknown key"),
        ({"device": {"memory_budget_mb": -1}}, "device.memory_budget_mb"),
        ({"device": {"power_budget_w": -5.0}}, "device.power_budget_w"),
        ({"encoder": {"precision": "fp8"}}, "encoder.precision"),
        ({"encoder": {"layers": [3, 19]}}, "encoder.layers.1"),
        ({"encoder": {"input_size": 16}}, "encoder.input_size"),
        ({"hdc": {"dim": 0}}, "hdc.dim"),
        ({"hdc": {"tpr": 1.0}}, "hdc.tpr"),
        ({"drift": {"method": "page-hinkley"}}, "drift.method"),
        ({"fleet": {"topic_prefix": "/edge"}}, "fleet.topic_prefix"),
        ({"fleet": {"topic_prefix": "Edge"}}, "fleet.topic_prefix"),
        ({"fleet": {"device_id": "a/b"}}, "fleet.device_id"),
        ({"fleet": {"qos": 3}}, "fleet.qos"),
        ({"fleet": {"port": 70000}}, "fleet.port"),
        ({"fleet": {"tls": True, "cert_file": "/c.crt"}}, "fleet: cert_file and key_file"),
        ({"telemetry": "often"}, "telemetry"),
    ],
)
def test_invalid_values_name_the_field(tmp_path: Path, data: dict, expected: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message  # the file is named too
    assert "\n" not in message  # one line for the CLI


def test_message_shows_bad_value_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"encoder": {"precision": "fp8"}})
    assert "'fp8'" in str(info.value) and "fp16" in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate_config({"adapt": {"label_budget": -3}})
    assert "-3" in str(info.value) and "greater than 0" in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate_config({"adapt": {"labl_budget": 3}})
    assert "label_budget" in str(info.value)  # lists what is allowed


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"hdc": {"dim": -1}, "adapt": {"steps": 0}})
    assert "hdc.dim" in str(info.value) and "adapt.steps" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hdc: {dim: 5\n", "invalid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("just a string", "must be a mapping"),
        ("hdc: 5\n", "hdc"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"bin\.yaml"):
        load_config(binary)


def test_overrides_from_strings() -> None:
    base = RuntimeConfig()
    cfg = base.with_overrides(
        parse_override_args(
            [
                "adapt.label_budget=100",
                "drift.warmup=50",
                "encoder.layers=[13, 18]",
                "hdc.early_weight=0.25",
                "fleet.device_id=007",  # a string field keeps its text
                "encoder.threads=null",
                "device.nvpmodel_name=007",  # optional text too
            ]
        )
    )
    assert cfg.adapt.label_budget == 100
    assert cfg.drift.warmup == 50
    assert cfg.encoder.layers == [13, 18]
    assert cfg.hdc.early_weight == 0.25
    assert cfg.fleet.device_id == "007"
    assert cfg.encoder.threads is None
    assert cfg.device.nvpmodel_name == "007"
    assert cfg.with_overrides({"device.nvpmodel_name": "null"}).device.nvpmodel_name is None
    assert base.adapt.label_budget == 200  # the original is untouched


def test_overrides_with_typed_values() -> None:
    cfg = RuntimeConfig().with_overrides({"hdc.dim": 4096, "fleet.tls": True})
    assert cfg.hdc.dim == 4096 and cfg.fleet.tls is True


# A value each not-implemented field would take once its reader exists.
ENABLED = {
    "device.power_budget_w": 15.0,
    "hdc.packed": False,
}


def test_every_unimplemented_field_has_an_enabled_case() -> None:
    assert set(ENABLED) == set(NOT_IMPLEMENTED)


@pytest.mark.parametrize("field", sorted(ENABLED))
def test_unimplemented_fields_refuse_any_other_value(tmp_path: Path, field: str) -> None:
    """No config may claim what the code does not do: the field is named, with the reason."""
    section, key = field.split(".")
    assert getattr(getattr(RuntimeConfig(), section), key) == NOT_IMPLEMENTED[field][0]
    path = _write(tmp_path, {section: {key: ENABLED[field]}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{field}: not implemented yet" in message and str(path) in message
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: not implemented yet"):
        RuntimeConfig().with_overrides({field: str(ENABLED[field]).lower()})
    # The one implemented value is still accepted where it is written out explicitly.
    assert load_config(_write(tmp_path, {section: {key: NOT_IMPLEMENTED[field][0]}}))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"adapt.nope": 1}, "adapt.nope: unknown key 'nope'"),
        ({"nope.x": 1}, "nope.x: unknown key 'nope'"),
        ({"adapt.label_budget.x": 1}, "is a value, not a section"),
        ({"adapt.label_budget": "-5"}, "adapt.label_budget"),
        ({"encoder.precision": "fp64"}, "encoder.precision"),
    ],
)
def test_bad_overrides_name_the_key(override: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        RuntimeConfig().with_overrides(override)


def test_override_args_need_key_equals_value() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override_args(["adapt.label_budget"])
    assert parse_override_args(["a.b = c=d"]) == {"a.b": "c=d"}


def test_configs_stored_by_older_builds_can_be_reset() -> None:
    """A checkpoint's config from before these fields were refused still loads, reset to what
    the code does; the stored mapping itself is not changed."""
    from edge_runtime.config import reset_unimplemented

    stored = RuntimeConfig().model_dump(mode="json")
    stored["hdc"]["packed"] = False
    with pytest.raises(ConfigError, match=r"hdc\.packed"):
        validate_config(stored)
    assert validate_config(reset_unimplemented(stored)) == RuntimeConfig()
    assert stored["hdc"]["packed"] is False
