"""The global-batch loss does not depend on how the batch is laid out: the same 16 sequences split
into 1, 2, 3, 4 or 8 micro-batches, or over 1, 2 or 4 gloo data-parallel processes (each with 2
micro-batches), give the same summed loss, the same gradient of a shared parameter and the same
metrics, for every mode, when every piece uses the GLOBAL normalizer.

This is the defect of public implementations that mean over the micro-batch. Tolerance (float32):
rtol 1e-6 on loss, gradient and metrics, with atol 1e-6 x the magnitude of the largest single
contribution (only the summation order differs; the total can be near zero by cancellation).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from algo_gloo import run_gloo
from loss_batches import MODE_OPTIONS, MODE_SCALE, random_batch

from gmpo_megatron.algo.metrics import Metrics
from gmpo_megatron.algo.policy_loss import local_normalizer, policy_loss

NUM_SEQUENCES, LENGTH, FEATURES = 16, 12, 5

CASES = [
    ("gmpo", {}),
    ("gmpo", {"clip_level": "sequence", "dual_clip": 0.5}),
    ("gmpo", {"clip_level": "none", "length_norm": False}),
    ("gmpo", {"tis_level": "geometric", "tis_cap": 1.02}),
    ("grpo", {}),
    ("grpo", {"tis_level": "token", "tis_cap": 1.03}),
    ("dapo", {}),
    ("dr_grpo", {"max_response_length": 16}),
    ("gspo", {}),
]


def _ids(case):
    mode, options = case
    return mode + "".join(f"-{k}={v}" for k, v in options.items())


def _problem(mode, seed=0):
    """A float32 batch whose log_prob comes from a shared parameter theta, as in a real model:
    log_prob = log_sigmoid(features @ theta) + offset, so gradients from all pieces add up in theta."""
    batch = random_batch(seed, batch=NUM_SEQUENCES, length=LENGTH, scale=MODE_SCALE[mode], dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 100)
    features = torch.randn(NUM_SEQUENCES, LENGTH, FEATURES, generator=g)
    theta = 0.1 * torch.randn(FEATURES, generator=g)
    # choose the offset so that log_prob(theta) equals the batch's log_prob (keeps its clipping mix)
    offset = batch["log_prob"] - torch.nn.functional.logsigmoid(features @ theta)
    return batch, features, theta, offset


def _accumulate(mode, options, batch, features, theta, offset, rows_per_piece, normalizer):
    """Sum of losses and theta-gradients over the pieces, and their merged metrics."""
    theta = theta.clone().requires_grad_(True)
    total, metrics = torch.zeros(()), Metrics()
    for rows in rows_per_piece:
        log_prob = torch.nn.functional.logsigmoid(features[rows] @ theta) + offset[rows]
        loss, piece_metrics = policy_loss(
            mode, log_prob, batch["old_log_prob"][rows], batch["advantages"][rows], batch["response_mask"][rows],
            rollout_log_prob=batch["rollout_log_prob"][rows], normalizer=normalizer, **options,
        )
        loss.backward()
        total += loss.detach()
        metrics.merge(piece_metrics)
    return total, theta.grad, metrics


def _single_process(mode, options, seed=0):
    batch, features, theta, offset = _problem(mode, seed)
    rows = [torch.arange(NUM_SEQUENCES)]
    return _accumulate(mode, options, batch, features, theta, offset, rows, None)


def _scale(mode, options):
    """Largest single |contribution| to the loss / gradient: the atol reference."""
    batch, features, theta, offset = _problem(mode)
    norm = float(local_normalizer(mode, batch["response_mask"], **options))
    losses, grads = [], []
    for i in range(NUM_SEQUENCES):
        loss, grad, _ = _accumulate(mode, options, batch, features, theta, offset, [torch.tensor([i])], norm)
        losses.append(loss.abs())
        grads.append(grad.abs().max())
    return float(max(losses)), float(max(grads))


def _assert_same(result, expected, scale):
    loss, grad, metrics = result
    ref_loss, ref_grad, ref_metrics = expected
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6 * scale[0])
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6 * scale[1])
    ref_metrics = ref_metrics.to_dict() if isinstance(ref_metrics, Metrics) else ref_metrics
    metrics = metrics.to_dict() if isinstance(metrics, Metrics) else metrics
    assert metrics.keys() == ref_metrics.keys()
    for name, value in ref_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_micro_batch_split_gives_same_loss_grad_and_metrics(case):
    mode, options = case
    expected = _single_process(mode, options)
    scale = _scale(mode, options)
    batch, features, theta, offset = _problem(mode)
    for pieces in (2, 3, 4, 8):
        rows = list(torch.arange(NUM_SEQUENCES).tensor_split(pieces))
        normalizer = sum(local_normalizer(mode, batch["response_mask"][r], **options) for r in rows)
        _assert_same(_accumulate(mode, options, batch, features, theta, offset, rows, normalizer), expected, scale)


def test_micro_batch_mean_without_global_normalizer_would_differ():
    """Guard: the public-implementation defect (each micro-batch normalised by its own count) is
    visible on this problem, so the invariance test above can fail."""
    batch, features, theta, offset = _problem("gmpo")
    expected = _single_process("gmpo", {})
    rows = list(torch.arange(NUM_SEQUENCES).tensor_split(4))
    total, grad, _ = _accumulate("gmpo", {}, batch, features, theta, offset, rows, None)
    assert not torch.allclose(total / 4, expected[0], rtol=1e-3)
    assert not torch.allclose(grad / 4, expected[1], rtol=1e-3)


def _data_parallel_worker(rank, world_size):
    out = {}
    for mode, options in CASES:
        batch, features, theta, offset = _problem(mode)
        my_rows = torch.arange(NUM_SEQUENCES).tensor_split(world_size)[rank]
        pieces = list(my_rows.tensor_split(2))  # two micro-batches per rank
        normalizer = sum(local_normalizer(mode, batch["response_mask"][r], **options) for r in pieces)
        dist.all_reduce(normalizer)  # the global count
        loss, grad, metrics = _accumulate(mode, options, batch, features, theta, offset, pieces, normalizer)
        dist.all_reduce(loss)
        dist.all_reduce(grad)  # a SUM, as the loss is already a share of the global loss
        metrics.all_reduce()
        out[_ids((mode, options))] = (loss, grad, metrics.to_dict())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_data_parallel_gloo_gives_same_loss_grad_and_metrics(world_size):
    results = run_gloo(world_size, _data_parallel_worker)
    for case in CASES:
        expected = _single_process(*case)
        scale = _scale(*case)
        for rank_result in results:
            _assert_same(rank_result[_ids(case)], expected, scale)
