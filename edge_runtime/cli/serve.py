"""``edge-runtime serve``: serve cameras, RTSP streams, video files, image folders and stream
files live through one runtime, with an operator's label inbox and Prometheus metrics.

The base domain is fitted before the first frame: ``--base S.npz`` fits it from a stream
file's labelled training set (and takes that set's frame shape as the serving frame shape),
``--checkpoint DIR`` loads a runtime saved by ``edge-runtime run --checkpoint`` or
``Runtime.save`` (everything it learned, not just the base). Writes ``DIR/events.jsonl``, a
rolling ``DIR/metrics.json``, ``DIR/capture/<request>/`` and reads ``DIR/inbox/*.csv``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from edge_runtime.cli.run import add_config_args, positive_float, positive_int, resolve_config
from edge_runtime.errors import InputError
from edge_runtime.serving.server import LiveServe, ServeOptions
from edge_runtime.sources.frames import FrameFormat

log = logging.getLogger(__name__)

EXIT_SIGNAL = 130


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
    add_config_args(parser)
    parser.set_defaults(func=_cmd_serve)


def build(args: argparse.Namespace) -> LiveServe:
    """The runtime (base fitted or loaded) and a started :class:`LiveServe` for ``args``."""
    from edge_runtime.runtime import Runtime

    cfg = resolve_config(args)
    frame_format = args.frame_shape
    if args.checkpoint:
        rt = Runtime.load(args.checkpoint)
    else:
        from edge_runtime.data.stream import load_stream
        from edge_runtime.encoder.cache import cached_features

        stream = load_stream(args.base)
        rt = Runtime(cfg)
        x = cached_features(rt.encoder, stream.train_images, "train")
        rt.fit_base(stream.train_images, stream.train_labels, features=x)
        if frame_format is None:
            frame_format = FrameFormat.like(stream.train_images.shape[1:])
        del stream  # the eval set and the stream itself are not needed while serving
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
    )
    server = LiveServe(rt, opts)
    try:
        return server.start()
    except BaseException:
        server.close()
        rt.close()
        raise


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
