"""Check a conversion: Megatron logits against transformers logits, or tensors after a round trip.

Logits mode (``verify_logits``): the Megatron model is built at the given layout (one process or
torchrun), loaded from a Megatron checkpoint (or, without one, straight from the HF directory with
``load_hf_weights`` — a check of the mapping itself), and run with the pipeline schedule on the same
random tokens as ``transformers``' model. Reported: max / mean absolute logit difference, cosine
similarity of the flattened logits, and the difference of the per-token log-probabilities of the
next token (what RL actually consumes). Both sides compute in ``dtype`` (fp32 by default).

Weights mode (``verify_weights``): every tensor of an HF checkpoint against another HF checkpoint
(e.g. the export of a round trip; block-FP8 tensors are dequantised and held to the FP8 error bound)
or against a Megatron checkpoint read through the mapping. Names, shapes and dtypes must match and
values must be bit-identical (``torch.equal``) unless a tolerance is given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from gmpo_megatron.convert import fp8 as fp8_format
from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.hf_io import open_hf_checkpoint
from gmpo_megatron.convert.megatron_ckpt import (
    checkpoint_info,
    converter_build_options,
    load_hf_config,
    load_megatron_model,
)
from gmpo_megatron.convert.validate import check_hf_config, compare_hf_configs
from gmpo_megatron.models import get_mapping


@dataclass
class LogitsReport:
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float
    max_logprob_diff: float
    mean_logprob_diff: float
    tokens: int
    layout: dict
    max_abs_tolerance: float
    min_cosine: float
    passed: bool = False

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict} logits over {self.tokens} tokens at {self.layout}: max|diff| "
                f"{self.max_abs_diff:.3e} (tolerance {self.max_abs_tolerance:.1e}), mean|diff| "
                f"{self.mean_abs_diff:.3e}, cosine {self.cosine:.8f} (min {self.min_cosine}), "
                f"next-token log-prob max|diff| {self.max_logprob_diff:.3e} mean "
                f"{self.mean_logprob_diff:.3e}")


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, tokens: torch.Tensor,
                   max_abs_tolerance: float, min_cosine: float, layout: dict) -> LogitsReport:
    """``reference``/``candidate`` ``[B, S, V]``; ``tokens`` ``[B, S]``."""
    ref, got = reference.double(), candidate.double()
    diff = (ref - got).abs()
    cosine = torch.nn.functional.cosine_similarity(ref.reshape(1, -1), got.reshape(1, -1)).item()
    nxt = tokens[:, 1:].unsqueeze(-1)
    lp_ref = torch.log_softmax(ref[:, :-1], dim=-1).gather(-1, nxt)
    lp_got = torch.log_softmax(got[:, :-1], dim=-1).gather(-1, nxt)
    lp_diff = (lp_ref - lp_got).abs()
    report = LogitsReport(diff.max().item(), diff.mean().item(), cosine, lp_diff.max().item(),
                          lp_diff.mean().item(), tokens.numel(), layout, max_abs_tolerance,
                          min_cosine)
    report.passed = report.max_abs_diff <= max_abs_tolerance and report.cosine >= min_cosine
    return report


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full ``[B, S, V]`` logits on last-stage ranks (gathered over TP), None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq)

    def forward_step(data_iterator, chunk):
        return chunk(tokens, position_ids, None), None  # loss_func None: the schedule keeps logits

    model.eval()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
        num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    logits = outputs[0]  # [B, S, V/TP]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        pieces = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(pieces, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(pieces, dim=-1)
    return logits.float()


def hf_logits(hf_dir: str, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, local_files_only=True)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def random_tokens(vocab_size: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def verify_logits(hf_dir: str, megatron_dir: str | None = None, *, hf_config_dir: str | None = None,
                  tp: int = 1, pp: int = 1,
                  ep: int = 1, etp: int | None = None, batch: int = 2, seq: int = 32,
                  seed: int = 0, dtype: torch.dtype = torch.float32,
                  max_abs_tolerance: float = 1e-4, min_cosine: float = 0.9999) -> LogitsReport:
    """Collective under torchrun; every rank returns the same report. ``hf_config_dir``: the
    config of a ``megatron_dir`` that carries none (a trainer checkpoint: ``<output_dir>/hf``)."""
    from gmpo_megatron.convert.hf_to_megatron import _ensure_process_group
    from gmpo_megatron.megatron.model_builder import build_model
    from gmpo_megatron.megatron.parallel import destroy_distributed, init_distributed
    from gmpo_megatron.megatron.weights import load_hf_weights

    hf_config = load_hf_config(hf_dir)
    check_hf_config(hf_config)
    if megatron_dir is not None:
        info = checkpoint_info(megatron_dir, hf_config_dir)
        compare_hf_configs(hf_config, info.hf_config, f"--hf-dir {hf_dir}",
                           f"the config of {megatron_dir}")
    if seq % tp:
        raise ConversionError(f"--seq-len {seq} must be divisible by --tp {tp} (sequence parallel)")
    tokens = random_tokens(hf_config.vocab_size, batch, seq, seed)
    started = _ensure_process_group()
    try:
        layout = init_distributed(tp=tp, pp=pp, ep=ep, etp=etp)
        model = build_model(hf_config, converter_build_options(tp=tp, pp=pp, ep=ep, etp=etp,
                                                    params_dtype=dtype))
        if megatron_dir is not None:
            load_megatron_model(model, megatron_dir)
        else:
            with open_hf_checkpoint(hf_dir) as ckpt:
                load_hf_weights(model, get_mapping(hf_config), ckpt.read)
        logits = megatron_logits(model, tokens)
        report = None
        if logits is not None and layout.tp_rank == 0 and layout.dp_rank == 0:
            reference = hf_logits(hf_dir, tokens, dtype)
            where = {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.etp}
            report = compare_logits(reference, logits, tokens, max_abs_tolerance, min_cosine, where)
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, report)
        return next(r for r in reports if r is not None)
    finally:
        if started:
            destroy_distributed()


# -- weights ---------------------------------------------------------------------------------

@dataclass
class WeightsReport:
    compared: int = 0
    identical: int = 0
    mismatches: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    fp8_tensors: int = 0

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        text = (f"{verdict} weights: {self.compared} tensors compared, {self.identical} bit-identical"
                f", max|diff| {self.max_abs_diff:.3e}")
        if self.fp8_tensors:
            text += f", {self.fp8_tensors} block-FP8 tensors within the FP8 error bound"
        if self.mismatches:
            text += f"\n  {len(self.mismatches)} mismatch(es):\n  - " + "\n  - ".join(
                self.mismatches[:20])
        return text

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def fp8_error_bound(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |W - q*s| for round-to-nearest e4m3: half a unit in the last place
    (3 mantissa bits: 2^-4 relative) of the scaled value, and half the smallest subnormal step
    (2^-10) for tiny values, in the block's scale."""
    deq = fp8_format.dequantize_block_fp8(q, scale_inv)
    scale = fp8_format.block_scales(scale_inv, tuple(q.shape))
    return torch.maximum(deq.abs() * 2.0**-4, scale * 2.0**-10) * 1.0001


