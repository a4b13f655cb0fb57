"""End to end: serve a built-in scenario through the runtime; quality, speed and the checks.

    python benchmarks/bench_e2e.py [--quick] [--scenario fashion-drift] [--out benchmarks/out]

Prints the per-segment table, the runtime against naive fine-tuning and the joint upper bound
(same labels, same head family), and writes ``e2e.json`` plus ``e2e_timeline.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from edge_runtime.cli.demo import cached_scenario
from edge_runtime.cli.run import format_summary
from edge_runtime.config import load_config
from edge_runtime.data import load_stream
from edge_runtime.plots import plot_timeline
from edge_runtime.runner import run_stream


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fashion-drift-mini, small budget")
    ap.add_argument("--scenario", default=None)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    name = args.scenario or ("fashion-drift-mini" if args.quick else "fashion-drift")
    cfg = load_config(None)
    if args.quick:
        cfg = cfg.with_overrides({"adapt.label_budget": 40, "adapt.steps": 100})
    out = Path(args.out)
    run_dir = out / f"e2e-{name}"
    t0 = time.perf_counter()
    stream = load_stream(cached_scenario(name))
    res = run_stream(stream, cfg, run_dir, progress=False)
    wall = time.perf_counter() - t0
    png = plot_timeline(run_dir, stream, out=out / "e2e_timeline.png", title=f"e2e: {name}")
    print(format_summary(res.metrics))
    row = {
        "scenario": name,
        "wall_seconds": round(wall, 2),
        "machine": platform.processor() or platform.machine(),
        "metrics": res.metrics,
    }
    (out / "e2e.json").write_text(json.dumps(row, indent=2))
    print(f"wall {wall:.1f} s; wrote {out / 'e2e.json'} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
