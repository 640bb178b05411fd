"""THD ``PackedSeqParams`` for Transformer-Engine attention, built from packed micro-batches: the
boundaries are the micro-batch's sequences, and they describe exactly the attention pattern of
the block-diagonal mask the local spec uses (so TE's THD kernel would compute the same thing).
Not yet run on a GPU: the trainer refuses packing with TE until benchmarks/gpu_check.py has."""

import random

import pytest
import torch

from gmpo_megatron.megatron.micro_batches import build_micro_batch, sequence_multiple
from gmpo_megatron.megatron.packed_seq import packed_seq_params, thd_boundaries, with_packed_seq_params
from gmpo_megatron.rollout.batch import RolloutBatch


def _samples(n: int, seed: int) -> tuple[RolloutBatch, list[list[int]]]:
    """A rollout batch of ``n`` random samples, and each sample's tokens (prompt + response)."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(n):
        p, r = rng.randint(1, 13), rng.randint(1, 11)
        prompts.append([rng.randrange(4, 64) for _ in range(p)])
        responses.append([rng.randrange(4, 64) for _ in range(r)])
    batch = RolloutBatch.from_lists(prompts, responses, [[-rng.random() for _ in r] for r in responses],
                                    [0.0] * n, [rng.uniform(-1, 1) for _ in range(n)],
                                    [i // 4 for i in range(n)], ["stop"] * n)
    return batch, [p + r for p, r in zip(prompts, responses)]


def _packed(seed: int, seq_multiple: int):
    rng = random.Random(seed)
    rollouts, samples = _samples(17, seed)
    chosen = sorted(rng.sample(range(len(samples)), rng.randint(1, 9)))
    batch = build_micro_batch(rollouts, chosen, pad_id=0, seq_multiple=seq_multiple,
                              device=torch.device("cpu"), packed=True)
    return samples, chosen, batch


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("seq_multiple", [1, 2, 4, 16])
def test_boundaries_are_the_sequences_of_the_micro_batch(seed, seq_multiple):
    samples, chosen, batch = _packed(seed, seq_multiple)
    cu_seqlens, padded = thd_boundaries(batch)
    lengths = [len(samples[i]) for i in chosen]
    assert cu_seqlens == [sum(lengths[:k]) for k in range(len(lengths) + 1)]
    total = batch.tokens.shape[1]
    assert padded[:-1] == cu_seqlens[:-1] and padded[-1] == total  # tail padding: the last one's
    assert total % seq_multiple == 0 and total - cu_seqlens[-1] < seq_multiple
    for k, i in enumerate(chosen):  # each segment holds that sequence's tokens
        segment = batch.tokens[0, cu_seqlens[k]:cu_seqlens[k + 1]].tolist()
        assert segment == samples[i]


@pytest.mark.parametrize("seed", range(6))
def test_boundaries_describe_the_local_specs_block_diagonal_mask(seed):
    """For every pair of real tokens: attended under the packed row's mask iff causal within one
    THD segment, which is what TE's THD attention with these cu_seqlens computes."""
    _, _, batch = _packed(seed, 4)
    cu_seqlens, _ = thd_boundaries(batch)
    real = cu_seqlens[-1]
    segment = torch.zeros(real, dtype=torch.long)
    for k in range(len(cu_seqlens) - 1):
        segment[cu_seqlens[k]:cu_seqlens[k + 1]] = k
    position = torch.arange(real)
    thd_visible = (segment[:, None] == segment[None, :]) & (position[None, :] <= position[:, None])
    mask_visible = ~batch.attention_mask[0, 0, :real, :real]
    assert torch.equal(thd_visible, mask_visible)


def test_packed_seq_params_fields():
    samples, chosen, batch = _packed(3, 4)
    params = packed_seq_params(batch)
    cu_seqlens, padded = thd_boundaries(batch)
    assert params.qkv_format == "thd"
    for field in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        tensor = getattr(params, field)
        assert tensor.dtype == torch.int32 and tensor.device == batch.tokens.device
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == cu_seqlens
    assert params.cu_seqlens_q_padded.tolist() == params.cu_seqlens_kv_padded.tolist() == padded
    longest = max(b - a for a, b in zip(padded[:-1], padded[1:]))
    assert params.max_seqlen_q == params.max_seqlen_kv == longest >= max(len(samples[i]) for i in chosen)


def test_with_packed_seq_params_drops_the_mask_and_keeps_the_rest():
    _, _, batch = _packed(4, 2)
    thd = with_packed_seq_params(batch)
    assert thd.attention_mask is None and thd.packed_seq_params.qkv_format == "thd"
    assert batch.attention_mask is not None and batch.packed_seq_params is None  # a copy
    for name in ("tokens", "position_ids", "logit_index", "targets", "response_mask", "advantages"):
        assert torch.equal(getattr(thd, name), getattr(batch, name))
    assert thd.spans == batch.spans and thd.sample_indices == batch.sample_indices


def test_refuses_anything_but_one_row_of_back_to_back_sequences():
    rollouts, _ = _samples(5, 1)
    padded = build_micro_batch(rollouts, [0, 1, 2], pad_id=0, seq_multiple=1, device=torch.device("cpu"),
                               packed=False)
    with pytest.raises(ValueError, match="one row"):
        thd_boundaries(padded)
    packed = build_micro_batch(rollouts, [0, 1, 2], pad_id=0, seq_multiple=1, device=torch.device("cpu"),
                               packed=True)
    row, start, length = packed.spans[1]
    packed.spans[1] = (row, start + 1, length)
    with pytest.raises(ValueError, match="back to back"):
        thd_boundaries(packed)


def test_the_forward_step_hands_the_params_to_the_model():
    from gmpo_megatron.megatron.train_step import _forward_step, _no_routing

    seen = {}

    def model(tokens, position_ids, **kwargs):
        seen.update(kwargs)
        return torch.zeros(())

    _, _, batch = _packed(2, 1)
    thd = with_packed_seq_params(batch)
    _forward_step(lambda b, o: None, _no_routing, iter([thd]), model)
    assert seen["packed_seq_params"] is thd.packed_seq_params and seen["attention_mask"] is None
    _forward_step(lambda b, o: None, _no_routing, iter([batch]), model)
    assert seen["packed_seq_params"] is None and seen["attention_mask"] is batch.attention_mask


def test_the_trainer_still_refuses_packing_with_transformer_engine(tmp_path, monkeypatch,
                                                                    megatron_single_process):
    from gmpo_megatron.config import load_config
    from gmpo_megatron.megatron import model_builder
    from gmpo_megatron.trainer import Trainer

    monkeypatch.setattr(model_builder, "te_available", lambda: True)
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "data.num_rows=16", "reward.num_workers=0"])
    with pytest.raises(ValueError, match="built but not yet verified on a GPU"):
        Trainer(cfg)


def test_sequence_multiple_under_sequence_parallel_and_fp8():
    """Rows split over TP ranks (SP); FP8 GEMMs need each rank's token count divisible by 16."""
    assert sequence_multiple(1, False, False) == 1
    assert sequence_multiple(4, True, False) == 4 and sequence_multiple(4, False, False) == 1
    assert sequence_multiple(1, False, True) == 16
    for tp in (2, 4, 8):
        multiple = sequence_multiple(tp, True, True)
        assert multiple % tp == 0 and (multiple // tp) % 16 == 0
