#!/usr/bin/env python3
"""The GPU check: one script, one GPU, at most 10 minutes, results appended to docs/gpu-results.md.

1. Agreement. The same GMPO steps (old log-probs, two optimizer steps, log-probs again) on the same
   weights and samples, through the trainer's own step functions (``build_model``,
   ``load_hf_weights``, ``wrap_ddp``, ``build_optimizer``, the micro-batch builders,
   ``compute_old_log_probs``, ``train_on_batches``), in several variants: Megatron's local spec in
   fp32 (the reference) and BF16, packed and padded; with Transformer-Engine (when it imports) its
   spec in BF16 padded, BF16 packed through THD ``PackedSeqParams`` (the path the trainer still
   refuses), and FP8. Each is compared with a baseline (log-probs, loss, grad norm) against
   stated tolerances. A negative control (packed rows without their block-diagonal mask: attention
   across sequences) must exceed the layout tolerance, or the check is not discriminating.
2. Throughput. Training steps (fwd + bwd + optimizer) and old-log-prob forwards on a ~1B-parameter
   Qwen3-MoE-shaped model (random Megatron init), tokens/s and MFU:
   model FLOPs = sum over sequences of 6 * N_active * S + 6 * L * (heads * head_dim) * S^2
   (training; causal attention counts half of QK^T and AV; forward only: a third of it), with
   N_active the parameters a token uses except the input embedding, against the device's peak
   dense BF16 TFLOP/s (from torch.cuda.get_device_name, or --peak-tflops).

``--cpu-smoke`` runs the same code on CPU with a tiny model in fp32 (and a BF16 variant), so CI
keeps the script from rotting (tests/e2e/test_gpu_check.py); its results are not GPU results and go
to ``--results`` (default outputs/gpu_check_smoke.md). ``--wheels DIR`` first installs the
packages of benchmarks/gpu_check_requirements.txt from wheels in DIR without network (torch must
be installed already; docs/gpu-results.md says how to build DIR).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Dense BF16 peak (TFLOP/s, no sparsity) by device name; the first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("H800", 989.0), ("H20", 148.0), ("A100", 312.0))


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted differences of a variant from its baseline (log-probs in nats)."""

    name: str
    logp_mean: float
    logp_max: float
    loss: float  # absolute, per optimizer step
    grad_norm_rel: float


# layout: the same precision, another micro-batch layout (fp32 on CPU: float rounding only)
LAYOUT_FP32 = Tolerance("layout fp32", 1e-5, 2e-4, 1e-5, 1e-4)
# BF16 vs the fp32 reference, or two BF16 layouts (other kernels / reduction order). Set for gross
# errors (wrong weights, a broken kernel, attention across sequences: the control measures ~0.5 nats
# mean): the CPU smoke run measures bf16 vs fp32 at ~8e-3 mean / 0.17 max before the updates and
# ~3e-2 mean after two (bf16 weights), two bf16 layouts at ~5e-3 / 2e-2.
BF16 = Tolerance("bf16", 6e-2, 0.5, 2e-2, 5e-2)
LAYOUT_BF16 = Tolerance("layout bf16", 3e-2, 0.3, 1e-2, 3e-2)
FP8 = Tolerance("fp8", 0.12, 1.0, 5e-2, 0.15)


@dataclass
class Variant:
    name: str
    use_te: bool
    dtype: str  # fp32 | bf16
    layout: str  # padded | packed | thd | leaky (packed rows without their mask: the control)
    fp8: str | None = None
    fp8_recipe: str = "tensorwise"


@dataclass
class Comparison:
    variant: str
    baseline: str
    tolerance: Tolerance
    control: bool = False  # a negative control: must exceed the tolerance
    values: dict = field(default_factory=dict)
    verdict: str = "not run"


# -- environment ----------------------------------------------------------------------------------
def wheel_install_command(directory: str | Path) -> list[str]:
    """pip, without network, installing gpu_check_requirements.txt from the wheels in ``directory``
    (dependencies resolved from there and from what is installed: torch must be)."""
    directory = Path(directory)
    if not directory.is_dir() or not list(directory.glob("*.whl")):
        raise SystemExit(f"--wheels {directory}: no .whl files there; build it with "
                         "`pip download --no-deps ... -r benchmarks/gpu_check_wheels.txt` "
                         "(docs/gpu-results.md, 'Running the GPU check')")
    return [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(directory),
            "-r", str(REPO / "benchmarks" / "gpu_check_requirements.txt")]


