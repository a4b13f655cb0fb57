"""The runtime's state codec: everything needed to resume, as one nested dict for a checkpoint.

The dict holds the config, the encoder's feature spec, the plug points' names (and state, for
plug points that have any), what is known (adaptors, HDC memories, active domain), the drift
monitor with its recent-frame window and any alarm awaiting confirmation, the return detector,
a label collection in progress, the training jobs not yet installed, and the stream position.
:func:`~edge_runtime.state.checkpoint.save_checkpoint` writes it (safetensors + JSON manifest).

A state of another ``STATE_VERSION``, or one whose encoder or plug points differ from the
runtime it is loaded into, is refused whole with a :class:`CheckpointError` that says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.adapt.adaptor import AdaptorArch
from edge_runtime.adapt.domains import DomainSet
from edge_runtime.adapt.executor import AdaptationExecutor
from edge_runtime.adapt.jobs import TrainSet
from edge_runtime.config.schema import RuntimeConfig, validate_config
from edge_runtime.drift import DriftMonitor
from edge_runtime.drift.returns import ReturnDetector
from edge_runtime.drift.signature import DomainSignature
from edge_runtime.encoder import FeatureSpec
from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.labels import LabelProtocol
from edge_runtime.state.checkpoint import IncompatibleCheckpoint

CHECKPOINT_KIND = "edge_runtime.runtime"
# 3: the domain signature's window of recent OOD frames. Version 2 states (without it) still
# load, with an empty window: nothing else changed.
# 4: a training job keeps the architecture the search chose (its rows are in that
# architecture's input space), and label collections and replay buffers keep their frames.
# Older states load: their jobs' rows are pooled features, searched again.
STATE_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)


@dataclass
class StateParts:
    """The parts whose state makes up a runtime (the runtime passes its own)."""

    config: RuntimeConfig
    spec: FeatureSpec
    domains: DomainSet
    monitor: DriftMonitor
    returns: ReturnDetector
    labels: LabelProtocol
    executor: AdaptationExecutor
    counters: dict[str, int] = field(default_factory=dict)
    signature: DomainSignature | None = None


def _plug_points(executor: AdaptationExecutor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role, part in (("search", executor.search), ("init", executor.initializer)):
        state = part.state_dict() if hasattr(part, "state_dict") else None
        out[role] = {"name": getattr(part, "name", type(part).__name__), "state": state}
    return out


def _str_keys(node: Any) -> Any:
    """Integer dict keys as strings, as ``events.jsonable`` writes them. A label collection
    keeps its flag's evidence (e.g. a return claim's ``claims_by_domain``, keyed by domain id),
    which only ever goes out again in an event, where the keys are strings anyway."""
    if isinstance(node, dict):
        return {
            str(k) if isinstance(k, (int, np.integer)) else k: _str_keys(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_str_keys(v) for v in node]
    return node


def encode(parts: StateParts) -> dict[str, Any]:
    jobs = parts.executor.pending_training()
    return {
        "state_version": STATE_VERSION,
        "config": parts.config.model_dump(mode="json"),
        "encoder_spec": parts.spec.to_dict(),
        "plug_points": _plug_points(parts.executor),
        "domains": parts.domains.state_dict(),
        "monitor": parts.monitor.state_dict(),
        "returns": parts.returns.state_dict(),
        "labels": _str_keys(parts.labels.state_dict()),
        "training": [
            {
                "domain": did,
                "features": t.features,
                "labels": t.labels,
                "weight": t.weight if t.weight is not None else np.zeros(0, np.float32),
                "arch": None if t.arch is None else t.arch.to_dict(),
            }
            for did, t in jobs
        ],
        "counters": {k: int(v) for k, v in parts.counters.items()},
        "signature": None if parts.signature is None else parts.signature.state_dict(),
    }


def read_header(state: dict[str, Any], source: str) -> tuple[RuntimeConfig, FeatureSpec]:
    """The config and encoder spec a state was made with (to build a runtime to load it into)."""
    version = state.get("state_version")
    if version not in READABLE_VERSIONS:
        raise IncompatibleCheckpoint(
            f"checkpoint {source} has runtime state version {version!r}; this build reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        return validate_config(state["config"]), FeatureSpec.from_dict(state["encoder_spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {source}: bad config or encoder spec ({exc})") from exc


def decode(state: dict[str, Any], parts: StateParts, source: str) -> None:
    """Load ``state`` into ``parts`` (built from the state's own config). All or nothing: every
    part is checked before the runtime uses any of them, and on error the caller drops them."""
    saved = FeatureSpec.from_dict(state["encoder_spec"]).to_dict()
    if parts.spec.to_dict() != saved:
        raise IncompatibleCheckpoint(
            f"checkpoint {source} was made with encoder {saved}, but this runtime's encoder is "
            f"{parts.spec.to_dict()}"
        )
    ours = _plug_points(parts.executor)
    for role, rec in state["plug_points"].items():
        if role not in ours or ours[role]["name"] != rec["name"]:
            have = ours.get(role, {}).get("name")
            raise IncompatibleCheckpoint(
                f"checkpoint {source} was made with {role} {rec['name']!r}, this runtime uses "
                f"{have!r}"
            )
        part = parts.executor.search if role == "search" else parts.executor.initializer
        if rec["state"] is not None and hasattr(part, "load_state_dict"):
            part.load_state_dict(rec["state"])
    try:
        parts.domains.load_state_dict(state["domains"])
        parts.monitor.load_state_dict(state["monitor"])
        parts.returns.load_state_dict(state["returns"])
        parts.labels.load_state_dict(state["labels"])
        jobs = []
        for rec in state["training"]:
            w = np.asarray(rec["weight"], dtype=np.float32)
            arch = rec.get("arch")
            jobs.append(
                (
                    int(rec["domain"]),
                    TrainSet(
                        np.asarray(rec["features"], dtype=np.float32),
                        np.asarray(rec["labels"], dtype=np.int64),
                        w if len(w) else None,
                        None if arch is None else AdaptorArch.from_dict(arch),
                    ),
                )
            )
        parts.counters.update({k: int(v) for k, v in state["counters"].items()})
        if parts.signature is not None and state.get("signature") is not None:
            parts.signature.load_state_dict(state["signature"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, InputError) as exc:
        raise CheckpointError(f"checkpoint {source} does not match this build: {exc!r}") from exc
    parts.executor.requeue(jobs)
