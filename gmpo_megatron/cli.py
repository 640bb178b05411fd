"""Command-line entry points: ``gmpo-train`` and ``gmpo-convert``."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from gmpo_megatron.config import ConfigError, load_config

RANK0_REPORT_WAIT_S = 3.0  # how long another failing rank waits to see whether rank 0 reported


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gmpo-train",
        description="GMPO reinforcement learning on Megatron-Core. Run as one process, or under "
                    "torchrun --nproc_per_node N for parallel layouts (parallel.tp/pp/ep/etp).",
    )
    parser.add_argument("--config", help="YAML config (e.g. examples/moe/tiny_cpu.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest finished checkpoint in output_dir")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an error (always written to output_dir/error.log)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.steps=10 parallel.tp=2 algorithm.loss=grpo")
    args = parser.parse_args(argv)
    started = time.time()
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun; every rank parses the same config
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        if rank != 0:
            # Every rank parses the same config, so rank 0 reports it and exits, and torchrun then
            # stops this rank. Exiting first would let torchrun stop rank 0 before it printed; a
            # config that fails on this rank only (a file missing on its node) is still reported.
            time.sleep(RANK0_REPORT_WAIT_S)
            print(f"gmpo-train: on rank {rank}: {error}", file=sys.stderr)
            return 2
        print(f"gmpo-train: {error}", file=sys.stderr)
        return 2
    from gmpo_megatron.trainer import run

    try:
        run(cfg, resume=args.resume)
    except Exception as error:  # noqa: BLE001 - reported as one line; the traceback goes to a file
        return _report_failure(error, Path(cfg.output_dir), rank, debug=args.debug, started=started)
    return 0


def _report_failure(error: Exception, output_dir: Path, rank: int, *, debug: bool, started: float) -> int:
    """One line with the cause on stderr, from rank 0 (another rank speaks only when rank 0 has
    not reported its own failure); the traceback in output_dir/error.log (error.rank<N>.log on
    rank N) when output_dir exists, and on stderr with --debug. Exits under torchrun: a peer may
    be blocked in a collective, and torchrun stops the other ranks once one has exited."""
    text = traceback.format_exc()
    log = None
    if output_dir.is_dir():
        log = output_dir / ("error.log" if rank == 0 else f"error.rank{rank}.log")
        try:
            log.write_text(text)
        except OSError:
            log = None
    if debug:
        print(text, file=sys.stderr, end="")
    elif rank == 0 or not _rank0_reported(output_dir, started):
        where = f" (traceback: {log})" if log else " (--debug prints the traceback)"
        who = "" if rank == 0 else f" on rank {rank}"
        print(f"gmpo-train: error{who}: {type(error).__name__}: {error}{where}", file=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 1


def _rank0_reported(output_dir: Path, started: float) -> bool:
    """Whether rank 0 wrote this run's error.log within RANK0_REPORT_WAIT_S. Without an
    output_dir the error came before anything rank-specific (the same on every rank)."""
    if not output_dir.is_dir():
        return True
    log = output_dir / "error.log"
    deadline = time.monotonic() + RANK0_REPORT_WAIT_S
    while time.monotonic() < deadline:
        if log.exists() and log.stat().st_mtime >= started:
            return True
        time.sleep(0.1)
    return False


def convert_main(argv: list[str] | None = None) -> int:
    from gmpo_megatron.convert.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(train_main())