def _compare(report: WeightsReport, name: str, ref: torch.Tensor, got: torch.Tensor,
             atol: float) -> None:
    report.compared += 1
    if ref.shape != got.shape:
        report.mismatches.append(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        return
    if ref.dtype != got.dtype:
        report.mismatches.append(f"{name}: dtype {got.dtype} != {ref.dtype}")
        return
    if torch.equal(ref, got):
        report.identical += 1
        return
    diff = (ref.double() - got.double()).abs().max().item()
    report.max_abs_diff = max(report.max_abs_diff, diff)
    if diff > atol:
        report.mismatches.append(f"{name}: max|diff| {diff:.3e}")


def verify_weights(hf_dir: str, *, other_hf_dir: str | None = None,
                   megatron_dir: str | None = None, hf_config_dir: str | None = None,
                   atol: float = 0.0) -> WeightsReport:
    """Compare ``hf_dir`` with ``other_hf_dir`` or ``megatron_dir`` tensor by tensor (streaming)."""
    if (other_hf_dir is None) == (megatron_dir is None):
        raise ConversionError("weights mode compares --hf-dir with exactly one of --other-hf-dir, "
                              "--megatron-dir")
    hf_config = load_hf_config(hf_dir)
    mapping = get_mapping(hf_config)
    report = WeightsReport()
    with open_hf_checkpoint(hf_dir) as ref:
        if other_hf_dir is not None:
            compare_hf_configs(hf_config, load_hf_config(other_hf_dir), f"--hf-dir {hf_dir}",
                               f"--other-hf-dir {other_hf_dir}")
            with open_hf_checkpoint(other_hf_dir) as other:
                _compare_hf(report, ref, other, atol)
        else:
            _compare_megatron(report, ref, megatron_dir, mapping, hf_config, atol, hf_config_dir)
    return report


def _compare_hf(report: WeightsReport, ref, other, atol: float) -> None:
    scales = {n for n in other.keys() if n.endswith(fp8_format.SCALE_SUFFIX)}
    ref_names, other_names = set(ref.keys()), set(other.keys()) - scales
    for name in sorted(ref_names - other_names):
        report.mismatches.append(f"{name}: missing from the other checkpoint")
    for name in sorted(other_names - ref_names):
        report.mismatches.append(f"{name}: not in the reference checkpoint")
    for name in sorted(ref_names & other_names):
        expected = ref.read(name)
        got = other.read(name)
        scale_name = name + fp8_format.SCALE_SUFFIX
        if scale_name in scales:
            report.compared += 1
            scale_inv = other.read(scale_name)
            if scale_inv.shape != fp8_format.scale_shape(tuple(got.shape)):
                report.mismatches.append(f"{scale_name}: shape {tuple(scale_inv.shape)}")
                continue
            error = (fp8_format.dequantize_block_fp8(got, scale_inv) - expected.float()).abs()
            if bool((error > fp8_error_bound(got, scale_inv)).any()):
                report.mismatches.append(f"{name}: FP8 error {error.max().item():.3e} above bound")
            else:
                report.fp8_tensors += 1
            continue
        if got.dtype != expected.dtype and got.dtype == fp8_format.KEPT_DTYPE:
            expected = expected.to(got.dtype)  # an FP8 export keeps unquantised tensors in bf16
        _compare(report, name, expected, got, atol)


def _compare_megatron(report: WeightsReport, ref, megatron_dir: str, mapping, hf_config,
                      atol: float, hf_config_dir: str | None) -> None:
    from gmpo_megatron.convert.megatron_to_hf import stream_megatron_tensors
    from gmpo_megatron.convert.torch_dist_reader import TorchDistCheckpoint
    from gmpo_megatron.convert.validate import check_megatron_tensors

    info = checkpoint_info(megatron_dir, hf_config_dir)
    compare_hf_configs(hf_config, info.hf_config, "--hf-dir", f"the config of {megatron_dir}")
    reader = TorchDistCheckpoint(info.directory, vocab_size=hf_config.vocab_size)
    check_megatron_tensors(reader.shapes(), mapping, info.directory)
    for megatron_name, full in stream_megatron_tensors(reader, mapping):
        for hf_name, tensor in mapping.to_hf(megatron_name, full):
            expected = ref.read(hf_name)
            if tensor.dtype != expected.dtype:
                back = tensor.to(expected.dtype)
                if not torch.equal(back.to(tensor.dtype), tensor):
                    report.mismatches.append(f"{hf_name}: the Megatron {tensor.dtype} values are "
                                             f"not representable in the HF {expected.dtype}")
                    report.compared += 1
                    continue
                tensor = back
            _compare(report, hf_name, expected, tensor, atol)
