"""Core attention for Megatron's local (non-Transformer-Engine) spec under context parallelism.

Megatron-Core 0.16.1's local ``DotProductAttention`` asserts ``context_parallel_size == 1``; on GPU
the TE spec's ``TEDotProductAttention`` does CP itself (``cp_comm_type``, default ``p2p``). This is
the local spec's CP attention, with ``cp_comm_type="all_gather"`` semantics: every CP rank
all-gathers the keys and values of the whole sequence, then its own queries attend to them.

Layout (``cp_batches.py``). Each rank holds chunks r and 2*CP-1-r of every row, ``[s/CP, b, n, d]``
in local order; gathered in rank order and re-ordered, the keys are at global positions 0..s-1.

    scores[b, n, i, j] = softmax_scale * q_i . k_j           i: this rank's positions, j: all
    masked where       j > pos_i (causal, padded rows: attention_mask None), or
                       attention_mask[b, 0, i, j] (packed rows: the block-diagonal causal mask's
                       rows at this rank's positions, every key column, cp_batches.py)
    out_i             = sum_j softmax_j(scores) v_j

The differentiable all-gather (Megatron's ``gather_from_sequence_parallel_region`` on the CP
group) reduce-scatters the key / value gradients in backward: every rank's queries contribute to
the gradient of every key, and each rank receives the sum for the keys it owns. Same softmax scale,
GQA (query groups repeated per head) and masked-fill value as ``DotProductAttention``; dropout must
be 0 (RL training here always is), and the options of ``DotProductAttention`` that no Qwen model
uses are refused rather than approximated.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule

from gmpo_megatron.algo.context_parallel import cp_chunk_positions

_MASKED = -10000.0  # Megatron's attention_mask_func fill value (exp underflows to exactly 0)


def _check_config(config, attention_dropout, cp_comm_type) -> None:
    problems = []
    if cp_comm_type not in (None, "all_gather"):
        problems.append(f"cp_comm_type={cp_comm_type!r}: the local spec's CP attention all-gathers K/V "
                        "(cp_comm_type='all_gather' or None); p2p / a2a need Transformer-Engine")
    dropout = config.attention_dropout if attention_dropout is None else attention_dropout
    if dropout:
        problems.append(f"attention_dropout={dropout}: set it to 0")
    if config.apply_query_key_layer_scaling:
        problems.append("apply_query_key_layer_scaling=True: set it to False")
    if config.window_size is not None:
        problems.append(f"window_size={config.window_size} (sliding-window attention): set it to None")
    if config.softmax_type != "vanilla":
        problems.append(f"softmax_type={config.softmax_type!r}: only 'vanilla'")
    if problems:
        raise ValueError("context-parallel attention on the local spec does not support:\n  - "
                         + "\n  - ".join(problems))


class ContextParallelDotProductAttention(MegatronModule):
    """Drop-in ``core_attention`` of the local spec for ``context_parallel_size >= 1`` (module
    docstring). Inputs ``query [s/CP, b, n/TP, d]``, ``key``/``value [s/CP, b, g/TP, d]``; output
    ``[s/CP, b, n/TP * d]``."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.enums import AttnMaskType

        super().__init__(config=config)
        _check_config(config, attention_dropout, cp_comm_type)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"attn_mask_type={attn_mask_type}: the CP attention is causal (GPT)")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group, self.cp_group = pg_collection.tp, pg_collection.cp
        tp = self.tp_group.size()
        self.layer_number = max(1, layer_number)
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.softmax_in_fp32 = config.attention_softmax_in_fp32

    def _gather_sequence(self, local: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """``[s/CP, b, g, d]`` of every CP rank -> ``[s, b, g, d]`` in global order."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        gathered = gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=True,
                                                        group=self.cp_group)
        return gathered.index_select(0, order)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("packed_seq_params (THD) is not supported by the local spec's CP "
                             "attention: packed rows carry a block-diagonal attention_mask instead")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the local spec's CP attention")
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        local_len, rows = query.shape[0], query.shape[1]
        seq_len = local_len * cp
        device = query.device
        held = [cp_chunk_positions(seq_len, cp, r) for r in range(cp)]
        order = torch.cat(held).argsort().to(device)  # gathered (rank-order) rows -> global order
        if cp > 1:
            key, value = self._gather_sequence(key, order), self._gather_sequence(value, order)
        if attention_mask is None:
            q_pos, k_pos = held[rank].to(device), torch.arange(seq_len, device=device)
            masked = (k_pos[None, :] > q_pos[:, None])[None, None]  # [1, 1, s/CP, s]
        else:
            masked = attention_mask
            if masked.shape[-2:] != (local_len, seq_len):
                raise ValueError(f"attention_mask has shape {tuple(masked.shape)}; the CP attention "
                                 f"needs [b, 1, {local_len} (this rank's queries), {seq_len} (all keys)]")
        repeat = self.heads // self.groups
        if repeat > 1:  # GQA: each query group serves `repeat` consecutive heads
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        scores = torch.einsum("qbnd,kbnd->bnqk", query, key) * self.softmax_scale
        if self.softmax_in_fp32 and scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # as Megatron's FusedScaleMaskSoftmax: half inputs only
        scores = scores.masked_fill(masked, _MASKED)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        context = torch.einsum("bnqk,kbnd->qbnd", probs, value)
        return context.reshape(local_len, rows, self.heads * self.head_dim)
