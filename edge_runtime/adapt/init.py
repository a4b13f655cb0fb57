"""Initializer plug point: how a new adaptor's weights start before the few-shot steps.

``init(adaptor, features, labels)`` mutates the adaptor in place. An initializer that can
fall back to another (:class:`MetaInit`) also says, through :func:`ran`, which one actually ran
on this thread's last call: the executor's build report carries that, not the configured name.
:class:`StandardInit` keeps
torch's default (Kaiming-uniform) initialisation; :class:`PrototypeInit` sets the output layer
from class means -- the nearest-class-mean classifier written as a linear layer -- so the head
starts where a prototype network would end and the gradient steps only refine it. A meta-learned
initialisation (MOL-style, ``torch.func``) implements the same protocol.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from edge_runtime.adapt.adaptor import Adaptor, _torch_threads, checked_sample_weight

if TYPE_CHECKING:
    from edge_runtime.meta.detector import ThresholdCorrection
    from edge_runtime.meta.store import MetaInitFile

log = logging.getLogger(__name__)


@runtime_checkable
class Initializer(Protocol):
    name: str

    def init(self, adaptor: Adaptor, features: np.ndarray, labels: np.ndarray) -> None: ...


@runtime_checkable
class WeightedInitializer(Initializer, Protocol):
    """An initializer that also sees the rows' training weights (shots and replay half and half,
    as the executor trains): a meta-init's fast steps should optimise what training will."""

    def init_weighted(
        self,
        adaptor: Adaptor,
        features: np.ndarray,
        labels: np.ndarray,
        sample_weight: np.ndarray | None,
    ) -> None: ...


def ran(initializer: Initializer) -> dict[str, Any]:
    """What ``initializer``'s last ``init`` on this thread did: at least ``{"init": name}``
    (the initializer that actually set the weights), plus whatever it reports (MetaInit: the
    family, the meta-init file or None, the fast steps, and why it fell back)."""
    last = getattr(initializer, "last", None)
    if isinstance(last, dict) and last.get("init"):
        return dict(last)
    return {"init": initializer.name}


class StandardInit:
    """Torch's default layer initialisation (what :func:`build_adaptor` already did)."""

    name = "standard"

    def init(self, adaptor: Adaptor, features: np.ndarray, labels: np.ndarray) -> None:
        return None


class PrototypeInit:
    """Output layer from class prototypes in the head's input space.

    With prototypes ``mu_c`` of the (normalised, hidden-layer) embeddings ``z``, the logit
    ``2 mu_c.z - |mu_c|^2`` equals ``-|z - mu_c|^2`` up to a per-frame constant: the head starts
    as a nearest-class-mean classifier. ``scale`` tempers the logits so the softmax starts soft
    enough for the first Adam steps to move. Also fits the adaptor's feature normaliser (the
    prototypes must live in the same space the head sees).
    """

    name = "prototype"

    def __init__(self, scale: float | None = None) -> None:
        self.scale = scale

    @torch.no_grad()
    def init(self, adaptor: Adaptor, features: np.ndarray, labels: np.ndarray) -> None:
        x = adaptor._as_tensor(features)
        y = torch.from_numpy(adaptor.to_local(np.asarray(labels)))
        adaptor.fit_normalizer(x)
        z = adaptor.embed(x)
        protos = torch.zeros(adaptor.n_classes, z.shape[1])
        for c in range(adaptor.n_classes):
            members = z[y == c]
            # A class with no shot yet keeps a zero prototype: its logit starts at 0.
            if len(members):
                protos[c] = members.mean(0)
        # Scale so the logits' spread is O(1): divide by the embedding's mean squared norm.
        scale = (
            self.scale
            if self.scale is not None
            else 1.0 / float(z.pow(2).sum(1).mean().clamp_min(1e-6))
        )
        adaptor.head.weight.copy_(2.0 * scale * protos)
        adaptor.head.bias.copy_(-scale * protos.pow(2).sum(1))


