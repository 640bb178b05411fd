"""Rollout samples -> Megatron micro-batches: padded or packed, planned across data-parallel ranks.

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

import torch


@dataclass
class Sample:
    """One rollout as the trainer keeps it (token ids are python ints; rank-independent)."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_log_probs: list[float]
    reward: float
    advantage: float
    group: int
    finish_reason: str
    old_log_probs: list[float] | None = None  # set by the old-log-prob pass (last PP stage)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


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

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def _loss_inputs(chosen: Sequence[Sample], starts: list[int]):
    """[B, R] loss tensors; ``starts[i]`` is sequence i's first flat position in the model input."""
    b = len(chosen)
    r = max(len(s.response_ids) for s in chosen)
    logit_index = torch.zeros((b, r), dtype=torch.long)
    targets = torch.zeros((b, r), dtype=torch.long)
    mask = torch.zeros((b, r), dtype=torch.bool)
    old = torch.zeros((b, r), dtype=torch.float32)
    rollout = torch.zeros((b, r), dtype=torch.float32)
    for i, (s, start) in enumerate(zip(chosen, starts)):
        n = len(s.response_ids)
        # response token j sits at position p + j and is predicted from position p + j - 1
        logit_index[i, :n] = torch.arange(n) + start + len(s.prompt_ids) - 1
        targets[i, :n] = torch.tensor(s.response_ids)
        mask[i, :n] = True
        rollout[i, :n] = torch.tensor(s.rollout_log_probs, dtype=torch.float32)
        if s.old_log_probs is not None:
            old[i, :n] = torch.tensor(s.old_log_probs, dtype=torch.float32)
    return logit_index, targets, mask, old, rollout


def model_input_shape(samples: Sequence[Sample], indices: Sequence[int], seq_multiple: int,
                      packed: bool) -> tuple[int, int]:
    """``(rows, sequence length)`` of the model input that ``build_micro_batch`` makes."""
    round_up = lambda n: -(-n // seq_multiple) * seq_multiple  # noqa: E731
    if packed:
        return 1, round_up(sum(samples[i].length for i in indices))
    return len(indices), round_up(max(samples[i].length for i in indices))


def build_micro_batch(samples: Sequence[Sample], indices: Sequence[int], *, pad_id: int,
                      seq_multiple: int, device: torch.device, packed: bool,
                      min_shape: tuple[int, int] = (0, 0)) -> MicroBatch:
    """``samples[indices]`` as one micro-batch; the model's sequence length is padded to a
    multiple of ``seq_multiple`` (the TP size under sequence parallelism). ``min_shape`` pads the
    model input to at least that many rows (padded layout) and tokens per row: the allgather MoE
    dispatcher needs the same token count on every expert-parallel rank."""
    chosen = [samples[i] for i in indices]
    if not chosen:
        raise ValueError("a micro-batch needs at least one sequence")
    rows, seq = model_input_shape(samples, indices, seq_multiple, packed)
    rows, seq = max(rows, min_shape[0]), max(seq, min_shape[1])
    if packed:
        if rows != 1:
            raise ValueError(f"a packed micro-batch has one row, min_shape asks for {rows}")
        total = seq
        tokens = torch.full((1, total), pad_id, dtype=torch.long)
        positions = torch.zeros((1, total), dtype=torch.long)
        segment = torch.full((total,), -1, dtype=torch.long)  # -1: tail padding
        starts, offset = [], 0
        for i, s in enumerate(chosen):
            tokens[0, offset:offset + s.length] = torch.tensor(s.prompt_ids + s.response_ids)
            positions[0, offset:offset + s.length] = torch.arange(s.length)
            segment[offset:offset + s.length] = i
            starts.append(offset)
            offset += s.length
        pad = segment < 0
        segment[pad] = -1 - torch.arange(int(pad.sum()))  # each pad token its own segment
        causal = torch.ones((total, total), dtype=torch.bool).tril()
        visible = causal & (segment[:, None] == segment[None, :])
        attention_mask = (~visible)[None, None]
    else:  # extra rows (min_shape) hold only padding and feed no loss
        tokens = torch.full((rows, seq), pad_id, dtype=torch.long)
        for row, s in enumerate(chosen):
            tokens[row, :s.length] = torch.tensor(s.prompt_ids + s.response_ids)
        positions = torch.arange(seq).unsqueeze(0).expand(rows, -1).contiguous()
        starts = [row * seq for row in range(len(chosen))]
        attention_mask = None
    logit_index, targets, mask, old, rollout = _loss_inputs(chosen, starts)
    spans = [(0, start, sm.length) if packed else (row, 0, sm.length)
             for row, (sm, start) in enumerate(zip(chosen, starts))]
    advantages = torch.tensor([s.advantage for s in chosen], dtype=torch.float32)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return MicroBatch(to(tokens), to(positions), to(attention_mask), to(logit_index), to(targets),
                      to(mask), to(old), to(rollout), to(advantages), list(indices), spans)


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
