"""What ``--resume`` may change: the schedule, run length and layout yes; the data stream, the
objective and the model no, each refusal naming the key and the checkpoint's value."""

from pathlib import Path

import pytest

from gmpo_megatron.config import load_config
from gmpo_megatron.resume import check_resume_config, may_change


def _tree(*overrides):
    return load_config(Path(__file__).parents[1] / "examples/moe/tiny_cpu.yaml", list(overrides)).model_dump(mode="json")


@pytest.mark.parametrize("override", [
    "train.steps=400", "train.lr=1e-4", "train.lr_schedule=cosine", "train.save_interval=10",
    "train.keep_last=5", "logging.tensorboard=false", "parallel.tp=2", "output_dir=/elsewhere",
    "train.max_tokens_per_microbatch=256", "rollout.max_batch_size=64",
])
def test_a_resume_may_change(override):
    changes = check_resume_config(_tree(), _tree(override), "ckpt")
    key = override.split("=")[0]
    assert list(changes) == [key]


@pytest.mark.parametrize("override, saved_value", [
    ("seed=2", "1"), ("rollout.n=4", "8"), ("rollout.temperature=0.7", "1.0"),
    ("data.num_rows=100", "4096"), ("algorithm.loss=grpo", "gmpo"), ("reward.fn=countdown", "arithmetic"),
    ("model.hf_config=qwen3-32b", "tiny-qwen3-moe"), ("parallel.distributed_optimizer=false", "True"),
    ("train.mini_batches=4", "2"), ("train.adam_beta2=0.99", "0.999"),
])
def test_a_resume_may_not_change(override, saved_value):
    key = override.split("=")[0]
    with pytest.raises(ValueError) as refused:
        check_resume_config(_tree(), _tree(override), "ckpt")
    assert key in str(refused.value) and saved_value in str(refused.value)
    assert "Pass the checkpoint's values" in str(refused.value)


def test_a_key_the_policy_does_not_know_is_refused():
    assert not may_change("rollout.some_future_option")
    assert may_change("rollout.sglang.urls") and may_change("logging.wandb")
