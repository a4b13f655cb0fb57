"""HDC memories: packed exemplars scored by Hamming k-NN, and float class prototypes.

The functional core (``select_exemplars``, ``knn_similarity``, ``knn_vote``)
is shared by :class:`~edge_runtime.hdc.detector.HDCDetector` (one memory) and
:class:`~edge_runtime.hdc.bank.DomainMemoryBank` (many domains in one kernel
call). All similarity work goes through ``edge_runtime.kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchhd

from edge_runtime import kernels
from edge_runtime.errors import InputError
from edge_runtime.kernels.knn import PAD_DISTANCE, knn_similarity

_QUERY_CHUNK = 512  # bounds the kernels' (B, M) working set


def select_exemplars(labels: np.ndarray, max_exemplars: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``max_exemplars`` rows, as class-balanced as the data allow.

    Each class gets an equal share (a class with fewer rows gives its spare
    share to the others); rows are drawn at random within a class. Sorted, so
    memory order follows input order.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if max_exemplars <= 0:
        raise InputError(f"max_exemplars must be > 0, got {max_exemplars}")
    if n <= max_exemplars:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.zeros(len(classes), dtype=np.int64)
    left = max_exemplars
    # Water-filling: repeatedly split what is left equally among classes not yet exhausted.
    while left > 0:
        open_ = np.flatnonzero(quota < counts)
        share = max(1, left // len(open_))
        for i in open_:
            take = min(share, counts[i] - quota[i], left)
            quota[i] += take
            left -= take
            if left == 0:
                break
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
        for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picks))


def segmented_topk(
    queries: torch.Tensor, memory: torch.Tensor, offsets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.segmented_hamming_topk`` over query chunks: (B,S,k) distances and rows."""
    if len(queries) <= _QUERY_CHUNK:  # one chunk: no copy through torch.cat
        return kernels.segmented_hamming_topk(queries, memory, offsets, k)
    d, i = [], []
    for s in range(0, len(queries), _QUERY_CHUNK):
        dd, ii = kernels.segmented_hamming_topk(queries[s : s + _QUERY_CHUNK], memory, offsets, k)
        d.append(dd)
        i.append(ii)
    return torch.cat(d), torch.cat(i)


def knn_similarity_np(dist: torch.Tensor, dim: int, reduce: str = "kth") -> np.ndarray:
    """:func:`knn_similarity` as a numpy array, bit for bit, cheaper for small CPU batches.

    When no neighbour is missing (the usual case: every segment holds at least k rows),
    ``1 - 2·d/D`` and the k-th pick are single IEEE float64 operations per element, so
    numpy gives torch's bits; the mean keeps torch's own sum (its reduction order) over
    the same contiguous (B,S,k) array. Anything else takes :func:`knn_similarity`.
    """
    if dist.device.type == "cpu" and dist.ndim == 3 and dist.shape[2] > 0:
        d = dist.numpy()
        if reduce in ("kth", "mean") and bool((d != PAD_DISTANCE).all()):
            if reduce == "kth":
                return (1.0 - 2.0 * d[:, :, -1].astype(np.float64) / dim).astype(np.float32)
            sim = 1.0 - 2.0 * d.astype(np.float64) / dim
            total = torch.from_numpy(sim).sum(dim=2).numpy()
            return (total / d.shape[2]).astype(np.float32)
    return knn_similarity(dist, dim, reduce).numpy()


def knn_vote(
    rows: torch.Tensor, dist: torch.Tensor, labels: torch.Tensor, n_classes: int
) -> torch.Tensor:
    """(B,k) neighbour rows/distances → (B,) majority label; ties go to the closer neighbours."""
    valid = rows >= 0
    labels = labels.to(rows.device)
    lab = torch.where(valid, labels[rows.clamp(min=0)], torch.zeros_like(rows))
    # Each vote weighs 1 plus a tiny bonus for closeness, so a tie breaks towards nearer rows.
    w = valid.to(torch.float64) * (1.0 + 1e-6 / (1.0 + dist.to(torch.float64)))
    votes = torch.zeros(rows.shape[0], n_classes, dtype=torch.float64, device=rows.device)
    votes.scatter_add_(1, lab, w)
    return votes.argmax(dim=1)


