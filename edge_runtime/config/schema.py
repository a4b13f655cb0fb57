"""The runtime configuration: one pydantic model per section, all strict about keys.

Every model forbids unknown keys, so a typo in a device profile (``lable_budget``)
fails loudly instead of silently running with the default. Validation errors are
turned into :class:`~edge_runtime.errors.ConfigError` by :func:`validate_config`,
whose message names the dotted field path, the bad value and what is allowed.

Sections belong to the part that reads them (``hdc`` to the HDC memory, ``fleet`` to
the MQTT client...); their owners may add fields here.

A field whose reader is not written yet accepts only its "off" value (see
:data:`NOT_IMPLEMENTED`): a profile that turns it on would claim what the code does not do,
so that is a ConfigError naming the field, not a setting silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edge_runtime.config.defaults import DEFAULT_INPUT_SIZE, DEFAULT_LAYERS
from edge_runtime.errors import ConfigError

# MobileNetV2 ``features`` has 19 blocks (0..18); pooled features can come from any of them.
MAX_ENCODER_LAYER = 18


def _expand_path(value: Path | None) -> Path | None:
    # "~" must be expanded once here: a consumer that forgets would create a literal "~" folder.
    return None if value is None else value.expanduser()


ExpandedPath = Annotated[Path, AfterValidator(_expand_path)]
OptionalPath = Annotated[Path | None, AfterValidator(_expand_path)]

# Dotted field -> (the only value accepted today, what is missing before another one means
# anything). Each entry leaves with the change that makes the code read the field.
NOT_IMPLEMENTED: dict[str, tuple[Any, str]] = {
    "device.power_budget_w": (None, "no power telemetry reads a budget"),
    "hdc.packed": (True, "the HDC memory always keeps bit-packed exemplars"),
}


def _only_implemented(field: str) -> AfterValidator:
    """Validator that refuses every value of ``field`` but the one the code implements."""
    allowed, missing = NOT_IMPLEMENTED[field]

    def check(value: Any) -> Any:
        if value != allowed:
            shown = "null" if allowed is None else str(allowed).lower()
            raise ValueError(f"not implemented yet ({missing}); must be {shown}")
        return value

    return AfterValidator(check)


def reset_unimplemented(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config mapping ``data`` with every :data:`NOT_IMPLEMENTED` field set to
    the value the code implements.

    Only for configs that an older build stored itself (a checkpoint's), written while some of
    these fields defaulted to on although nothing read them; a user's file must keep failing.
    """
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    for dotted, (allowed, _) in NOT_IMPLEMENTED.items():
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section][key] = allowed
    return out


