"""Episodes for meta-training: few-shot tasks drawn from base data under simulated shifts.

A *domain* here is a pool of encoder features of one source under one corruption (or none).
Meta-training sees only :data:`TRAIN_SHIFTS`: Fashion-MNIST classes 0-5 (the base classes of
``fashion-drift``) under corruption families that no benchmark holds out. Every episode draws a
domain, a random subset of its classes, and a random permutation of labels (so the learner can
never memorise "label 3 = dress": the output layer must come from the shots). The held-out
shifts (:data:`HELD_OUT_SHIFTS`) use corruptions, classes and a source that appear in no episode,
drawn from the *test* split so even the images differ.

Features come from :func:`~edge_runtime.encoder.cache.cached_features` with the runtime's own
encoder: building the pools costs one encoder pass per frame once, and every later run (tests,
benchmarks, ``meta-train``) reads them from the cache.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from edge_runtime.data.corruptions import corrupt
from edge_runtime.data.datasets import load_fashion_mnist, load_mnist_digits
from edge_runtime.errors import InputError

BASE_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
NOVEL_CLASSES: tuple[int, ...] = (6, 7, 8, 9)
MNIST_LABEL_OFFSET = 10  # as edge_runtime.data.scenario, so labels never collide


@dataclass(frozen=True)
class ShiftSpec:
    """One domain: ``source`` images of ``classes`` under ``corruption`` at ``severity``."""

    name: str
    source: str  # "fashion-train" | "fashion-test" | "mnist"
    classes: tuple[int, ...]
    corruption: str | None = None
    severity: int = 0


# Corruption families of meta-training; fog and gaussian noise (fashion-drift's shifts) are not
# among them, nor classes 6-9, nor MNIST.
TRAIN_SHIFTS: tuple[ShiftSpec, ...] = (
    ShiftSpec("clean", "fashion-train", BASE_CLASSES),
    ShiftSpec("rotation-2", "fashion-train", BASE_CLASSES, "rotation", 2),
    ShiftSpec("rotation-4", "fashion-train", BASE_CLASSES, "rotation", 4),
    ShiftSpec("blur-3", "fashion-train", BASE_CLASSES, "blur", 3),
    ShiftSpec("blur-5", "fashion-train", BASE_CLASSES, "blur", 5),
    ShiftSpec("contrast-3", "fashion-train", BASE_CLASSES, "contrast", 3),
    ShiftSpec("contrast-5", "fashion-train", BASE_CLASSES, "contrast", 5),
    ShiftSpec("brightness-4", "fashion-train", BASE_CLASSES, "brightness", 4),
    ShiftSpec("inversion-3", "fashion-train", BASE_CLASSES, "inversion", 3),
    ShiftSpec("inversion-5", "fashion-train", BASE_CLASSES, "inversion", 5),
)

# The base domain's held-out frames (for base accuracy) and four shifts held out of every
# episode: the fashion-drift segments' kinds of change, on test-split images.
BASE_EVAL = ShiftSpec("base-clean", "fashion-test", BASE_CLASSES)
HELD_OUT_SHIFTS: tuple[ShiftSpec, ...] = (
    ShiftSpec("fog-4", "fashion-test", BASE_CLASSES, "fog", 4),
    ShiftSpec("noise-3", "fashion-test", BASE_CLASSES, "gaussian_noise", 3),
    ShiftSpec("new-classes", "fashion-test", NOVEL_CLASSES),
    ShiftSpec("mnist", "mnist", tuple(range(10))),
)


@dataclass
class Domain:
    """Features (N, D) float32 and global labels (N,) int64 of one shift."""

    name: str
    features: np.ndarray
    labels: np.ndarray

    @property
    def classes(self) -> list[int]:
        return sorted({int(v) for v in self.labels})


def _load(source: str) -> tuple[np.ndarray, np.ndarray]:
    if source == "fashion-train":
        return load_fashion_mnist("train")
    if source == "fashion-test":
        return load_fashion_mnist("test")
    if source == "mnist":
        x, y = load_mnist_digits()
        return x, np.asarray(y, dtype=np.int64) + MNIST_LABEL_OFFSET
    raise InputError(f"unknown meta source {source!r}")


def shift_images(
    spec: ShiftSpec, per_class: int, seed: int = 0, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic uint8 frames and labels of one shift; ``offset`` picks a disjoint slice of
    each class's pool, so shifts drawn from one split never share an image."""
    images, labels = _load(spec.source)
    classes = [c + (MNIST_LABEL_OFFSET if spec.source == "mnist" else 0) for c in spec.classes]
    rng = np.random.default_rng(seed)
    pick: list[np.ndarray] = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        chunk = idx[offset * per_class : (offset + 1) * per_class]
        if len(chunk) == 0:
            raise InputError(f"shift {spec.name}: class {c} has no frames at offset {offset}")
        pick.append(chunk)
    rows = np.sort(np.concatenate(pick))
    x, y = np.ascontiguousarray(images[rows]), labels[rows].astype(np.int64)
    if spec.corruption:
        # The corruption seed depends on the shift's name only: same frames, same noise.
        x = corrupt(x, spec.corruption, spec.severity, seed=zlib.crc32(spec.name.encode()))
    return x, y