@dataclass
class ExemplarMemory:
    """Bit-packed exemplar hypervectors (M, W) int64 with their labels (M,) int64."""

    packed: torch.Tensor
    labels: torch.Tensor
    dim: int

    def __post_init__(self) -> None:
        if self.packed.ndim != 2 or self.packed.dtype != torch.int64:
            raise InputError(
                f"packed exemplars must be (M,W) int64, got {tuple(self.packed.shape)} "
                f"{self.packed.dtype}"
            )
        if self.packed.shape[1] != kernels.words_for(self.dim):
            raise InputError(
                f"packed exemplars have {self.packed.shape[1]} words, "
                f"dim {self.dim} needs {kernels.words_for(self.dim)}"
            )
        if self.labels.shape != (self.packed.shape[0],):
            raise InputError("exemplar labels must be (M,) matching the packed rows")

    def __len__(self) -> int:
        return int(self.packed.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.packed.numel() * 8)

    def topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,k) nearest distances and rows among all exemplars (on the memory's device: the
        encoder keeps a GPU batch's codes on the GPU, the memory may live elsewhere)."""
        offsets = torch.tensor([0, len(self)], dtype=torch.int64)
        d, i = segmented_topk(queries.to(self.packed.device), self.packed, offsets, k)
        return d[:, 0], i[:, 0]


@dataclass
class PrototypeMemory:
    """Float prototypes (P, D) (several per class allowed) with labels (P,): max-cosine score."""

    prototypes: torch.Tensor
    labels: torch.Tensor

    def best(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) best cosine similarity and (B,) label of the best prototype."""
        offsets = torch.tensor([0, self.prototypes.shape[0]], dtype=torch.int64)
        queries = queries.to(self.prototypes.device)  # as ExemplarMemory.topk
        sims, rows = [], []
        for s in range(0, len(queries), _QUERY_CHUNK):
            v, r = kernels.segmented_cosine_max(
                queries[s : s + _QUERY_CHUNK], self.prototypes, offsets
            )
            sims.append(v[:, 0])
            rows.append(r[:, 0])
        return torch.cat(sims).to(torch.float32), self.labels[torch.cat(rows)]


def class_centroids(hv: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """HDFF prototypes: bundle (``torchhd.multiset``) the hypervectors of each class."""
    return torch.stack(
        [
            torchhd.multiset(hv[labels == c].as_subclass(torchhd.MAPTensor)).as_subclass(
                torch.Tensor
            )
            for c in classes
        ]
    )


def kmeans_prototypes(
    z: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PALM-style mixture: k-means centres per class in the pre-projection space.

    The projection is linear, so projecting a centre equals bundling the
    projected members; clustering the narrower pre-projection vectors is cheaper.
    """
    from sklearn.cluster import KMeans

    centres, labs = [], []
    for c in classes:
        x = z[labels == c].numpy()
        m = min(per_class, len(x))
        km = KMeans(n_clusters=m, n_init=3, random_state=seed).fit(x)
        centres.append(torch.from_numpy(km.cluster_centers_.astype(np.float32)))
        labs.append(torch.full((m,), int(c), dtype=torch.int64))
    return torch.cat(centres), torch.cat(labs)


def retrain_prototypes(
    hv: torch.Tensor, labels: torch.Tensor, n_classes: int, epochs: int, lr: float = 1.0
) -> torch.Tensor:
    """OnlineHD refinement (torchhd ``Centroid.add_online``) of one prototype per class."""
    model = torchhd.models.Centroid(hv.shape[1], n_classes)
    x = hv.as_subclass(torch.Tensor)
    model.add(x, labels)
    for _ in range(epochs):
        for s in range(0, len(x), 256):
            model.add_online(x[s : s + 256], labels[s : s + 256], lr=lr)
    return model.weight.detach().clone()
