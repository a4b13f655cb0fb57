"""Initializer plug point: how a new adaptor's weights start before the few-shot steps.

``init(adaptor, features, labels)`` mutates the adaptor in place. :class:`StandardInit` keeps
torch's default (Kaiming-uniform) initialisation; :class:`PrototypeInit` sets the output layer
from class means -- the nearest-class-mean classifier written as a linear layer -- so the head
starts where a prototype network would end and the gradient steps only refine it. A meta-learned
initialisation (MOL-style, ``torch.func``) implements the same protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from edge_runtime.adapt.adaptor import Adaptor


@runtime_checkable
class Initializer(Protocol):
    name: str

    def init(self, adaptor: Adaptor, features: np.ndarray, labels: np.ndarray) -> None: ...


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


INITIALIZERS: dict[str, type] = {"standard": StandardInit, "prototype": PrototypeInit}


def make_initializer(name: str) -> Initializer:
    from edge_runtime.errors import ConfigError

    if name not in INITIALIZERS:
        raise ConfigError(
            f"adapt.init: unknown initializer {name!r}; choose one of {sorted(INITIALIZERS)}"
        )
    return INITIALIZERS[name]()
