"""Training-free (zero-cost) proxies: score an untrained adaptor on the label-budget batch.

Every proxy is ``(model, x, y_local) -> float`` (higher = predicted better), computed on a copy
of ``model`` (its weights, normaliser and BatchNorm statistics are never changed), deterministic
for a given model (the model's weights come from :func:`build_adaptor`'s seed; anything random
here is seeded). ``model`` should have its normaliser fitted on ``x`` (``fit_normalizer``), as
the search does.

Definitions (written from the papers, not copied from their code):

* ``grad_norm`` (Abdelfattah et al. 2021): sum over weight tensors of the L2 norm of the
  cross-entropy gradient.
* ``snip`` (Lee et al. 2019, as a NAS proxy in Abdelfattah et al.): sum of |w * dL/dw|.
* ``synflow`` (Tanaka et al. 2020): weights replaced by |w|, an all-ones input, R = sum of the
  outputs; score sum of w * dR/dw (float64; reported as log so it never overflows).
* ``naswot`` (Mellor et al. 2021): binary activation codes of the batch, kernel
  K = c c^T + (1-c)(1-c)^T, score log|det K|.
* ``jacob_cov`` (Mellor et al. 2020, v1): correlation of the per-frame input Jacobians;
  score -sum(log(l + k) + 1/(l + k)) over its eigenvalues l, k = 1e-5.
* ``zico`` (Li et al. ICLR 2023): the batch split into 4 class-stratified chunks; per layer,
  log of sum over weights of mean|g| / std(g) across chunks; summed over layers.
* ``meco`` (Jiang et al. NeurIPS 2023), *MeCo-style*: the minimum eigenvalue of a Pearson
  correlation matrix of each layer's output, summed over layers. The paper correlates one
  frame's channels; that is undefined for MLP layers (one value per channel), so here it is the
  correlation between frames of the flattened layer output (the first 64 frames), which exists
  for every family.
* ``ncm``: leave-one-out nearest-class-mean accuracy (cosine) of the untrained embedding (the
  head's input). Not one of the published proxies: it is the label-aware, training-free score of
  what the body's random features make separable, and it is what PrototypeInit starts from.
* ``ridge_loo``: the same idea with a closed-form linear probe: leave-one-out accuracy of kernel
  ridge regression (linear kernel, one-hot targets) on the untrained embedding, computed from the
  hat matrix, no fitting loop.
* ``entk_loo``: minus the leave-one-out squared error (PRESS) of kernel ridge regression on
  the centred one-hot labels, with the candidate's empirical neural tangent kernel (Jacot et
  al. 2018) at the point training starts from (PrototypeInit's head) and a centred kernel.
  Kernel regression with the NTK is what gradient descent on the linearised network converges
  to, so its left-out error is a training-free estimate of what training the candidate on the
  shots buys on frames it has not seen. It sees the input (tap, filter), the body's inductive
  bias and every trainable weight, where ``ridge_loo`` sees only the frozen embedding. The
  squared error rather than the left-out accuracy: it has no ties, and it ranked trained
  accuracy better where candidates differ by a point or two (new classes: 0.71 vs 0.46). Not
  a published proxy (TE-NAS and KNAS use the NTK's spectrum or mean, not a held-out
  regression); its ridge was chosen on bench_nas's segments (see ``ENTK_ALPHA``).
* ``lga`` (label-gradient alignment, Mok et al. CVPR 2022): centred kernel alignment between the
  gradient kernel (inner products of per-frame cross-entropy gradients w.r.t. the conv and
  linear weights, an empirical NTK of the loss; 64 class-stratified frames) and the label kernel.
* ``params``, ``flops``: size and cost of the architecture.
* ``vote``: a rank aggregation of named proxies (:class:`RankVote`); it scores a population,
  so :func:`score_population` computes it.

Comparability across families (a pooled head sees 1,304 standardised features, a conv adaptor a
standardised C*h*w map): every input is standardised per element by the fitted normaliser, so
input scale is the same for all; NASWOT's kernel is divided by the number of units coded, and
MeCo's correlation matrices have the same size whatever the layer width, so neither grows with
width alone; gradient proxies (grad_norm, snip, zico) are left unnormalised, because the number
of weights an adaptor can move is part of what they measure.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge_runtime.adapt.adaptor import Adaptor
from edge_runtime.errors import InputError

Proxy = Callable[[Adaptor, torch.Tensor, torch.Tensor], float]

_ACTS = (nn.ReLU, nn.GELU, nn.Tanh)


def _weights(model: nn.Module) -> list[nn.Parameter]:
    """Conv and linear weights (what the proxies' papers score; biases and BN excluded)."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _work_copy(model: Adaptor) -> Adaptor:
    m = copy.deepcopy(model)
    m.train()  # BatchNorm on batch statistics, as in training; dropout seeded by the caller
    return m


def _ce_grads(
    model: Adaptor, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[torch.Tensor], list[nn.Parameter]]:
    m = _work_copy(model)
    ws = _weights(m)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        loss = nn.functional.cross_entropy(m(x), y)
    return list(torch.autograd.grad(loss, ws)), ws


def grad_norm(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    grads, _ = _ce_grads(model, x, y)
    return float(sum(g.norm() for g in grads))


def snip(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    grads, ws = _ce_grads(model, x, y)
    with torch.no_grad():
        return float(sum((g * w).abs().sum() for g, w in zip(grads, ws, strict=True)))


@torch.no_grad()
def _abs_weights(m: nn.Module) -> None:
    for p in m.parameters():
        p.abs_()


def synflow(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    m = _work_copy(model).double().eval()  # BN as a fixed affine map (its calibrated stats)
    _abs_weights(m)
    ws = _weights(m)
    ones = torch.ones(1, m.arch.in_dim, dtype=torch.float64)
    r = m.head(m.body(ones)).sum()  # the normaliser is bypassed: synflow is data-free
    grads = torch.autograd.grad(r, ws, allow_unused=True)
    s = sum(float((g * w).sum().detach()) for g, w in zip(grads, ws, strict=True) if g is not None)
    return math.log(s) if s > 0 else -1e9


def _layer_outputs(model: Adaptor, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every activation of the body plus the logits, for frames ``x``."""
    m = _work_copy(model)
    outs: list[torch.Tensor] = []
    hooks = [
        mod.register_forward_hook(lambda _m, _i, o: outs.append(o.detach()))
        for mod in m.body
        if isinstance(mod, _ACTS)
    ]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        logits = m(x)
    for h in hooks:
        h.remove()
    return [*outs, logits]


def naswot(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    codes = []
    for out in _layer_outputs(model, x):
        # tanh and GELU pass negatives: "active" is a positive output for every activation.
        codes.append((out.reshape(len(x), -1) > 0).double())
    c = torch.cat(codes, 1)
    k = (c @ c.T + (1 - c) @ (1 - c).T) / c.shape[1]
    _sign, logdet = torch.linalg.slogdet(k)
    return float(logdet) if torch.isfinite(logdet) else -1e9


def jacob_cov(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    m = _work_copy(model)
    xi = x.clone().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = m(xi)
    (jac,) = torch.autograd.grad(out.sum(), xi)
    corr = torch.corrcoef(jac.double())
    corr = torch.nan_to_num(corr, nan=0.0)
    ev = torch.linalg.eigvalsh(corr).clamp_min(0.0)
    k = 1e-5
    return float(-(torch.log(ev + k) + 1.0 / (ev + k)).sum())


def _chunks(y: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` class-stratified index chunks (each class spread evenly over the chunks)."""
    parts: list[list[int]] = [[] for _ in range(n)]
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten().tolist()
        for j, i in enumerate(idx):
            parts[j % n].append(i)
    return [torch.tensor(p, dtype=torch.long) for p in parts if p]


def zico(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    chunks = _chunks(y, 4)
    if len(chunks) < 2:
        raise InputError("zico needs at least 2 frames")
    per: list[list[torch.Tensor]] = []
    for idx in chunks:
        grads, _ = _ce_grads(model, x[idx], y[idx])
        per.append(grads)
    score = 0.0
    for layer in zip(*per, strict=True):
        g = torch.stack([t.flatten() for t in layer]).double()
        mean_abs, std = g.abs().mean(0), g.std(0, unbiased=False)
        ok = std > 0
        s = float((mean_abs[ok] / std[ok]).sum())
        if s > 0:
            score += math.log(s)
    return score


def meco(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    n = min(len(x), 64)
    score = 0.0
    for out in _layer_outputs(model, x[:n]):
        corr = torch.nan_to_num(torch.corrcoef(out.reshape(n, -1).double()), nan=0.0)
        score += float(torch.linalg.eigvalsh(corr)[0])
    return score


def ncm(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    m = _work_copy(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        z = m.embed(x).double()
    z = z - z.mean(0)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    classes = torch.unique(y)
    onehot = (y[:, None] == classes[None, :]).double()
    counts = onehot.sum(0)
    sums = onehot.T @ z  # (C, D)
    # Leave-one-out: each frame's own class mean without it.
    own = sums[torch.searchsorted(classes, y)] - z
    means = sums[None, :, :].expand(len(z), -1, -1).clone()
    idx = torch.searchsorted(classes, y)
    means[torch.arange(len(z)), idx] = own
    denom = counts[None, :].expand(len(z), -1).clone()
    denom[torch.arange(len(z)), idx] -= 1
    means = means / denom.clamp_min(1)[..., None]
    means = means / means.norm(dim=2, keepdim=True).clamp_min(1e-12)
    sim = torch.einsum("nd,ncd->nc", z, means)
    sim[denom == 0] = -2.0  # a class whose only shot is this frame cannot be predicted
    return float((sim.argmax(1) == idx).double().mean())


def _krr_loo(
    k: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, center: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Left-out predictions of kernel ridge regression on one-hot targets, in closed form.

    No fitting loop: with the hat matrix H = K (K + lam I)^-1 the left-out prediction of frame
    i is t_i - (t_i - (H t)_i) / (1 - H_ii). lam = ``alpha`` x the mean kernel diagonal, so the
    result does not depend on the kernel's scale (a candidate's gradient kernel can be 1e6 x
    another's). ``center``: the kernel of mean-removed feature vectors (a regression with an
    intercept, as the trained head has a bias). Returns (left-out predictions, centred
    targets, class index per frame), or None for a kernel with no usable diagonal.
    """
    n = len(k)
    k = k.double()
    if center:
        c = torch.eye(n, dtype=k.dtype) - 1.0 / n
        k = c @ k @ c
    classes, idx = torch.unique(y, return_inverse=True)
    t = torch.nn.functional.one_hot(idx, len(classes)).double()
    t = t - t.mean(0)
    lam = alpha * float(k.diagonal().mean())
    if not math.isfinite(lam) or lam <= 0:
        return None
    eye = torch.eye(n, dtype=k.dtype)
    h = k @ torch.linalg.solve(k + lam * eye, eye)
    loo = t - (t - h @ t) / (1 - h.diagonal()).clamp_min(1e-9)[:, None]
    return loo, t, idx


def _krr_loo_accuracy(
    k: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, center: bool = False
) -> float:
    out = _krr_loo(k, y, alpha, center)
    if out is None:
        return 0.0
    loo, _t, idx = out
    return float((loo.argmax(1) == idx).double().mean())


def _krr_press(k: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, center: bool = False) -> float:
    """Minus the mean left-out squared error (Allen's PRESS statistic per frame)."""
    out = _krr_loo(k, y, alpha, center)
    if out is None or not bool(torch.isfinite(out[0]).all()):
        return -1e9
    loo, t, _idx = out
    return -float(((loo - t) ** 2).sum(1).mean())


def ridge_loo(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    m = _work_copy(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        z = m.embed(x).double()
    z = (z - z.mean(0)) / z.std(0, unbiased=False).clamp_min(1e-6)
    return _krr_loo_accuracy(z @ z.T / z.shape[1], y)


def _per_frame_kernel(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Empirical NTK of the adaptor as training starts, (n, n), float64.

    The adaptor starts where :class:`PrototypeInit` puts it (the head from class means), in eval
    mode (BatchNorm on the shots' statistics, so frames do not interact). Its outputs are
    contracted with one fixed random direction v (the trace of the multi-output NTK in
    expectation; one direction ranked like the exact trace on bench_nas's segments), and the
    kernel is sum over weight tensors of <d(v.f(x_i))/dW, d(v.f(x_j))/dW>. Per-frame gradients
    come from one batched backward pass: a linear layer's is the outer product of its input and
    its output gradient, so its kernel block is (D D^T) * (A A^T + 1) without forming them; a
    conv's is the output gradient times the unfolded input patches (depthwise: per channel);
    BatchNorm's affine pair is included.
    """
    from edge_runtime.adapt.init import PrototypeInit

    m = copy.deepcopy(model)
    PrototypeInit().init(m, x.numpy(), np.asarray(m.label_map)[y.numpy()])
    m.eval()
    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def keep(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        out.retain_grad()
        seen.append((mod, inp[0].detach(), out))

    kinds = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)
    hooks = [mod.register_forward_hook(keep) for mod in m.modules() if isinstance(mod, kinds)]
    try:
        logits = m(x.detach())
    finally:
        for h in hooks:
            h.remove()
    n = len(x)
    v = torch.randn(logits.shape[1], generator=torch.Generator().manual_seed(0))
    (logits * v).sum().backward()
    k = torch.zeros(n, n, dtype=torch.float64)
    for mod, a, out in seen:
        d = out.grad
        if d is None:
            continue
        if isinstance(mod, nn.Linear):
            aa = a.reshape(n, -1) @ a.reshape(n, -1).T
            if mod.bias is not None:
                aa = aa + 1.0
            k += ((d @ d.T) * aa).double()
            continue
        if isinstance(mod, nn.Conv2d):
            u = nn.functional.unfold(a, mod.kernel_size, padding=mod.padding, stride=mod.stride)
            dd = d.reshape(n, d.shape[1], -1)
            if mod.groups == 1:
                g = torch.bmm(dd, u.transpose(1, 2))
            else:  # depthwise: each channel's taps see only that channel's patches
                g = torch.einsum("ncp,nckp->nck", dd, u.reshape(n, a.shape[1], -1, u.shape[-1]))
        else:  # BatchNorm2d in eval mode: y = gamma * x_hat + beta per channel
            mean = mod.running_mean[None, :, None, None]
            std = torch.sqrt(mod.running_var[None, :, None, None] + mod.eps)
            g = torch.cat([(d * (a - mean) / std).sum((2, 3)), d.sum((2, 3))], 1)
        g = g.reshape(n, -1)
        k += (g @ g.T).double()
    return k


#: entk_loo's ridge, in units of the centred kernel's mean diagonal. Mean Spearman on
#: bench_nas's six segments was 0.818 / 0.823 / 0.820 at 2 / 3 / 5 (0.798 at 1, 0.779 at 10).
ENTK_ALPHA = 3.0


def entk_loo(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    return _krr_press(_per_frame_kernel(model, x, y), y, ENTK_ALPHA, center=True)


def lga(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    from torch.func import functional_call, grad, vmap

    m = _work_copy(model).eval()  # per-frame gradients: BatchNorm on its calibrated statistics
    # 64 frames, class-stratified: the kernel is (64, 64) and per-frame gradients stay small.
    pick = torch.cat(_chunks(y, max(1, len(y) // 64)))[:64] if len(y) > 64 else torch.arange(len(y))
    n = len(pick)
    xs, ys = x[pick], y[pick]
    names = [k for k, p in m.named_parameters() if p.ndim > 1]  # conv and linear weights
    weights = {k: p.detach() for k, p in m.named_parameters() if k in names}
    rest = {k: p.detach() for k, p in m.named_parameters() if k not in names}
    buffers = dict(m.named_buffers())

    def loss(w: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(m, (w, rest, buffers), (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(weights, xs, ys)
    flat = torch.cat([g[k].reshape(n, -1) for k in names], 1)
    k = (flat @ flat.T).double()
    onehot = (ys[:, None] == ys[None, :]).double()
    c = torch.eye(n, dtype=k.dtype) - 1.0 / n
    kc, yc = c @ k @ c, c @ onehot @ c
    denom = float(kc.norm() * yc.norm())
    return float((kc * yc).sum()) / denom if denom > 0 else 0.0


def params(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(model.arch.n_params(model.n_classes))


def flops(model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(model.arch.flops(model.n_classes))


@dataclass(frozen=True)
class RankVote:
    """Mean rank of candidates under each member proxy (ties share their mean rank)."""

    members: tuple[str, ...]

    def __call__(self, model: Adaptor, x: torch.Tensor, y: torch.Tensor) -> float:
        raise InputError(
            "vote ranks a population of candidates: use score_population(), not one model"
        )

    def aggregate(self, member_scores: dict[str, Sequence[float]]) -> list[float]:
        ranks = [_ranks(member_scores[name]) for name in self.members]
        return [float(v) for v in np.mean(ranks, axis=0)]


def _ranks(values: Sequence[float]) -> np.ndarray:
    """0-based ranks, higher value = higher rank, ties averaged (NaN ranks lowest)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-np.inf)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=np.float64)
    for u in np.unique(v):
        tie = v == u
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


#: One function + one line per proxy.
PROXIES: dict[str, Proxy] = {
    "naswot": naswot,  # log|K| of binary activation codes (Mellor et al. 2021)
    "synflow": synflow,  # log synaptic flow, data-free (Tanaka et al. 2020)
    "grad_norm": grad_norm,  # sum of per-tensor gradient norms (Abdelfattah et al. 2021)
    "snip": snip,  # sum |w * dL/dw| (Lee et al. 2019)
    "jacob_cov": jacob_cov,  # Jacobian correlation spectrum (Mellor et al. 2020)
    "zico": zico,  # gradient mean/std across chunks (Li et al. 2023)
    "meco": meco,  # min eigenvalue of layer correlations, MeCo-style (Jiang et al. 2023)
    "ncm": ncm,  # leave-one-out nearest-class-mean accuracy of the untrained embedding
    "ridge_loo": ridge_loo,  # closed-form leave-one-out kernel-ridge accuracy of the embedding
    "entk_loo": entk_loo,  # the same with the adaptor's empirical NTK at its starting point
    "lga": lga,  # alignment of the per-frame gradient kernel with the labels (Mok et al. 2022)
    "params": params,  # trainable parameters
    "flops": flops,  # 2 x MACs per frame
    "vote": RankVote(("snip", "synflow", "naswot")),  # mean rank (the vote)
}


def proxy_names(include_vote: bool = True) -> list[str]:
    return [k for k in PROXIES if include_vote or not isinstance(PROXIES[k], RankVote)]


def resolve(name: str) -> Proxy:
    """A registered proxy, or ``vote:a+b+c`` for a rank vote of named proxies."""
    if name.startswith("vote:"):
        members = tuple(p for p in name[5:].split("+") if p)
        unknown = [p for p in members if p not in PROXIES or isinstance(PROXIES[p], RankVote)]
        if not members or unknown:
            raise InputError(f"proxy vote {name!r}: unknown or empty members {unknown}")
        return RankVote(members)
    if name not in PROXIES:
        raise InputError(f"unknown proxy {name!r}; choose one of {sorted(PROXIES)} or vote:a+b")
    return PROXIES[name]


def score_population(
    name: str, per_candidate: Sequence[Callable[[str], float]]
) -> tuple[list[float], dict[str, list[float]]]:
    """Scores of proxy ``name`` for each candidate; ``per_candidate[i](proxy)`` computes one
    plain proxy for candidate i. Returns the scores and every member proxy's raw scores."""
    proxy = resolve(name)
    if isinstance(proxy, RankVote):
        raw = {m: [f(m) for f in per_candidate] for m in proxy.members}
        return proxy.aggregate(raw), raw
    raw = {name: [f(name) for f in per_candidate]}
    return raw[name], raw
