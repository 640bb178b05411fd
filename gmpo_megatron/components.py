"""The run's components, built from the config: tokenizer, prompt dataset, reward function, loss
settings, initial HF weights and rollout engine. ``Trainer`` wires them together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gmpo_megatron.algo.policy_loss import loss_normalizer_kind
from gmpo_megatron.config import Config
from gmpo_megatron.megatron.train_step import LossSettings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_tokenizer(cfg: Config, hf_config):
    from transformers import AutoTokenizer

    from gmpo_megatron.data.tokenizer import build_task_tokenizer

    if cfg.model.tokenizer == "task":
        tokenizer = build_task_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer, local_files_only=True)
    if len(tokenizer) > hf_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{hf_config.vocab_size}: use a matching model.tokenizer / model.hf_config"
        )
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs eos and pad tokens (the rollout stops at eos)")
    return tokenizer


def load_dataset(cfg: Config, tokenizer, output_dir: Path, rank: int):
    """The configured files, or the procedural task written once (by rank 0) into output_dir/data."""
    from gmpo_megatron.data.dataset import load_prompt_dataset
    from gmpo_megatron.data.tasks import write_task_parquet

    d = cfg.data
    files = list(d.train_files)
    if not files:
        path = output_dir / "data" / f"{d.task}_seed{cfg.seed}.parquet"
        if rank == 0 and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_task_parquet(d.task, str(path), d.num_rows, cfg.seed, **d.task_options)
        if dist.is_initialized():
            dist.barrier()
        files = [str(path)]
    return load_prompt_dataset(files, tokenizer=tokenizer, max_prompt_length=d.max_prompt_length,
                               prompt_key=d.prompt_key, answer_key=d.answer_key)


def reward_fn(cfg: Config):
    from gmpo_megatron.rewards import get_reward_fn

    name = cfg.reward.fn or cfg.data.task
    if name is None:
        raise ValueError("reward.fn is required with data.train_files (e.g. reward.fn=math)")
    return get_reward_fn(name)


def loss_settings(cfg: Config) -> LossSettings:
    """The policy loss and its options; the combination is validated here, before any step."""
    a = cfg.algorithm
    options: dict[str, Any] = {}
    for key in ("clip_eps_low", "clip_eps_high", "clip_level", "length_norm"):
        if getattr(a, key) is not None:
            options[key] = getattr(a, key)
    if a.loss == "dr_grpo":
        options["max_response_length"] = a.max_response_length or cfg.rollout.max_new_tokens
    elif a.max_response_length is not None:
        raise ValueError("algorithm.max_response_length is dr_grpo's normaliser; remove it or "
                         "set algorithm.loss=dr_grpo")
    if a.tis_level is not None:
        options.update(tis_level=a.tis_level, tis_cap=a.tis_cap)
    loss_normalizer_kind(a.loss, **options)  # validates the option combination up front
    # temperature 0 is greedy sampling; its log-probs are those of softmax(logits), i.e. T = 1
    return LossSettings(a.loss, options, cfg.rollout.temperature or 1.0, a.entropy_coef)


def initial_hf_state(cfg: Config, hf_config, mapping):
    """A reader of HF tensors: the configured checkpoint, or a seeded random init (identical on
    every rank and at every layout, because it is made in HF space before sharding)."""
    if cfg.model.hf_checkpoint:
        from gmpo_megatron.convert.hf_io import open_hf_checkpoint
        from gmpo_megatron.convert.validate import check_hf_config, check_hf_tensors

        # The same refusals as the converter: a config it cannot reproduce exactly, or a
        # missing / unexpected / wrongly shaped tensor, stops the run before any step.
        check_hf_config(hf_config)
        checkpoint = open_hf_checkpoint(cfg.model.hf_checkpoint)
        check_hf_tensors(checkpoint, mapping)
        return checkpoint.read
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return checkpoint_layout_state(hf_model, mapping).__getitem__


def rollout_engine(cfg: Config, hf_config, tokenizer, device: torch.device):
    from gmpo_megatron.rollout.embedded import EmbeddedEngine

    return EmbeddedEngine(
        hf_config, device=device, dtype=DTYPES[cfg.precision.params_dtype],
        pad_token_id=tokenizer.pad_token_id, max_batch_size=cfg.rollout.max_batch_size,
        init_seed=cfg.seed,
    )


def checkpoint_layout_state(hf_model, mapping) -> dict[str, torch.Tensor]:
    """An HF model's tensors under checkpoint names (transformers 5 fuses experts in memory)."""
    from gmpo_megatron.rollout.embedded import checkpoint_state_dict

    state = checkpoint_state_dict(hf_model)
    missing = [n for n in mapping.hf_names() if n not in state]
    if missing:
        raise KeyError(f"random-init HF model lacks {missing[:5]} ... ({len(missing)} tensors)")
    return state
