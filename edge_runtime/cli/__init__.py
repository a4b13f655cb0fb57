"""The ``edge-runtime`` command line.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence

from edge_runtime import __version__
from edge_runtime.errors import EdgeRuntimeError

# Order is the order shown in --help.
COMMANDS: tuple[str, ...] = (
    "demo",
    "run",
    "serve",
    "fleet",
    "scenario",
    "export",
    "profile",
    "meta-train",
)

log = logging.getLogger("edge_runtime")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-runtime",
        description=(
            "Continual-adaptation runtime for Jetson-class devices: a frozen encoder feeds an "
            "HDC out-of-distribution detector; on drift the device grows a small adaptor for "
            "the new domain, routes later frames to it and tells the fleet.\n\n"
            "Start with `edge-runtime demo` (builds the built-in fashion-drift stream and runs it)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text, or one JSON object per line (for services and log shippers)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"edge_runtime.cli.{name.replace('-', '_')}").register(sub)
    return parser


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: time (Unix s), level, logger, message, and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(verbose: int, quiet: bool, fmt: str = "text") -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet, args.log_format)
    try:
        return int(args.func(args) or 0)
    except EdgeRuntimeError as exc:
        print(f"edge-runtime: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-runtime: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edge-runtime fleet events | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
