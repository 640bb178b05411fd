"""Token log-probabilities and entropy from (vocab-parallel) logits, chunked over tokens.

For a token with (temperature-scaled) logits x = logits / temperature over the full vocabulary:

    lse      = log sum_v exp(x_v)
    log_prob = x_target - lse
    entropy  = -sum_v p_v log p_v = lse - sum_v p_v x_v,          p_v = exp(x_v - lse)

and the gradients with respect to x (then divided by the temperature for the logits):

    d log_prob / d x_v = 1[v = target] - p_v
    d entropy  / d x_v = -p_v (log p_v + entropy)

Under tensor parallelism each rank holds a vocab shard `[T, V/TP]` (rank r owns the global ids
[r*V/TP, (r+1)*V/TP)); the forward needs two all-reduces per chunk (MAX of the max-logit, then one
SUM of [sum-exp, the target logit (owned by exactly one rank), sum p*x]); the backward needs none,
because p_v only needs the global lse, saved per token.

Memory: the naive `log_softmax(logits.float())` keeps an fp32 `[T, V]` copy for backward (and an
entropy adds more). Here the forward saves only the input logits (already alive) and three `[T]`
statistics; both passes work on `chunk_size` tokens at a time, so the extra memory is two fp32
`[chunk_size, V/TP]` buffers, plus the `[T, V/TP]` gradient in the logits' dtype in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = ["token_log_probs"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled_chunk(logits: torch.Tensor, start: int, end: int, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """A fresh `[end-start, V/TP]` buffer of logits / temperature in `dtype` (safe to edit in place)."""
    x = logits[start:end].to(dtype=dtype, copy=True)
    if temperature != 1.0:
        x.div_(temperature)
    return x


class _VocabParallelTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, tp_rank, tp_size, temperature, chunk_size, with_entropy):
        num_tokens, vocab_shard = logits.shape
        dtype = _compute_dtype(logits.dtype)
        log_prob = torch.empty(num_tokens, dtype=dtype, device=logits.device)
        entropy = torch.empty(num_tokens if with_entropy else 0, dtype=dtype, device=logits.device)
        lse = torch.empty(num_tokens, dtype=dtype, device=logits.device)
        local_target = target - tp_rank * vocab_shard
        owned = (local_target >= 0) & (local_target < vocab_shard)
        local_target = local_target.clamp(0, vocab_shard - 1)

        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            x = _scaled_chunk(logits, start, end, temperature, dtype)
            max_logit = x.amax(-1)
            if tp_size > 1:
                dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=tp_group)
            x.sub_(max_logit[:, None])  # shifted by the global max: exp never overflows
            target_logit = torch.where(owned[start:end], x.gather(1, local_target[start:end, None]).squeeze(1), 0.0)
            if with_entropy:
                e = torch.exp(x)
                # sum_v e_v (x_v - max), for E_p[x]; a batched dot writes no [chunk, V] product
                sum_exp_x = torch.einsum("tv,tv->t", e, x)
                stats = torch.stack([e.sum(-1), target_logit, sum_exp_x])
                del e
            else:
                stats = torch.stack([x.exp_().sum(-1), target_logit])
            del x
            if tp_size > 1:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
            log_sum_exp = stats[0].log()
            log_prob[start:end] = stats[1] - log_sum_exp
            lse[start:end] = max_logit + log_sum_exp
            if with_entropy:
                entropy[start:end] = log_sum_exp - stats[2] / stats[0]

        ctx.save_for_backward(logits, local_target, owned, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return log_prob, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_prob, grad_entropy):
        logits, local_target, owned, lse, entropy = ctx.saved_tensors
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_log_prob is None and grad_entropy is None:
            return (None,) * 8
        dtype = lse.dtype
        inv_temperature = 1.0 / ctx.temperature
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, logits.shape[0])
            g_lp = None if grad_log_prob is None else grad_log_prob[start:end].to(dtype)
            log_p = _scaled_chunk(logits, start, end, ctx.temperature, dtype).sub_(lse[start:end, None])
            p = torch.exp(log_p)
            # d/dlogits_v = (1/temperature) * [ g_lp (1[v = target] - p_v) - g_H p_v (log p_v + H) ]
            #             = p_v (a log p_v + b) + (g_lp / temperature) 1[v = target]
            # with a = -g_H / temperature and b = -(g_H H + g_lp) / temperature: three passes.
            if grad_entropy is not None:
                g_h = grad_entropy[start:end].to(dtype)
                a = -g_h * inv_temperature
                b = -(g_h * entropy[start:end] + (0.0 if g_lp is None else g_lp)) * inv_temperature
                grad = log_p.mul_(a[:, None]).add_(b[:, None]).mul_(p)
                del p
            else:
                del log_p
                grad = p.mul_((-g_lp * inv_temperature)[:, None])
            if g_lp is not None:  # the one-hot term, only on the rank that owns the target id
                one_hot = torch.where(owned[start:end], g_lp * inv_temperature, 0.0)
                grad.scatter_add_(1, local_target[start:end, None], one_hot[:, None])
            grad_logits[start:end].copy_(grad)
            del grad
        return grad_logits, None, None, None, None, None, None, None


def token_log_probs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target) and the entropy of pi per token, from this rank's vocab shard of the logits.

    logits `[T, V/TP]` (or `[..., V/TP]`; leading dims are kept): tensor-parallel rank r of
    `tp_group` holds vocab ids [r*V/TP, (r+1)*V/TP). target `[T]` (or `[...]`): GLOBAL token ids.
    tp_group=None means no tensor parallelism (the logits are the whole vocabulary), not the
    default process group. pi = softmax(logits / temperature).

    Returns (log_prob `[T]`, entropy `[T]` or None), float32 (float64 for float64 logits; bf16/fp16
    logits are upcast to float32 before the temperature division). Both outputs are
    differentiable w.r.t. the logits (the entropy for an entropy bonus); double backward is not
    supported. Checks that every target id is in [0, V) (one host synchronisation).
    """
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a [T, V/TP] float tensor, got {logits.dtype} {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target has shape {tuple(target.shape)}; expected {tuple(logits.shape[:-1])} "
            "(the logits' shape without the vocab dim)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}")
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    vocab_shard = logits.shape[-1]
    target = target.reshape(-1).long()
    if target.numel() > 0:
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= vocab_shard * tp_size:
            raise ValueError(
                f"target ids must lie in [0, {vocab_shard * tp_size}) = [0, V/TP * TP) with V/TP={vocab_shard}, "
                f"TP={tp_size}; got min {low}, max {high} (wrong tokenizer, or wrong tp_group?)"
            )
    log_prob, entropy = _VocabParallelTokenLogProbs.apply(
        logits.reshape(-1, vocab_shard), target, tp_group, tp_rank, tp_size,
        float(temperature), chunk_size, with_entropy,
    )
    leading = logits.shape[:-1]
    return log_prob.view(leading), (entropy.view(leading) if with_entropy else None)