class MetaInit:
    """Proto-MAML initialisation from a meta-init file (``edge-runtime meta-train``).

    The output layer comes from class means as in :class:`PrototypeInit` (with the learned
    temperature), everything else from the family's meta-learned weights; the feature
    normaliser is fitted on the shots with the learned per-feature gain folded into
    ``feat_std``; then ``steps`` (default: the file's ``inner_steps``) SGD steps run with the
    learned per-layer step sizes, so the head handed back is already adapted and any further
    training (the executor's Adam steps) only refines it.

    ``path``: a meta-init manifest, its ``.safetensors``, or a directory holding one file per
    family; None looks in the cache by ``encoder_hash`` (see :mod:`edge_runtime.meta.store`).
    A configured path that is damaged or belongs to another encoder raises CheckpointError
    here, at construction; an adaptor whose family has no meta-init falls back to
    :class:`PrototypeInit` and the log says so (once per family). ``last`` describes this thread's
    most recent call (the build and the training worker initialise on different threads), and
    its ``init`` names what actually ran: ``meta``, or the fallback's name with ``fallback``
    saying why (what the executor puts in its report). ``threads``: torch threads for the
    fast steps (None: the caller's); one, because these are a few small full-batch steps and a
    second thread on 2 shared cores measured ~20x slower (23 ms vs 544 ms for 200 shots,
    benchmarks/bench_meta.py).
    """

    name = "meta"

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        encoder_hash: str | None = None,
        *,
        steps: int | None = None,
        fallback: Initializer | None = None,
        threads: int | None = 1,
    ) -> None:
        from edge_runtime.meta.store import load_meta_init

        self.path = Path(path) if path is not None else None
        self.encoder_hash = encoder_hash
        self.steps = steps
        self.threads = threads
        self.fallback: Initializer = fallback if fallback is not None else PrototypeInit()
        self._files: dict[str, MetaInitFile | None] = {}
        self._warned: set[str] = set()
        self._scanned = False
        self._local = threading.local()
        if self.path is not None and not self.path.exists():
            from edge_runtime.errors import ConfigError

            raise ConfigError(f"adapt.meta_init: {self.path} does not exist")
        if self.path is not None and self.path.is_file():
            if encoder_hash is None:
                from edge_runtime.errors import ConfigError

                raise ConfigError("MetaInit needs the encoder hash to check a meta-init file")
            loaded = load_meta_init(self.path, encoder_hash)
            self._files[loaded.family] = loaded

    @property
    def last(self) -> dict[str, Any]:
        """This thread's last ``init``: what ran (see the class docstring)."""
        return dict(getattr(self._local, "last", {}))

    @last.setter
    def last(self, value: dict[str, Any]) -> None:
        self._local.last = dict(value)

    def file_for(self, adaptor: Adaptor) -> MetaInitFile | None:
        """The verified meta-init of this adaptor's family, or None."""
        from edge_runtime.errors import CheckpointError
        from edge_runtime.meta.maml import family_name
        from edge_runtime.meta.store import find_meta_init, load_meta_init

        family = family_name(adaptor.arch)
        if family in self._files:
            return self._files[family]
        found: MetaInitFile | None = None
        if self.path is not None and self.path.is_dir():
            # A configured folder: a family file that is there but wrong is an error.
            candidate = self.path / f"{family}.json"
            if candidate.is_file() and self.encoder_hash is not None:
                found = load_meta_init(candidate, self.encoder_hash, adaptor.arch)
        elif self.path is None and self.encoder_hash is not None:
            cached = find_meta_init(self.encoder_hash, adaptor.arch)
            if cached is not None:
                try:
                    found = load_meta_init(cached, self.encoder_hash, adaptor.arch)
                except CheckpointError as exc:
                    log.warning("meta-init: ignoring cached file: %s", exc)
        # (a single configured file serves only its own family, loaded in __init__)
        self._files[family] = found
        return found

    def correction(self, adaptor: Adaptor) -> ThresholdCorrection | None:
        """The learned threshold correction shipped with this family's meta-init, if any."""
        f = self.file_for(adaptor)
        return f.correction if f is not None else None

    def _scan(self) -> list[MetaInitFile]:
        """Every verified family file of this encoder: the configured file or folder, else
        the cache (a damaged cached file is skipped with a warning, a configured one raises)."""
        from edge_runtime.errors import CheckpointError
        from edge_runtime.meta.store import SUMMARY_NAME, load_meta_init, meta_cache_dir

        # Each file is verified (SHA-256, shapes) once: the runtime asks twice at start-up
        # (label budget, threshold correction).
        if (
            not self._scanned
            and self.encoder_hash is not None
            and not (self.path is not None and self.path.is_file())
        ):
            folder = self.path if self.path is not None else meta_cache_dir(self.encoder_hash)
            for manifest in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                if manifest.name == SUMMARY_NAME:
                    continue  # the training summary, not a family file
                try:
                    loaded = load_meta_init(manifest, self.encoder_hash)
                except CheckpointError as exc:
                    if self.path is not None:
                        raise
                    log.warning("meta-init: ignoring cached file: %s", exc)
                    continue
                self._files.setdefault(loaded.family, loaded)
            self._scanned = True  # after the loop: a configured folder's bad file raises again
        return [f for f in self._files.values() if f is not None]

    def available(self) -> bool:
        """True when at least one family has a meta-init for this encoder."""
        return bool(self._scan())

    def detector_correction(self) -> ThresholdCorrection | None:
        """The learned threshold correction for a new domain's memory, from any verified
        family file of this encoder (the correction belongs to the HDC bank, not to an
        adaptor family; ``meta-train`` writes the same one into every family's file)."""
        for loaded in self._scan():
            if loaded.correction is not None:
                return loaded.correction
        return None

    def init_weighted(
        self,
        adaptor: Adaptor,
        features: np.ndarray,
        labels: np.ndarray,
        sample_weight: np.ndarray | None,
    ) -> None:
        self.init(adaptor, features, labels, sample_weight=sample_weight)

    def init(
        self,
        adaptor: Adaptor,
        features: np.ndarray,
        labels: np.ndarray,
        sample_weight: np.ndarray | None = None,
    ) -> None:
        """``sample_weight``: the rows' weights as the executor trains with them (shots and
        replay half and half); the prototypes, the normaliser and the fast steps use them.
        The prototype fallback ignores them, as PrototypeInit always has."""
        from edge_runtime.meta.maml import ProtoMAML, family_name

        t0 = time.perf_counter()
        meta_file = self.file_for(adaptor)
        family = family_name(adaptor.arch)
        if meta_file is None:
            if family not in self._warned:
                self._warned.add(family)
                where = self.path or "the meta-init cache"
                log.info(
                    "meta-init: none for family %s and encoder %s in %s; using prototype init",
                    family,
                    (self.encoder_hash or "?")[:16],
                    where,
                )
            self.fallback.init(adaptor, features, labels)
            self.last = {
                "init": self.fallback.name,
                "family": family,
                "meta_init": None,
                "fallback": f"no meta-init for family {family} and this encoder",
            }
            return
        x = adaptor._as_tensor(features)
        y = torch.from_numpy(adaptor.to_local(np.asarray(labels)))
        w = None
        if sample_weight is not None:
            w = torch.from_numpy(checked_sample_weight(sample_weight, len(x), nonzero=True))
        steps = meta_file.inner_steps if self.steps is None else int(self.steps)
        model = ProtoMAML(adaptor.arch, steps)
        # Enable grad: the fast steps differentiate even under an inference-mode caller.
        with torch.enable_grad(), _torch_threads(self.threads):
            params, buffers = model.adapt(meta_file.meta, x, y, adaptor.n_classes, steps, w)
        model.install(adaptor, params, buffers)
        adaptor.eval()
        self.last = {
            "init": self.name,
            "family": family,
            "meta_init": str(meta_file.path),
            "fast_steps": steps,
            "seconds": round(time.perf_counter() - t0, 5),
        }


INITIALIZERS: dict[str, type] = {
    "standard": StandardInit,
    "prototype": PrototypeInit,
    "meta": MetaInit,
}


def make_initializer(name: str) -> Initializer:
    from edge_runtime.errors import ConfigError

    if name not in INITIALIZERS:
        raise ConfigError(
            f"adapt.init: unknown initializer {name!r}; choose one of {sorted(INITIALIZERS)}"
        )
    return INITIALIZERS[name]()
