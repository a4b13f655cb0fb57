"""``edge-runtime serve``: serve cameras, RTSP streams, video files, image folders and stream
files live through one runtime, with an operator's label inbox and Prometheus metrics.

The base domain is fitted before the first frame: ``--base S.npz`` fits it from a stream
file's labelled training set (and takes that set's frame shape as the serving frame shape) in
a separate process that saves it to ``DIR/base/`` (training it costs ~300 MB of peak memory
that serving never needs; ``--checkpoint DIR/base`` reuses it on the next start),
``--checkpoint DIR`` loads a runtime saved by ``edge-runtime run --checkpoint`` or
``Runtime.save`` (everything it learned, not just the base). Writes ``DIR/events.jsonl``, a
rolling ``DIR/metrics.json``, ``DIR/capture/<request>/`` and reads ``DIR/inbox/*.csv``.
Frames around each drift flag and low-confidence frames go to the bounded capture ring
``DIR/capture/ring/`` (PNGs indexed in ``index.sqlite``; list them with
``python -m edge_runtime.serving.ring DIR``). With ``--set fleet.enabled=true`` alerts go to
the fleet's MQTT broker; with ``--set telemetry.enabled=true`` CPU, memory, temperatures, power
and (Jetson) GPU load are sampled into ``/metrics``. See docs/SERVING.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
from collections.abc import Callable
from pathlib import Path

from edge_runtime.cli.run import add_config_args, positive_float, positive_int, resolve_config
from edge_runtime.config.schema import RuntimeConfig
from edge_runtime.errors import InputError
from edge_runtime.serving.ring import RingConfig
from edge_runtime.serving.server import LABELS_FROM, LiveServe, ServeOptions
from edge_runtime.sources.frames import FrameFormat
from edge_runtime.state.atomic import atomic_write_json

log = logging.getLogger(__name__)

EXIT_SIGNAL = 130
BASE_DIR = "base"  # DIR/base/: the fitted base runtime, reusable with --checkpoint
BASE_META = "serve-base.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve live sources (RTSP, cameras, video files, folders); metrics on HTTP",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--source",
        dest="sources",
        action="append",
        required=True,
        metavar="URI",
        help=(
            "repeatable: rtsp://..., /dev/videoN, gst:PIPELINE ! appsink, a video file "
            "(.mp4/.mkv/.avi), dir:PATH or a directory (PNG/JPEG files served once each, "
            "new ones as they arrive), or a stream .npz"
        ),
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    base = parser.add_mutually_exclusive_group(required=True)
    base.add_argument(
        "--base",
        metavar="S.npz",
        help="fit the base domain from this stream file's train_images/train_labels",
    )
    base.add_argument(
        "--checkpoint", metavar="DIR", help="load a saved runtime (Runtime.save) instead"
    )
    parser.add_argument(
        "--frame-shape",
        type=FrameFormat.parse,
        metavar="HxW[xC]",
        help=(
            "frames are converted to this shape before the encoder (default: the --base "
            "training frames' shape, or the encoder's square input in RGB)"
        ),
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /healthz, /readyz here (0: any free port, see metrics.json)",
    )
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address to bind /metrics to")
    parser.add_argument(
        "--max-frames", type=positive_int, metavar="N", help="stop cleanly after N frames"
    )
    parser.add_argument(
        "--fps-cap", type=positive_float, metavar="FPS", help="at most FPS frames/s per source"
    )
    parser.add_argument(
        "--rate",
        type=positive_float,
        metavar="FPS",
        help=(
            "deliver file and folder sources at FPS frames/s as a camera would (stale frames "
            "dropped and counted when the runtime falls behind); default: as fast as served"
        ),
    )
    parser.add_argument("--inbox", metavar="DIR", help="label inbox (default DIR/inbox)")
    parser.add_argument(
        "--label-deadline-s",
        type=positive_float,
        default=600.0,
        metavar="S",
        help="a label request expires S seconds after its drift flag (default 600)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=positive_float,
        default=20.0,
        metavar="MS",
        help="longest wait for a batch to fill before serving what has arrived (default 20)",
    )
    parser.add_argument(
        "--labels",
        choices=LABELS_FROM,
        default="inbox",
        help=(
            "who answers label requests: CSV files in the inbox (default), or the operator "
            "through the fleet's label loop (needs --set fleet.enabled=true)"
        ),
    )
    ring = parser.add_argument_group("active-learning capture ring (DIR/capture/ring)")
    d = RingConfig()
    ring.add_argument("--no-capture-ring", action="store_true", help="write no capture ring")
    ring.add_argument(
        "--capture-around",
        type=int,
        default=d.around,
        metavar="N",
        help=f"frames kept before and after each drift flag (default {d.around})",
    )
    ring.add_argument(
        "--capture-margin",
        type=float,
        default=d.margin,
        metavar="M",
        help=(
            "a frame whose calibrated OOD score is within M of the threshold is low-confidence "
            f"and kept (default {d.margin}; 0 turns it off)"
        ),
    )
    ring.add_argument(
        "--capture-per-minute", type=int, default=d.per_minute, metavar="N", help="rate cap"
    )
    ring.add_argument(
        "--capture-per-hour", type=int, default=d.per_hour, metavar="N", help="rate cap"
    )
    ring.add_argument(
        "--capture-max-files", type=int, default=d.max_files, metavar="N", help="size cap"
    )
    ring.add_argument(
        "--capture-max-mb",
        type=positive_float,
        default=d.max_bytes / 2**20,
        metavar="MB",
        help="size cap; the oldest files are deleted past either cap",
    )
    add_config_args(parser)
    parser.set_defaults(func=_cmd_serve)


def ring_config(args: argparse.Namespace) -> RingConfig | None:
    if args.no_capture_ring:
        return None
    return RingConfig(
        around=args.capture_around,
        margin=args.capture_margin if args.capture_margin else None,
        per_minute=args.capture_per_minute,
        per_hour=args.capture_per_hour,
        max_files=args.capture_max_files,
        max_bytes=int(args.capture_max_mb * 2**20),
    )


def build(args: argparse.Namespace, mark: Callable[[str], None] = lambda step: None) -> LiveServe:
    """The runtime (base fitted or loaded) and a started :class:`LiveServe` for ``args``.

    ``mark(step)`` is called after each setup step (benchmarks/bench_serve.py takes an RSS
    snapshot there, to say where the serving process's memory goes)."""
    from edge_runtime.runtime import Runtime

    mark("imports")
    cfg = resolve_config(args)
    frame_format = args.frame_shape
    checkpoint = args.checkpoint
    if checkpoint and frame_format is None and (Path(checkpoint) / BASE_META).is_file():
        # a base serve fitted earlier (DIR/base): the frames it was fitted on
        shape = json.loads((Path(checkpoint) / BASE_META).read_text())["frame_shape"]
        frame_format = FrameFormat.like(tuple(shape))
    if not checkpoint:
        checkpoint = Path(args.out) / BASE_DIR
        shape = fit_base_apart(cfg, Path(args.base), checkpoint)
        mark("fit_base_apart")
        if frame_format is None:
            frame_format = FrameFormat.like(shape)
    rt = Runtime.load(checkpoint)
    mark("runtime")
    if frame_format is None:
        size = rt.encoder.spec.input_size
        frame_format = FrameFormat(size, size, 3)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise InputError(f"--metrics-port must be 0..65535, got {args.metrics_port}")
    out = Path(args.out)
    opts = ServeOptions(
        sources=list(args.sources),
        out_dir=out,
        frame_format=frame_format,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        max_frames=args.max_frames,
        inbox_dir=Path(args.inbox) if args.inbox else None,
        label_deadline_s=args.label_deadline_s,
        fps_cap=args.fps_cap,
        rate=args.rate,
        max_wait_s=args.max_wait_ms / 1000.0,
        ring=ring_config(args),
        labels_from=args.labels,
    )
    server = LiveServe(rt, opts)
    try:
        server.start()
        mark("started")
        return server
    except BaseException:
        server.close()
        rt.close()
        raise


def _fit_base(cfg: RuntimeConfig, base: str, dest: str) -> None:
    """In the child process: fit the base domain and save the runtime to ``dest``."""
    from edge_runtime.data.stream import load_stream
    from edge_runtime.encoder.cache import cached_features
    from edge_runtime.runtime import Runtime

    stream = load_stream(base)
    rt = Runtime(cfg, background=False)
    x = cached_features(rt.encoder, stream.train_images, "train")
    rt.fit_base(stream.train_images, stream.train_labels, features=x)
    rt.save(dest)
    rt.close()
    meta = {"base": str(base), "frame_shape": list(stream.train_images.shape[1:])}
    atomic_write_json(Path(dest) / BASE_META, meta)


def fit_base_apart(cfg: RuntimeConfig, base: Path, dest: Path) -> tuple[int, ...]:
    """Fit the base domain from ``base`` in a fresh process and save it to ``dest``; returns
    the training frames' shape.

    The fit (the training set, its features and the head's full-batch training) peaks at about
    300 MB above what serving holds, and CPython keeps most of a peak resident after it is
    freed; a process of its own gives all of it back before the first frame."""
    if not base.is_file():
        raise InputError(f"--base {base}: no such stream file")
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads running
    child = ctx.Process(target=_fit_base, args=(cfg, str(base), str(dest)), name="fit-base")
    child.start()
    child.join()
    meta = Path(dest) / BASE_META
    if child.exitcode != 0 or not meta.is_file():
        raise InputError(f"fitting the base domain from {base} failed (exit {child.exitcode})")
    return tuple(json.loads(meta.read_text())["frame_shape"])


def _cmd_serve(args: argparse.Namespace) -> int:
    server = build(args)
    try:
        summary = server.run()
    finally:
        server.close()
        server.rt.close()
    m = summary.metrics
    keys = ("frames_served", "frames_dropped", "frames_rejected", "latency_ms", "ood_rate")
    print(json.dumps({k: m.get(k) for k in (*keys, "drift_flags", "adaptations", "stopped")}))
    return EXIT_SIGNAL if summary.stopped == "signal" else 0
