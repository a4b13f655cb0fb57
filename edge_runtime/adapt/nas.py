"""Zero-shot NAS: rank the adaptor search space by a training-free proxy on the shots.

:class:`ZeroShotSearch` implements :class:`~edge_runtime.adapt.search.ArchitectureSearch`:
candidates over the budget (parameters, MACs, measured latency) are dropped before anything is
computed; every other candidate is built with :func:`build_adaptor`, its normaliser fitted on
the shots in its own input space, and scored by the proxy; the best score wins (ties: fewer
MACs). Its report (chosen arch, proxy, top-10 scores, seconds, candidates considered / over
budget, encoder passes) is JSON-able and goes into the ``adaptation_finished`` event.

:class:`LatencyTable`: each candidate's adaptor latency on this device (CPU wall ms per frame at
batch 32), measured the first time it is asked for and cached as JSON, so a device measures once.
A conditioned candidate also pays a second encoder pass per routed frame
(``encoder_ms_per_frame``), which the search adds to its latency.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.adapt.adaptor import AdaptorArch, build_adaptor
from edge_runtime.adapt.proxies import RankVote, resolve
from edge_runtime.adapt.search import (
    ArrayInputs,
    CandidateInputs,
    EncodedInputs,
    SearchBudget,
    SearchResult,
    as_inputs,
)
from edge_runtime.adapt.space import default_space
from edge_runtime.errors import InputError

log = logging.getLogger(__name__)

#: The runtime's proxy: the left-out error of kernel regression with each candidate's empirical
#: NTK (see proxies.entk_loo). On benchmarks/bench_nas.py's six segments its mean Spearman with
#: trained accuracy is about 0.8, where the earlier vote:ncm+snip had 0.2-0.4
#: (benchmarks/RESULTS.md).
DEFAULT_PROXY = "entk_loo"
LATENCY_BATCH = 32


# -- latency ------------------------------------------------------------------------------------
def device_key() -> str:
    """Stable id of this CPU, torch build and thread count (what adaptor latency depends on)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    raw = f"{cpu}|{platform.machine()}|torch {torch.__version__}|threads {torch.get_num_threads()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _cache_root() -> Path:
    root = os.environ.get("EDGE_RUNTIME_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "edge_runtime"


class LatencyTable:
    """Adaptor ms/frame per (arch, n_classes) on this device, measured once and cached as JSON.

    ``path`` defaults to ``$EDGE_RUNTIME_CACHE/latency-<device-key>.json`` (else
    ``~/.cache/edge_runtime/...``). A missing, unreadable or malformed file is rebuilt.
    """

    def __init__(self, path: str | Path | None = None, repeats: int = 3) -> None:
        self.path = Path(path) if path else _cache_root() / f"latency-{device_key()}.json"
        self.repeats = int(repeats)
        self.measured = 0  # measurements made by this object (0 = all from the cache)
        self._table = self._load()

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
            table = data["ms_per_frame"]
            if not isinstance(table, dict) or not all(
                isinstance(v, (int, float)) and np.isfinite(v) and v >= 0 for v in table.values()
            ):
                raise ValueError("bad entries")
            return {str(k): float(v) for k, v in table.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("latency table %s is unreadable (%s): rebuilding it", self.path, exc)
            return {}

    def _save(self) -> None:
        payload = {"device_key": device_key(), "batch": LATENCY_BATCH, "ms_per_frame": self._table}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only cache costs re-measuring, never a failed search
            log.warning("cannot write latency table %s: %s", self.path, exc)

    @staticmethod
    def key(arch: AdaptorArch, n_classes: int) -> str:
        d = arch.to_dict()
        d.pop("condition")  # filtering is the encoder's cost, counted separately
        return json.dumps([d, int(n_classes)], sort_keys=True)

    def ms(self, arch: AdaptorArch, n_classes: int) -> float:
        k = self.key(arch, n_classes)
        if k not in self._table:
            self._table[k] = self._measure(arch, n_classes)
            self.measured += 1
            self._save()
        return self._table[k]

    def _measure(self, arch: AdaptorArch, n_classes: int) -> float:
        model = build_adaptor(arch, list(range(n_classes))).eval()
        x = torch.randn(LATENCY_BATCH, arch.in_dim, generator=torch.Generator().manual_seed(0))
        times = []
        with torch.inference_mode():
            model(x)  # warm-up
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1000.0 / LATENCY_BATCH)


# -- the search ---------------------------------------------------------------------------------
def _input_size(inputs: CandidateInputs) -> int | None:
    if isinstance(inputs, EncodedInputs):
        return int(inputs.encoder.spec.input_size)
    return None


def _available(inputs: CandidateInputs, arch: AdaptorArch) -> bool:
    if isinstance(inputs, ArrayInputs):
        return (arch.tap, arch.condition) in inputs.available()
    return True


class ZeroShotSearch:
    """Pick the candidate with the best training-free proxy score under the budget."""

    name = "zero-shot"
    # Seconds per search (tap encodings, every candidate scored): the executor builds on its
    # worker rather than on the serving thread.
    costly = True

    def __init__(
        self,
        space: Sequence[AdaptorArch] | None = None,
        proxy: str = DEFAULT_PROXY,
        seed: int = 0,
        latency: LatencyTable | None = None,
        encoder_ms_per_frame: float = 0.0,
        *,
        input_size: int = 64,
        refine_top: int = 0,
        refine_steps: int = 40,
    ) -> None:
        resolve(proxy)  # an unknown proxy fails here, not at the first drift
        self.space = list(space) if space is not None else None
        self.proxy = proxy
        self.seed = int(seed)
        self.latency = latency
        self.encoder_ms_per_frame = float(encoder_ms_per_frame)
        self.input_size = int(input_size)
        # 0: a pure training-free pick. k > 1: the proxy prunes to its top k, then each is trained
        # ``refine_steps`` steps on 3/4 of the shots and the best on the other 1/4 wins (a cheap
        # tie-break, no longer training-free; the report says so).
        self.refine_top = int(refine_top)
        self.refine_steps = int(refine_steps)

    def candidates(self, inputs: CandidateInputs) -> list[AdaptorArch]:
        pooled_dim = int(np.shape(inputs.get(None))[1])
        if self.space is not None:
            return [a if a.kind == "conv" else a.with_in_dim(pooled_dim) for a in self.space]
        return default_space(pooled_dim, _input_size(inputs) or self.input_size)

    def latency_ms(self, arch: AdaptorArch, n_classes: int) -> float | None:
        """Serving cost per frame beyond the shared encoder pass (None: no table)."""
        if self.latency is None:
            return None
        extra = self.encoder_ms_per_frame if arch.condition != "none" else 0.0
        return self.latency.ms(arch, n_classes) + extra

    def search(
        self,
        inputs: CandidateInputs | np.ndarray,
        labels: np.ndarray,
        label_map: list[int],
        budget: SearchBudget | None = None,
    ) -> SearchResult:
        t0 = time.perf_counter()
        inputs = as_inputs(inputs)
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != inputs.n or len(labels) < 2:
            raise InputError(f"labels must be ({inputs.n},) with at least 2 shots")
        n_cls = len(label_map)
        space = self.candidates(inputs)
        budget = budget or SearchBudget()
        fits: list[AdaptorArch] = []
        over: list[dict[str, Any]] = []
        unavailable = 0
        lat: dict[AdaptorArch, float | None] = {}
        for arch in space:
            if not _available(inputs, arch):
                unavailable += 1
                continue
            lat[arch] = self.latency_ms(arch, n_cls) if budget.max_latency_ms is not None else None
            why = budget.violations(arch, n_cls, lat[arch])
            if why:
                over.append({"arch": arch.label(), "why": why})
            else:
                fits.append(arch)
        if not fits:
            smallest = min(space, key=lambda a: a.n_params(n_cls))
            raise InputError(
                f"no adaptor candidate fits the search budget {budget.to_dict()} for {n_cls} "
                f"classes ({len(over)} over budget, {unavailable} without inputs); the smallest "
                f"is {smallest.label()} with {smallest.n_params(n_cls)} params and "
                f"{smallest.macs(n_cls)} MACs"
            )
        t_filter = time.perf_counter()
        proxy = resolve(self.proxy)
        prepared: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}

        def prepare(i: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
            if i not in prepared:
                arch = fits[i]
                x = torch.as_tensor(inputs.get(arch.tap, arch.condition), dtype=torch.float32)
                model = build_adaptor(arch, label_map, seed=self.seed)
                y = torch.from_numpy(model.to_local(labels))
                model.fit_normalizer(x)
                prepared[i] = (model, x, y)
            return prepared[i]

        raw: dict[str, list[float]] = {}
        members = proxy.members if isinstance(proxy, RankVote) else (self.proxy,)
        for name in members:
            fn = resolve(name)
            raw[name] = [fn(*prepare(i)) for i in range(len(fits))]
        scores = proxy.aggregate(raw) if isinstance(proxy, RankVote) else raw[self.proxy]
        # Best score; ties (e.g. equal NCM accuracy) go to the cheaper candidate.
        order = sorted(range(len(fits)), key=lambda i: (-scores[i], fits[i].macs(n_cls)))
        best = fits[order[0]]
        refined: list[dict[str, Any]] = []
        if self.refine_top > 1 and len(order) > 1:
            top = order[: self.refine_top]
            held = [self._holdout_accuracy(fits[i], prepare(i)[1], labels, label_map) for i in top]
            # Held-out accuracy first; the proxy's order breaks its ties.
            j = max(range(len(top)), key=lambda t: (held[t], -t))
            best = fits[top[j]]
            order = [top[j], *[i for i in order if i != top[j]]]
            refined = [
                {"arch": fits[i].label(), "holdout_accuracy": h}
                for i, h in zip(top, held, strict=True)
            ]
        seconds = time.perf_counter() - t0
        rows = [
            {
                "arch": fits[i].label(),
                "score": float(scores[i]),
                "params": fits[i].n_params(n_cls),
                "macs": fits[i].macs(n_cls),
                **({name: float(v[i]) for name, v in raw.items()} if len(raw) > 1 else {}),
            }
            for i in order
        ]
        report = {
            "method": self.name if not refined else f"{self.name}+refine{self.refine_top}",
            "proxy": self.proxy,
            "arch": best.to_dict(),
            "chosen": best.label(),
            "params": best.n_params(n_cls),
            "macs": best.macs(n_cls),
            "latency_ms": lat.get(best),
            "top": rows[:10],
            "candidates": len(space),
            "considered": len(fits),
            "over_budget": len(over),
            "unavailable": unavailable,
            "encoder_passes": getattr(inputs, "passes", 0),
            "refined": refined,  # empty: the pick is the proxy's alone
            "seconds": round(seconds, 4),
            "filter_seconds": round(t_filter - t0, 4),
        }
        log.info(
            "zero-shot search: %s (%s=%.4g) from %d candidates in %.2fs",
            best.label(),
            self.proxy,
            scores[order[0]],
            len(fits),
            seconds,
        )
        return SearchResult(best, self.name, scores=rows, report=report)

    def _holdout_accuracy(
        self, arch: AdaptorArch, x: torch.Tensor, labels: np.ndarray, label_map: list[int]
    ) -> float:
        """Accuracy on every 4th shot of each class after ``refine_steps`` steps on the rest."""
        from edge_runtime.adapt.adaptor import train_adaptor
        from edge_runtime.adapt.init import PrototypeInit

        held = np.zeros(len(labels), dtype=bool)
        for c in np.unique(labels):
            held[np.flatnonzero(labels == c)[::4]] = True
        xn = x.numpy()
        model = build_adaptor(arch, label_map, seed=self.seed)
        PrototypeInit().init(model, xn[~held], labels[~held])
        train_adaptor(
            model,
            xn[~held],
            labels[~held],
            steps=self.refine_steps,
            seed=self.seed,
            fit_normalizer=False,
        )
        return float((model.predict(xn[held]) == labels[held]).mean())
