"""What the evaluation scripts share: the runtime's config and factories, and row labels.

A benchmark row that claims to measure the runtime builds its parts the way the runtime does,
from a :class:`~edge_runtime.config.RuntimeConfig` (``--config FILE`` or ``--profile NAME``; the
built-in defaults otherwise) through the runtime's own factories. Every other row is that
config with dotted overrides, and its label is written from those overrides, so a label cannot
drift from what the row ran. The factories are imported here once: when the runtime moves
them, only this file changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_runtime.config import RuntimeConfig, load_config, load_profile
from edge_runtime.encoder import Encoder, FeatureSpec
from edge_runtime.hdc.bank import DomainMemoryBank
from edge_runtime.runtime import build_encoder, make_bank, make_monitor

__all__ = [
    "RUNTIME_LABEL",
    "add_config_args",
    "backend_name",
    "bank_settings",
    "build_encoder",
    "config_source",
    "differences",
    "encoder_line",
    "machine_name",
    "make_bank",
    "make_monitor",
    "override_label",
    "runtime_config",
    "select_layers",
]

RUNTIME_LABEL = "runtime config"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config`` / ``--profile``: the runtime config the benchmark measures."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--config", default=None, help="runtime config YAML (default: built-in)")
    group.add_argument("--profile", default=None, help="device profile name, e.g. x86-dev")


def runtime_config(args: argparse.Namespace) -> RuntimeConfig:
    """The config named on the command line, validated as the runtime validates it."""
    if getattr(args, "profile", None):
        return load_profile(args.profile)
    return load_config(getattr(args, "config", None))


def config_source(args: argparse.Namespace) -> str:
    """Where the measured config came from, for the header every benchmark prints: its rows
    say ``runtime config`` for whichever config that is."""
    if getattr(args, "profile", None):
        return f"profile {args.profile}"
    if getattr(args, "config", None):
        return f"config file {args.config}"
    return "built-in defaults"


def override_label(overrides: Mapping[str, Any]) -> str:
    """``runtime config`` or ``runtime config, hdc.dim=10000, ...``: the label of a row."""
    if not overrides:
        return RUNTIME_LABEL
    parts = [f"{k}={_text(v)}" for k, v in overrides.items()]
    return f"{RUNTIME_LABEL}, " + ", ".join(parts)


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value)


def select_layers(
    features: np.ndarray, spec: FeatureSpec, layers: Sequence[int]
) -> tuple[np.ndarray, FeatureSpec]:
    """The columns of ``layers`` (each one of ``spec.layers``) and the spec that describes them.

    A row that drops encoder layers reads them from the runtime encoder's output rather than
    from a second encoder, so it differs from the runtime row in the layers only.
    """
    missing = [layer for layer in layers if layer not in spec.layers]
    if missing:
        raise SystemExit(f"layers {missing} are not in the encoder's output {list(spec.layers)}")
    slices = spec.slices()
    pick = [spec.layers.index(layer) for layer in layers]
    cols = np.concatenate([np.arange(slices[i].start, slices[i].stop) for i in pick])
    sub = dataclasses.replace(
        spec, layers=tuple(spec.layers[i] for i in pick), dims=tuple(spec.dims[i] for i in pick)
    )
    return np.ascontiguousarray(features[:, cols]), sub


def bank_settings(bank: DomainMemoryBank, spec: FeatureSpec, backend: str) -> dict[str, Any]:
    """What decides a bank's scores, read from the built object (not from its config).

    ``None`` marks a setting that does not apply (one layer has no earlier layers to weigh);
    :func:`differences` skips those.
    """
    enc = bank.encoder.config()
    return {
        "backend": backend,
        "input_size": spec.input_size,
        "layers": tuple(spec.layers),
        "memory": "exemplar",
        "dim": enc["dim"],
        "projection": enc["projection"],
        "k": bank.k,
        "reduce": bank.reduce,
        "rerank": bank.rerank,
        "max_exemplars": bank.max_exemplars,
        "center": enc["center"],
        "layer_norm": enc["layer_norm"],
        "early_weight": enc["early_weight"] if len(spec.layers) > 1 else None,
    }


def differences(settings: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    """``layers 18, dim 10000, ...``: where ``settings`` differ from ``reference`` ('' if none)."""
    out = []
    for key, ref in reference.items():
        value = settings.get(key)
        if value is None or ref is None:
            continue
        if value != ref:
            out.append(f"{key} {_text(value)}")
    return ", ".join(out)


def backend_name(encoder: Encoder) -> str:
    """The backend's name as the feature cache keys it (``torch``, ``onnxruntime-cpu``, ...)."""
    return str(getattr(encoder.backend, "name", type(encoder.backend).__name__))


def encoder_line(encoder: Encoder) -> str:
    """One line naming the encoder a row ran on (backend, input size, layers)."""
    spec = encoder.spec
    return (
        f"{backend_name(encoder)}, input {spec.input_size}, "
        f"layers {'+'.join(str(x) for x in spec.layers)}"
    )


def machine_name() -> str:
    """The CPU model as `lscpu` names it (the platform's processor string without lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
