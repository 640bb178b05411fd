"""One policy update through Megatron: micro-batches, the forward step, the loss, the schedule.

Exact global normalisation. GMPO's loss is a mean over all sequences of the global batch (the 1/G
of Eq. 4); a mean per micro-batch (the known defect of public code) makes gradients depend on the
split. We use Megatron's own per-token-loss mechanism (``calculate_per_token_loss=True``): the loss
function returns the un-normalised sum over its micro-batch together with its unit count (sequences,
or tokens for token-mean losses, from ``algo.policy_loss.local_normalizer``); Megatron neither
divides by the number of micro-batches nor averages over data-parallel ranks, sums the counts over
micro-batches and DP ranks, and scales the summed gradients by 1 / total count in
``finalize_model_grads``. The gradient is then exactly that of the global-batch loss for any
micro-batch split, DP size and model-parallel layout.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from gmpo_megatron.algo.logprobs import token_log_probs
from gmpo_megatron.algo.metrics import Metrics
from gmpo_megatron.algo.policy_loss import local_normalizer, loss_normalizer_kind, policy_loss
from gmpo_megatron.megatron.micro_batches import MicroBatch, Sample


@dataclass
class LossSettings:
    mode: str
    options: dict[str, Any]
    temperature: float
    entropy_coef: float


def _tp_group():
    """The tensor-parallel group, None at TP1 (vocab-parallel log-probs, sequence-parallel routes)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def _log_probs_of(output: torch.Tensor, batch: MicroBatch, temperature: float, with_entropy: bool):
    """Log-probs (and entropy) of the response tokens, ``[B, R]``, from the model output
    ``[b, S, V/TP]``: only the rows that predict a response token are gathered (padded or packed
    layout alike), so prompt and padding positions cost no log-softmax."""
    flat = output.reshape(-1, output.shape[-1])
    logits = flat.index_select(0, batch.logit_index.reshape(-1))
    log_prob, entropy = token_log_probs(
        logits, batch.targets.reshape(-1), tp_group=_tp_group(), temperature=temperature,
        with_entropy=with_entropy,
    )
    shape = batch.targets.shape
    return log_prob.view(shape), (entropy.view(shape) if entropy is not None else None)


