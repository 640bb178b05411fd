"""Rollout samples (a ``RolloutBatch``) -> Megatron micro-batches: padded or packed, planned across
data-parallel ranks.

Two layouts of the *model input*, one layout of the *loss input*:

- padded: ``tokens [b, S]``, one right-padded sequence per row (causal attention never sees the
  padding of its own row);
- packed: all sequences of the micro-batch back to back in one row ``tokens [1, T]`` with
  ``cu_seqlens`` (the THD layout). Megatron-Core 0.16.1's local attention has no THD kernel, so
  on the local spec the packed row carries a block-diagonal causal mask built from the same
  ``cu_seqlens``: a token attends only to earlier tokens of its own sequence. RoPE depends only on
  relative positions within a sequence, so this is the same computation as separate sequences
  (up to float rounding of the rotary tables). There is no padding between sequences; only the
  tail is padded to a multiple of the sequence-parallel size.
- loss input, both layouts: ``[B, R]`` with one row per sequence and R = the longest response,
  gathered from the model output by ``logit_index``; ``policy_loss`` sees exactly the response
  tokens of whole sequences, whatever the model layout.

Planning: every rank computes the same plan (a pure function of the sample lengths), so no
communication is needed: sequences are spread over DP ranks to balance tokens, packed into
micro-batches under a token budget, and every DP rank gets the same number of micro-batches
(expert-parallel all-to-alls inside the forward need all EP ranks to run the same schedule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gmpo_megatron.rollout.batch import RolloutBatch, exclusive_cumsum


@dataclass
class MicroBatch:
    """Model input (padded ``[b, S]`` or packed ``[1, T]``) + loss input ``[B, R]``.

    tokens, position_ids   [b, S]        model input
    attention_mask         [b, 1, S, S]  True = masked (packed rows only; None: causal)
    logit_index            [B, R]        flat position in the [b*S] model output whose logits
                                         predict response token j of sequence i (0 where unused)
    targets                [B, R]        response token ids
    response_mask          [B, R]        True for real response tokens
    old_log_prob, rollout_log_prob [B, R]
    advantages             [B]
    spans                  (row, start, length) of each sequence in ``tokens`` (routing replay)
    cp                     None, or this context-parallel rank's part (``cp_batches.CPShard``):
                           tokens, position_ids, attention_mask and logit_index are then the
                           rank's [b, S/CP] part; spans and the loss tensors stay unsplit
    packed_seq_params      THD boundaries for Transformer-Engine attention (packed_seq.py; None:
                           the mask above)
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    logit_index: torch.Tensor
    targets: torch.Tensor
    response_mask: torch.Tensor
    old_log_prob: torch.Tensor
    rollout_log_prob: torch.Tensor
    advantages: torch.Tensor
    sample_indices: list[int]
    spans: list[tuple[int, int, int]]
    cp: Any = None  # cp_batches.CPShard under context parallelism
    packed_seq_params: Any = None

    @property
    def seq_len(self) -> int:
        """The unsplit row length (the one spans and routes refer to)."""
        return self.cp.seq_len if self.cp is not None else int(self.tokens.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def _loss_inputs(batch: RolloutBatch, rows: torch.Tensor, starts: Sequence[int]):
    """[B, R] loss tensors; ``starts[i]`` is sequence i's first flat position in the model input.
    Row i holds sample i's response (left-aligned, zeros after): slice copies from the batch."""
    prompts, responses = batch.prompt_lengths[rows].tolist(), batch.response_lengths[rows].tolist()
    token_starts, response_starts = batch.token_starts[rows].tolist(), batch.response_starts[rows].tolist()
    b, r = len(responses), max(responses)
    logit_index = torch.zeros((b, r), dtype=torch.long)
    targets = torch.zeros((b, r), dtype=torch.long)
    mask = torch.zeros((b, r), dtype=torch.bool)
    old = torch.zeros((b, r), dtype=torch.float32)
    rollout = torch.zeros((b, r), dtype=torch.float32)
    steps = torch.arange(r)
    for i, (p, n, token, response, start) in enumerate(zip(prompts, responses, token_starts, response_starts, starts)):
        mask[i, :n] = True
        # response token j sits at position start + p + j and is predicted from the one before
        torch.add(steps[:n], start + p - 1, out=logit_index[i, :n])
        targets[i, :n] = batch.tokens[token + p:token + p + n]
        rollout[i, :n] = batch.rollout_log_probs[response:response + n]
        if batch.old_log_probs is not None:
            old[i, :n] = batch.old_log_probs[response:response + n]
    return logit_index, targets, mask, old, rollout


def model_input_shape(lengths: torch.Tensor, indices: Sequence[int], seq_multiple: int,
                      packed: bool) -> tuple[int, int]:
    """``(rows, sequence length)`` of the model input that ``build_micro_batch`` makes from the
    samples ``indices``; ``lengths [N]``: every sample's prompt + response length."""
    round_up = lambda n: -(-n // seq_multiple) * seq_multiple  # noqa: E731
    chosen = lengths[torch.as_tensor(list(indices), dtype=torch.long)]
    if packed:
        return 1, round_up(int(chosen.sum()))
    return len(indices), round_up(int(chosen.max()))


def build_micro_batch(batch: RolloutBatch, indices: Sequence[int], *, pad_id: int,
                      seq_multiple: int, device: torch.device, packed: bool,
                      min_shape: tuple[int, int] = (0, 0)) -> MicroBatch:
    """Samples ``indices`` (global sample numbers, all held by ``batch``) as one micro-batch; the
    model's sequence length is padded to a multiple of ``seq_multiple`` (the TP size under
    sequence parallelism). ``min_shape`` pads the model input to at least that many rows (padded
    layout) and tokens per row: the allgather MoE dispatcher needs the same token count on every
    expert-parallel rank."""
    if not len(indices):
        raise ValueError("a micro-batch needs at least one sequence")
    rows = batch.rows(indices)
    lengths, token_starts = batch.lengths[rows].tolist(), batch.token_starts[rows].tolist()
    n_rows, seq = model_input_shape(batch.lengths, rows.tolist(), seq_multiple, packed)  # by row of this batch
    n_rows, seq = max(n_rows, min_shape[0]), max(seq, min_shape[1])
    if packed:
        if n_rows != 1:
            raise ValueError(f"a packed micro-batch has one row, min_shape asks for {n_rows}")
        total, used = seq, sum(lengths)
        starts = exclusive_cumsum(torch.tensor(lengths)).tolist()
        tokens = torch.full((1, total), pad_id, dtype=torch.long)
        positions = torch.zeros((1, total), dtype=torch.long)
        segment = torch.empty(total, dtype=torch.long)
        steps = torch.arange(max(lengths))
        for i, (start, n, token) in enumerate(zip(starts, lengths, token_starts)):
            tokens[0, start:start + n] = batch.tokens[token:token + n]
            positions[0, start:start + n] = steps[:n]
            segment[start:start + n] = i
        segment[used:] = -1 - torch.arange(total - used)  # tail padding: one segment per token
        causal = torch.ones((total, total), dtype=torch.bool).tril()
        visible = causal & (segment[:, None] == segment[None, :])
        attention_mask = (~visible)[None, None]
        spans = [(0, start, n) for start, n in zip(starts, lengths)]
    else:  # extra rows (min_shape) hold only padding and feed no loss
        tokens = torch.full((n_rows, seq), pad_id, dtype=torch.long)
        for row, (n, token) in enumerate(zip(lengths, token_starts)):
            tokens[row, :n] = batch.tokens[token:token + n]
        positions = torch.arange(seq).unsqueeze(0).expand(n_rows, -1).contiguous()
        starts = [row * seq for row in range(len(indices))]
        attention_mask = None
        spans = [(row, 0, n) for row, n in enumerate(lengths)]
    logit_index, targets, mask, old, rollout = _loss_inputs(batch, rows, starts)
    advantages = batch.advantages[rows].to(torch.float32)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return MicroBatch(to(tokens), to(positions), to(attention_mask), to(logit_index), to(targets),
                      to(mask), to(old), to(rollout), to(advantages), [int(i) for i in indices], spans)


def split_evenly(items: Sequence[int], parts: int) -> list[list[int]]:
    """``parts`` contiguous chunks whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(list(items[start:start + size]))
        start += size
    return out


def _too_few(count: int, dp_size: int) -> ValueError:
    return ValueError(
        f"a mini-batch of {count} sequences cannot feed {dp_size} data-parallel ranks: raise "
        "rollout.prompts_per_step / rollout.n or lower train.mini_batches"
    )


def plan_micro_batches(indices: Sequence[int], dp_rank: int, dp_size: int,
                       micro_batch_size: int) -> list[list[int]]:
    """Padded layout: this DP rank's micro-batches of at most ``micro_batch_size`` sequences; the
    same number of non-empty micro-batches on every DP rank."""
    shares = split_evenly(indices, dp_size)
    smallest = min(len(s) for s in shares)
    if smallest == 0:
        raise _too_few(len(indices), dp_size)
    count = min(-(-max(len(s) for s in shares) // micro_batch_size), smallest)
    return split_evenly(shares[dp_rank], count)


def plan_packed_micro_batches(lengths: dict[int, int], indices: Sequence[int], dp_rank: int,
                              dp_size: int, max_tokens: int) -> list[list[int]]:
    """Packed layout: this DP rank's micro-batches, each at most ``max_tokens`` tokens.

    1. balance: longest sequence first, each to the DP rank with the fewest tokens so far;
    2. pack: first-fit decreasing into micro-batches of at most ``max_tokens`` tokens;
    3. equalise: ranks with fewer micro-batches split their fullest one until all ranks have
       the same count (every micro-batch keeps at least one sequence).
    """
    if len(indices) < dp_size:
        raise _too_few(len(indices), dp_size)
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    too_long = [i for i in order if lengths[i] > max_tokens]
    if too_long:
        raise ValueError(
            f"sequence {too_long[0]} has {lengths[too_long[0]]} tokens, more than "
            f"train.max_tokens_per_microbatch={max_tokens}: raise it to at least the longest "
            "prompt + response (data.max_prompt_length + rollout.max_new_tokens)"
        )
    loads = [0] * dp_size
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    for i in order:
        rank = min(range(dp_size), key=lambda r: (loads[r], len(shares[r]), r))
        shares[rank].append(i)
        loads[rank] += lengths[i]
    plans = []
    for share in shares:
        bins: list[list[int]] = []
        room: list[int] = []
        for i in share:  # already longest first
            for b, free in enumerate(room):
                if lengths[i] <= free:
                    bins[b].append(i)
                    room[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                room.append(max_tokens - lengths[i])
        plans.append(bins)
    count = max(len(p) for p in plans)
    for bins in plans:
        while len(bins) < count:
            fullest = max(range(len(bins)), key=lambda b: (len(bins[b]), -b))
            if len(bins[fullest]) < 2:
                raise _too_few(len(indices), dp_size)
            half = len(bins[fullest]) // 2
            bins.append(bins[fullest][half:])
            bins[fullest] = bins[fullest][:half]
    return [sorted(b) for b in plans[dp_rank]]


def sequence_multiple(tp: int, sequence_parallel: bool, fp8: bool) -> int:
    """What every micro-batch row's length is padded to a multiple of: the TP size under sequence
    parallelism (the sequence is split over TP ranks), times 16 with FP8, whose GEMMs need the
    token count of each rank's shard divisible by 8 and 16 (Transformer-Engine's FP8 rule)."""
    return (tp if sequence_parallel else 1) * (16 if fp8 else 1)
