"""``edge-runtime scenario``: list, build and inspect stream files."""

from __future__ import annotations

import argparse
import logging
import time

from edge_runtime.data.scenario import SCENARIOS, write_scenario
from edge_runtime.data.stream import load_stream

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "scenario",
        help="list, build and inspect drift scenarios (stream .npz files)",
        description="Built-in drift scenarios and the stream .npz files `edge-runtime run` reads.",
    )
    sub = parser.add_subparsers(dest="scenario_command", metavar="ACTION", required=True)

    p_list = sub.add_parser("list", help="list the built-in scenarios")
    p_list.set_defaults(func=cmd_list)

    p_build = sub.add_parser("build", help="build a built-in scenario into a stream .npz")
    p_build.add_argument(
        "name", choices=sorted(SCENARIOS), metavar="NAME", help=f"one of: {', '.join(SCENARIOS)}"
    )
    p_build.add_argument("--out", required=True, metavar="S.npz", help="stream file to write")
    p_build.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p_build.set_defaults(func=cmd_build)

    p_inspect = sub.add_parser("inspect", help="validate a stream .npz and print its segments")
    p_inspect.add_argument("path", metavar="S.npz")
    p_inspect.set_defaults(func=cmd_inspect)


def cmd_list(args: argparse.Namespace) -> int:
    for name, spec in SCENARIOS.items():
        frames = sum(s.frames for s in spec.segments)
        print(f"{name:<20} {len(spec.segments)} segments, {frames} frames: {spec.description}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    log.info("building scenario %s (seed %d)", args.name, args.seed)
    stream, path = write_scenario(args.name, args.out, seed=args.seed)
    print(
        f"wrote {path}: {len(stream)} frames, {stream.num_segments} segments, "
        f"{len(stream.train_images)} train, {len(stream.eval_images)} eval "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    # StreamFormatError propagates to cli.main, which prints one line and exits 2.
    stream = load_stream(args.path)
    print(stream.summary())
    return 0
