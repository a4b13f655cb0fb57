"""Adaptors: small heads on frozen encoder features, with a global label map.

An :class:`Adaptor` owns the labels it predicts (``label_map``: local output index -> global label
id), an optional feature normaliser fitted on its training data, and a body: none (linear), an
MLP on pooled features, or 1-2 convs + BatchNorm + pooling on an encoder tap's spatial map (input
always 2-D: a tap map arrives flattened and the body reshapes it). Its
``arch`` dict (see :class:`AdaptorArch`) plus ``label_map`` plus ``state_dict`` rebuild it exactly,
which is what a checkpoint stores.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_runtime.errors import CheckpointError, InputError

KINDS = ("linear", "mlp", "conv")
ACTIVATIONS = ("relu", "gelu", "tanh")
CONDITIONS = ("none", "median3", "blur")
#: Step-size schedules of :func:`train_adaptor`.
SCHEDULES = ("cosine", "constant")
#: A conv adaptor's first conv strides by 2 on maps this wide or wider (block 3 at 64 px is
#: 16x16): full-resolution 3x3 convs there cost ~4x the MACs for no accuracy we could measure.
STRIDE2_FROM = 16


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[name]()


def _conv_out(size: int, stride: int) -> int:
    return (size + 2 - 3) // stride + 1


@dataclass(frozen=True)
class AdaptorArch:
    """What to build.

    * ``linear`` / ``mlp`` (``hidden`` width, ``depth`` hidden layers, ``activation``, dropout):
      heads on pooled encoder features (``tap=None``).
    * ``conv``: ``convs`` (1-2) 3x3 convs (plain, or depthwise-separable when ``separable``) of
      ``width`` channels, each with BatchNorm and ``activation``, then global average pooling and
      the linear head, on the spatial map of encoder block ``tap``; its input is that map
      flattened (``in_dim = C*h*w``, ``in_shape = (C, h, w)``).
    * ``condition``: the frames routed to this adaptor go through the encoder a second time after
      that input filter (``none`` | ``median3`` | ``blur``).
    """

    kind: str = "linear"
    in_dim: int = 1280
    hidden: int = 0
    depth: int = 0
    dropout: float = 0.0
    normalize: bool = True
    activation: str = "relu"
    tap: int | None = None
    in_shape: tuple[int, int, int] | None = None
    width: int = 0
    convs: int = 0
    separable: bool = False
    condition: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"adaptor kind must be one of {KINDS}, got {self.kind!r}")
        if self.in_dim <= 0:
            raise InputError(f"adaptor in_dim must be > 0, got {self.in_dim}")
        if self.kind == "mlp" and (self.hidden <= 0 or self.depth <= 0):
            raise InputError(f"an mlp adaptor needs hidden > 0 and depth > 0, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"adaptor dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise InputError(
                f"adaptor activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if self.condition not in CONDITIONS:
            raise InputError(
                f"adaptor condition must be one of {CONDITIONS}, got {self.condition!r}"
            )
        if self.kind == "conv":
            if self.tap is None or self.in_shape is None:
                raise InputError(
                    f"a conv adaptor needs an encoder tap and its in_shape, got {self}"
                )
            if len(self.in_shape) != 3 or int(np.prod(self.in_shape)) != self.in_dim:
                raise InputError(
                    f"conv adaptor in_shape {self.in_shape} must be (C, h, w) with "
                    f"C*h*w == in_dim {self.in_dim}"
                )
            if self.width <= 0 or self.convs not in (1, 2):
                raise InputError(f"a conv adaptor needs width > 0 and 1-2 convs, got {self}")
        elif self.tap is not None:
            raise InputError(f"a {self.kind} adaptor reads pooled features (tap=None), got {self}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["in_shape"] = None if self.in_shape is None else [int(v) for v in self.in_shape]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdaptorArch:
        d = dict(d)
        if d.get("in_shape") is not None:
            d["in_shape"] = tuple(int(v) for v in d["in_shape"])
        try:
            return cls(**d)
        except TypeError as exc:
            raise CheckpointError(f"adaptor arch {d!r} is not valid: {exc}") from exc

    def with_in_dim(self, in_dim: int) -> AdaptorArch:
        if self.kind == "conv" and int(in_dim) != self.in_dim:
            raise InputError(
                f"a conv adaptor's input is fixed by its tap ({self.in_shape}); "
                f"cannot change in_dim to {in_dim}"
            )
        return AdaptorArch.from_dict({**self.to_dict(), "in_dim": int(in_dim)})

    # -- cost ----------------------------------------------------------------------------------
    def conv_layers(self) -> list[tuple[int, int, int, int, int]]:
        """Per conv: (in channels, out channels, stride, out h, out w)."""
        if self.kind != "conv":
            return []
        assert self.in_shape is not None
        c, h, w = self.in_shape
        out = []
        for i in range(self.convs):
            stride = 2 if i == 0 and min(h, w) >= STRIDE2_FROM else 1
            h, w = _conv_out(h, stride), _conv_out(w, stride)
            out.append((c, self.width, stride, h, w))
            c = self.width
        return out

    def head_in(self) -> int:
        """Width of the head's input (the embedding)."""
        if self.kind == "conv":
            return self.width
        return self.hidden if self.kind == "mlp" else self.in_dim

    def n_params(self, n_classes: int) -> int:
        """Trainable parameters for ``n_classes`` outputs (BatchNorm's affine pair included)."""
        head = (self.head_in() + 1) * n_classes
        if self.kind == "linear":
            return head
        if self.kind == "mlp":
            widths = [self.in_dim] + [self.hidden] * self.depth
            return sum((a + 1) * b for a, b in itertools.pairwise(widths)) + head
        body = 0
        for cin, cout, _s, _h, _w in self.conv_layers():
            body += (9 * cin + cin * cout if self.separable else 9 * cin * cout) + 2 * cout
        return body + head

    def macs(self, n_classes: int) -> int:
        """Multiply-accumulates per frame (BatchNorm folds into the conv at inference)."""
        head = self.head_in() * n_classes
        if self.kind == "linear":
            return head
        if self.kind == "mlp":
            widths = [self.in_dim] + [self.hidden] * self.depth
            return sum(a * b for a, b in itertools.pairwise(widths)) + head
        body = 0
        for cin, cout, _s, h, w in self.conv_layers():
            per_pixel = 9 * cin + cin * cout if self.separable else 9 * cin * cout
            body += per_pixel * h * w
        return body + head

    def flops(self, n_classes: int) -> int:
        """Floating-point operations per frame (2 x MACs)."""
        return 2 * self.macs(n_classes)

    def label(self) -> str:
        """Short human-readable name, e.g. ``conv@10 sep 2x64 relu`` or ``mlp 2x256 gelu``."""
        if self.kind == "linear":
            name = "linear"
        elif self.kind == "mlp":
            name = f"mlp {self.depth}x{self.hidden} {self.activation}"
        else:
            sep = " sep" if self.separable else ""
            name = f"conv@{self.tap}{sep} {self.convs}x{self.width} {self.activation}"
        return name if self.condition == "none" else f"{name} +{self.condition}"


