"""``edge-runtime meta-train``: learn one meta-init file per adaptor family for this encoder.

Episodes come from the base data under simulated shifts (see :mod:`edge_runtime.meta.episodes`);
the result goes to ``--out`` and, unless ``--no-install``, into the cache where the runtime
looks for it by encoder hash. A killed run started again with the same ``--out`` resumes from
its checkpoints (``OUT/.checkpoints``).
"""

from __future__ import annotations

import argparse
import json
import sys

from edge_runtime.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    from edge_runtime.cli.run import add_config_args
    from edge_runtime.meta.train import DEFAULT_FAMILIES, FAMILIES, META_TAPS, MetaTrainConfig

    d = MetaTrainConfig()
    parser = subparsers.add_parser(
        "meta-train",
        help="meta-learn adaptor initialisations (Proto-MAML + Meta-SGD) for this encoder",
        description=(
            "Meta-trains, for each adaptor family, the weights that prototypes do not set, "
            "per-layer step sizes and the new domain's threshold correction, on episodes drawn "
            "from the base data under simulated shifts. Writes OUT/<family>.safetensors + "
            ".json and OUT/meta_train.json."
        ),
    )
    parser.add_argument("--out", required=True, metavar="PATH", help="output directory")
    add_config_args(parser)
    parser.add_argument(
        "--families",
        default=",".join(DEFAULT_FAMILIES),
        help=(
            f"comma-separated adaptor families from {','.join(FAMILIES)} "
            f"(default {','.join(DEFAULT_FAMILIES)}); 'conv' is every conv arch of the search "
            f"space on encoder taps {'/'.join(str(t) for t in META_TAPS)} (one file each), and "
            "one conv arch can be named as its file is, e.g. conv-t13-96x4x4-2x64"
        ),
    )
    parser.add_argument("--iterations", type=int, default=d.iterations, help="outer steps")
    parser.add_argument("--tasks", type=int, default=d.tasks, help="episodes per outer step")
    parser.add_argument(
        "--conv-iterations",
        type=int,
        default=d.conv_iterations,
        help="outer steps per conv arch (each costs ~20x a linear head's)",
    )
    parser.add_argument(
        "--conv-tasks", type=int, default=d.conv_tasks, help="episodes per conv outer step"
    )
    parser.add_argument("--inner-steps", type=int, default=d.inner_steps, help="fast steps")
    parser.add_argument("--first-order", action="store_true", help="first-order MAML")
    parser.add_argument("--meta-lr", type=float, default=d.meta_lr, help="outer Adam rate")
    parser.add_argument("--per-class", type=int, default=200, help="frames per class per shift")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--no-install", action="store_true", help="do not copy the files into the cache"
    )
    parser.set_defaults(func=_cmd_meta_train)


def _cmd_meta_train(args: argparse.Namespace) -> int:
    from edge_runtime.cli.run import resolve_config
    from edge_runtime.meta.train import FAMILIES, MetaTrainConfig, run_meta_train

    families = [f.strip() for f in str(args.families).split(",") if f.strip()]
    # A single conv arch's name is checked against the search space once the encoder is known.
    bad = [f for f in families if f not in FAMILIES and not f.startswith("conv-")]
    if bad or not families:
        raise ConfigError(f"--families: unknown {bad}; choose from {list(FAMILIES)}")
    for name in ("iterations", "tasks", "conv_iterations", "conv_tasks", "per_class"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be > 0")
    cfg = MetaTrainConfig(
        iterations=args.iterations,
        tasks=args.tasks,
        conv_iterations=args.conv_iterations,
        conv_tasks=args.conv_tasks,
        inner_steps=args.inner_steps,
        first_order=args.first_order,
        meta_lr=args.meta_lr,
        seed=args.seed,
    )
    summary = run_meta_train(
        resolve_config(args),
        args.out,
        cfg,
        families=families,
        per_class=args.per_class,
        install=not args.no_install,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    brief = {
        "encoder_hash": summary["encoder_hash"][:16],
        "seconds": summary["seconds"],
        "families": {k: v["files"] for k, v in summary["families"].items()},
    }
    print(json.dumps(brief, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m edge_runtime.cli.meta_train meta-train ...``: the subcommand on its own."""
    parser = argparse.ArgumentParser(prog="edge-runtime")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
