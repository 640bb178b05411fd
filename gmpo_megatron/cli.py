"""Command-line entry points: ``gmpo-train`` and ``gmpo-convert``."""

from __future__ import annotations

import argparse
import sys

from gmpo_megatron.config import ConfigError, load_config


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gmpo-train",
        description="GMPO reinforcement learning on Megatron-Core. Run as one process, or under "
                    "torchrun --nproc_per_node N for parallel layouts (parallel.tp/pp/ep/etp).",
    )
    parser.add_argument("--config", help="YAML config (e.g. examples/moe/tiny_cpu.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest finished checkpoint in output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.steps=10 parallel.tp=2 algorithm.loss=grpo")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"gmpo-train: {error}", file=sys.stderr)
        return 2
    from gmpo_megatron.trainer import run

    run(cfg, resume=args.resume)
    return 0


def convert_main(argv: list[str] | None = None) -> int:
    from gmpo_megatron.convert.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(train_main())
