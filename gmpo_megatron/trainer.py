"""The RL loop: prompts -> rollouts -> rewards -> advantages -> old log-probs -> K updates -> weight
sync -> metrics -> checkpoint. One ``Trainer`` per process; every process runs the same loop.

Who does what across processes: global rank 0 owns the rollout engine, generates the whole step's
rollouts, scores them and broadcasts the samples; every rank then holds the full rollout batch and
takes its data-parallel share of each mini-batch. Rollouts are a pure function of (seed, step,
weights), so runs at different parallel layouts see the same data, and a resumed run continues
exactly where the interrupted one would have gone.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gmpo_megatron.algo.advantages import compute_advantages, dynamic_sampling_filter
from gmpo_megatron.algo.metrics import Metrics
from gmpo_megatron import components
from gmpo_megatron.config import Config
from gmpo_megatron.megatron import checkpoint as ckpt
from gmpo_megatron.megatron.micro_batches import (
    Sample,
    build_micro_batch,
    model_input_shape,
    plan_micro_batches,
    plan_packed_micro_batches,
    split_evenly,
)
from gmpo_megatron.megatron.train_step import compute_old_log_probs, train_on_batches
from gmpo_megatron.megatron.weights import load_hf_weights


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: independent of layout and of restarts."""
    return (seed * 1_000_003 + step * 7919) % (2**31 - 1)


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False) -> None:
        from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
        from gmpo_megatron.megatron.optimizer import OptimSettings, build_optimizer, wrap_ddp
        from gmpo_megatron.megatron.parallel import init_distributed
        from gmpo_megatron.models import get_mapping
        from gmpo_megatron.models.presets import load_hf_config

        self.cfg = cfg
        p = cfg.parallel
        if p.cp > 1:
            raise ValueError(
                f"parallel.cp={p.cp}: context parallel training is not wired into the trainer yet. "
                "The CP pieces exist and are tested on their own (gmpo_megatron/algo/context_parallel.py: "
                "Megatron's 2*CP split and the exact per-sequence reduction before exp), but the "
                "micro-batches are not split over CP ranks; it also needs Transformer-Engine "
                "attention on GPU. Set parallel.cp=1"
            )
        self.layout = init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, cp=p.cp, seed=cfg.seed)
        self.rank = self.layout.rank
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
        self.output_dir = Path(cfg.output_dir)
        if not resume and ((self.output_dir / "metrics.jsonl").exists()
                           or ckpt.latest_checkpoint(self.output_dir / "checkpoints") is not None):
            raise FileExistsError(
                f"output_dir {str(self.output_dir)!r} already holds a run (metrics.jsonl or "
                "checkpoints): continue it with --resume, or choose another output_dir"
            )
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.hf_config = load_hf_config(cfg.model.hf_config or cfg.model.hf_checkpoint)
        if cfg.model.hf_checkpoint and cfg.model.hf_config:
            from gmpo_megatron.convert.validate import compare_hf_configs

            compare_hf_configs(load_hf_config(cfg.model.hf_checkpoint), self.hf_config,
                               f"model.hf_checkpoint ({cfg.model.hf_checkpoint})",
                               f"model.hf_config ({cfg.model.hf_config})")
        self.mapping = get_mapping(self.hf_config)
        self.tokenizer = components.load_tokenizer(cfg, self.hf_config)
        self.dataset = components.load_dataset(cfg, self.tokenizer, self.output_dir, self.rank)
        self.reward_fn = components.reward_fn(cfg)
        self.loss_settings = components.loss_settings(cfg)

        opts = BuildOptions(
            tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, cp=p.cp, sequence_parallel=p.sequence_parallel,
            pp_first_stage_layers=p.pp_first_stage_layers, pp_last_stage_layers=p.pp_last_stage_layers,
            params_dtype=components.DTYPES[cfg.precision.params_dtype], fp8=cfg.precision.fp8,
            fp8_recipe=cfg.precision.fp8_recipe, moe_dispatcher=p.moe_dispatcher,
            moe_aux_loss_coeff=cfg.moe.aux_loss_coeff, moe_z_loss_coeff=cfg.moe.z_loss_coeff,
            moe_router_dtype=cfg.moe.router_dtype,
        )
        from gmpo_megatron.megatron.model_builder import te_available

        if cfg.train.packing and (opts.use_te if opts.use_te is not None else te_available()):
            # The local spec honours the packed row's block-diagonal mask (tested on CPU). With the
            # TE spec, packed batches must go through THD PackedSeqParams, which is not wired and
            # verified on a GPU yet: refuse rather than risk attention across sequences.
            raise ValueError("train.packing=true is verified on Megatron's local spec only; with "
                             "Transformer-Engine set train.packing=false (padded micro-batches, "
                             "train.micro_batch_size sequences each)")
        model = build_model(self.hf_config, opts)
        if torch.cuda.is_available():
            model = model.cuda()
        load_hf_weights(model, self.mapping, components.initial_hf_state(cfg, self.hf_config, self.mapping))
        self.model = wrap_ddp(model, p.distributed_optimizer)
        t = cfg.train
        self.optimizer, self.scheduler = build_optimizer(self.model, OptimSettings(
            lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, grad_clip=t.grad_clip,
            warmup_steps=t.warmup_steps, total_steps=t.steps * t.ppo_epochs * t.mini_batches,
            distributed_optimizer=p.distributed_optimizer, bf16=cfg.precision.params_dtype == "bf16",
            lr_schedule=t.lr_schedule,
        ))
        from gmpo_megatron.megatron.expert_load import ExpertLoad
        from gmpo_megatron.megatron.routing_replay import RoutingReplay

        is_moe = bool(self.model.config.num_moe_experts)
        if cfg.moe.routing_replay != "none" and not is_moe:
            raise ValueError(f"moe.routing_replay={cfg.moe.routing_replay!r} but the model has no "
                             "experts: set moe.routing_replay=none")
        self.routing_replay = RoutingReplay(self.model) if cfg.moe.routing_replay == "r2" else None
        self.expert_load = ExpertLoad(self.model) if is_moe else None
        self.step = 0
        self.data_position = 0
        self.weight_version = 0
        if resume:
            self._resume()
        self.engine = (components.rollout_engine(cfg, self.hf_config, self.tokenizer, self.device)
                       if self.rank == 0 else None)
        self.sync_weights()

    # -- set-up pieces ------------------------------------------------------------------------
    # -- weight sync ----------------------------------------------------------------------------
    def sync_weights(self) -> float:
        """Megatron shards -> full HF tensors -> engine (collective; the engine lives on rank 0)."""
        from gmpo_megatron.megatron.weights import iter_hf_weights

        start = time.perf_counter()
        self.weight_version += 1
        stream = iter_hf_weights(self.model, self.mapping)
        try:
            if self.engine is not None:
                self.engine.update_weights(stream, version=self.weight_version)
        finally:
            # Finish the gather collectives even if the engine refused the update (it stops
            # reading on error): otherwise the other ranks would block inside them.
            for _ in stream:
                pass
        return time.perf_counter() - start

    # -- one step -------------------------------------------------------------------------------
    def _rollout(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """Global rank 0 samples and scores the step's batch, then broadcasts it to every rank."""
        from gmpo_megatron.rollout.collect import collect_rollouts
        from gmpo_megatron.rollout.engine import SamplingParams

        r, a = self.cfg.rollout, self.cfg.algorithm
        batch = next(self.dataset.batches(r.prompts_per_step, self.cfg.seed, self.data_position))
        self.data_position = batch.end_position
        payload = None
        if self.rank == 0:
            sampling = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                      max_new_tokens=r.max_new_tokens,
                                      stop_token_ids=(self.tokenizer.eos_token_id,))
            scored = collect_rollouts(self.engine, self.tokenizer, batch.prompt_ids, batch.ground_truths,
                                      batch.extra_infos, sampling, self.reward_fn,
                                      seed=rollout_seed(self.cfg.seed, step))
            advantages = compute_advantages(a.advantage, scored.rewards, scored.groups)
            keep, dropped = dynamic_sampling_filter(scored.rewards, scored.groups)
            stats = dict(scored.stats(), all_equal_reward_groups=float(dropped),
                         num_groups=float(len(batch.prompt_ids)))
            samples = [
                Sample(o.prompt_ids, o.response_ids, list(o.response_log_probs), float(rw), float(ad),
                       o.prompt_index, o.finish_reason)
                for o, rw, ad, k in zip(scored.rollouts, scored.rewards.tolist(), advantages.tolist(),
                                        keep.tolist())
                if k or not a.dynamic_sampling
            ]
            payload = (samples, stats)
        box = [payload]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def _mini_batches(self, samples: list[Sample], epoch: int, step: int) -> list[list[int]]:
        order = list(range(len(samples)))
        random.Random(rollout_seed(self.cfg.seed, step) + epoch).shuffle(order)
        return [m for m in split_evenly(order, self.cfg.train.mini_batches) if m]

    def _micro_batches(self, samples: list[Sample], indices: list[int]):
        """This DP rank's micro-batches of ``samples[indices]`` (every rank plans all ranks)."""
        t, layout = self.cfg.train, self.layout
        seq_multiple = layout.tp if self.model.config.sequence_parallel else 1
        if t.packing:
            lengths = {i: samples[i].length for i in indices}
            plans = [plan_packed_micro_batches(lengths, indices, r, layout.dp, t.max_tokens_per_microbatch)
                     for r in range(layout.dp)]
        else:
            plans = [plan_micro_batches(indices, r, layout.dp, t.micro_batch_size) for r in range(layout.dp)]
        min_shapes = [(0, 0)] * len(plans[layout.dp_rank])
        if self._uniform_tokens:
            # allgather dispatcher: micro-batch k has the same shape on every DP (hence EP) rank
            shapes = [[model_input_shape(samples, chunk, seq_multiple, t.packing) for chunk in plan]
                      for plan in plans]
            min_shapes = [tuple(max(dim) for dim in zip(*column)) for column in zip(*shapes)]
        return [build_micro_batch(samples, chunk, pad_id=self.tokenizer.pad_token_id,
                                  seq_multiple=seq_multiple, device=self.device, packed=t.packing,
                                  min_shape=shape)
                for chunk, shape in zip(plans[layout.dp_rank], min_shapes)]

    @property
    def _uniform_tokens(self) -> bool:
        config = self.model.config
        return bool(config.num_moe_experts) and self.layout.ep > 1 and (
            config.moe_token_dispatcher_type == "allgather")

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        samples, stats = self._rollout(step)
        t_rollout = time.perf_counter() - t0
        metrics = Metrics()
        grad_norms = []
        if len(samples) >= self.layout.dp:
            all_indices = list(range(len(samples)))
            old_batches = self._micro_batches(samples, all_indices)
            routes = compute_old_log_probs(self.model, samples, old_batches, self.loss_settings.temperature,
                                           replay=self.routing_replay)
            if self.expert_load is not None:
                self.expert_load.reset()  # the load metrics describe the update passes
            for epoch in range(self.cfg.train.ppo_epochs):
                for mini in self._mini_batches(samples, epoch, step):
                    batches = self._micro_batches(samples, mini)
                    part, grad_norm, ok = train_on_batches(self.model, self.optimizer, batches,
                                                           self.loss_settings, self.routing_replay, routes)
                    if not ok:
                        raise FloatingPointError(f"step {step}: the optimizer step was skipped (non-finite "
                                                 "gradients); lower train.lr or check the rewards")
                    self.scheduler.step(1)
                    metrics.merge(part)
                    grad_norms.append(grad_norm)
        t_train = time.perf_counter() - t0 - t_rollout
        t_sync = self.sync_weights()
        row = self._reduce_metrics(metrics)
        if self.expert_load is not None:
            row.update(self.expert_load.metrics())  # collective over all ranks
        row.update(stats)
        row.update(
            step=step, grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            lr=self.optimizer.param_groups[0]["lr"], weight_version=self.weight_version,
            num_samples=len(samples), time_rollout_s=t_rollout, time_train_s=t_train,
            time_sync_s=t_sync, time_step_s=time.perf_counter() - t0,
        )
        return row

    def _reduce_metrics(self, metrics: Metrics) -> dict[str, float]:
        """DP-reduce on the last pipeline stage (where the loss lives), then hand to global rank 0."""
        from megatron.core import parallel_state as ps

        if self.layout.is_last_stage:
            metrics.all_reduce(ps.get_data_parallel_group())
        row = metrics.to_dict() if self.layout.is_last_stage else None
        if self.layout.pp > 1:
            group = ps.get_pipeline_model_parallel_group()
            box = [row]
            dist.broadcast_object_list(box, src=dist.get_process_group_ranks(group)[-1], group=group)
            row = box[0]
        return dict(row)

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save(self) -> Path:
        state = {"data_position": self.data_position, "weight_version": self.weight_version,
                 "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(),
                 "config": self.cfg.model_dump(mode="json")}
        return ckpt.save_checkpoint(self.checkpoint_dir, self.step, self.model, self.optimizer, state,
                                    keep_last=self.cfg.train.keep_last)

    def _resume(self) -> None:
        latest = ckpt.latest_checkpoint(self.checkpoint_dir)
        if latest is None:
            raise FileNotFoundError(
                f"--resume: no finished checkpoint under {self.checkpoint_dir}; run without --resume "
                "to start a new run"
            )
        ckpt.init_optimizer_state(self.optimizer)
        state = ckpt.load_checkpoint(latest, self.model, self.optimizer)
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.weight_version = int(state["weight_version"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state.get("rng", {}))

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        from gmpo_megatron.run_log import RunLog

        cfg = self.cfg
        run_log = RunLog(self.output_dir, cfg, self.hf_config, self.tokenizer, start_step=self.step,
                         enabled=self.rank == 0)
        rows = []
        try:
            while self.step < cfg.train.steps:
                row = self.train_step(self.step)
                _check_finite(row)  # every rank holds the row: all stop together, none hangs
                self.step += 1
                rows.append(row)
                run_log.log(row)
                interval = cfg.train.save_interval
                if (interval and self.step % interval == 0) or self.step == cfg.train.steps:
                    self.save()
        finally:
            run_log.close()
        return rows

    def close(self) -> None:
        from gmpo_megatron.megatron.parallel import destroy_distributed

        if self.engine is not None:
            self.engine.close()
        destroy_distributed()


def _check_finite(row: dict[str, float]) -> None:
    for key in ("loss", "grad_norm", "reward_mean"):
        value = row.get(key)
        if value is not None and not math.isfinite(value):
            raise FloatingPointError(
                f"step {row['step']}: {key} is {value}; the last finished checkpoint is kept intact. "
                "Lower train.lr or check the reward function"
            )


def run(cfg: Config, resume: bool = False) -> list[dict[str, float]]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()
