"""``edge-runtime demo``: build the fashion-drift scenario (cached), run it, plot a timeline."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from edge_runtime.cli.run import (
    EXIT_INTERRUPTED,
    add_config_args,
    add_replay_args,
    format_summary,
    resolve_config,
)
from edge_runtime.data.stream import load_stream
from edge_runtime.errors import StreamFormatError


def scenario_cache_dir() -> Path:
    """``$EDGE_RUNTIME_CACHE/scenarios`` if set, else ``~/.cache/edge_runtime/scenarios``."""
    root = os.environ.get("EDGE_RUNTIME_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "edge_runtime"
    return base / "scenarios"


def cached_scenario(name: str, seed: int = 0, *, rebuild: bool = False) -> Path:
    """Path of the scenario's stream file, building and caching it on first use."""
    from edge_runtime.data.scenario import get_scenario, write_scenario

    get_scenario(name)  # unknown names fail before anything is built
    path = scenario_cache_dir() / (f"{name}.npz" if seed == 0 else f"{name}-seed{seed}.npz")
    if path.is_file() and not rebuild:
        try:
            load_stream(path)
            return path
        except StreamFormatError:
            pass  # a damaged cache entry is rebuilt
    print(f"building scenario {name} -> {path}", file=sys.stderr)
    write_scenario(name, path, seed=seed)
    return path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build and run the fashion-drift scenario; print a summary and plot a timeline",
        description=(
            "One command: builds the built-in fashion-drift stream (cached under "
            "~/.cache/edge_runtime/scenarios), serves it, prints a per-segment table and writes "
            "a PNG timeline next to metrics.json. Without --rate the replay runs as fast as "
            "it can; --rate 30 serves it as a 30 fps camera would (10,000 frames: ~6 min)."
        ),
    )
    parser.add_argument("--scenario", default="fashion-drift", help="built-in scenario name")
    parser.add_argument("--seed", type=int, default=0, help="scenario seed")
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached scenario")
    add_replay_args(parser)
    add_config_args(parser)
    parser.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from edge_runtime.plots import plot_timeline
    from edge_runtime.runner import run_stream

    t0 = time.perf_counter()
    cfg = resolve_config(args)
    path = cached_scenario(args.scenario, args.seed, rebuild=args.rebuild)
    stream = load_stream(path)
    print(stream.summary())
    result = run_stream(
        stream,
        cfg,
        args.out,
        progress=not args.no_progress and sys.stderr.isatty(),
        stream_path=str(path),
        rate=args.rate,
        max_frames=args.max_frames,
    )
    png = plot_timeline(result.out_dir, stream, title=f"edge-runtime demo: {args.scenario}")
    print(format_summary(result.metrics))
    print(f"outputs: {result.out_dir}/metrics.json, events.jsonl, frames.npz")
    print(f"timeline: {png}")
    print(f"demo wall time: {time.perf_counter() - t0:.1f} s")
    return EXIT_INTERRUPTED if result.interrupted else 0
