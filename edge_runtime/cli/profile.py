"""``edge-runtime profile``: list, show, validate and detect device profiles."""

from __future__ import annotations

import argparse
import sys

from edge_runtime.config import (
    detect_device,
    list_profiles,
    load_profile,
    parse_override_args,
    resolve_profile_path,
)
from edge_runtime.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="list, show, validate or detect device profiles (firmware_configs/)",
        description=(
            "Device profiles are full runtime configs, one YAML per target "
            "(Jetson Orin Nano/NX, AGX Orin, Xavier NX, x86-dev)."
        ),
    )
    sub = parser.add_subparsers(dest="profile_command", metavar="ACTION", required=True)

    p_list = sub.add_parser("list", help="names of the shipped profiles")
    p_list.set_defaults(func=_cmd_list)

    p_show = sub.add_parser("show", help="print a profile as resolved YAML")
    p_show.add_argument(
        "profile", nargs="?", help="profile name or YAML path (default: the detected profile)"
    )
    p_show.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set adapt.label_budget=100 (repeatable)",
    )
    p_show.set_defaults(func=_cmd_show)

    p_validate = sub.add_parser("validate", help="check YAML files; exit 2 naming the bad key")
    p_validate.add_argument("paths", nargs="+", metavar="PATH", help="profile names or YAML files")
    p_validate.set_defaults(func=_cmd_validate)

    p_detect = sub.add_parser("detect", help="which profile fits this machine, and why")
    p_detect.add_argument(
        "--root", default="/", help="filesystem root to inspect (tests use a fake tree)"
    )
    p_detect.set_defaults(func=_cmd_detect)


def _cmd_list(args: argparse.Namespace) -> int:
    for name in list_profiles():
        cfg = load_profile(name)
        mode = (
            f"nvpmodel {cfg.device.nvpmodel_mode} ({cfg.device.nvpmodel_name})"
            if cfg.device.nvpmodel_mode is not None
            else "no nvpmodel"
        )
        print(f"{name:24s} {cfg.encoder.precision:5s} {mode:28s} {cfg.device.description}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    name = args.profile
    detection = None
    if name is None:
        detection = detect_device()
        name = detection.profile
        print(f"# detected: {detection.reason}")
    path = resolve_profile_path(name)
    cfg = load_profile(path)
    if detection is not None:  # the budget scaled to this module's memory
        cfg = detection.apply(cfg)
    if args.overrides:
        cfg = cfg.with_overrides(parse_override_args(args.overrides))
    print(f"# profile: {name} ({path})")
    sys.stdout.write(cfg.to_yaml())
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for item in args.paths:
        try:
            load_profile(item)
        except ConfigError as exc:
            failed += 1
            print(f"edge-runtime: error: {exc}", file=sys.stderr)
        else:
            print(f"ok: {item}")
    return 2 if failed else 0


def _cmd_detect(args: argparse.Namespace) -> int:
    detection = detect_device(args.root)
    print(f"profile: {detection.profile}")
    print(f"reason:  {detection.reason}")
    if detection.default_power_mode is not None:
        print(f"nvpmodel default mode: {detection.default_power_mode}")
    return 0
