"""Soak: stream many frames through the runtime and check that memory stays flat once warm.

    python benchmarks/soak.py --frames 200000 --out DIR [--size 32] [--sample-every 2000]

Without ``--size`` the encoder runs at the config's default input size (64 px).

The ``fashion-drift-mini`` scenario (six segments: base, four corruptions, back to base) is
served over and over, frame ``i`` being scenario frame ``i mod 1140``, so the run sees a drift
flag, label collection and an adaptation or a return every couple of hundred frames, for as
long as it lasts. Labels come from the scenario (test-then-train, as ``edge-runtime run``).
The runtime is the production one: background adaptation, the serve loop, the memory governor,
``events.jsonl`` written as it goes, and the fleet client with its durable outbox (offline,
pointed at an unused port: every alert stays queued, so the outbox's bound is exercised too).

Every ``--sample-every`` frames it records resident memory (RSS), open file descriptors,
threads, frames/s over the last window, outbox rows and the number of adaptors, and writes
``DIR/soak.json`` and ``DIR/soak.png``. The verdict: RSS growth over the last 75 % of the run
(from the sample at 25 % to the last), less what the adaptors added in that span account for
(their HDC memories and heads, measured as the bytes of their state), under 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from edge_runtime.cli.demo import cached_scenario
from edge_runtime.config import RuntimeConfig
from edge_runtime.data.stream import FrameBatch, load_stream
from edge_runtime.events import JsonlSink
from edge_runtime.fleet.attach import attach
from edge_runtime.runner.labels import StreamLabels
from edge_runtime.runner.loop import ServedBatch, ServeLoop
from edge_runtime.runner.pressure import MemoryGovernor
from edge_runtime.runtime import Runtime
from edge_runtime.state.checkpoint import flatten_state


def _config(size: int | None, outbox: Path, max_outbox: int) -> RuntimeConfig:
    sized = {} if size is None else {"encoder.input_size": str(size)}
    return RuntimeConfig().with_overrides(
        {
            **sized,
            "hdc.dim": "2048",
            "adapt.steps": "60",
            "adapt.label_budget": "40",
            "fleet.enabled": "true",
            "fleet.host": "127.0.0.1",
            "fleet.port": "9",  # discard port: nothing listens, the device serves offline
            "fleet.tls": "false",
            "fleet.device_id": "soak",
            "fleet.outbox_dir": str(outbox),
            "fleet.outbox_max_messages": str(max_outbox),
            "fleet.reconnect_max_s": "30",
        }
    )


def _domain_bytes(rt: Runtime) -> int:
    """Bytes of the adaptors' state (HDC memories, heads, replay buffers): what new adaptors
    may legitimately add to resident memory."""
    _, tensors = flatten_state(rt.domains_set.state_dict())
    return int(sum(a.nbytes for a in tensors.values()))


class Sampler:
    def __init__(self, rt: Runtime, link: Any, every: int) -> None:
        self.rt, self.link, self.every = rt, link, every
        self.proc = psutil.Process()
        self.rows: list[dict[str, Any]] = []
        self._next = 0
        self._t_last = time.perf_counter()
        self._f_last = 0
        self.t0 = self._t_last

    def sample(self, frames: int) -> None:
        now = time.perf_counter()
        mem = self.proc.memory_info()
        self.rows.append(
            {
                "frames": frames,
                "seconds": round(now - self.t0, 2),
                "rss_mb": round(mem.rss / 2**20, 2),
                "open_fds": self.proc.num_fds(),
                "threads": self.proc.num_threads(),
                "fps": round((frames - self._f_last) / max(now - self._t_last, 1e-9), 1),
                "outbox_rows": len(self.link.client.outbox) if self.link is not None else None,
                "adaptors": len(self.rt.domains),
                "domain_bytes": _domain_bytes(self.rt),
            }
        )
        self._t_last, self._f_last = now, frames

    def __call__(self, item: ServedBatch) -> None:
        if item.batch.stop >= self._next:
            self.sample(item.batch.stop)
            self._next = item.batch.stop + self.every


def _batches(images: np.ndarray, total: int, governor: MemoryGovernor) -> Any:
    n = len(images)
    lo = 0
    while lo < total:
        size = min(governor.current_batch, total - lo)
        idx = np.arange(lo, lo + size) % n
        yield FrameBatch(start=lo, stop=lo + size, images=images[idx])
        lo += size


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS growth over the last 75 %, less the adaptors' own bytes added in that span."""
    total = rows[-1]["frames"]
    warm = next(r for r in rows if r["frames"] >= total * 0.25)
    last = rows[-1]
    grown_mb = last["rss_mb"] - warm["rss_mb"]
    adaptor_mb = (last["domain_bytes"] - warm["domain_bytes"]) / 2**20
    beyond = grown_mb - max(adaptor_mb, 0.0)
    pct = 100.0 * beyond / warm["rss_mb"]
    # One sample can sit on either side of a heap trim; the fitted trend and the medians of the
    # first and last thirds after warm-up say whether memory creeps, whatever one sample says.
    after = [r for r in rows if r["frames"] >= warm["frames"]]
    x = np.array([r["frames"] for r in after], float)
    y = np.array([r["rss_mb"] for r in after], float)
    slope = float(np.polyfit(x, y, 1)[0]) * 100_000 if len(after) > 2 else 0.0
    third = max(1, len(after) // 3)
    return {
        "warm_frame": warm["frames"],
        "trend_mb_per_100k_frames": round(slope, 2),
        "median_rss_mb_first_third": round(float(np.median(y[:third])), 2),
        "median_rss_mb_last_third": round(float(np.median(y[-third:])), 2),
        "warm_rss_mb": warm["rss_mb"],
        "last_rss_mb": last["rss_mb"],
        "max_rss_mb_after_warm": max(r["rss_mb"] for r in rows if r["frames"] >= warm["frames"]),
        "growth_mb": round(grown_mb, 2),
        "adaptor_growth_mb": round(adaptor_mb, 2),
        "growth_beyond_adaptors_pct": round(pct, 2),
        "open_fds_warm_last": [warm["open_fds"], last["open_fds"]],
        "threads_warm_last": [warm["threads"], last["threads"]],
        "passes": pct < 5.0,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["frames"] for r in rows]
    fig, axes = plt.subplots(5, 1, figsize=(8, 11), sharex=True)
    for ax, key, label in zip(
        axes,
        ("rss_mb", "open_fds", "threads", "fps", "outbox_rows"),
        ("RSS (MB)", "open fds", "threads", "frames/s", "outbox rows"),
        strict=True,
    ):
        ax.plot(x, [r[key] if r[key] is not None else np.nan for r in rows])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("frames served")
    fig.suptitle("edge_runtime soak (fashion-drift-mini, looped)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/soak"))
    ap.add_argument(
        "--size",
        type=int,
        default=None,
        help="encoder input size (px); default: the config's (64)",
    )
    ap.add_argument("--sample-every", type=int, default=2000)
    ap.add_argument("--max-outbox", type=int, default=20_000)
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    stream = load_stream(cached_scenario("fashion-drift-mini"))
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=out))
    cfg = _config(args.size, work / "outbox", args.max_outbox)
    size = int(cfg.encoder.input_size)
    sized = "" if args.size is None else f" --size {args.size}"
    rt = Runtime(cfg)
    t0 = time.perf_counter()
    rt.fit_base(stream.train_images, stream.train_labels)
    labels = StreamLabels(np.resize(stream.labels, args.frames))
    jsonl = JsonlSink(out / "events.jsonl")
    rt.events.add_sink(labels)
    rt.events.add_sink(jsonl)
    link = attach(rt, cfg.fleet)
    governor = MemoryGovernor(rt, float(cfg.device.memory_budget_mb), int(cfg.encoder.batch_size))
    sampler = Sampler(rt, link, args.sample_every)
    sampler.sample(0)
    loop = ServeLoop(rt, governor.wrap(labels), observers=[governor, sampler])
    try:
        outcome = loop.run(_batches(stream.images, args.frames, governor))
        sampler.sample(outcome.served)
    finally:
        link.close(flush_timeout_s=0.5)
        rt.close()
        jsonl.close()
    rows = sampler.rows
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    counts: dict[str, int] = {}
    for e in events:
        counts[e["type"]] = counts.get(e["type"], 0) + 1
    result = {
        "command": f"python benchmarks/soak.py --frames {args.frames}{sized}",
        "frames": outcome.served,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "encoder_input_size": size,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "event_counts": counts,
        "memory_governor": governor.summary(),
        "verdict": verdict(rows),
        "samples": rows,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, out / "soak.png")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0 if result["verdict"]["passes"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
