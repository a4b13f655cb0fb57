"""Post-hoc OOD baselines over a linear head, as in OpenOOD / pytorch-ood.

MSP (Hendrycks & Gimpel 2017), energy (Liu et al. 2020), Mahalanobis (Lee et
al. 2018, class means + shared covariance on the features), KNN (Sun et al.
2022, k-th nearest-neighbour distance on L2-normalised features) and ViM (Wang
et al. 2022, energy minus the scaled residual off the principal subspace).
Every score follows the convention higher = more in-distribution.
"""

from __future__ import annotations

import numpy as np
import torch

from edge_runtime.hdc.base import OODDetector, check_labels
from edge_runtime.hdc.projection import check_features


class LinearHead:
    """A linear probe on the base classes: cross-entropy, Adam, a few epochs, as usual.

    Kept short on purpose: MSP/energy degrade as a linear head is trained to
    over-confidence (measured on Fashion-MNIST: energy near-OOD AUROC 0.76 after
    5 epochs, 0.60 after 100), and 5 epochs already reach the plateau accuracy.
    """

    def __init__(self, epochs: int = 5, lr: float = 1e-3, batch_size: int = 128, seed: int = 0):
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed
        self.weight: torch.Tensor | None = None  # (C, F)
        self.bias: torch.Tensor | None = None  # (C,)

    def fit(
        self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
    ) -> LinearHead:
        x = check_features(features)
        y = check_labels(labels, len(x))
        g = torch.Generator().manual_seed(self.seed)
        lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
        with torch.no_grad():  # seeded init, independent of the global RNG
            bound = 1.0 / x.shape[1] ** 0.5
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=g) * 2 * bound - bound)
            lin.bias.zero_()
        opt = torch.optim.Adam(lin.parameters(), lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.epochs):
                perm = torch.randperm(len(x), generator=g)
                for s in range(0, len(x), self.batch_size):
                    i = perm[s : s + self.batch_size]
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(lin(x[i]), y[i]).backward()
                    opt.step()
        self.weight = lin.weight.detach().clone()
        self.bias = lin.bias.detach().clone()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        assert self.weight is not None and self.bias is not None, "LinearHead is not fitted"
        return x @ self.weight.T + self.bias

    def predict(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.logits(check_features(features)).argmax(1).numpy()


class _HeadDetector(OODDetector):
    """A detector that needs the linear head; pass ``head=`` to share one fitted head."""

    def __init__(self, head: LinearHead | None = None):
        self.head = head
        self.threshold = None
        self.in_features = None

    def _fit_head(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.head is None or self.head.weight is None:
            self.head = (self.head or LinearHead()).fit(x, y)

    def fit(
        self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
    ) -> _HeadDetector:
        x = check_features(features)
        y = check_labels(labels, len(x))
        self.in_features = int(x.shape[1])
        self._fit_head(x, y)
        self._fit_extra(x, y)
        return self

    def _fit_extra(self, x: torch.Tensor, y: torch.Tensor) -> None:
        return None

    def classify(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        assert self.head is not None
        return self.head.logits(self._checked(features)).argmax(1).numpy()


class MSPDetector(_HeadDetector):
    """Maximum softmax probability."""

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        assert self.head is not None
        return torch.softmax(self.head.logits(x), dim=1).max(dim=1).values


class EnergyDetector(_HeadDetector):
    """Negative free energy: T·logsumexp(logits / T)."""

    def __init__(self, head: LinearHead | None = None, temperature: float = 1.0):
        super().__init__(head)
        self.temperature = temperature

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        assert self.head is not None
        t = self.temperature
        return t * torch.logsumexp(self.head.logits(x) / t, dim=1)


class MahalanobisDetector(_HeadDetector):
    """Negative minimum Mahalanobis distance to a class mean, shared (shrunk) covariance."""

    def _fit_extra(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from sklearn.covariance import ledoit_wolf

        xd = x.double()
        classes = torch.unique(y)
        self.means = torch.stack([xd[y == c].mean(0) for c in classes])
        centred = xd - self.means[torch.searchsorted(classes, y)]
        # Ledoit-Wolf shrinkage: the plain covariance is singular when frames < feature width
        # (1,280-d features, a few hundred frames per new domain), and pinv then scores noise.
        cov, _ = ledoit_wolf(centred.numpy(), assume_centered=True)
        self.precision = torch.linalg.inv(torch.from_numpy(cov))

    def _fit_head(self, x: torch.Tensor, y: torch.Tensor) -> None:
        return None  # Mahalanobis needs no head

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(x), 2048):
            d = x[s : s + 2048].double().unsqueeze(1) - self.means.unsqueeze(0)  # (B,C,F)
            m = torch.einsum("bcf,fg,bcg->bc", d, self.precision, d)
            out.append(-m.min(dim=1).values)
        return torch.cat(out).float()


class KNNDetector(_HeadDetector):
    """Negative distance to the k-th nearest training feature, all L2-normalised (Sun et al.)."""

    def __init__(self, head: LinearHead | None = None, k: int = 50):
        super().__init__(head)
        self.k = k

    def _fit_head(self, x: torch.Tensor, y: torch.Tensor) -> None:
        return None  # KNN needs no head

    def _fit_extra(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.bank = torch.nn.functional.normalize(x, dim=1)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.nn.functional.normalize(x, dim=1)
        k = min(self.k, len(self.bank))
        out = []
        for s in range(0, len(q), 1024):
            sim = q[s : s + 1024] @ self.bank.T
            kth = sim.topk(k, dim=1).values[:, -1]
            # ||a - b|| = sqrt(2 - 2 cos) for unit vectors.
            out.append(-torch.sqrt((2.0 - 2.0 * kth).clamp(min=0.0)))
        return torch.cat(out)


class ViMDetector(_HeadDetector):
    """Virtual-logit matching: energy minus alpha·||residual off the principal subspace||."""

    def __init__(self, head: LinearHead | None = None, dim: int | None = None):
        super().__init__(head)
        self.principal_dim = dim

    def _fit_extra(self, x: torch.Tensor, y: torch.Tensor) -> None:
        assert self.head is not None
        w, b = self.head.weight.double(), self.head.bias.double()
        # Origin u = -pinv(W) b, so that logits are linear in (x - u).
        self.origin = -(torch.linalg.pinv(w) @ b)
        xc = x.double() - self.origin
        width = x.shape[1]
        dim = self.principal_dim or (width // 2 if width < 1500 else 1000)
        dim = min(dim, width - 1)
        cov = xc.T @ xc / len(x)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)
        self.null_space = evecs[:, order[dim:]].contiguous()  # (F, F-dim)
        resid = torch.linalg.norm(xc @ self.null_space, dim=1)
        self.alpha = float(self.head.logits(x).max(dim=1).values.double().mean() / resid.mean())

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        assert self.head is not None
        resid = torch.linalg.norm((x.double() - self.origin) @ self.null_space, dim=1)
        energy = torch.logsumexp(self.head.logits(x).double(), dim=1)
        return (energy - self.alpha * resid).float()