def check_torch(cpu_smoke: bool) -> None:
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("torch is not installed: the GPU check needs a CUDA build of torch already on "
                         "the machine (a CUDA torch wheel is ~900 MB, more than the device tool carries); "
                         "use an image that has one, e.g. the Dockerfile's NGC PyTorch base")
    import torch

    if not cpu_smoke and not torch.cuda.is_available():
        raise SystemExit(f"torch {torch.__version__} sees no CUDA device: run on a GPU, or pass "
                         "--cpu-smoke for the CPU run of the same code")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def te_imports() -> tuple[bool, str]:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as error:  # noqa: BLE001 - TE raises RuntimeError, not only ImportError
        return False, f"{type(error).__name__}: {error}"
    return True, getattr(transformer_engine, "__version__", version("transformer-engine"))


def peak_bf16_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- models ---------------------------------------------------------------------------------------
def agreement_config(cpu_smoke: bool):
    """A small Qwen3-MoE for the agreement check (GQA, QK-norm, head_dim != hidden / heads). The
    larger initializer range makes logits large enough that attention errors show in log-probs."""
    from gmpo_megatron.models.presets import tiny_qwen3_moe

    if cpu_smoke:
        return tiny_qwen3_moe(initializer_range=0.1)
    return tiny_qwen3_moe(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=64, intermediate_size=1024,
                          moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
                          max_position_embeddings=4096, initializer_range=0.05)


def throughput_config(cpu_smoke: bool):
    """~1B parameters, Qwen3-MoE-shaped (48 fine-grained experts, top-8, Qwen's vocabulary)."""
    from gmpo_megatron.models.presets import tiny_qwen3_moe

    if cpu_smoke:
        return tiny_qwen3_moe()
    return tiny_qwen3_moe(vocab_size=151936, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                          num_key_value_heads=4, head_dim=128, intermediate_size=3072,
                          moe_intermediate_size=256, num_experts=48, num_experts_per_tok=8,
                          max_position_embeddings=8192)


def param_counts(hf) -> dict[str, int]:
    """Parameters from the HF config's arithmetic: total, active per token (top-k experts), and
    the part of the active ones that does matmuls (all but the input embedding's lookup)."""
    from gmpo_megatron.models import get_mapping
    from gmpo_megatron.models.hf_config import head_dim, moe_layer_pattern

    h, d = hf.hidden_size, head_dim(hf)
    hq, hkv = hf.num_attention_heads, hf.num_key_value_heads
    mapping = get_mapping(hf)
    attention = h * hq * d + 2 * h * hkv * d + hq * d * h
    if mapping.qkv_bias:
        attention += hq * d + 2 * hkv * d
    if mapping.qk_norm:
        attention += 2 * d
    norms = 2 * h
    total = active = 0
    for is_moe in moe_layer_pattern(hf):
        base = attention + norms
        if is_moe:
            expert = 3 * h * hf.moe_intermediate_size
            total += base + hf.num_experts * h + hf.num_experts * expert
            active += base + hf.num_experts * h + hf.num_experts_per_tok * expert
        else:
            total += base + 3 * h * hf.intermediate_size
            active += base + 3 * h * hf.intermediate_size
    embedding = hf.vocab_size * h
    head = 0 if hf.tie_word_embeddings else embedding  # tied: the embedding is the output layer too
    total += embedding + head + h
    active += embedding + head + h
    # the input embedding is a lookup, not a matmul (when tied, its matrix is the output layer's)
    return {"total": total, "active": active, "matmul_active": active - embedding if head else active}


def model_flops(hf, lengths: list[int], training: bool) -> float:
    """Model FLOPs of one pass over sequences of ``lengths`` tokens (module docstring)."""
    from gmpo_megatron.models.hf_config import head_dim

    n = param_counts(hf)["matmul_active"]
    width = hf.num_attention_heads * head_dim(hf)
    per_pass = sum(6.0 * n * s + 6.0 * hf.num_hidden_layers * width * s * s for s in lengths)
    return per_pass if training else per_pass / 3.0