class _Section(BaseModel):
    """Base for every section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class DeviceConfig(_Section):
    """Which device this is and what it may spend."""

    name: str = Field("x86-dev", min_length=1)
    description: str = ""
    # nvpmodel mode id (``sudo nvpmodel -m N``); None off-Jetson.
    nvpmodel_mode: int | None = Field(None, ge=0)
    # The mode's NAME in /etc/nvpmodel.conf (e.g. "15W", "MAXN"), for humans and for detect.
    nvpmodel_name: str | None = None
    memory_budget_mb: int = Field(4096, gt=0)
    power_budget_w: Annotated[float | None, _only_implemented("device.power_budget_w")] = Field(
        None, gt=0
    )


class EncoderConfig(_Section):
    """The frozen encoder and the backend that runs it."""

    backend: Literal["auto", "torch", "onnxruntime", "tensorrt"] = "auto"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    input_size: int = Field(DEFAULT_INPUT_SIZE, ge=32, le=512)
    layers: list[Annotated[int, Field(ge=0, le=MAX_ENCODER_LAYER)]] = Field(
        default_factory=lambda: list(DEFAULT_LAYERS), min_length=1
    )
    batch_size: int = Field(32, gt=0)
    threads: int | None = Field(None, gt=0)
    weights: OptionalPath = None
    engine_cache_dir: ExpandedPath = Path("~/.cache/edge_runtime/engines")

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat a layer")
        return value


class HDCConfig(_Section):
    """Hypervector size, packing and the OOD-threshold calibration target."""

    # 2,048, not the HDFF 10,000: with ``rerank`` the final k-NN scores are exact angles, so the
    # sign codes only have to find each domain's candidates. `python
    # benchmarks/eval_hdc_fastpath.py` prints near/far AUROC 90.69/99.07 at D=2,048 with rerank
    # 16 and 90.71/99.09 for the float (angle) path; with `--config` holding `hdc: {dim: 4096,
    # rerank: 0}` (Hamming alone) it prints 90.42/99.09, for twice the scan (512 B per exemplar).
    # 2,048 is also the padded width of the default 1,304 features, so the float projection is
    # an isometry and loses nothing.
    dim: int = Field(2048, gt=0)
    # "hadamard": structured H·D·H·D sign projection (no stored matrix, O(D log F) per frame,
    # same quality as the dense seeded Gaussian matrix of "gaussian").
    projection: Literal["hadamard", "gaussian"] = "hadamard"
    packed: Annotated[bool, _only_implemented("hdc.packed")] = True
    k: int = Field(10, gt=0)
    # Packed exemplars kept per domain (512 B each at dim 4,096); 6,000 = the whole base set.
    max_exemplars: int = Field(6000, gt=0)
    # Weight of every encoder layer before the last after per-layer L2 norm (HDFF fusion);
    # 0.5 measured best on near-OOD in benchmarks/eval_ood.py.
    early_weight: float = Field(0.5, ge=0)
    # Fraction of in-distribution calibration frames that must score above the threshold.
    tpr: float = Field(0.95, gt=0, lt=1)
    # Candidates per domain that the packed scan keeps for exact re-scoring (0: score by the
    # Hamming estimate alone). The sign codes' noise flips routes between close domains; the
    # exact angles of 16 candidates route as the float path does (benchmarks/
    # eval_hdc_fastpath.py) for 2.6 KB more memory per exemplar and a few dot products.
    # Values below k act as k.
    rerank: int = Field(16, ge=0)
    seed: int = 0


class DriftConfig(_Section):
    """Sequential change detection on the OOD score stream."""

    method: Literal["cusum", "page_hinkley"] = "cusum"
    warmup: int = Field(200, ge=0)
    # Per in-distribution frame: sets the CUSUM threshold (average run length ~ 1/rate).
    false_alarm_rate: float = Field(1e-4, gt=0, lt=1)
    # The smallest out-of-distribution rate a shift must bring to be worth detecting.
    min_ood_rate: float = Field(0.3, gt=0, lt=1)
    # Frames after an alarm whose OOD rate must reach min_ood_rate before the flag is raised
    # (0: flag at the alarm). A real shift keeps its OOD rate; a chance burst of in-distribution
    # frames near the threshold does not, and a flag costs an operator label_budget labels.
    confirm_frames: int = Field(20, ge=0)


class AdaptConfig(_Section):
    """Adaptor growth: labels, capacity, search and meta-learned initialisation."""

    label_budget: int = Field(200, gt=0)
    # Labels per drift when a meta-learned initialisation for this encoder is in use
    # (``init: meta`` and a file found): a meta-init needs fewer shots. null: label_budget.
    meta_label_budget: int | None = Field(None, gt=0)
    max_adaptors: int = Field(8, gt=0)
    # At max_adaptors: refuse growth, or evict a drift-grown domain (the oldest, or the one
    # that served the fewest frames); the base is never evicted.
    eviction: Literal["refuse", "oldest", "least_used"] = "refuse"
    # Zero-shot NAS (edge_runtime/adapt/nas.py) picks each new adaptor's architecture -- heads
    # on pooled features or conv adaptors on an intermediate encoder tap -- from training-free
    # proxies on the labelled shots; false: always a linear head on pooled features.
    nas: bool = True
    # The proxy (or rank vote) the search ranks candidates by; null: the search's default.
    nas_proxy: str | None = None
    # Limits on one new adaptor (null: none), and on all adaptors' parameters together.
    max_adaptor_params: int | None = Field(300_000, gt=0)
    max_adaptor_macs: int | None = Field(None, gt=0)
    max_adaptor_latency_ms: float | None = Field(None, gt=0)
    max_total_params: int | None = Field(2_000_000, gt=0)
    # How a new adaptor's weights start: class prototypes, torch's default, or a meta-learned
    # initialisation (`edge-runtime meta-train`) for its family and this encoder -- the file
    # or folder ``meta_init``, else the cache by encoder hash; a family without one starts
    # from prototypes, and the log says so.
    init: Literal["prototype", "meta", "standard"] = "prototype"
    meta_init: OptionalPath = None
    steps: int = Field(300, gt=0)
    lr: float = Field(1e-2, gt=0)
    # Step size over a training job: annealed from ``lr`` to 0 (cosine), or held (constant).
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    # Refit a new domain's head on the frames it then serves, pseudo-labelled by its own head
    # (class-balanced, a growing share over the rounds). ``self_training_pool`` frames are
    # collected first; ``fraction``: the share of them kept in the last round. Off by default:
    # it pays at small label budgets (50 labels: fashion-drift mean final 80.3 -> 81.8,
    # lowlevel-drift 77.5 -> 79.3) but at the default 200 it cost fashion-drift 0.3 points and
    # forgetting 1.3 -> 2.7 (lowlevel-drift +0.7; benchmarks/RESULTS.md).
    self_training: bool = False
    self_training_pool: int = Field(450, gt=0)
    self_training_rounds: int = Field(3, gt=0)
    self_training_fraction: float = Field(0.7, gt=0, le=1)
    # New classes: a domain of their own ("separate"), a new adaptor version of the known
    # domain their shots are nearest to ("extend"), or whichever the shots' labels support
    # ("auto"); see edge_runtime/adapt/planner.py.
    novel_policy: Literal["auto", "separate", "extend"] = "auto"
    # A background training job past this many seconds is cancelled and reported as an error
    # event; the domain keeps its initialised head. None: no limit.
    job_timeout_s: float | None = Field(120.0, gt=0)


# One MQTT topic level: no wildcards, no separators, nothing empty.
_TOPIC_LEVEL = re.compile(r"^[^/+#\s]+$")


class FleetConfig(_Section):
    """MQTT link to the fleet controller (:mod:`edge_runtime.fleet.client`)."""

    enabled: bool = False
    device_id: str = "dev-0"
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = "edge"
    tls: bool = False
    ca_file: OptionalPath = None
    cert_file: OptionalPath = None
    key_file: OptionalPath = None
    # YAML/JSON file with ``username`` and ``password``; kept out of the profile itself. Without
    # it, EDGE_RUNTIME_MQTT_USERNAME / EDGE_RUNTIME_MQTT_PASSWORD are read; never the CLI.
    credentials_file: OptionalPath = None
    qos: Literal[0, 1, 2] = 1
    heartbeat_s: float = Field(30.0, gt=0)
    # Durable outbox (SQLite, WAL): ``<outbox_dir>/<device_id>.sqlite``.
    outbox_dir: ExpandedPath = Path("~/.cache/edge_runtime/outbox")
    # Outbox bound: when full, the oldest alerts are dropped and an ``outbox_dropped`` alert says
    # how many (a device offline for days keeps its newest history).
    outbox_max_messages: int = Field(100_000, gt=0)
    # Reconnect backoff: doubles from min to max, then retries at max forever.
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(60.0, gt=0)
    # A command larger than this is refused unread (an adaptor bundle travels in one).
    max_command_bytes: int = Field(4 * 1024 * 1024, gt=0)
    # Label requests: thumbnail side in pixels (PNG) and frames per request message.
    thumbnail_px: int = Field(32, ge=8, le=256)
    label_request_frames: int = Field(32, gt=0)

    @field_validator("device_id")
    @classmethod
    def _device_id_is_one_level(cls, value: str) -> str:
        if not _TOPIC_LEVEL.match(value):
            raise ValueError("must be one MQTT topic level: non-empty, no '/', '+', '#' or spaces")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        levels = value.split("/")
        if value != value.lower():
            raise ValueError("must be lowercase")
        if value.startswith("/"):
            raise ValueError("must not start with '/'")
        if not all(_TOPIC_LEVEL.match(level) for level in levels):
            raise ValueError(
                "must be '/'-separated non-empty levels without '+', '#', spaces or a trailing '/'"
            )
        return value

    @model_validator(mode="after")
    def _client_cert_pair(self) -> FleetConfig:
        # A client certificate without its key (or the reverse) cannot open a TLS session.
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class TelemetryConfig(_Section):
    """Device readings (psutil, tegrastats, sysfs) sent with heartbeats."""

    # ``edge-runtime serve`` starts a sampler whose readings feed /metrics and metrics.json.
    enabled: bool = False
    interval_s: float = Field(5.0, gt=0)
    # Samples kept in memory (ring buffer) for latest()/history.
    history: int = Field(720, gt=0)
    # Run tegrastats as one long-lived subprocess when it is on PATH (Jetson only).
    tegrastats: bool = True


class RuntimeConfig(_Section):
    """The whole runtime configuration; a device profile is one of these as YAML."""

    device: DeviceConfig = Field(default_factory=DeviceConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    hdc: HDCConfig = Field(default_factory=HDCConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    def with_overrides(self, dotted: dict[str, Any]) -> RuntimeConfig:
        """A copy with ``{"adapt.label_budget": 100, ...}`` applied and re-validated.

        String values are read as YAML scalars (``"100"`` -> 100, ``"true"`` -> True,
        ``"[17, 18]"`` -> a list, ``"null"`` -> None) unless the field is a plain string,
        so values straight from a command line work. Raises ConfigError naming the key.
        """
        data = self.model_dump()
        for key, value in dotted.items():
            _set_dotted(data, key, value)
        return validate_config(data)

    def to_yaml(self) -> str:
        """The resolved config as YAML (paths as strings); ``load_config`` reads it back."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    model: type[BaseModel] = RuntimeConfig
    node = data
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(
                f"{key}: unknown key {part!r} in {where} (allowed: {', '.join(fields)})"
            )
        annotation = fields[part].annotation
        if depth == len(parts) - 1:
            if isinstance(value, str):
                value = _parse_override_value(key, value, annotation)
            node[part] = value
            return
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"{key}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        model = annotation
        node = node.setdefault(part, {})


