"""The demo timeline: rolling accuracy, OOD score vs threshold, flags, adaptations, segments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_runtime.data.stream import Stream


def rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` frames (shorter at the start)."""
    x = np.asarray(x, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_timeline(
    run_dir: str | Path,
    stream: Stream,
    *,
    out: str | Path | None = None,
    title: str = "",
    window: int = 100,
) -> Path:
    """Read ``frames.npz`` + ``events.jsonl`` from ``run_dir`` and write ``timeline.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    frames = np.load(run_dir / "frames.npz", allow_pickle=False)
    events = [
        json.loads(line)
        for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    pred = frames["prediction"]
    n = len(pred)
    labels = stream.labels[:n]
    t = np.arange(n)
    acc = rolling_mean(pred == labels, window) * 100.0
    score = frames["ood_score"].astype(np.float64)
    score = np.where(np.isfinite(score), score, np.nan)

    fig, (ax1, ax2, ax3) = plt.subplots(
        3, 1, figsize=(13, 8), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1]}
    )
    ax1.plot(t, acc, color="tab:blue", lw=1.2, label=f"rolling accuracy ({window} frames)")
    ax1.set_ylabel("accuracy (%)")
    ax1.set_ylim(0, 100)
    ax2.plot(t, score, ".", ms=1.2, color="tab:gray", alpha=0.5, label="OOD score (frame)")
    ax2.plot(
        t,
        rolling_mean(np.nan_to_num(score, nan=0.0), 25),
        color="tab:green",
        lw=1.0,
        label="OOD score (25-frame mean)",
    )
    ax2.axhline(0.0, color="tab:red", ls="--", lw=1, label="threshold (calibrated 0)")
    lo, hi = np.nanpercentile(score, [1, 99]) if np.isfinite(score).any() else (-1.0, 1.0)
    pad = 0.1 * (hi - lo + 1e-9)
    ax2.set_ylim(lo - pad, hi + pad)
    ax2.set_ylabel("score (higher = ID)")

    ax3.step(t, frames["domain"], where="post", color="tab:purple", lw=1)
    ax3.set_ylabel("domain")
    ax3.set_xlabel("frame")

    seg_meta = stream.meta.get("segments", []) if isinstance(stream.meta, dict) else []
    for s in range(stream.num_segments):
        start, _ = stream.segment_bounds(s)
        for ax in (ax1, ax2, ax3):
            ax.axvline(start, color="black", lw=0.6, alpha=0.5)
        if start < n:
            name = seg_meta[s].get("name", f"seg {s}") if s < len(seg_meta) else f"seg {s}"
            ax1.text(start + 5, 97, name, va="top", fontsize=8)
    marks = {
        "drift": ("tab:red", "drift flag"),
        "novel_class": ("tab:orange", "novel-class flag"),
        "adaptation_started": ("tab:olive", "adaptation started"),
        "adaptation_finished": ("tab:green", "adaptation finished"),
        "domain_returned": ("tab:cyan", "return to known domain"),
    }
    seen: set[str] = set()
    for e in events:
        kind = e.get("type")
        if kind not in marks or not 0 <= int(e.get("frame", -1)) < n:
            continue
        color, label = marks[kind]
        for ax in (ax1, ax2):
            ax.axvline(
                int(e["frame"]),
                color=color,
                ls=":",
                lw=1.4,
                label=label if kind not in seen and ax is ax1 else None,
            )
        seen.add(kind)
    ax1.legend(loc="lower left", fontsize=7, ncol=3)
    ax2.legend(loc="lower left", fontsize=7, ncol=3)
    if title:
        ax1.set_title(title)
    fig.tight_layout()
    path = Path(out) if out is not None else run_dir / "timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