class _Unflatten(nn.Module):
    """(N, C*h*w) rows back to (N, C, h, w) maps (no parameters, so no state-dict keys)."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = tuple(int(v) for v in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _conv_body(a: AdaptorArch) -> list[nn.Module]:
    assert a.in_shape is not None
    layers: list[nn.Module] = [_Unflatten(a.in_shape)]
    for cin, cout, stride, _h, _w in a.conv_layers():
        if a.separable:
            layers += [
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.Conv2d(cin, cout, 1, bias=False),
            ]
        else:
            layers.append(nn.Conv2d(cin, cout, 3, stride, 1, bias=False))
        layers += [nn.BatchNorm2d(cout), _act(a.activation)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    return layers


class Adaptor(nn.Module):
    """A head on frozen features (pooled, or a flattened tap map) that predicts global labels."""

    def __init__(self, arch: AdaptorArch | dict[str, Any], label_map: Sequence[int]) -> None:
        super().__init__()
        self.arch = arch if isinstance(arch, AdaptorArch) else AdaptorArch.from_dict(arch)
        labels = [int(v) for v in label_map]
        if not labels:
            raise InputError("an adaptor needs at least one label")
        if len(set(labels)) != len(labels):
            raise InputError(f"label_map has duplicates: {labels}")
        self.label_map: list[int] = labels
        self._index = {g: i for i, g in enumerate(labels)}
        a = self.arch
        # Normaliser as buffers so it travels in state_dict; identity until fitted.
        self.register_buffer("feat_mean", torch.zeros(a.in_dim))
        self.register_buffer("feat_std", torch.ones(a.in_dim))
        layers: list[nn.Module] = []
        if a.kind == "conv":
            layers = _conv_body(a)
        else:
            # Linear, act[, Dropout] per layer: the key layout older checkpoints were saved in.
            width = a.in_dim
            for _ in range(a.depth if a.kind == "mlp" else 0):
                layers += [nn.Linear(width, a.hidden), _act(a.activation)]
                if a.dropout > 0:
                    layers.append(nn.Dropout(a.dropout))
                width = a.hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(a.head_in(), len(labels))

    # -- description ---------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return len(self.label_map)

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.BatchNorm2d) for m in self.body)

    def describe(self) -> dict[str, Any]:
        """JSON-able: what a checkpoint needs besides the tensors."""
        return {"arch": self.arch.to_dict(), "label_map": list(self.label_map)}

    @classmethod
    def from_state(cls, description: dict[str, Any], state: dict[str, torch.Tensor]) -> Adaptor:
        """Rebuild from :meth:`describe` and :meth:`state_dict` output."""
        model = cls(description["arch"], description["label_map"])
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"adaptor tensors do not match its arch: {exc}") from exc
        return model.eval()

    # -- labels --------------------------------------------------------------------------------
    def to_local(self, labels: np.ndarray) -> np.ndarray:
        """Global label ids -> output indices; an unknown label raises InputError."""
        try:
            return np.fromiter(
                (self._index[int(v)] for v in labels), dtype=np.int64, count=len(labels)
            )
        except KeyError as exc:
            raise InputError(
                f"label {exc.args[0]} is not in this adaptor's label map {self.label_map}"
            ) from exc

    # -- inference -----------------------------------------------------------------------------
    def fit_normalizer(self, features: torch.Tensor) -> None:
        """Input normaliser from ``features``; BatchNorm statistics are set from them too."""
        if self.arch.normalize:
            with torch.no_grad():
                self.feat_mean.copy_(features.mean(0))
                # The floor keeps near-constant (dead ReLU) channels from being blown up.
                self.feat_std.copy_(
                    features.std(0, unbiased=False).clamp_min(1e-3 * features.std().item() + 1e-6)
                )
        self.calibrate_batchnorm(features)

    @torch.no_grad()
    def calibrate_batchnorm(self, features: torch.Tensor) -> None:
        """BatchNorm running statistics = the exact batch statistics of ``features``.

        Initialisers (PrototypeInit) read :meth:`embed` in whatever mode the module is in, and a
        head installed with zero training steps serves in eval mode: without this the running
        statistics would still be BatchNorm's (0, 1) defaults and eval embeddings would differ
        from the ones the head was fitted on.
        """
        bns = [m for m in self.body if isinstance(m, nn.BatchNorm2d)]
        if not bns or len(features) < 2:
            return
        was = self.training
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch = its own statistics
        self.train()
        self.embed(features)
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        self.train(was)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised features through the body (the head's input)."""
        return self.body((features - self.feat_mean) / self.feat_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(features))

    def _as_tensor(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(features, dtype=torch.float32)
        if x.ndim != 2 or x.shape[1] != self.arch.in_dim:
            raise InputError(
                f"features must have shape (N, {self.arch.in_dim}), got {tuple(x.shape)}"
            )
        return x

    @torch.inference_mode()
    def logits(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, n_classes) float32 logits, columns in ``label_map`` order."""
        was = self.training
        self.eval()
        out = self(self._as_tensor(features)).numpy()
        self.train(was)
        return out

    def predict(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,) int64 global label ids."""
        if len(features) == 0:
            return np.zeros(0, dtype=np.int64)
        idx = self.logits(features).argmax(1)
        return np.asarray(self.label_map, dtype=np.int64)[idx]


def build_adaptor(
    arch: AdaptorArch | dict[str, Any], label_map: Sequence[int], seed: int = 0
) -> Adaptor:
    """A freshly initialised adaptor (deterministic given ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Adaptor(arch, label_map)


@dataclass
class TrainReport:
    steps: int
    final_loss: float
    train_accuracy: float
    seconds: float
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_adaptor(
    adaptor: Adaptor,
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    *,
    fit_normalizer: bool = True,
    cancel: threading.Event | None = None,
    threads: int | None = None,
    sample_weight: np.ndarray | None = None,
    schedule: str = "cosine",
) -> TrainReport:
    """Full-batch Adam on (features, global labels); deterministic for a given ``seed``.

    ``schedule``: ``cosine`` anneals the step size from ``lr`` to 0 over ``steps``;
    ``constant`` keeps it. Cosine is the default because at a constant 1e-2 the wider conv
    adaptors (2 x 64 channels + BatchNorm on a tap) blew up late in 300 steps on some draws of
    200 shots (training accuracy fell to 0.80-0.88, held-out accuracy 62-71% where the same
    arch reached 81-83% on another seed), which made trained accuracy a lottery; annealed, the
    same runs land within a point of each other (benchmarks/RESULTS.md, bench_nas).

    Few-shot sets (hundreds of frames) fit in one batch, so full-batch steps are both the fastest
    and reproducible. ``threads=None`` leaves this thread's torch thread count as it is: on the
    serving thread that is the profile's ``encoder.threads`` (a base fit pinned to one core took
    24 s of the demo's 65 s), and the :class:`AdaptationWorker` sets its own thread to one so a
    background job never competes with the encoder for cores (OpenMP counts are per thread). A
    number sets the count for this call only. ``cancel`` stops between steps.
    """
    if steps <= 0:
        raise InputError(f"steps must be > 0, got {steps}")
    if schedule not in SCHEDULES:
        raise InputError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    x = adaptor._as_tensor(features).detach()
    y_np = np.asarray(labels)
    if y_np.ndim != 1 or len(y_np) != len(x) or len(x) == 0:
        raise InputError(f"labels must have shape ({len(x)},) matching features, got {y_np.shape}")
    y = torch.from_numpy(adaptor.to_local(y_np))
    w = None
    if sample_weight is not None:
        w_np = checked_sample_weight(sample_weight, len(x))
        w = torch.from_numpy(w_np / max(float(w_np.sum()), 1e-12))
    with _torch_threads(threads):
        return _train(
            adaptor, x, y, steps, lr, weight_decay, seed, fit_normalizer, cancel, w, schedule
        )


def checked_sample_weight(
    sample_weight: np.ndarray, n: int, *, nonzero: bool = False
) -> np.ndarray:
    """``sample_weight`` as float32 (n,), or InputError when it is not finite and >= 0 (and,
    with ``nonzero``, not all 0)."""
    w = np.asarray(sample_weight, dtype=np.float32)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
        raise InputError(f"sample_weight must be ({n},) finite and >= 0")
    if nonzero and not float(w.sum()) > 0:
        raise InputError(f"sample_weight must be ({n},) finite, >= 0, not all 0")
    return w


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set this thread's torch intra-op thread count."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(
    adaptor: Adaptor,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    weight_decay: float,
    seed: int,
    fit_normalizer: bool,
    cancel: threading.Event | None,
    weight: torch.Tensor | None = None,
    schedule: str = "cosine",
) -> TrainReport:
    t0 = time.perf_counter()
    if fit_normalizer:
        adaptor.fit_normalizer(x)
    adaptor.train()
    opt = torch.optim.Adam(adaptor.parameters(), lr=lr, weight_decay=weight_decay)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        if schedule == "cosine"
        else None
    )
    # Per-row weights (normalised to sum 1) = repeating rows, at the cost of one copy.
    loss_fn = nn.CrossEntropyLoss(reduction="none" if weight is not None else "mean")
    loss = torch.tensor(float("nan"))
    done, stopped = 0, False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        for _ in range(steps):
            if cancel is not None and cancel.is_set():
                stopped = True
                break
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(adaptor(x), y)
            if weight is not None:
                loss = (loss * weight).sum()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            done += 1
    adaptor.eval()
    with torch.inference_mode():
        acc = float((adaptor(x).argmax(1) == y).float().mean())
    return TrainReport(done, float(loss.detach()), acc, time.perf_counter() - t0, stopped)
