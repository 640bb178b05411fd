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
from gmpo_megatron.megatron.micro_batches import MicroBatch
from gmpo_megatron.rollout.batch import RolloutBatch


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
    layout alike), so prompt and padding positions cost no log-softmax. Under context parallelism
    (``[b, S/CP, V/TP]``) see ``_cp_log_probs_of``."""
    if batch.cp is not None:
        return _cp_log_probs_of(output, batch, temperature, with_entropy)
    flat = output.reshape(-1, output.shape[-1])
    logits = flat.index_select(0, batch.logit_index.reshape(-1))
    log_prob, entropy = token_log_probs(
        logits, batch.targets.reshape(-1), tp_group=_tp_group(), temperature=temperature,
        with_entropy=with_entropy,
    )
    shape = batch.targets.shape
    return log_prob.view(shape), (entropy.view(shape) if entropy is not None else None)


def _cp_log_probs_of(output: torch.Tensor, batch: MicroBatch, temperature: float, with_entropy: bool):
    """``_log_probs_of`` on a context-parallel rank: the response tokens whose logits this rank
    holds, merged with the other CP ranks' into the whole ``[B, R]`` on every CP rank (exact; the
    backward keeps only this rank's own tokens: ``merge_disjoint_over_context_parallel``). Every
    CP rank then computes the same, unsplit loss."""
    from megatron.core import parallel_state as ps

    from gmpo_megatron.algo.context_parallel import merge_disjoint_over_context_parallel

    owned = batch.cp.logit_owned
    flat = output.reshape(-1, output.shape[-1])
    logits = flat.index_select(0, batch.logit_index[owned])
    log_prob, entropy = token_log_probs(logits, batch.targets[owned], tp_group=_tp_group(),
                                        temperature=temperature, with_entropy=with_entropy)
    group = ps.get_context_parallel_group()

    def merged(values):
        part = values.new_zeros(owned.shape).masked_scatter(owned, values)
        return merge_disjoint_over_context_parallel(part, group)

    return merged(log_prob), (merged(entropy) if entropy is not None else None)


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
        if batch.cp is not None and batch.cp.rank != 0:
            # Every CP rank holds the whole loss; Megatron sums the counts over DP x CP ranks, so
            # only CP rank 0 counts the micro-batch's sequences (tokens), once.
            count = torch.zeros_like(count)
    return loss, count.to(torch.int), {"metrics": metrics}


def _old_log_prob_func(temperature: float, batch: MicroBatch, output: torch.Tensor):
    log_prob, _ = _log_probs_of(output, batch, temperature, False)
    zero = output.new_zeros(()).float()
    return zero, torch.tensor(0, dtype=torch.int), {"log_prob": log_prob.detach().float().cpu(),
                                                   "indices": batch.sample_indices}


def _forward_step(loss_func, routing, data_iterator, model):
    batch: MicroBatch = next(data_iterator)
    with routing(batch):
        output = model(batch.tokens, batch.position_ids, attention_mask=batch.attention_mask,
                       packed_seq_params=batch.packed_seq_params)
    return output, partial(loss_func, batch)


def _no_routing(batch: MicroBatch):
    return nullcontext()


def run_schedule(model_chunks, batches: list[MicroBatch], loss_func, forward_only: bool,
                 routing=_no_routing):
    """Megatron's forward(-backward) schedule over ``batches`` (PP-aware). ``routing(batch)`` is a
    context manager entered around each forward (routing replay record / replay)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()
    seq = max(b.seq_len for b in batches)  # unsplit: Megatron divides it by CP for pipeline p2p
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


def _replay_given_routes(replay, chunks, batches: list[MicroBatch], routes: dict[int, dict], tag: str):
    """Lay per-sequence ``routes`` out in each micro-batch and return the routing context that
    replays them (keys ``(tag, sample indices)``)."""
    from megatron.core import parallel_state as ps

    sequence_parallel = chunks[0].config.sequence_parallel
    tp_rank = ps.get_tensor_model_parallel_rank() if sequence_parallel else 0
    tp_size = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    for b in batches:
        replay.set_sequence_routes((tag, tuple(b.sample_indices)), [routes[i] for i in b.sample_indices],
                                   b.spans, (b.tokens.shape[0], b.seq_len), tp_rank, tp_size,
                                   cp_positions=b.cp.positions if b.cp is not None else None)
    return lambda b: replay.replay((tag, tuple(b.sample_indices)))


@torch.no_grad()
def compute_old_log_probs(model_chunks, batch: RolloutBatch, batches: list[MicroBatch],
                          temperature: float, replay=None,
                          engine_routes: dict[int, dict] | None = None) -> dict[int, dict] | None:
    """Fill ``batch.old_log_probs`` for the samples of ``batches`` on the last pipeline stage
    (the only stage that reads them); they stay on this rank (``step_data.exchange_old_log_probs``
    hands them to the DP ranks whose update micro-batches need them).

    With ``replay`` (a RoutingReplay) the routes of every pass are fixed per sample
    (``{sample index: {layer: [n, top_k]}}``) and returned for the update passes to replay:
    R2 records them in this pass (this stage's layers, this DP rank's samples:
    ``step_data.exchange_sequence_routes`` completes them); R3 (``engine_routes``: the rollout
    engine's routes) replays them here already."""
    from megatron.core import parallel_state as ps

    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    for chunk in chunks:
        chunk.eval()
    if replay is None:
        routing = _no_routing
    elif engine_routes is not None:
        routing = _replay_given_routes(replay, chunks, batches, engine_routes, "old")
    else:
        routing = lambda b: replay.record(("old", tuple(b.sample_indices)))  # noqa: E731
    try:
        outputs = run_schedule(model_chunks, batches, partial(_old_log_prob_func, temperature),
                               forward_only=True, routing=routing)
    finally:
        if engine_routes is not None and replay is not None:
            replay.clear()
    for chunk in chunks:
        chunk.train()
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        if batch.old_log_probs is None:
            batch.old_log_probs = torch.zeros(int(batch.response_lengths.sum()), dtype=torch.float32)
        for out in outputs or []:
            batch.store_old_log_probs(out["indices"], out["log_prob"])
    if replay is None:
        return None
    if engine_routes is not None:
        return engine_routes
    routes: dict[int, dict] = {}
    sp_group = _tp_group() if chunks[0].config.sequence_parallel else None
    cp_group = ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None
    for b in batches:
        key = ("old", tuple(b.sample_indices))
        per_sequence = replay.sequence_routes(key, b.spans, (b.tokens.shape[0], b.seq_len),
                                              tp_group=sp_group, cp_group=cp_group)
        routes.update(zip(b.sample_indices, per_sequence))
    replay.clear()
    return routes


def train_on_batches(model_chunks, optimizer, batches: list[MicroBatch], settings: LossSettings,
                     replay=None, routes: dict[int, dict] | None = None) -> tuple[Metrics, float, bool]:
    """One optimizer step over ``batches`` (this rank's micro-batches of one mini-batch); with
    ``replay`` and ``routes`` (from ``compute_old_log_probs``) every forward uses the recorded experts.

    Returns (metrics of this rank, reduced over DP later; grad norm; update successful)."""
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    routing = _no_routing
    if replay is not None:
        routing = _replay_given_routes(replay, chunks, batches, routes, "update")
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
