"""Proto-MAML with Meta-SGD step sizes, written with ``torch.func`` over any :class:`Adaptor`.

What is learned, per adaptor family (an :class:`AdaptorArch` without its output width):

* ``body``: the initial weights of every parameter that is not the output layer (none for a
  linear head). The output layer is never meta-learned: each task sets it from its own class
  means (Proto-MAML, Triantafillou et al. 2020), so a new label set or a new class count costs
  nothing and the head starts as a nearest-class-mean classifier.
* ``log_lr``: one step size per parameter tensor (Meta-SGD, Li et al. 2017, per layer); the
  output layer's weight gets one per input column, which does not depend on the class count.
* ``log_gain``: a per-feature gain on the normalised features, folded into the adaptor's
  ``feat_std`` buffer at install. For a linear head it is the only place a metric can be
  learned: it decides which encoder channels the prototypes (and the steps) listen to.
* ``log_scale``: the prototype logits' temperature, relative to PrototypeInit's 1/|z|^2.
* ``log_prior_std``, ``log_kappa``: the feature normaliser's spread is the support's variance
  shrunk toward a learned prior, with weight ``n / (n + kappa)`` on the support's ``n`` frames:
  from one shot per class the support's own per-feature spread is mostly noise, from 30 it is
  the new domain's. (The mean is always the support's: centring on the new domain matters.)

The inner loop is plain SGD with those step sizes on the support set; the outer loss is the
query cross-entropy after ``inner_steps`` steps, averaged over a batch of tasks with ``vmap``.
``first_order`` drops the inner gradients' own graph (FOMAML); the prototypes stay in the graph
either way. The adaptor is called only through ``functional_call`` on its ``embed`` and
``forward``, with its parameters and buffers as a dict, so any family whose forward is
functional (linear, MLP) works unchanged.

The conv family (1-2 convs + BatchNorm on a tap map) is different: a BatchNorm module that
updates running statistics is not functional inside ``vmap``. Its body is run by
:meth:`ProtoMAML.embed` layer by layer instead, with BatchNorm written out as the runtime uses
it: the support (and every fast step on it) normalises with its own batch statistics, as
``train_adaptor`` does in training mode; the adapted adaptor then carries the support's
statistics at its final weights as running statistics (``running_var`` unbiased, exactly what
``Adaptor.calibrate_batchnorm`` stores at install), and the query is scored in eval mode with
them, as the installed head serves. Each task thus has its own statistics and nothing is
shared between the tasks of a ``vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from edge_runtime.adapt.adaptor import Adaptor, AdaptorArch, build_adaptor
from edge_runtime.errors import InputError

Params = dict[str, torch.Tensor]

HEAD_W, HEAD_B = "head.weight", "head.bias"
_RUNNING = ("running_mean", "running_var")


class _Embed(nn.Module):
    """``adaptor.embed`` as a module's forward, so ``functional_call`` can swap its tensors."""

    def __init__(self, adaptor: Adaptor) -> None:
        super().__init__()
        self.a = adaptor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a.embed(x)


def family_name(arch: AdaptorArch) -> str:
    """The key a meta-init file is stored under: everything about the arch but the classes."""
    act = "" if arch.activation == "relu" else f"-{arch.activation}"
    cond = "" if arch.condition == "none" else f"-{arch.condition}"
    if arch.kind == "linear":
        return f"linear-{arch.in_dim}{cond}"
    if arch.kind == "mlp":
        return f"mlp-{arch.in_dim}-{arch.hidden}x{arch.depth}{act}{cond}"
    shape = "x".join(str(v) for v in arch.in_shape or ())
    sep = "-sep" if arch.separable else ""
    return f"{arch.kind}-t{arch.tap}-{shape}-{arch.convs}x{arch.width}{sep}{act}{cond}"


