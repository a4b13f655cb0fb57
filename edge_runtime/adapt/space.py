"""The adaptor search space: EAR-style families, each small.

* pooled heads: linear, or an MLP (depth 1-3, width 32-512, relu | gelu | tanh) on the pooled
  encoder features;
* conv adaptors on an intermediate tap (blocks 3, 6, 10, 13): 1-2 3x3 convs, plain or
  depthwise-separable, each + BatchNorm + activation, width 16-128, then pooling and linear;
* input conditioning (none, median 3x3, blur) on some conv candidates: frames routed to such a
  domain go through the encoder a second time after the filter, a cost the search counts.

:func:`default_space` is what the runtime searches: 26 candidates, sized so the whole search
(one encoder pass over the shots per distinct (tap, condition), proxies on every candidate) stays
under 5 s on 2 cores. :func:`sample_space` draws a larger random population from the same
families, for the benchmark.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.adapt.adaptor import AdaptorArch

try:  # the encoder owns its geometry; the fallback keeps this module importable on its own
    from edge_runtime.encoder.backend import TAP_BLOCKS, tap_shape
except ImportError:  # pragma: no cover - only before the encoder's tap API existed
    TAP_BLOCKS = (3, 6, 10, 13)
    _C = {3: 24, 6: 32, 10: 64, 13: 96}
    _S = {3: 4, 6: 8, 10: 16, 13: 16}

    def tap_shape(block: int, input_size: int) -> tuple[int, int, int]:
        h = -(-int(input_size) // _S[block])
        return _C[block], h, h


#: Per-frame MAC bound of the sampled space: a conv adaptor above it trains too slowly on 2 cores
#: to fit the 200-shot budget's few seconds (and serves no better in what we measured).
MAX_SAMPLED_MACS = 1_500_000


def conv_arch(
    tap: int,
    input_size: int,
    width: int,
    convs: int,
    separable: bool = False,
    activation: str = "relu",
    condition: str = "none",
) -> AdaptorArch:
    shape = tap_shape(tap, input_size)
    return AdaptorArch(
        "conv",
        int(np.prod(shape)),
        tap=tap,
        in_shape=tuple(int(v) for v in shape),  # type: ignore[arg-type]
        width=width,
        convs=convs,
        separable=separable,
        activation=activation,
        condition=condition,
    )


def mlp_arch(feature_dim: int, depth: int, hidden: int, activation: str = "relu") -> AdaptorArch:
    return AdaptorArch("mlp", feature_dim, hidden=hidden, depth=depth, activation=activation)


def default_space(feature_dim: int, input_size: int) -> list[AdaptorArch]:
    """The runtime's search space (26 candidates, 8 distinct (tap, condition) inputs)."""
    space = [
        AdaptorArch("linear", feature_dim),
        mlp_arch(feature_dim, 1, 256, "relu"),
        mlp_arch(feature_dim, 1, 512, "gelu"),
        mlp_arch(feature_dim, 2, 128, "relu"),
        mlp_arch(feature_dim, 2, 256, "gelu"),
        mlp_arch(feature_dim, 3, 64, "tanh"),
    ]
    # Two plain convs on the 8x8 maps of blocks 3 (after its stride) and 6 cost 4x what they
    # cost on the 4x4 maps of blocks 10 and 13 at the same width: a quarter of the width there
    # keeps them under 0.5M MACs (training 300 full-batch steps on 200 shots is CPU-bound).
    wide = {3: 16, 6: 16, 10: 64, 13: 64}
    for tap in TAP_BLOCKS:
        space += [
            conv_arch(tap, input_size, 32, 1),
            conv_arch(tap, input_size, wide[tap], 2),
            conv_arch(tap, input_size, 128, 1, separable=True),
            conv_arch(tap, input_size, 64, 2, separable=True, activation="gelu"),
        ]
    for cond in ("median3", "blur"):
        for tap in (6, 10):
            space.append(conv_arch(tap, input_size, wide[tap], 2, condition=cond))
    return space


def sample_space(
    n: int,
    seed: int = 0,
    feature_dim: int = 1304,
    input_size: int = 64,
    max_macs: int = MAX_SAMPLED_MACS,
) -> list[AdaptorArch]:
    """``n`` distinct candidates: the default space first, then random draws from the families
    (a third pooled heads, two thirds conv adaptors, a quarter of those conditioned), each
    random conv within ``max_macs`` (10 output classes)."""
    out: list[AdaptorArch] = []
    seen: set[AdaptorArch] = set()

    def add(a: AdaptorArch) -> None:
        if a not in seen and len(out) < n:
            seen.add(a)
            out.append(a)

    for a in default_space(feature_dim, input_size):
        add(a)
    rng = np.random.default_rng(seed)
    acts = ("relu", "gelu", "tanh")
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        if rng.random() < 1 / 3:
            add(
                mlp_arch(
                    feature_dim,
                    int(rng.integers(1, 4)),
                    int(rng.choice((32, 64, 128, 256, 512))),
                    str(rng.choice(acts)),
                )
            )
            continue
        cond = "none" if rng.random() < 0.75 else str(rng.choice(("median3", "blur")))
        a = conv_arch(
            int(rng.choice(TAP_BLOCKS)),
            input_size,
            int(rng.choice((16, 32, 64, 128))),
            int(rng.integers(1, 3)),
            separable=bool(rng.random() < 0.5),
            activation=str(rng.choice(acts)),
            condition=cond,
        )
        if a.macs(10) <= max_macs:
            add(a)
    return out
