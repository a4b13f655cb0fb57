"""Does the fast HDC path keep the quality of the float cosine path? (the kernels issue's bar)

    python benchmarks/eval_hdc_fastpath.py [--quick] [--config C.yaml | --profile NAME]
                                           [--out benchmarks/out]

On the ``fashion-drift`` stream, with the runtime's encoder and HDC bank built from one runtime
config (the built-in defaults unless ``--config`` / ``--profile``) by the runtime's own
factories (``build_encoder``, ``make_bank``), four paths see the same exemplars and the same
(leave-one-out) calibration frames of every domain:

  fast       the runtime's bank as the config builds it: projection → sign → bit-packed
             exemplars → Hamming scan keeping ``hdc.rerank`` candidates per domain → their
             exact angles → k-NN (``DomainMemoryBank``, through ``edge_runtime.kernels``)
  hamming    the runtime config with ``hdc.rerank=0``: the same scan scored by the Hamming
             estimate alone
  float      the fast bank's projection kept real: MAP hypervectors (torchhd) → exact cosine
             k-NN, each neighbour's cosine mapped to its angular similarity 1 - 2·acos(cos)/π,
             the value a sign code's Hamming similarity estimates (the angle-average reference)
  float-cos  the same neighbours, their cosines averaged as they are (the plain cosine
             reference)

Agreement is reported against both references. The bar is held against ``float``: the sign
codes estimate angles (SimHash), so ``float`` is the exact value of what the fast path
approximates; ``float-cos`` puts the same neighbours on a compressed scale whose margins
between domains differ, so disagreeing with it measures the change of scale, not the codes.

Domains: the base (training set) and one per shift segment (its first 200 frames after a
10-frame detection delay, as the runtime would collect them). Reported: near-OOD AUROC (base
eval frames vs the novel-class segment's eval frames, scored by the base memory alone, as
before adapting), far-OOD AUROC (base vs MNIST eval frames), and the fraction of eval frames
whose routing decision (argmax of calibrated scores, or OOD) is identical to the fast path's.
Bar: AUROC within 0.5 point, routing at least 99% identical. Writes ``hdc_fastpath.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torchhd
from eval_setup import (
    add_config_args,
    build_encoder,
    config_source,
    encoder_line,
    make_bank,
    override_label,
    runtime_config,
)

from edge_runtime import kernels
from edge_runtime.cli.demo import cached_scenario
from edge_runtime.data import load_stream
from edge_runtime.encoder.cache import cached_features
from edge_runtime.hdc.bank import DomainMemoryBank
from edge_runtime.hdc.base import threshold_for_tpr
from edge_runtime.hdc.memory import select_exemplars
from edge_runtime.hdc.metrics import auroc

SHOTS, DELAY = 200, 10


class FloatCosineBank:
    """The float reference: same exemplars and leave-one-out calibration as
    ``DomainMemoryBank.add_domain``, exact cosine k-NN on the real hypervectors.

    ``scale="angle"`` averages each neighbour's angular similarity ``1 - 2·acos(cos)/π``,
    the exact value of what a sign code's bipolar Hamming similarity estimates (SimHash),
    so both paths put thresholds and routing margins on one scale. ``scale="cosine"``
    averages the cosines themselves (same neighbours, a different, compressed scale).
    """

    def __init__(self, bank: DomainMemoryBank, scale: str = "angle"):
        self.encoder = copy.deepcopy(bank.encoder)  # every setting, and its own fitted state
        self.k, self.tpr, self.seed, self.scale = bank.k, bank.tpr, bank.seed, scale
        self.max_exemplars, self.rows = bank.max_exemplars, bank.calibration_rows
        self.memories: list[torch.Tensor] = []
        self.thresholds: list[float] = []

    def _score(
        self, hv: torch.Tensor, memory: torch.Tensor, own: torch.Tensor | None = None
    ) -> np.ndarray:
        """Mean of the k best neighbour similarities; ``own[i]`` (a memory row, or -1) is
        never query i's neighbour (leave-one-out calibration)."""
        out = []
        k = min(self.k, memory.shape[0])
        for i in range(0, len(hv), 1024):
            sim = torchhd.cosine_similarity(hv[i : i + 1024], memory).as_subclass(torch.Tensor)
            if own is not None:
                mine = own[i : i + 1024]
                hit = torch.nonzero(mine >= 0).flatten()
                sim[hit, mine[hit]] = float("-inf")
            val = torch.topk(sim, k, dim=1).values
            finite = torch.isfinite(val)  # a masked self row, when memory has <= k rows
            if self.scale == "angle":
                val = kernels.angular_similarity(val)
            out.append(torch.where(finite, val, 0.0).sum(dim=1) / finite.sum(dim=1))
        return torch.cat(out).numpy()

    def add_domain(self, domain_id: int, x: np.ndarray, y: np.ndarray) -> None:
        if self.encoder.in_features is None:
            self.encoder.fit(x)
        keep = torch.from_numpy(select_exemplars(y, self.max_exemplars, self.seed + domain_id))
        memory = self.encoder.encode_float(x[keep.numpy()]).as_subclass(torch.Tensor)
        self.memories.append(memory)
        own = torch.full((len(x),), -1, dtype=torch.int64)
        own[keep] = torch.arange(len(keep))
        cal = self.rows(len(x), self.seed + domain_id)
        hv = self.encoder.encode_float(x[cal.numpy()]).as_subclass(torch.Tensor)
        self.thresholds.append(threshold_for_tpr(self._score(hv, memory, own[cal]), self.tpr))

    def scores(self, x: np.ndarray) -> np.ndarray:
        hv = self.encoder.encode_float(x).as_subclass(torch.Tensor)
        return np.stack([self._score(hv, m) for m in self.memories], axis=1)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fashion-drift-mini")
    ap.add_argument("--out", default="benchmarks/out")
    add_config_args(ap)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = runtime_config(args)
    scenario = "fashion-drift-mini" if args.quick else "fashion-drift"
    stream = load_stream(cached_scenario(scenario))
    enc = build_encoder(cfg)
    f_train = cached_features(enc, stream.train_images, "train", progress=True)
    f_stream = cached_features(enc, stream.images, "stream", progress=True)
    f_eval = cached_features(enc, stream.eval_images, "eval", progress=True)

    h = cfg.hdc
    hamming_overrides = {"hdc.rerank": 0}
    fast = make_bank(cfg, enc.spec)
    paths: dict[str, DomainMemoryBank | FloatCosineBank] = {
        "fast": fast,
        "hamming": make_bank(cfg.with_overrides(hamming_overrides), enc.spec),
        "float": FloatCosineBank(fast, "angle"),
        "float-cos": FloatCosineBank(fast, "cosine"),
    }
    labels = {
        "fast": override_label({}),
        "hamming": override_label(hamming_overrides),
        "float": "angle-average reference: fast's projection kept real, exact angles",
        "float-cos": "plain cosine reference: the same neighbours, cosines averaged",
    }
    shots = min(SHOTS, int(np.bincount(stream.segment).min()) - DELAY)
    domains = {0: (f_train, stream.train_labels)}
    for s in np.flatnonzero(stream.segment_is_shift):
        if not stream.is_novel[stream.segment == s].any():  # a return: no new domain
            continue
        idx = np.flatnonzero(stream.segment == s)[DELAY : DELAY + shots]
        domains[int(s)] = (f_stream[idx], stream.labels[idx])
    timings = {}
    for name, bank in paths.items():
        t0 = time.perf_counter()
        for d, (x, y) in domains.items():
            bank.add_domain(d, x, y)
        timings[name] = {"build_s": time.perf_counter() - t0}

    seg = stream.eval_segment
    base = seg == 0
    base_labels = set(stream.train_labels.tolist())

    def labels_of(s: int) -> set[int]:
        return set(stream.labels[stream.segment == s].tolist())

    # near OOD: new Fashion classes (ids < 10) unseen in training; far OOD: MNIST (ids >= 10)
    novel_seg = next(
        (s for s in domains if s and not labels_of(s) & base_labels and max(labels_of(s)) < 10),
        None,
    )
    far_seg = next((s for s in domains if s and min(labels_of(s)) >= 10), None)
    rows = {}
    ids = np.asarray(list(domains), dtype=np.int64)
    # the domain each eval frame belongs to: its segment's, or the base for a return segment
    true_domain = np.array([s if s in domains else 0 for s in seg.tolist()], dtype=np.int64)
    for name, bank in paths.items():
        t0 = time.perf_counter()
        raw = bank.scores(f_eval)
        timings[name]["score_s"] = time.perf_counter() - t0
        cal = raw - np.asarray(bank.thresholds, dtype=np.float32)
        best = cal.argmax(axis=1)
        route = np.where(cal[np.arange(len(cal)), best] >= 0, ids[best], -1)
        base_score = raw[:, 0]
        row = {
            "route": route,
            "domain": ids[best],
            "routing_accuracy": float(np.mean(ids[best] == true_domain)),
        }
        for key, s in (("near_auroc", novel_seg), ("far_auroc", far_seg)):
            if s is not None:
                ood = seg == s
                row[key] = auroc(base_score[base], base_score[ood])
        rows[name] = row
    # routing = the domain a frame is sent to; the in/out decision near a threshold is
    # reported apart, since any change of score flips frames that sit right on it.
    for name in paths:
        rows[name]["routing_identical_to_fast"] = float(
            np.mean(rows["fast"]["domain"] == rows[name]["domain"])
        )
        rows[name]["route_and_ood_identical_to_fast"] = float(
            np.mean(rows["fast"]["route"] == rows[name]["route"])
        )
    # Agreement of the fast path with each reference; the bar is held against "float".
    agreement = {
        ref: {
            "routing_identical": rows[ref]["routing_identical_to_fast"],
            "route_and_ood_identical": rows[ref]["route_and_ood_identical_to_fast"],
            "near_auroc_gap_pt": 100 * abs(rows["fast"]["near_auroc"] - rows[ref]["near_auroc"]),
            "far_auroc_gap_pt": 100 * abs(rows["fast"]["far_auroc"] - rows[ref]["far_auroc"]),
        }
        for ref in ("float", "float-cos")
    }
    result = {
        "scenario": scenario,
        "encoder": encoder_line(enc),
        "hdc": h.model_dump(),
        "labels": labels,
        "domains": {int(d): len(v[1]) for d, v in domains.items()},
        "near_ood_segment": novel_seg,
        "far_ood_segment": far_seg,
        **{
            name: {k: v for k, v in rows[name].items() if k not in ("route", "domain")}
            for name in paths
        },
        "agreement": agreement,
        "bar_reference": "float",
        "timings": timings,
    }
    print(
        f"{scenario}, runtime config = {config_source(args)}: encoder {encoder_line(enc)}; "
        f"HDC D={h.dim} {h.projection}, k={h.k}, "
        f"rerank={h.rerank}, tpr={h.tpr}; domains {result['domains']}\n"
    )
    print(
        "| path | what it is | near AUROC | far AUROC | eval frames routed to their own domain "
        "| same route as fast | same route and in/out decision as fast |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in paths:
        r = result[name]
        print(
            f"| {name} | {labels[name]} | {100 * r['near_auroc']:.2f} | "
            f"{100 * r['far_auroc']:.2f} | {100 * r['routing_accuracy']:.2f}% | "
            f"{100 * r['routing_identical_to_fast']:.2f}% | "
            f"{100 * r['route_and_ood_identical_to_fast']:.2f}% |"
        )
    print()
    for ref, a in agreement.items():
        print(
            f"fast vs {ref}: routing identical {100 * a['routing_identical']:.2f}% "
            f"(route and in/out decision {100 * a['route_and_ood_identical']:.2f}%), "
            f"|Δnear| {a['near_auroc_gap_pt']:.2f} pt, |Δfar| {a['far_auroc_gap_pt']:.2f} pt"
        )
    bar = agreement["float"]
    ok = bar["near_auroc_gap_pt"] <= 0.5 and bar["far_auroc_gap_pt"] <= 0.5
    ok = ok and bar["routing_identical"] >= 0.99
    print(
        "the bar is held against float: the sign codes estimate angles, so float is the exact "
        "value of what the fast path approximates"
    )
    print(f"{'PASS' if ok else 'FAIL'}: vs float, AUROC within 0.5 pt and >= 99% routing identical")
    result["pass"] = ok
    (out / "hdc_fastpath.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out / 'hdc_fastpath.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