@dataclass
class MetaParams:
    """The meta-learned tensors of one family (see the module docstring)."""

    body: Params
    log_lr: Params
    log_gain: torch.Tensor
    log_scale: torch.Tensor
    log_prior_std: torch.Tensor
    log_kappa: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat, safetensors-ready."""
        out = {f"body.{k}": v for k, v in self.body.items()}
        out |= {f"log_lr.{k}": v for k, v in self.log_lr.items()}
        out["log_gain"], out["log_scale"] = self.log_gain, self.log_scale
        out["log_prior_std"], out["log_kappa"] = self.log_prior_std, self.log_kappa
        return {k: v.detach().contiguous().clone() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> MetaParams:
        body = {k[5:]: v for k, v in t.items() if k.startswith("body.")}
        log_lr = {k[7:]: v for k, v in t.items() if k.startswith("log_lr.")}
        return cls(body, log_lr, t["log_gain"], t["log_scale"], t["log_prior_std"], t["log_kappa"])

    def leaves(self) -> list[torch.Tensor]:
        return [
            *self.body.values(),
            *self.log_lr.values(),
            self.log_gain,
            self.log_scale,
            self.log_prior_std,
            self.log_kappa,
        ]

    def requires_grad_(self) -> MetaParams:
        for v in self.leaves():
            v.requires_grad_(True)
        return self


def expected_shapes(arch: AdaptorArch) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape a meta-init file of ``arch``'s family must hold."""
    template = build_adaptor(arch, [0, 1])
    out: dict[str, tuple[int, ...]] = {}
    for name, p in template.named_parameters():
        if name == HEAD_W:
            out[f"log_lr.{name}"] = (p.shape[1],)
            continue
        if name != HEAD_B:
            out[f"body.{name}"] = tuple(p.shape)
        out[f"log_lr.{name}"] = ()
    out["log_gain"], out["log_scale"] = (arch.in_dim,), ()
    out["log_prior_std"], out["log_kappa"] = (arch.in_dim,), ()
    return out


def initial_meta_params(
    arch: AdaptorArch,
    seed: int = 0,
    init_lr: float = 0.5,
    prior_std: torch.Tensor | None = None,
) -> MetaParams:
    """Torch's default init for the body, ``init_lr`` everywhere, unit gain and scale, and a
    normaliser prior (``prior_std``, default 1) that the support outweighs from a few frames
    (kappa = 2): close to prototype init plus SGD steps, the baseline to beat."""
    template = build_adaptor(arch, [0, 1], seed=seed)
    body = {
        k: v.detach().clone() for k, v in template.named_parameters() if k not in (HEAD_W, HEAD_B)
    }
    log_lr = {}
    for k, v in template.named_parameters():
        shape = (v.shape[1],) if k == HEAD_W else ()
        log_lr[k] = torch.full(shape, math.log(init_lr))
    prior = torch.ones(arch.in_dim) if prior_std is None else prior_std.float().clamp_min(1e-4)
    return MetaParams(
        body,
        log_lr,
        torch.zeros(arch.in_dim),
        torch.zeros(()),
        prior.log().clone(),
        torch.tensor(math.log(2.0)),
    )