def _policy_loss_func(settings: LossSettings, batch: MicroBatch, output: torch.Tensor):
    log_prob, entropy = _log_probs_of(output, batch, settings.temperature, True)
    # rollout_log_prob always goes in: policy_loss reports |old - rollout| (the train / rollout
    # mismatch) and applies truncated IS only when the options ask for it.
    loss, metrics = policy_loss(
        settings.mode, log_prob, batch.old_log_prob, batch.advantages, batch.response_mask,
        normalizer=1.0,  # un-normalised sum; Megatron divides by the global count (module doc)
        rollout_log_prob=batch.rollout_log_prob, **settings.options,
    )
    mask = batch.response_mask
    token_entropy = torch.where(mask, entropy, 0.0)
    if settings.entropy_coef:
        # The bonus is summed in the loss's own units, so Megatron's division by the global count
        # turns it into the mean entropy per token (token-mean losses) or per sequence.
        if loss_normalizer_kind(settings.mode, **settings.options) == "tokens":
            bonus = token_entropy.sum()
        else:
            bonus = (token_entropy.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        loss = loss - settings.entropy_coef * bonus
    with torch.no_grad():
        metrics.add_mean("entropy", token_entropy.sum(), mask.sum())
        count = local_normalizer(settings.mode, mask, **settings.options)
        metrics.add_mean("loss", loss.detach().to(torch.float64), count)
    return loss, count.to(torch.int), {"metrics": metrics}


def _old_log_prob_func(temperature: float, batch: MicroBatch, output: torch.Tensor):
    log_prob, _ = _log_probs_of(output, batch, temperature, False)
    zero = output.new_zeros(()).float()
    return zero, torch.tensor(0, dtype=torch.int), {"log_prob": log_prob.detach().float().cpu(),
                                                   "indices": batch.sample_indices}


def _forward_step(loss_func, routing, data_iterator, model):
    batch: MicroBatch = next(data_iterator)
    with routing(batch):
        output = model(batch.tokens, batch.position_ids, attention_mask=batch.attention_mask)
    return output, partial(loss_func, batch)


def _no_routing(batch: MicroBatch):
    return nullcontext()


def run_schedule(model_chunks, batches: list[MicroBatch], loss_func, forward_only: bool,
                 routing=_no_routing):
    """Megatron's forward(-backward) schedule over ``batches`` (PP-aware). ``routing(batch)`` is a
    context manager entered around each forward (routing replay record / replay)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()
    seq = max(b.tokens.shape[1] for b in batches)
    mbs = max(b.tokens.shape[0] for b in batches)
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    return forward_backward(
        forward_step_func=partial(_forward_step, loss_func, routing),
        data_iterator=iter(batches),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


@torch.no_grad()
def compute_old_log_probs(model_chunks, samples: list[Sample], batches: list[MicroBatch],
                          temperature: float, replay=None) -> dict[int, dict] | None:
    """Fill ``Sample.old_log_probs`` on the last pipeline stage (the only stage that reads them).

    With ``replay`` (a RoutingReplay: R2), the routes of this pass are recorded and returned per
    sample (``{sample index: {layer: [n, top_k]}}``, this stage's layers, every sample of the
    batch on every DP rank) for the update passes to replay."""
    from megatron.core import parallel_state as ps

    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    for chunk in chunks:
        chunk.eval()
    routing = _no_routing if replay is None else (
        lambda b: replay.record(("old", tuple(b.sample_indices))))
    outputs = run_schedule(model_chunks, batches, partial(_old_log_prob_func, temperature),
                           forward_only=True, routing=routing)
    for chunk in chunks:
        chunk.train()
    local: list[tuple[int, list[float]]] = []
    for out in outputs or []:
        log_prob, indices = out["log_prob"], out["indices"]
        for row, index in enumerate(indices):
            local.append((index, log_prob[row, :len(samples[index].response_ids)].tolist()))
    # Each data-parallel rank scored its own share; the update's mini-batches are drawn from the
    # whole batch, so every rank of the last stage needs every sample's old log-probs.
    dp = ps.get_data_parallel_world_size()
    if ps.is_pipeline_last_stage(ignore_virtual=True) and dp > 1:
        shares: list = [None] * dp
        torch.distributed.all_gather_object(shares, local, group=ps.get_data_parallel_group())
        local = [item for share in shares for item in share]
    for index, values in local:
        samples[index].old_log_probs = values
    if replay is None:
        return None
    from gmpo_megatron.megatron.sequence_routes import all_gather_sequence_routes

    routes: dict[int, dict] = {}
    sp_group = _tp_group() if chunks[0].config.sequence_parallel else None
    for b in batches:
        key = ("old", tuple(b.sample_indices))
        per_sequence = replay.sequence_routes(key, b.spans, tuple(b.tokens.shape), tp_group=sp_group)
        routes.update(zip(b.sample_indices, per_sequence))
    replay.clear()
    if dp > 1:
        routes = all_gather_sequence_routes(routes, ps.get_data_parallel_group())
    return routes


def train_on_batches(model_chunks, optimizer, batches: list[MicroBatch], settings: LossSettings,
                     replay=None, routes: dict[int, dict] | None = None) -> tuple[Metrics, float, bool]:
    """One optimizer step over ``batches`` (this rank's micro-batches of one mini-batch); with
    ``replay`` and ``routes`` (from ``compute_old_log_probs``) every forward uses the recorded experts.

    Returns (metrics of this rank, reduced over DP later; grad norm; update successful)."""
    from megatron.core import parallel_state as ps

    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    routing = _no_routing
    if replay is not None:
        sequence_parallel = chunks[0].config.sequence_parallel
        tp_rank = ps.get_tensor_model_parallel_rank() if sequence_parallel else 0
        tp_size = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
        for b in batches:
            replay.set_sequence_routes(("update", tuple(b.sample_indices)),
                                       [routes[i] for i in b.sample_indices], b.spans,
                                       tuple(b.tokens.shape), tp_rank, tp_size)
        routing = lambda b: replay.replay(("update", tuple(b.sample_indices)))  # noqa: E731
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    try:
        outputs = run_schedule(model_chunks, batches, partial(_policy_loss_func, settings),
                               forward_only=False, routing=routing)
    finally:
        if replay is not None:
            replay.clear()  # the same samples come back next epoch under the same keys
    metrics = Metrics()
    for out in outputs or []:
        metrics.merge(out["metrics"])
    ok, grad_norm, _ = optimizer.step()
    return metrics, float(grad_norm) if grad_norm is not None else float("nan"), bool(ok)