def _parse_override_value(key: str, text: str, annotation: Any) -> Any:
    """A command-line string -> the value for a field of type ``annotation``."""
    options = get_args(annotation) or (annotation,)
    if str in options:
        # Text fields keep the text ("007" stays "007"); "null" clears an optional one.
        return None if type(None) in options and text in ("null", "~") else text
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read value {text!r}: {exc}") from None


def parse_override_args(items: list[str]) -> dict[str, str]:
    """``["adapt.label_budget=100", ...]`` (CLI ``--set``) -> ``{"adapt.label_budget": "100"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. adapt.label_budget=100")
        out[key.strip()] = value.strip()
    return out


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error -> ``path: problem (got value)``."""
    loc = [str(p) for p in error["loc"]]
    path = ".".join(loc) or "config"
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = ", ".join(model.model_fields) if model is not None else "see the schema"
        return f"{path}: unknown key (allowed here: {allowed})"
    if kind == "missing":
        return f"{path}: required"
    msg = str(error["msg"])
    msg = msg.removeprefix("Value error, ").replace("Input should be", "must be")
    if isinstance(value, dict):  # a whole-section check: the section itself is the value
        return f"{path}: {msg}"
    return f"{path}: {msg} (got {value!r})"


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    """The model class that a location names (``["adapt"]`` -> AdaptConfig)."""
    model: type[BaseModel] = RuntimeConfig
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def validate_config(data: Any, source: str | None = None) -> RuntimeConfig:
    """Build a RuntimeConfig from plain data, raising ConfigError that names every bad field."""
    prefix = f"{source}: " if source else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix}config must be a mapping of sections, got {type(data).__name__}"
        )
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors(include_url=False))
        raise ConfigError(f"{prefix}{problems}") from None
