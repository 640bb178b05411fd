"""Context parallelism: Megatron's 2*CP load-balanced split, and a loss computed from per-token
values gathered over CP ranks equals the unsplit loss and gradients, for every loss mode."""

import pytest
import torch

from gmpo_megatron.algo.context_parallel import (
    cp_chunk_positions,
    gather_from_context_parallel,
    merge_disjoint_over_context_parallel,
    packed_cp_positions,
)
from gmpo_megatron.algo.policy_loss import local_normalizer, policy_loss

from algo_gloo import run_gloo
from loss_batches import MODE_OPTIONS, MODE_SCALE, random_batch


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_chunks_are_load_balanced_and_cover_the_sequence(cp):
    seq_len = 2 * cp * 5
    held = [cp_chunk_positions(seq_len, cp, r) for r in range(cp)]
    assert torch.equal(torch.cat(held).sort().values, torch.arange(seq_len))
    chunk = seq_len // (2 * cp)
    for r, positions in enumerate(held):
        assert positions[:chunk].tolist() == list(range(r * chunk, (r + 1) * chunk))
        assert positions[chunk:].tolist() == list(range((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk))
        # causal work of a position ~ its index: every rank's total is the same
        assert int(positions.sum()) == int(held[0].sum())


def test_split_refuses_unpadded_sequences():
    with pytest.raises(ValueError, match="multiple of 2 \\* cp_size = 4"):
        cp_chunk_positions(10, 2, 0)


def test_packed_sequences_are_split_one_by_one():
    cu = [0, 8, 12, 24]
    positions = [packed_cp_positions(cu, 2, r) for r in range(2)]
    assert torch.equal(torch.cat(positions).sort().values, torch.arange(24))
    assert positions[0][:4].tolist() == [0, 1, 6, 7]  # sequence 0: chunks 0 and 3 of 2 tokens
    assert positions[1][:4].tolist() == [2, 3, 4, 5]


def _cp_worker(rank, world_size, mode, seed):
    batch = random_batch(seed, batch=6, length=4 * world_size, scale=MODE_SCALE[mode])
    options = MODE_OPTIONS[mode]
    full_len = batch["log_prob"].shape[1]
    positions = cp_chunk_positions(full_len, world_size, rank)
    local = batch["log_prob"][:, positions].clone().requires_grad_(True)
    log_prob = gather_from_context_parallel(local, positions, full_len, None)
    normalizer = local_normalizer(mode, batch["response_mask"], **options)
    loss, _ = policy_loss(mode, log_prob, batch["old_log_prob"], batch["advantages"], batch["response_mask"],
                          normalizer=normalizer, **options)
    loss.backward()
    return {"loss": loss.detach(), "grad": local.grad, "positions": positions}


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("mode", sorted(MODE_OPTIONS))
def test_cp_gathered_loss_equals_unsplit_loss_and_gradients(mode, cp):
    seed = 100 + cp
    batch = random_batch(seed, batch=6, length=4 * cp, scale=MODE_SCALE[mode])
    options = MODE_OPTIONS[mode]
    log_prob = batch["log_prob"].clone().requires_grad_(True)
    loss, _ = policy_loss(mode, log_prob, batch["old_log_prob"], batch["advantages"], batch["response_mask"],
                          **options)
    loss.backward()
    results = run_gloo(cp, _cp_worker, mode, seed)
    full_grad = torch.zeros_like(log_prob)
    for result in results:
        assert torch.allclose(result["loss"], loss.detach(), rtol=0, atol=1e-12)  # every rank: full loss
        full_grad[:, result["positions"]] += result["grad"]
    # each rank's gradient covers only its own positions; their sum is the unsplit gradient
    assert torch.allclose(full_grad, log_prob.grad, rtol=0, atol=1e-12)


def _owner(shape, cp, seed):
    """A random owner rank per entry: uneven counts per rank (as response tokens fall unevenly)."""
    return torch.randint(0, cp, shape, generator=torch.Generator().manual_seed(seed))


def _merge_worker(rank, world_size, mode, seed):
    batch = random_batch(seed, batch=5, length=7, scale=MODE_SCALE[mode])
    options = MODE_OPTIONS[mode]
    owned = _owner(batch["log_prob"].shape, world_size, seed) == rank
    mine = batch["log_prob"][owned].clone().requires_grad_(True)
    part = torch.zeros_like(batch["log_prob"]).masked_scatter(owned, mine)
    log_prob = merge_disjoint_over_context_parallel(part, None)
    normalizer = local_normalizer(mode, batch["response_mask"], **options)
    loss, _ = policy_loss(mode, log_prob, batch["old_log_prob"], batch["advantages"], batch["response_mask"],
                          normalizer=normalizer, **options)
    loss.backward()
    return {"loss": loss.detach(), "grad": mine.grad, "owned": owned, "merged": log_prob.detach()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gmpo", "grpo"])
def test_cp_merged_uneven_parts_give_the_unsplit_loss_and_gradients(mode):
    seed, cp = 7, 2
    batch = random_batch(seed, batch=5, length=7, scale=MODE_SCALE[mode])
    log_prob = batch["log_prob"].clone().requires_grad_(True)
    loss, _ = policy_loss(mode, log_prob, batch["old_log_prob"], batch["advantages"], batch["response_mask"],
                          **MODE_OPTIONS[mode])
    loss.backward()
    results = run_gloo(cp, _merge_worker, mode, seed)
    assert len({int(r["owned"].sum()) for r in results}) > 1  # the ranks hold different counts
    full_grad = torch.zeros_like(log_prob)
    for result in results:
        assert torch.equal(result["merged"], batch["log_prob"])  # x + 0: bit-exact
        assert torch.allclose(result["loss"], loss.detach(), rtol=0, atol=1e-12)
        full_grad[result["owned"]] += result["grad"]
    assert torch.allclose(full_grad, log_prob.grad, rtol=0, atol=1e-12)