FeatureFn = Callable[[np.ndarray, str], np.ndarray]


def _shift_frames(
    specs: tuple[ShiftSpec, ...], per_class: int, seed: int
) -> Iterator[tuple[ShiftSpec, np.ndarray, np.ndarray]]:
    """Each shift's frames and labels; shifts of the same source take disjoint slices."""
    used: dict[str, int] = {}
    for spec in specs:
        offset = used.get(spec.source, 0)
        used[spec.source] = offset + 1
        # MNIST has ~500 frames a class: one slice only; its held-out shift is the only user.
        x, y = shift_images(spec, per_class, seed, offset if spec.source != "mnist" else 0)
        yield spec, x, y


def build_domains(
    specs: tuple[ShiftSpec, ...],
    features: FeatureFn,
    per_class: int,
    seed: int = 0,
) -> list[Domain]:
    """Encode each shift (``features(images, tag)``, e.g. a cached encoder pass). Shifts of the
    same source take disjoint slices of its images."""
    return [
        Domain(spec.name, np.asarray(features(x, f"meta-{spec.name}")), y)
        for spec, x, y in _shift_frames(specs, per_class, seed)
    ]


def build_tap_domains(
    specs: tuple[ShiftSpec, ...],
    encoder: object,
    taps: tuple[int, ...],
    per_class: int,
    seed: int = 0,
    progress: bool = False,
) -> dict[int | None, list[Domain]]:
    """The shifts' pooled features (key None) and their flattened maps at each of ``taps``,
    all from one cached encoder pass per shift (:func:`cached_encoded`): a conv family's
    episodes read the tap map its adaptor reads in the runtime. Same frames, slices and
    corruption noise as :func:`build_domains` (so the pooled domains equal its result)."""
    from edge_runtime.encoder.cache import cached_encoded

    taps = tuple(sorted({int(t) for t in taps}))
    out: dict[int | None, list[Domain]] = {None: [], **{t: [] for t in taps}}
    for spec, x, y in _shift_frames(specs, per_class, seed):
        tag = f"meta-{spec.name}"
        enc = cached_encoded(encoder, x, taps, tag=tag, progress=tag if progress else False)  # type: ignore[arg-type]
        out[None].append(Domain(spec.name, np.asarray(enc.features, np.float32), y))
        for t in taps:
            m = np.asarray(enc.maps[t], np.float32).reshape(len(x), -1)
            out[t].append(Domain(spec.name, m, y))
    return out


def domains_by_tap(
    specs: tuple[ShiftSpec, ...],
    encoder: object,
    taps: tuple[int, ...],
    per_class: int,
    seed: int = 0,
    progress: bool = False,
) -> dict[int | None, list[Domain]]:
    """The shifts' domains keyed by tap (None: pooled features): :func:`build_tap_domains` when
    a family reads taps, else :func:`build_domains` through the pooled-feature cache."""
    if taps:
        return build_tap_domains(specs, encoder, taps, per_class, seed, progress)
    return {None: build_domains(specs, encoder_features(encoder, progress), per_class, seed)}


def encoder_features(encoder: object, progress: bool = False) -> FeatureFn:
    """``features(images, tag)`` through the on-disk feature cache for ``encoder``."""
    from edge_runtime.encoder.cache import cached_features

    def fn(images: np.ndarray, tag: str) -> np.ndarray:
        return cached_features(encoder, images, tag, progress=tag if progress else False)  # type: ignore[arg-type]

    return fn


@dataclass
class EpisodeBatch:
    """``tasks`` episodes of one shape, stacked for ``vmap``: support (T, W*K, D) with local
    labels (T, W*K) in 0..W-1, query (T, W*Q, D) and (T, W*Q)."""

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    n_way: int
    k_shot: int
    ws: torch.Tensor | None = None  # (T, S) support row weights; None: uniform