class ProtoMAML:
    """The functional model of one family: prototype head, fast steps, query loss.

    ``template`` only supplies the code (``embed``/``forward``); its own tensors are never used.
    """

    def __init__(self, arch: AdaptorArch, inner_steps: int = 5, first_order: bool = False):
        if inner_steps < 0:
            raise InputError(f"inner_steps must be >= 0, got {inner_steps}")
        if arch.dropout:
            arch = AdaptorArch(**{**arch.to_dict(), "dropout": 0.0})  # steps are deterministic
        self.arch = arch
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.template = build_adaptor(arch, [0, 1]).eval()
        self._embed = _Embed(self.template)
        self.batchnorm = self.template.has_batchnorm

    # -- pieces --------------------------------------------------------------------------------
    def normaliser(
        self, xs: torch.Tensor, meta: MetaParams, weight: torch.Tensor | None = None
    ) -> Params:
        """The adaptor's feature normaliser from the support (as ``fit_normalizer``, its spread
        shrunk toward the learned prior), with the learned gain folded into ``feat_std``.
        ``weight`` (rows, summing to 1): a weighted support counts as its effective size."""
        if self.arch.normalize:
            if weight is None:
                mean, raw, n = xs.mean(0), xs.var(0, unbiased=False), float(xs.shape[0])
            else:
                mean = weight @ xs
                raw = weight @ (xs - mean).pow(2)
                n = 1.0 / weight.pow(2).sum()  # Kish's effective sample size
            w = n / (n + meta.log_kappa.exp())
            var = w * raw + (1 - w) * (2 * meta.log_prior_std).exp()
            std = var.clamp_min(1e-12).sqrt()
        else:
            mean, std = torch.zeros_like(xs[0]), torch.ones_like(xs[0])
        return {"feat_mean": mean, "feat_std": std / meta.log_gain.exp()}

    def embed(self, body: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        """The head's input. A BatchNorm family uses ``buffers``' running statistics where they
        are present (eval mode) and the batch's own otherwise (training mode)."""
        if self.batchnorm:
            return self._conv_embed(body, buffers, x)[0]
        state = {f"a.{k}": v for k, v in (body | buffers).items()}
        return functional_call(self._embed, state, (x,))

    def logits(self, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        if self.batchnorm:
            return F.linear(self.embed(params, buffers, x), params[HEAD_W], params[HEAD_B])
        return functional_call(self.template, params | buffers, (x,))

    def batchnorm_stats(self, params: Params, buffers: Params, x: torch.Tensor) -> Params:
        """Running statistics of every BatchNorm from ``x``'s batch at ``params`` (what
        ``Adaptor.calibrate_batchnorm`` sets at install); empty for a family without one."""
        if not self.batchnorm:
            return {}
        plain = {k: v for k, v in buffers.items() if not k.endswith(_RUNNING)}
        return self._conv_embed(params, plain, x)[1]

    def _conv_embed(
        self, body: Params, buffers: Params, x: torch.Tensor
    ) -> tuple[torch.Tensor, Params]:
        """The conv body written out functionally (see the module docstring); also returns the
        running statistics each training-mode BatchNorm would store for this batch."""
        h = (x - buffers["feat_mean"]) / buffers["feat_std"]
        stats: Params = {}
        for i, m in enumerate(self.template.body):
            key = f"body.{i}"
            if isinstance(m, nn.Conv2d):
                h = F.conv2d(
                    h, body[f"{key}.weight"], None, m.stride, m.padding, m.dilation, m.groups
                )
            elif isinstance(m, nn.BatchNorm2d):
                if f"{key}.running_mean" in buffers:
                    mean, var = buffers[f"{key}.running_mean"], buffers[f"{key}.running_var"]
                else:
                    mean = h.mean((0, 2, 3))
                    var = h.var((0, 2, 3), unbiased=False)
                    n = h.numel() // h.shape[1]
                    stats[f"{key}.running_mean"] = mean
                    stats[f"{key}.running_var"] = var * (n / max(n - 1, 1))
                scale = torch.rsqrt(var + m.eps) * body[f"{key}.weight"]
                shift = body[f"{key}.bias"] - mean * scale
                h = h * scale[:, None, None] + shift[:, None, None]
            else:  # reshape, activation, pooling, flatten: no tensors of their own
                h = m(h)
        return h, stats

    @staticmethod
    def prototype_head(
        z: torch.Tensor,
        y: torch.Tensor,
        n_way: int,
        log_scale: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PrototypeInit's head (class means, 1/|z|^2 scale) times the learned temperature;
        with ``weight``, weighted class means (a class's shots outweigh its replayed rows)."""
        onehot = (y[:, None] == torch.arange(n_way, device=y.device)).to(z.dtype)
        if weight is None:
            weight = torch.full_like(z[:, 0], 1.0 / z.shape[0])
        mass = onehot * weight[:, None]
        # A class with no shot keeps a zero prototype.
        protos = (mass.T @ z) / mass.sum(0).clamp_min(1e-12)[:, None]
        scale = log_scale.exp() / (weight @ z.pow(2).sum(1)).clamp_min(1e-6)
        return 2.0 * scale * protos, -scale * protos.pow(2).sum(1)

    # -- one task ------------------------------------------------------------------------------
    def adapt(
        self,
        meta: MetaParams,
        xs: torch.Tensor,
        ys: torch.Tensor,
        n_way: int,
        steps: int | None = None,
        weight: torch.Tensor | None = None,
    ) -> tuple[Params, Params]:
        """Initialise from ``meta`` and the support, then ``steps`` (default ``inner_steps``)
        Meta-SGD steps; returns (parameters, buffers) of the adapted adaptor (a BatchNorm
        family's buffers include the support's running statistics at the final weights).

        ``weight``: per-row weights of the support, as ``train_adaptor``'s ``sample_weight``
        (the runtime's train set is a few shots plus hundreds of replayed rows, weighted half
        and half): the normaliser, the prototypes and the fast steps' loss use them. Episodes
        are balanced, so meta-training passes none (uniform)."""
        if weight is not None:
            weight = weight / weight.sum()
        buffers = self.normaliser(xs, meta, weight)
        z = self.embed(meta.body, buffers, xs)
        w, b = self.prototype_head(z, ys, n_way, meta.log_scale, weight)
        params: Params = dict(meta.body) | {HEAD_W: w, HEAD_B: b}
        lrs = {k: v.exp() for k, v in meta.log_lr.items()}

        def support_loss(p: Params) -> torch.Tensor:
            out = self.logits(p, buffers, xs)
            if weight is None:
                return F.cross_entropy(out, ys)
            return (F.cross_entropy(out, ys, reduction="none") * weight).sum()

        step_grad: Callable[[Params], Params] = grad(support_loss)
        for _ in range(self.inner_steps if steps is None else int(steps)):
            g = step_grad(params)
            if self.first_order:
                g = {k: v.detach() for k, v in g.items()}
            params = {k: params[k] - lrs[k] * g[k] for k in params}
        return params, buffers | self.batchnorm_stats(params, buffers, xs)

    def query_loss(
        self,
        meta: MetaParams,
        xs: torch.Tensor,
        ys: torch.Tensor,
        xq: torch.Tensor,
        yq: torch.Tensor,
        n_way: int,
        steps: int | None = None,
        ws: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(query cross-entropy, query accuracy) after adapting on the (``ws``-weighted)
        support."""
        params, buffers = self.adapt(meta, xs, ys, n_way, steps, ws)
        out = self.logits(params, buffers, xq)
        return F.cross_entropy(out, yq), (out.argmax(1) == yq).float().mean()

    # -- a batch of tasks ----------------------------------------------------------------------
    def batch_loss(
        self,
        meta: MetaParams,
        xs: torch.Tensor,
        ys: torch.Tensor,
        xq: torch.Tensor,
        yq: torch.Tensor,
        n_way: int,
        steps: int | None = None,
        ws: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean query loss and accuracy over stacked tasks (leading dim), vmapped; ``ws``:
        (tasks, support) row weights, or None (uniform)."""

        def one(
            a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, *w: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return self.query_loss(meta, a, b, c, d, n_way, steps, w[0] if w else None)

        loss, acc = vmap(one)(xs, ys, xq, yq, *(() if ws is None else (ws,)))
        return loss.mean(), acc.mean()

    # -- onto a real adaptor -------------------------------------------------------------------
    @torch.no_grad()
    def install(self, adaptor: Adaptor, params: Params, buffers: Params) -> None:
        """Copy adapted tensors into ``adaptor`` (its own label map; same family)."""
        state = adaptor.state_dict()
        for k, v in (params | buffers).items():
            if k not in state or state[k].shape != v.shape:
                raise InputError(f"meta-init tensor {k} {tuple(v.shape)} does not fit the adaptor")
            state[k].copy_(v.detach())


def describe_meta(meta: MetaParams) -> dict[str, Any]:
    """Readable summary of the learned step sizes and temperature (for logs and manifests)."""
    lrs = {k: round(float(v.exp().mean()), 5) for k, v in meta.log_lr.items()}
    gain = meta.log_gain.exp()
    return {
        "step_sizes": lrs,
        "scale": round(float(meta.log_scale.exp()), 5),
        "gain_min": round(float(gain.min()), 5),
        "gain_max": round(float(gain.max()), 5),
    }
