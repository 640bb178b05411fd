"""Megatron DDP + optimizer + LR schedule for the policy, wired the way Megatron's schedules expect."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OptimSettings:
    lr: float
    min_lr: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    grad_clip: float
    warmup_steps: int
    total_steps: int
    distributed_optimizer: bool
    bf16: bool
    lr_schedule: str = "constant"  # "constant" (the paper's) | "cosine" | "linear", after warmup


def wrap_ddp(model, distributed_optimizer: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=True,  # a NaN gradient stops the step with a clear error
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(ddp_model, s: OptimSettings):
    """Adam (decoupled weight decay) with Megatron's grad clipping and a warmup + cosine schedule."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from gmpo_megatron.megatron import cpu_compat

    config = OptimizerConfig(
        optimizer="adam", lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay,
        adam_beta1=s.adam_beta1, adam_beta2=s.adam_beta2, adam_eps=s.adam_eps,
        clip_grad=s.grad_clip, bf16=s.bf16,
        params_dtype=torch.bfloat16 if s.bf16 else torch.float32,
        use_distributed_optimizer=s.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    cpu_compat.apply()
    model_config = ddp_model.config
    # What Megatron-LM's training loop wires up: grad sync / scaling hooks used by the schedules.
    model_config.no_sync_func = ddp_model.no_sync
    model_config.finalize_model_grads_func = finalize_model_grads
    model_config.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if s.warmup_steps else s.lr, max_lr=s.lr, min_lr=s.min_lr,
        lr_warmup_steps=s.warmup_steps, lr_decay_steps=max(s.total_steps, s.warmup_steps + 1),
        lr_decay_style=s.lr_schedule,
        start_wd=s.weight_decay, end_wd=s.weight_decay, wd_incr_steps=max(s.total_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler
