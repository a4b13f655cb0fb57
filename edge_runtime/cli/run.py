"""``edge-runtime run``: serve a stream file under the test-then-train protocol.

Writes ``DIR/frames.npz``, ``DIR/events.jsonl`` and ``DIR/metrics.json`` (docs/ARCHITECTURE.md,
"Outputs"). ``--rate FPS`` paces the replay as a camera would deliver it; without it frames
are served as fast as the runtime takes them. Ctrl-C finishes the current batch, writes what
was served so far (metrics marked ``"interrupted": true``) and exits 130.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from edge_runtime.config import (
    RuntimeConfig,
    load_config,
    load_profile,
    parse_override_args,
)
from edge_runtime.data.stream import load_stream
from edge_runtime.errors import ConfigError

EXIT_INTERRUPTED = 130


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config / --profile / --set / --label-budget / --no-progress (shared with demo)."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="C.yaml", help="runtime config YAML (default: built-in)")
    src.add_argument("--profile", metavar="NAME", help="device profile name or YAML path")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set encoder.batch_size=64 (repeatable)",
    )
    parser.add_argument(
        "--label-budget",
        type=int,
        metavar="N",
        help="labels collected per drift (adapt.label_budget)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_config(args: argparse.Namespace) -> RuntimeConfig:
    """The config named by --config/--profile with --set and --label-budget applied."""
    if getattr(args, "profile", None):
        cfg = load_profile(args.profile)
    else:
        cfg = load_config(getattr(args, "config", None))
    overrides = parse_override_args(list(getattr(args, "overrides", []) or []))
    if getattr(args, "label_budget", None) is not None:
        if args.label_budget <= 0:
            raise ConfigError(f"--label-budget: must be > 0, got {args.label_budget}")
        overrides["adapt.label_budget"] = str(args.label_budget)
    return cfg.with_overrides(overrides) if overrides else cfg


RATE_HELP = (
    "pace the replay as a camera delivering FPS frames/s: frame i arrives i/FPS s after the "
    "first, a batch is served once its last frame has arrived, and the loop never sleeps when "
    "it is behind. Without --rate the replay runs as fast as the machine serves, so background "
    "training ends hundreds of frames after its flag; with it, metrics.json's "
    "adaptation_delay_frames are the delays a device on that camera would see "
    "(figures: benchmarks/RESULTS.md)"
)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_replay_args(parser: argparse.ArgumentParser) -> None:
    """--rate / --max-frames (shared with demo)."""
    parser.add_argument("--rate", type=positive_float, metavar="FPS", help=RATE_HELP)
    parser.add_argument(
        "--max-frames",
        type=positive_int,
        metavar="N",
        help="serve only the first N frames of the stream (the rest are scored as not served)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="serve a stream .npz: detect drift, adapt, write events.jsonl and metrics.json",
        description=(
            "Serve every frame of a stream file in order (test-then-train), detecting drift "
            "and growing adaptors; writes frames.npz, events.jsonl and metrics.json into --out. "
            "Without --rate the replay runs as fast as it can (see --rate for what that does "
            "to adaptation delays in frames)."
        ),
    )
    parser.add_argument("--stream", required=True, metavar="S.npz", help="stream file")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--checkpoint", metavar="DIR", help="also save the final runtime here")
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the naive/joint baseline heads"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help=(
            "continue from the newest intact checkpoint under DIR/checkpoints/ (a damaged one "
            "is skipped with a warning; one from another encoder or version is refused); with "
            "none there, start at frame 0. The outputs at the end are those of one "
            "uninterrupted run. Implies --checkpoint-every 256 unless given"
        ),
    )
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        metavar="N",
        help=(
            "write a run checkpoint under DIR/checkpoints/ every N frames and after each "
            "adaptation, keeping the last --keep-checkpoints; adaptation then runs "
            "synchronously so that a resumed run makes the same decisions"
        ),
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=positive_int,
        default=3,
        metavar="K",
        help="run checkpoints kept (default 3)",
    )
    parser.add_argument(
        "--labels",
        choices=("stream", "fleet"),
        default="stream",
        help=(
            "who answers label requests: the stream file's labels (test-then-train replay), or "
            "the operator through the fleet's label loop (needs --set fleet.enabled=true; the "
            "device publishes labels/request with thumbnails and waits for a `labels` command)"
        ),
    )
    add_replay_args(parser)
    add_config_args(parser)
    parser.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_runtime.runner import run_stream

    cfg = resolve_config(args)
    stream = load_stream(args.stream)
    result = run_stream(
        stream,
        cfg,
        args.out,
        progress=not args.no_progress and sys.stderr.isatty(),
        stream_path=str(Path(args.stream)),
        checkpoint=args.checkpoint,
        baselines=not args.no_baselines,
        rate=args.rate,
        max_frames=args.max_frames,
        labels_from=args.labels,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
    )
    m = result.metrics
    print(format_summary(m))
    print(f"outputs: {result.out_dir}/metrics.json, events.jsonl, frames.npz")
    if result.interrupted:
        print(
            "edge-runtime: interrupted; wrote outputs for the frames served so far", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    return 0


def format_summary(m: dict) -> str:
    """The per-segment table (detected, delay, accuracy, adaptor) and headline numbers."""
    lines = [
        f"{'seg':>3} {'frames':>6} {'shift':>5} {'detected':>8} {'delay':>5} "
        f"{'preq.acc':>8} {'final.acc':>9} {'adaptor':>7}"
    ]
    for s in m.get("segments", []):
        det = "-" if s["detected"] is None else ("yes" if s["detected"] else "NO")
        delay = "-" if s["detection_delay"] is None else str(s["detection_delay"])
        pa = "-" if s["prequential_accuracy"] is None else f"{s['prequential_accuracy']:.1f}"
        fa = "-" if s["final_accuracy"] is None else f"{s['final_accuracy']:.1f}"
        ad = "-" if s["adaptor"] is None else str(s["adaptor"])
        shift = "yes" if s["is_shift"] else "no"
        lines.append(
            f"{s['id']:>3} {s['frames']:>6} {shift:>5} {det:>8} {delay:>5} {pa:>8} {fa:>9} {ad:>7}"
        )
    b = m.get("baselines") or {}
    head = {
        "prequential_accuracy": m.get("prequential_accuracy"),
        "mean_final_accuracy": m.get("mean_final_accuracy"),
        "naive_finetune": b.get("naive_finetune_mean_final_accuracy"),
        "joint": b.get("joint_mean_final_accuracy"),
        "forgetting": m.get("forgetting"),
        "false_alarms": m.get("false_alarms"),
        "median_delay": m.get("median_detection_delay"),
        "ood_auroc": m.get("ood_auroc"),
        "labels_used": m.get("labels_used"),
        "adaptors": m.get("adaptors"),
        "frames_per_second": m.get("frames_per_second"),
        "max_serving_gap_s": m.get("max_serving_gap_s"),
        "peak_rss_mb": m.get("peak_rss_mb"),
        "rate_fps": m.get("rate_fps"),
        "median_installed_after_frames": m.get("median_installed_after_frames"),
        "median_trained_after_frames": m.get("median_trained_after_frames"),
    }
    lines.append(json.dumps(head))
    checks = m.get("checks") or {}
    failed, unmeasured = checks.get("failed", []), checks.get("not_measured", [])
    verdict = "all pass" if checks.get("all_pass") else "FAILED " + ", ".join(failed)
    if unmeasured:
        verdict += f" (not measurable on this stream: {', '.join(unmeasured)})"
    lines.append("checks: " + verdict)
    return "\n".join(lines)