class EpisodeSampler:
    """Few-shot episodes over ``domains``: a random domain, ``n_way`` of its classes under a
    random new label assignment, ``k_shot`` support and ``q_query`` query frames per class."""

    def __init__(self, domains: list[Domain], seed: int = 0) -> None:
        if not domains:
            raise InputError("an episode sampler needs at least one domain")
        self.domains = domains
        self.rng = np.random.default_rng(seed)
        self._by_class = [
            {c: np.flatnonzero(d.labels == c) for c in d.classes} for d in self.domains
        ]

    def episode(
        self, n_way: int, k_shot: int, q_query: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        di = int(self.rng.integers(len(self.domains)))
        d, pools = self.domains[di], self._by_class[di]
        classes = list(pools)
        if n_way > len(classes):
            raise InputError(f"domain {d.name} has {len(classes)} classes, asked for {n_way}")
        chosen = self.rng.choice(classes, n_way, replace=False)  # order = new label ids
        s_rows, q_rows, s_y, q_y = [], [], [], []
        for local, c in enumerate(chosen):
            rows = self.rng.choice(pools[int(c)], k_shot + q_query, replace=False)
            s_rows.append(rows[:k_shot])
            q_rows.append(rows[k_shot:])
            s_y += [local] * k_shot
            q_y += [local] * q_query
        f = d.features
        return (
            f[np.concatenate(s_rows)],
            np.asarray(s_y, np.int64),
            f[np.concatenate(q_rows)],
            np.asarray(q_y, np.int64),
        )

    def batch(self, tasks: int, n_way: int, k_shot: int, q_query: int) -> EpisodeBatch:
        eps = [self.episode(n_way, k_shot, q_query) for _ in range(tasks)]
        xs, ys, xq, yq = (torch.from_numpy(np.stack([e[i] for e in eps])) for i in range(4))
        return EpisodeBatch(xs.float(), ys, xq.float(), yq, n_way, k_shot)


class ReplayEpisodeSampler(EpisodeSampler):
    """Episodes shaped like the runtime's build of a new domain's adaptor: the support is a few
    shots of a shifted domain *plus replayed frames of the base domain*, weighted half and half
    (:func:`edge_runtime.adapt.executor.with_replay`), and the query is the shifted domain's.

    Each batch is one of two cases, as the runtime meets them:

    * ``shift`` (``n_way == 0``): every base class, the shots under the shift and the replay
      clean, sharing labels (a corruption of the known classes: fog, noise);
    * ``new`` (``n_way`` of them): ``n_way`` classes seen only under the shift with labels of
      their own, beside the replay of the other base classes (new classes, a new source).

    Labels are a random permutation per episode, as in :class:`EpisodeSampler`. ``domains[0]``
    is the base domain (the replay source); the shifted domain is drawn from the others, which
    must hold (some of) the base's classes: the meta-training shifts all do. (Truly new classes
    are simulated by relabelling base classes seen under a shift.)
    """

    def __init__(self, domains: list[Domain], seed: int = 0, replay_per_class: int = 10) -> None:
        if len(domains) < 2:
            raise InputError("replay episodes need the base domain and at least one shift")
        super().__init__(domains, seed)
        self.replay_per_class = int(replay_per_class)

    @property
    def max_new(self) -> int:
        """The most new classes an episode can hold (one base class stays for the replay)."""
        return len(self.domains[0].classes) - 1

    def episode(
        self, n_way: int, k_shot: int, q_query: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.weighted_episode(n_way, k_shot, q_query)[:4]

    def weighted_episode(
        self, n_way: int, k_shot: int, q_query: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        base, base_pools = self.domains[0], self._by_class[0]
        di = int(self.rng.integers(1, len(self.domains)))
        d, pools = self.domains[di], self._by_class[di]
        classes = [c for c in base.classes if c in pools]
        if len(classes) < 2:
            raise InputError(
                f"replay episodes need shifts of the base domain's classes; {d.name} shares "
                f"{len(classes)} of them"
            )
        if n_way > len(classes) - 1:
            raise InputError(f"at most {len(classes) - 1} new classes, asked for {n_way}")
        order = [int(c) for c in self.rng.permutation(classes)]
        if n_way == 0:  # shift: the same classes, the same labels, on both sides
            shifted, replayed = order, order
        else:
            shifted, replayed = order[:n_way], order[n_way:]
        labels = {c: i for i, c in enumerate(self.rng.permutation(len(classes)).tolist())}
        local = {c: labels[i] for i, c in enumerate(order)}
        s_rows, q_rows, s_y, q_y, r_rows, r_y = [], [], [], [], [], []
        for c in shifted:
            rows = self.rng.choice(pools[c], k_shot + q_query, replace=False)
            s_rows.append(rows[:k_shot])
            q_rows.append(rows[k_shot:])
            s_y += [local[c]] * k_shot
            q_y += [local[c]] * q_query
        for c in replayed:
            r_rows.append(self.rng.choice(base_pools[c], self.replay_per_class, replace=False))
            r_y += [local[c]] * self.replay_per_class
        n_s, n_r = len(s_y), len(r_y)
        w = np.concatenate([np.full(n_r, 0.5 / n_r), np.full(n_s, 0.5 / n_s)]).astype(np.float32)
        return (
            np.concatenate(
                [base.features[np.concatenate(r_rows)], d.features[np.concatenate(s_rows)]]
            ),
            np.asarray(r_y + s_y, np.int64),
            d.features[np.concatenate(q_rows)],
            np.asarray(q_y, np.int64),
            w,
        )

    def batch(self, tasks: int, n_way: int, k_shot: int, q_query: int) -> EpisodeBatch:
        eps = [self.weighted_episode(n_way, k_shot, q_query) for _ in range(tasks)]
        xs, ys, xq, yq, ws = (torch.from_numpy(np.stack([e[i] for e in eps])) for i in range(5))
        return EpisodeBatch(
            xs.float(), ys, xq.float(), yq, len(self.domains[0].classes), k_shot, ws
        )