# -- samples and steps ----------------------------------------------------------------------------
def synthetic_samples(count: int, vocab: int, prompt: tuple[int, int], response: tuple[int, int],
                      seed: int, group: int = 8):
    """Rollout-like samples: random tokens of random (odd) lengths, binary rewards per group,
    GRPO advantages (the trainer's ``compute_advantages``)."""
    import torch

    from gmpo_megatron.algo.advantages import compute_advantages
    from gmpo_megatron.rollout.batch import RolloutBatch

    rng = random.Random(seed)
    rewards = torch.tensor([float(rng.random() < 0.5) for _ in range(count)])
    groups = torch.tensor([i // group for i in range(count)])
    advantages = compute_advantages("grpo", rewards, groups)
    prompts, responses = [], []
    for _ in range(count):
        p, r = rng.randint(*prompt), rng.randint(*response)
        prompts.append([rng.randrange(vocab) for _ in range(p)])
        responses.append([rng.randrange(vocab) for _ in range(r)])
    return RolloutBatch.from_lists(prompts, responses, [[-rng.random() for _ in r] for r in responses],
                                   rewards, advantages, groups, ["stop"] * count)


def micro_batches(model, samples, indices, layout: str, device, budget: int, rows: int):
    """This (single) rank's micro-batches, as ``Trainer._plan`` / ``Trainer._build`` make them."""
    from gmpo_megatron.megatron.micro_batches import (
        build_micro_batch,
        plan_micro_batches,
        plan_packed_micro_batches,
        sequence_multiple,
    )
    from gmpo_megatron.megatron.packed_seq import with_packed_seq_params

    config = model.config
    multiple = sequence_multiple(1, config.sequence_parallel, bool(config.fp8))
    packed = layout != "padded"
    if packed:
        plan = plan_packed_micro_batches({i: int(samples.lengths[i]) for i in indices}, indices, 0, 1, budget)
    else:
        plan = plan_micro_batches(indices, 0, 1, rows)
    batches = [build_micro_batch(samples, chunk, pad_id=0, seq_multiple=multiple, device=device, packed=packed)
               for chunk in plan]
    if layout == "thd":
        batches = [with_packed_seq_params(b) for b in batches]
    elif layout == "leaky":  # the negative control: plain causal attention over the whole row
        batches = [dataclasses.replace(b, attention_mask=None) for b in batches]
    return batches


def build_policy(hf, variant: Variant, hf_state, lr: float):
    """Model + DDP + optimizer, as ``Trainer.__init__`` builds them (TP1, one process)."""
    import torch

    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
    from gmpo_megatron.megatron.optimizer import OptimSettings, build_optimizer, wrap_ddp
    from gmpo_megatron.megatron.weights import load_hf_weights
    from gmpo_megatron.models import get_mapping

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[variant.dtype]
    model = build_model(hf, BuildOptions(params_dtype=dtype, fp8=variant.fp8, fp8_recipe=variant.fp8_recipe,
                                         use_te=variant.use_te))
    if torch.cuda.is_available():
        model = model.cuda()
    if hf_state is not None:
        load_hf_weights(model, get_mapping(hf), hf_state)
    model = wrap_ddp(model, True)
    optimizer, scheduler = build_optimizer(model, OptimSettings(
        lr=lr, min_lr=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, grad_clip=1.0,
        warmup_steps=0, total_steps=100, distributed_optimizer=True, bf16=variant.dtype == "bf16"))
    return model, optimizer, scheduler


def gmpo_steps(hf, variant: Variant, hf_state, samples, device, budget: int, rows: int) -> dict:
    """Old log-probs, two optimizer steps (two mini-batches), log-probs again."""
    from gmpo_megatron.megatron.train_step import LossSettings, compute_old_log_probs, train_on_batches

    samples = copy.deepcopy(samples)
    samples.old_log_probs = None
    model, optimizer, scheduler = build_policy(hf, variant, hf_state, lr=1e-4)
    everything = list(range(samples.num_samples))
    compute_old_log_probs(model, samples, micro_batches(model, samples, everything, variant.layout, device,
                                                        budget, rows), 1.0)
    old = _per_sample(samples)
    settings = LossSettings("gmpo", {}, 1.0, 0.0)
    losses, norms = [], []
    for mini in (everything[0::2], everything[1::2]):
        metrics, norm, ok = train_on_batches(model, optimizer, micro_batches(model, samples, mini, variant.layout,
                                                                             device, budget, rows), settings)
        if not ok:
            raise FloatingPointError("the optimizer skipped the step (non-finite gradients)")
        scheduler.step(1)
        losses.append(metrics.to_dict()["loss"])
        norms.append(norm)
    compute_old_log_probs(model, samples, micro_batches(model, samples, everything, variant.layout, device,
                                                        budget, rows), 1.0)
    after = _per_sample(samples)
    del model, optimizer, scheduler
    _free()
    return {"old": old, "losses": losses, "grad_norms": norms, "after": after}


def _per_sample(batch) -> list[list[float]]:
    """The batch's old log-probs, one list per sample."""
    return [part.tolist() for part in batch.old_log_probs.split(batch.response_lengths.tolist())]


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare(run: dict, base: dict) -> dict:
    def logp_diffs(key):
        diffs = [abs(a - b) for ra, rb in zip(run[key], base[key]) for a, b in zip(ra, rb)]
        return max(diffs), sum(diffs) / len(diffs)

    old_max, old_mean = logp_diffs("old")
    after_max, after_mean = logp_diffs("after")
    return {
        "logp_old_max": old_max, "logp_old_mean": old_mean, "logp_after_max": after_max,
        "logp_after_mean": after_mean,
        "loss_diff": max(abs(a - b) for a, b in zip(run["losses"], base["losses"])),
        "grad_norm_rel": max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(run["grad_norms"], base["grad_norms"])),
    }


def within(values: dict, tol: Tolerance) -> bool:
    return (values["logp_old_mean"] <= tol.logp_mean and values["logp_old_max"] <= tol.logp_max
            and values["logp_after_mean"] <= tol.logp_mean and values["logp_after_max"] <= tol.logp_max
            and values["loss_diff"] <= tol.loss and values["grad_norm_rel"] <= tol.grad_norm_rel)


def agreement_plan(cpu_smoke: bool, te: bool, fp8_ok: bool, fp8_recipe: str):
    """(variants in run order, comparisons)."""
    ref = Variant("local_fp32_padded", False, "fp32", "padded")
    variants = [ref, Variant("local_fp32_packed", False, "fp32", "packed"),
                Variant("local_fp32_leaky", False, "fp32", "leaky"),
                Variant("local_bf16_padded", False, "bf16", "padded"),
                Variant("local_bf16_packed", False, "bf16", "packed")]
    comparisons = [Comparison("local_fp32_packed", ref.name, LAYOUT_FP32),
                   Comparison("local_fp32_leaky", "local_fp32_packed", LAYOUT_FP32, control=True),
                   Comparison("local_bf16_padded", ref.name, BF16),
                   Comparison("local_bf16_packed", "local_bf16_padded", LAYOUT_BF16)]
    if te and not cpu_smoke:
        variants += [Variant("te_bf16_padded", True, "bf16", "padded"),
                     Variant("te_bf16_thd", True, "bf16", "thd")]
        comparisons += [Comparison("te_bf16_padded", ref.name, BF16),
                        Comparison("te_bf16_padded", "local_bf16_padded", BF16),
                        Comparison("te_bf16_thd", "te_bf16_padded", LAYOUT_BF16)]
        if fp8_ok:
            variants.append(Variant("te_fp8_padded", True, "bf16", "padded", fp8="e4m3", fp8_recipe=fp8_recipe))
            comparisons.append(Comparison("te_fp8_padded", ref.name, FP8))
    return variants, comparisons


def run_agreement(args, report: dict, deadline: float, te: bool, fp8_ok: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from gmpo_megatron.components import checkpoint_layout_state
    from gmpo_megatron.models import get_mapping

    hf = agreement_config(args.cpu_smoke)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        state = checkpoint_layout_state(AutoModelForCausalLM.from_config(hf, dtype=torch.float32), get_mapping(hf))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.cpu_smoke:
        samples = synthetic_samples(16, hf.vocab_size, (3, 9), (2, 11), args.seed)
        budget, rows = 64, 4
    else:
        samples = synthetic_samples(48, hf.vocab_size, (16, 96), (32, 400), args.seed)
        budget, rows = 4096, 8
    variants, comparisons = agreement_plan(args.cpu_smoke, te, fp8_ok, args.fp8_recipe)
    results, errors = {}, {}
    for variant in variants:
        if time.monotonic() > deadline:
            errors[variant.name] = "skipped: time budget"
            continue
        start = time.monotonic()
        try:
            results[variant.name] = gmpo_steps(hf, variant, state.__getitem__, samples, device, budget, rows)
            results[variant.name]["seconds"] = time.monotonic() - start
        except Exception as error:  # noqa: BLE001 - recorded, the other variants still run
            errors[variant.name] = f"{type(error).__name__}: {str(error)[:300]}"
            _free()
    for c in comparisons:
        if c.variant in errors or c.baseline in errors:
            c.verdict = f"not run ({errors.get(c.variant) or errors.get(c.baseline)})"
            continue
        c.values = compare(results[c.variant], results[c.baseline])
        ok = within(c.values, c.tolerance)
        c.verdict = ("PASS (control: difference detected)" if not ok else "FAIL (control not detected)") \
            if c.control else ("PASS" if ok else "FAIL")
    report["agreement"] = {
        "model": describe(hf), "samples": samples.num_samples, "tokens": int(samples.lengths.sum()),
        "variants": {v.name: {**asdict(v), "seconds": results.get(v.name, {}).get("seconds"),
                              "error": errors.get(v.name),
                              "grad_norms": results.get(v.name, {}).get("grad_norms"),
                              "losses": results.get(v.name, {}).get("losses")} for v in variants},
        "comparisons": [{"variant": c.variant, "baseline": c.baseline, "tolerance": asdict(c.tolerance),
                         "control": c.control, "values": c.values, "verdict": c.verdict} for c in comparisons],
    }


def describe(hf) -> str:
    counts = param_counts(hf)
    return (f"hidden {hf.hidden_size}, {hf.num_hidden_layers} layers, {hf.num_attention_heads}/"
            f"{hf.num_key_value_heads} heads x {getattr(hf, 'head_dim', None)}, {hf.num_experts} experts "
            f"top-{hf.num_experts_per_tok} (ffn {hf.moe_intermediate_size}), vocab {hf.vocab_size}: "
            f"{_count(counts['total'])} parameters, {_count(counts['active'])} active per token")


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


# -- throughput -----------------------------------------------------------------------------------
def run_throughput(args, report: dict, deadline: float, te: bool, fp8_ok: bool, peak: float | None) -> None:
    import torch

    from gmpo_megatron.megatron.train_step import LossSettings, compute_old_log_probs, train_on_batches

    hf = throughput_config(args.cpu_smoke)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.cpu_smoke:
        seq, rows, micro, warmup, timed = 32, 2, 2, 1, 2
        variants = [Variant("local_fp32", False, "fp32", "padded")]
    else:
        seq, rows, micro, warmup, timed = args.seq_len, args.rows, args.micro_batches, 2, args.steps
        variants = [Variant("local_bf16", False, "bf16", "padded")]
        if te:
            variants.append(Variant("te_bf16", True, "bf16", "padded"))
            if fp8_ok:
                variants.append(Variant("te_fp8", True, "bf16", "padded", fp8="e4m3", fp8_recipe=args.fp8_recipe))
    prompt = seq // 4
    samples = synthetic_samples(rows * micro, hf.vocab_size, (prompt, prompt), (seq - prompt, seq - prompt),
                                args.seed)
    lengths = samples.lengths.tolist()
    tokens = sum(lengths)
    train_flops = model_flops(hf, lengths, training=True)
    forward_flops = model_flops(hf, lengths, training=False)
    rows_out = {}
    for variant in variants:
        if time.monotonic() > deadline:
            rows_out[variant.name] = {"error": "skipped: time budget"}
            continue
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            model, optimizer, scheduler = build_policy(hf, variant, None, lr=1e-6)
            everything = list(range(samples.num_samples))
            batches = micro_batches(model, samples, everything, "padded", device, 0, rows)
            settings = LossSettings("gmpo", {}, 1.0, 0.0)
            step_times, forward_times = [], []
            for i in range(warmup + timed):
                samples.old_log_probs = None
                _sync()
                t0 = time.perf_counter()
                compute_old_log_probs(model, samples, batches, 1.0)
                _sync()
                t1 = time.perf_counter()
                batches = micro_batches(model, samples, everything, "padded", device, 0, rows)  # with old log-probs
                _sync()
                t2 = time.perf_counter()
                _, _, ok = train_on_batches(model, optimizer, batches, settings)
                _sync()
                t3 = time.perf_counter()
                if i >= warmup:
                    forward_times.append(t1 - t0)
                    step_times.append(t3 - t2)
                if time.monotonic() > deadline and i >= warmup:
                    break
            step, forward = sorted(step_times)[len(step_times) // 2], sorted(forward_times)[len(forward_times) // 2]
            row = {"tokens": tokens, "step_s": step, "tokens_per_s": tokens / step,
                   "tflops": train_flops / step / 1e12, "forward_s": forward,
                   "forward_tokens_per_s": tokens / forward, "forward_tflops": forward_flops / forward / 1e12,
                   "timed_steps": len(step_times),
                   "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None}
            row["mfu"] = row["tflops"] / peak if peak else None
            row["forward_mfu"] = row["forward_tflops"] / peak if peak else None
            rows_out[variant.name] = row
            del model, optimizer, scheduler, batches
        except Exception as error:  # noqa: BLE001 - recorded, the other variants still run
            rows_out[variant.name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        _free()
    report["throughput"] = {"model": describe(hf), "params": param_counts(hf), "seq_len": seq,
                            "micro_batch": f"{rows} x {seq}", "micro_batches": micro, "tokens_per_step": tokens,
                            "train_flops_per_step": train_flops, "forward_flops_per_step": forward_flops,
                            "peak_bf16_tflops": peak, "variants": rows_out}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- report ---------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    env = report["environment"]
    title = "GPU check" if not report["cpu_smoke"] else "CPU smoke run of the GPU check (not a GPU result)"
    lines = [f"## {report['date']}: {title} on {env['device']}", "",
             f"Command: `{report['command']}`", "",
             f"Device: {env['device']} (peak dense BF16: "
             f"{str(env['peak_bf16_tflops']) + ' TFLOP/s' if env['peak_bf16_tflops'] else 'unknown, no MFU'}); "
             f"torch {env['torch']} ({'CUDA ' + env['cuda'] if env['cuda'] else 'no CUDA'}); megatron-core {env['megatron_core']}; transformers "
             f"{env['transformers']}; Transformer-Engine {env['transformer_engine']}; Python {env['python']}; "
             f"commit {env['commit']}; {report['seconds']:.0f} s in all.", ""]
    agreement = report.get("agreement")
    if agreement:
        lines += ["### Agreement", "",
                  f"Model: {agreement['model']}; {agreement['samples']} sequences, {agreement['tokens']} tokens; "
                  "old log-probs, 2 GMPO optimizer steps (lr 1e-4), log-probs again, through the trainer's "
                  "step functions. Differences from the baseline (log-probs in nats, over response tokens; "
                  "loss absolute; grad norm relative; the largest over both steps).", "",
                  "| variant | baseline | old log-prob max / mean | log-prob after max / mean | loss | grad norm "
                  "| tolerance (log-prob mean / max, loss, grad norm) | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in agreement["comparisons"]:
            v, t = c["values"], c["tolerance"]
            cells = (f"{v['logp_old_max']:.2e} / {v['logp_old_mean']:.2e} | {v['logp_after_max']:.2e} / "
                     f"{v['logp_after_mean']:.2e} | {v['loss_diff']:.2e} | {v['grad_norm_rel']:.2e}") if v \
                else "- | - | - | -"
            lines.append(f"| {c['variant']}{' (control)' if c['control'] else ''} | {c['baseline']} | {cells} | "
                         f"{t['name']}: {t['logp_mean']:g} / {t['logp_max']:g}, {t['loss']:g}, "
                         f"{t['grad_norm_rel']:g} | {c['verdict']} |")
        failed = {n: v["error"] for n, v in agreement["variants"].items() if v["error"]}
        lines += [""] + [f"- {n}: {e}" for n, e in failed.items()] + ([""] if failed else [])
    throughput = report.get("throughput")
    if throughput:
        lines += ["### Throughput", "",
                  f"Model: {throughput['model']}; micro-batches of {throughput['micro_batch']} tokens, "
                  f"{throughput['micro_batches']} per optimizer step ({throughput['tokens_per_step']} tokens); "
                  "median of the timed steps. Model FLOPs: 6 * N_active * S + 6 * L * heads * head_dim * S^2 "
                  "per sequence (training), a third of it for the old-log-prob forward; MFU against peak "
                  "dense BF16 (FP8 rows too).", "",
                  "| variant | train step s | train tokens/s | TFLOP/s | MFU | forward tokens/s | forward MFU "
                  "| peak GiB |", "|---|---|---|---|---|---|---|---|"]
        for name, row in throughput["variants"].items():
            if row.get("error"):
                lines.append(f"| {name} | {row['error']} | | | | | | |")
                continue
            pct = lambda x: f"{100 * x:.1f}%" if x is not None else "n/a"  # noqa: E731
            mem = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "n/a"
            lines.append(f"| {name} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['tflops']:.3g} | "
                         f"{pct(row['mfu'])} | {row['forward_tokens_per_s']:.0f} | {pct(row['forward_mfu'])} | {mem} |")
        lines.append("")
    lines.append(f"Verdict: {report['verdict']}")
    return "\n".join(lines) + "\n"


def append_section(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else "# GPU results\n"
    path.write_text(old.rstrip("\n") + "\n\n" + text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, fp32, on CPU (CI)")
    parser.add_argument("--wheels", help="install gpu_check_requirements.txt from the wheels in this folder first")
    parser.add_argument("--results", help="Markdown file to append to (default: docs/gpu-results.md; "
                                          "--cpu-smoke: outputs/gpu_check_smoke.md)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--time-budget-s", type=float, default=540.0,
                        help="later variants are skipped past this (default 540: under 10 minutes in all)")
    parser.add_argument("--peak-tflops", type=float, help="peak dense BF16 TFLOP/s (default: from the device name)")
    parser.add_argument("--fp8-recipe", default="tensorwise", choices=("tensorwise", "blockwise", "delayed"))
    parser.add_argument("--seq-len", type=int, default=4096, help="throughput: tokens per sequence")
    parser.add_argument("--rows", type=int, default=2, help="throughput: sequences per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=4, help="throughput: micro-batches per step")
    parser.add_argument("--steps", type=int, default=4, help="throughput: timed steps (after 2 warm-up)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.time_budget_s
    if args.wheels:
        command = wheel_install_command(args.wheels)
        print("+", shlex.join(command), flush=True)
        subprocess.run(command, check=True)
    check_torch(args.cpu_smoke)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from gmpo_megatron.megatron.parallel import destroy_distributed, init_distributed

    te, te_version = (False, "not used (--cpu-smoke)") if args.cpu_smoke else te_imports()
    gpu = torch.cuda.is_available() and not args.cpu_smoke
    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({platform_name()})"
    fp8_ok = te and gpu and torch.cuda.get_device_capability() >= (8, 9)
    peak = peak_bf16_tflops(device_name, args.peak_tflops) if gpu else args.peak_tflops
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_smoke": args.cpu_smoke,
        "command": shlex.join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": {"device": device_name, "peak_bf16_tflops": peak, "torch": torch.__version__,
                        "cuda": torch.version.cuda, "megatron_core": version("megatron-core"),
                        "transformers": version("transformers"), "transformer_engine": te_version,
                        "python": platform.python_version(),
                        "commit": git_commit(), "fp8": "yes" if fp8_ok else "no"},
    }
    init_distributed(seed=args.seed)
    crashed = []  # a phase that died outside its per-variant guard: recorded, the file still written
    try:
        for phase, run in (("agreement", lambda: run_agreement(args, report, deadline, te, fp8_ok)),
                           ("throughput", lambda: run_throughput(args, report, deadline, te, fp8_ok, peak))):
            if phase == "throughput" and args.skip_throughput:
                continue
            try:
                run()
            except Exception as error:  # noqa: BLE001
                crashed.append(f"{phase}: {type(error).__name__}: {str(error)[:300]}")
                _free()
    finally:
        destroy_distributed()
    verdicts = [c["verdict"] for c in report.get("agreement", {}).get("comparisons", [])]
    broken = [n for n, v in report.get("throughput", {}).get("variants", {}).items() if v.get("error")]
    failed = sum(not v.startswith("PASS") for v in verdicts)
    report["verdict"] = ("PASS" if not failed and not broken and not crashed else
                         f"FAIL ({failed} comparison(s) not passed"
                         f"{'; throughput failed: ' + ', '.join(broken) if broken else ''}"
                         f"{'; crashed: ' + ' | '.join(crashed) if crashed else ''})")
    report["seconds"] = time.monotonic() - started
    text = markdown(report)
    results = Path(args.results) if args.results else REPO / (
        "outputs/gpu_check_smoke.md" if args.cpu_smoke else "docs/gpu-results.md")
    append_section(results, text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(text, flush=True)
    print(f"appended to {results}", flush=True)
    return 0 if report["verdict"] == "PASS" else 1


def platform_name() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
