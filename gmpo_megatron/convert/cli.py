"""``gmpo-convert``: HF <-> Megatron conversion, FP8 export and verification.

    gmpo-convert hf-to-megatron --hf-dir H --out-dir M [--tp N --pp N --ep N --etp N] [--dtype auto]
    gmpo-convert megatron-to-hf --megatron-dir M --out-dir H2 [--hf-config-dir H] [--fp8]
                                [--max-shard-size 5GB] [--reader stream|model --tp ...]
    gmpo-convert verify --hf-dir H [--megatron-dir M [--hf-config-dir C]] [--tp ...]   (logits)
    gmpo-convert verify --mode weights --hf-dir H (--other-hf-dir H2 | --megatron-dir M [--hf-config-dir C])

Multi-process: ``torchrun --nproc_per_node N -m gmpo_megatron.convert.cli <command> ...`` (or
``tools/convert/convert.py``). Exit status: 0 success, 1 verification outside tolerance, 2 refused
(the message names the tensor, field or path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from gmpo_megatron.convert.errors import ConversionError


def _layout_args(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group(f"parallel layout ({what}; world size must match)")
    group.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    group.add_argument("--ep", type=int, default=1, help="expert parallel size")
    group.add_argument("--etp", type=int, default=None,
                       help="expert tensor parallel size (default: --tp; TP2+EP2 on 2 processes "
                            "needs --etp 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmpo-convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="HF <-> Megatron conversion, block-FP8 export and verification for Qwen2.5, "
                    "Qwen3 and Qwen3-MoE (docs/convert.md)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Megatron / torch warnings (hidden by default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: conversion is memory-bound and "
                             "multi-threaded copies collapse when other work shares the cores; "
                             "raise it for --fp8 on an idle many-core machine)")
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron torch_dist checkpoint")
    imp.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    imp.add_argument("--out-dir", required=True, help="Megatron checkpoint directory to create")
    imp.add_argument("--dtype", default="auto",
                     help="parameter dtype: auto (the checkpoint's widest float dtype: exact), bf16, "
                          "fp16, fp32")
    imp.add_argument("--writer", choices=("auto", "stream", "model"), default="auto",
                     help="stream: no model in memory, HF tensors streamed into the files (one "
                          "process, TP1); model: build and fill the model at --tp/--pp/--ep/--etp "
                          "and save it (torchrun); auto: stream when it can (default)")
    imp.add_argument("--overwrite", action="store_true",
                     help="replace --out-dir if it is a previous gmpo-convert output")
    _layout_args(imp, "the layout the conversion runs at; the output loads at any layout")

    exp = sub.add_parser("megatron-to-hf", help="Megatron torch_dist checkpoint -> HF safetensors")
    exp.add_argument("--megatron-dir", required=True)
    exp.add_argument("--out-dir", required=True)
    exp.add_argument("--hf-config-dir", default=None,
                     help="HF directory with config.json / tokenizer (needed for checkpoints that "
                          "do not carry hf/, e.g. the trainer's; checked against hf/ otherwise)")
    exp.add_argument("--fp8", action="store_true",
                     help="block-FP8 (128x128, e4m3) export for SGLang / vLLM")
    exp.add_argument("--dtype", default=None,
                     help="output dtype for every tensor (default: the original HF dtypes)")
    exp.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB")
    exp.add_argument("--reader", choices=("stream", "model"), default="stream",
                     help="stream: read tensors straight from the files, bounded memory, one "
                          "process (default); model: build the model at --tp/--pp/--ep/--etp and "
                          "gather (torchrun)")
    exp.add_argument("--read-budget", default="1GiB",
                     help="stream reader: bytes read per batch (memory bound)")
    exp.add_argument("--overwrite", action="store_true")
    _layout_args(exp, "--reader model only")

    ver = sub.add_parser("verify", help="compare logits or weights")
    ver.add_argument("--mode", choices=("logits", "weights"), default="logits")
    ver.add_argument("--hf-dir", required=True, help="the reference HF model")
    ver.add_argument("--megatron-dir", default=None,
                     help="Megatron checkpoint (logits: omitted = load --hf-dir into Megatron)")
    ver.add_argument("--hf-config-dir", default=None,
                     help="HF directory with config.json for a --megatron-dir that does not carry "
                          "hf/, e.g. the trainer's (<output_dir>/hf); checked against hf/ otherwise")
    ver.add_argument("--other-hf-dir", default=None, help="weights mode: HF checkpoint to compare")
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--seq-len", type=int, default=32)
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--dtype", default="fp32", help="logits compute dtype (both models)")
    ver.add_argument("--max-abs-diff", type=float, default=None,
                     help="logits: tolerance on max |logit diff| (default 1e-4 fp32, 0.5 bf16); "
                          "weights: allowed |diff| (default 0: bit-identical)")
    ver.add_argument("--min-cosine", type=float, default=None,
                     help="logits: minimum cosine (default 0.9999 fp32, 0.99 bf16/fp16)")
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    _layout_args(ver, "logits mode")
    return parser


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _run(args, log) -> int:
    from gmpo_megatron.convert.safetensors_writer import parse_size

    if args.command == "hf-to-megatron":
        from gmpo_megatron.convert.hf_to_megatron import convert_hf_to_megatron

        convert_hf_to_megatron(args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp, ep=args.ep,
                               etp=args.etp, dtype=args.dtype, writer=args.writer,
                               overwrite=args.overwrite, log=log)
        return 0
    if args.command == "megatron-to-hf":
        from gmpo_megatron.convert.megatron_to_hf import convert_megatron_to_hf

        convert_megatron_to_hf(args.megatron_dir, args.out_dir, hf_config_dir=args.hf_config_dir,
                               fp8=args.fp8, dtype=args.dtype,
                               max_shard_bytes=parse_size(args.max_shard_size), reader=args.reader,
                               tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
                               read_budget=parse_size(args.read_budget), overwrite=args.overwrite,
                               log=log)
        return 0
    from gmpo_megatron.convert import verify
    from gmpo_megatron.convert.hf_to_megatron import parse_dtype

    if args.mode == "weights":
        report = verify.verify_weights(args.hf_dir, other_hf_dir=args.other_hf_dir,
                                       megatron_dir=args.megatron_dir, hf_config_dir=args.hf_config_dir,
                                       atol=args.max_abs_diff or 0.0)
        payload = report.as_dict()
    else:
        dtype = parse_dtype(args.dtype)
        fp32 = dtype.itemsize == 4
        report = verify.verify_logits(
            args.hf_dir, args.megatron_dir, hf_config_dir=args.hf_config_dir,
            tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
            batch=args.batch, seq=args.seq_len, seed=args.seed, dtype=dtype,
            max_abs_tolerance=args.max_abs_diff if args.max_abs_diff is not None else (
                1e-4 if fp32 else 0.5),
            min_cosine=args.min_cosine if args.min_cosine is not None else (
                0.9999 if fp32 else 0.99))
        payload = {**vars(report)}
    if _is_rank0():
        print(json.dumps(payload, indent=2, default=str) if args.json else report.summary())
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 verification failed, 2 refused).

    Process-wide settings (warning filters, torch's thread count) are restored on return, so it
    can run inside another program."""
    import torch

    args = build_parser().parse_args(argv)

    def log(message: str) -> None:
        if _is_rank0():
            print(message, flush=True)

    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        if not args.verbose:
            for module in ("megatron", "torch.distributed", "transformers", "torch.utils"):
                warnings.filterwarnings("ignore", module=module)
        torch.set_num_threads(args.threads)
        try:
            return _run(args, log)
        except ConversionError as error:
            print(f"gmpo-convert {args.command}: refused: {error}", file=sys.stderr, flush=True)
            return 2
        finally:
            torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
