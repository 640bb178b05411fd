"""The RL loop: prompts -> rollouts -> rewards -> advantages -> old log-probs -> K updates -> weight
sync -> metrics -> checkpoint. One ``Trainer`` per process; every process runs the same loop.

Who does what across processes: global rank 0 owns the rollout engine, generates the whole step's
rollouts, scores them into one ``RolloutBatch`` (flat tensors) and broadcasts only its lengths;
every rank plans every data-parallel rank's micro-batches from those, and each rank receives just
the samples its own micro-batches need (``megatron/step_data.py``). Rollouts are a pure function
of (seed, step, weights), so runs at different parallel layouts see the same data, and a resumed
run continues exactly where the interrupted one would have gone.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gmpo_megatron.algo.advantages import compute_advantages
from gmpo_megatron.algo.metrics import Metrics
from gmpo_megatron import components, run_dir
from gmpo_megatron.config import Config
from gmpo_megatron.megatron import checkpoint as ckpt
from gmpo_megatron.megatron import step_data
from gmpo_megatron.megatron.micro_batches import (
    build_micro_batch,
    model_input_shape,
    plan_micro_batches,
    plan_packed_micro_batches,
    sequence_multiple,
    split_evenly,
)
from gmpo_megatron.megatron.train_step import compute_old_log_probs, train_on_batches
from gmpo_megatron.megatron.weights import load_hf_weights
from gmpo_megatron.rollout.batch import BatchShape, RolloutBatch
from gmpo_megatron.resume import check_resume_config, record_resume


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
        if p.cp > 1 and (cfg.moe.aux_loss_coeff or cfg.moe.z_loss_coeff):
            # The router's statistics would count the padding that the 2*CP split adds, so the
            # loss would differ from the one of the same run without CP.
            raise ValueError(
                f"parallel.cp={p.cp} with moe.aux_loss_coeff={cfg.moe.aux_loss_coeff} / "
                f"moe.z_loss_coeff={cfg.moe.z_loss_coeff}: MoE auxiliary losses are not verified "
                "under context parallelism; set both to 0 (the RL default) or parallel.cp=1")
        self.layout = init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, cp=p.cp, seed=cfg.seed)
        self.rank = self.layout.rank
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
        self.data_groups = step_data.data_groups(self.device)
        self.output_dir = Path(cfg.output_dir)
        # One run per output_dir: global rank 0 locks it before any heavy set-up; a refusal is
        # raised on every rank. Then every rank reads the same files to the same verdict.
        self.run_lock = self._on_rank0(lambda: run_dir.RunDirLock(self.output_dir))
        self.restart_from_zero = run_dir.check_output_dir(
            self.output_dir, resume=resume,
            has_checkpoint=ckpt.latest_checkpoint(self.checkpoint_dir) is not None)
        self.resume_changes: dict[str, list] = {}
        if resume and not self.restart_from_zero:
            saved = ckpt.newest_saved_config(self.checkpoint_dir)
            if saved is not None:  # refused before the model is built or any reward fn imported
                self.resume_changes = check_resume_config(saved[1], cfg.model_dump(mode="json"), saved[0])
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
        self.advantage_options = components.advantage_options(cfg)

        opts = BuildOptions(
            tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, cp=p.cp, sequence_parallel=p.sequence_parallel,
            pp_first_stage_layers=p.pp_first_stage_layers, pp_last_stage_layers=p.pp_last_stage_layers,
            params_dtype=components.DTYPES[cfg.precision.params_dtype], fp8=cfg.precision.fp8,
            fp8_recipe=cfg.precision.fp8_recipe, moe_dispatcher=p.moe_dispatcher,
            moe_aux_loss_coeff=cfg.moe.aux_loss_coeff, moe_z_loss_coeff=cfg.moe.z_loss_coeff,
            moe_router_dtype=cfg.moe.router_dtype,
            recompute=cfg.train.recompute, recompute_method=cfg.train.recompute_method,
            recompute_num_layers=cfg.train.recompute_num_layers,
            recompute_modules=cfg.train.recompute_modules,
        )
        from gmpo_megatron.megatron.model_builder import te_available

        # The local spec honours the packed row's block-diagonal mask (tested on CPU); the TE spec
        # takes THD PackedSeqParams instead (megatron/packed_seq.py, used by _build).
        self.thd = cfg.train.packing and (opts.use_te if opts.use_te is not None else te_available())
        if self.thd:
            # Built and tested on CPU, not yet run on a GPU: refuse rather than risk attention across
            # sequences until benchmarks/gpu_check.py has shown THD equal to padded micro-batches.
            raise ValueError("train.packing=true is verified on Megatron's local spec only: with "
                             "Transformer-Engine, packed micro-batches go through THD PackedSeqParams "
                             "(gmpo_megatron/megatron/packed_seq.py), which is built but not yet "
                             "verified on a GPU (docs/gpu-results.md). Set train.packing=false (padded "
                             "micro-batches, train.micro_batch_size sequences each)")
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
        self.routing_replay = RoutingReplay(self.model) if cfg.moe.routing_replay != "none" else None
        self.expert_load = ExpertLoad(self.model) if is_moe else None
        self.step = 0
        self.data_position = 0
        self.weight_version = 0
        if resume and not self.restart_from_zero:
            self._resume()
        elif resume:
            self._warn(f"output_dir {str(self.output_dir)!r} has no finished checkpoint (the run "
                       "stopped before its first save): starting again from step 0; its "
                       "metrics.jsonl and TensorBoard events are replaced")
            if self.rank == 0:
                record_resume(self.output_dir, None, 0, {}, [])
        self.stop_token_ids = components.stop_token_ids(self.tokenizer, self.hf_config)
        self.sync_root = components.sync_dir(cfg)
        self.engine = self._on_rank0(lambda: components.rollout_engine(
            cfg, self.hf_config, self.tokenizer, self.device, self.output_dir, self.sync_root))
        self.distributed_sync = None  # rollout.sglang.weight_sync=distributed (every rank)
        if cfg.rollout.engine == "sglang" and cfg.rollout.sglang.weight_sync == "distributed":
            from gmpo_megatron.megatron.distributed_sync import DistributedWeightSync

            self.distributed_sync = DistributedWeightSync(
                self.model, self.mapping, bucket_bytes=cfg.rollout.sglang.bucket_mb << 20,
                timeout_s=cfg.rollout.sglang.request_timeout_s, gather_bytes=cfg.rollout.weight_gather_mb << 20)
        from gmpo_megatron.megatron.weight_gather import HFWeightGather

        self.weight_gather = HFWeightGather(self.model, self.mapping, cfg.rollout.weight_gather_mb << 20,
                                            self.device)
        try:
            self.sync_weights()  # launched SGLang servers start here, from these weights
        except BaseException:
            self.close_after_failure(rollout_only=True)
            raise

    # -- set-up pieces ------------------------------------------------------------------------
    def _on_rank0(self, fn):
        """``fn()`` on global rank 0 (the rollout engine's rank); its failure is raised on every
        rank, so none is left waiting in the next collective."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as caught:  # noqa: BLE001 - re-raised below, on every rank
                error = caught
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and error is None:
                raise RuntimeError(f"global rank 0 failed: {box[0]}")
        if error is not None:
            raise error
        return result

    # -- weight sync ----------------------------------------------------------------------------
    def sync_weights(self) -> float:
        """Megatron shards -> the engine at the next weight version (collective; the engine lives
        on global rank 0). Embedded: full HF tensors gathered to rank 0 only, in buckets, and
        streamed into it. SGLang (disk): every pipeline stage writes its HF safetensors into
        ``sync_root/vNNNNNN`` and the servers load that directory."""
        start = time.perf_counter()
        self.weight_version += 1
        version = self.weight_version
        if self.cfg.rollout.engine == "sglang":
            # distributed: broadcast into the servers (False: launched servers boot from disk first)
            if self.distributed_sync is not None and self.distributed_sync.push(self.engine, version):
                if self.cfg.rollout.sglang.check_weights:
                    self.check_engine_weights()
                return time.perf_counter() - start
            from gmpo_megatron.megatron.disk_sync import write_weights_dir
            from gmpo_megatron.rollout.engine import DiskWeights

            static = components.sync_static_files(self.sync_root, self.hf_config, self.tokenizer,
                                                  self.stop_token_ids, self.rank)
            path = write_weights_dir(self.model, self.mapping, self.sync_root, version, static_files=static,
                                     bucket_bytes=self.cfg.rollout.weight_gather_mb << 20)
            self._on_rank0(lambda: self.engine.update_weights(DiskWeights(path, version), version=version))
            if self.cfg.rollout.sglang.check_weights:
                self.check_engine_weights()
            return time.perf_counter() - start
        stream = self.weight_gather.stream()  # yields on global rank 0 only
        try:
            if self.engine is not None:
                self.engine.update_weights(stream, version=version)
        finally:
            # Finish the gather collectives even if the engine refused the update (it stops
            # reading on error): otherwise the other ranks would block inside them.
            for _ in stream:
                pass
        return time.perf_counter() - start

    def check_engine_weights(self) -> float:
        """The weight read-back check (``rollout.sglang.check_weights``): every server's
        log-probs of a fixed probe sequence against Megatron's for the same tokens (collective).
        sglang 0.5.21 implements ``/get_weights_by_name`` for Llama-family models only (not
        Qwen3 / Qwen3-MoE), so the servers' weights are read back through their outputs: a wrong
        mapping or a stale tensor moves these log-probs far beyond float rounding. Returns the
        largest difference; raises when it exceeds ``check_weights_tol``."""
        # shorter than the run's longest sequence (+1 generated token): launched servers size
        # their context for those
        longest = self.cfg.data.max_prompt_length + self.cfg.rollout.max_new_tokens
        probe = components.probe_tokens(self.tokenizer, self.hf_config, length=min(24, longest - 1))
        # one copy of the probe per DP rank (every rank builds the same batch, nothing to send)
        copies = self.layout.dp
        zeros = [0.0] * (len(probe) - 1)
        batch = RolloutBatch.from_lists([probe[:1]] * copies, [probe[1:]] * copies, [zeros] * copies,
                                        [0.0] * copies, [0.0] * copies, list(range(copies)), ["length"] * copies)
        plans = self._plan(batch.shape, list(range(copies)))
        compute_old_log_probs(self.model, batch, self._build(batch, plans), 1.0)
        if self.layout.is_last_stage:  # sample 0's log-probs to DP rank 0, wherever they were computed
            step_data.exchange_old_log_probs(batch, step_data.flat_samples(plans),
                                             [[0]] + [[]] * (copies - 1), self.data_groups)
        ours = self._from_last_stage(batch.old_log_probs[batch.response_index([0])] if self.layout.is_last_stage
                                     else torch.empty(len(probe) - 1)).tolist()
        tol = self.cfg.rollout.sglang.check_weights_tol

        def compare() -> float:
            worst = 0.0
            for url, theirs in zip(self.engine.urls, self.engine.probe(probe)):
                diff = max(abs(a - b) for a, b in zip(ours, theirs))
                if not diff <= tol:
                    raise RuntimeError(
                        f"weight check after sync v{self.weight_version}: SGLang server {url}'s log-probs "
                        f"of the probe differ from the trainer's by {diff:.3g} > "
                        f"rollout.sglang.check_weights_tol={tol:g}: the server is not running the "
                        "trainer's weights (mapping, dtype or a failed load)")
                worst = max(worst, diff)
            return worst

        return self._on_rank0(compare)

    def _from_last_stage(self, values: torch.Tensor) -> torch.Tensor:
        """A float32 tensor held by the last pipeline stage (same shape on every stage), on
        every stage of global rank 0's pipeline."""
        if self.layout.pp == 1:
            return values
        from megatron.core import parallel_state as ps

        group = ps.get_pipeline_model_parallel_group()
        box = values.to(device=self.device, dtype=torch.float32).contiguous()
        dist.broadcast(box, src=dist.get_process_group_ranks(group)[-1], group=group)
        return box.cpu()

    # -- one step -------------------------------------------------------------------------------
    def _rollout(self, step: int) -> tuple[RolloutBatch | None, BatchShape, dict[str, float], bool]:
        """Global rank 0 samples and scores the step's batch; every rank gets its shape (lengths),
        the stats and whether any sample has a non-zero advantage. Returns (the batch on rank 0,
        None elsewhere; shape; stats; informative)."""
        from gmpo_megatron.rollout.collect import collect_rollouts
        from gmpo_megatron.rollout.dynamic_sampling import sample_step
        from gmpo_megatron.rollout.engine import SamplingParams

        r, a = self.cfg.rollout, self.cfg.algorithm

        def sample():
            sampling = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                      max_new_tokens=r.max_new_tokens, stop_token_ids=self.stop_token_ids)

            def generate(batch, seed):
                return collect_rollouts(self.engine, self.tokenizer, batch.prompt_ids, batch.ground_truths,
                                        batch.extra_infos, sampling, self.reward_fn, seed=seed)

            # one round of prompts, or DAPO's refill rounds (rollout/dynamic_sampling.py)
            prompts = self.dataset.batches(r.prompts_per_step, self.cfg.seed, self.data_position)
            batch = sample_step(prompts, generate, num_groups=r.prompts_per_step,
                                step_seed=rollout_seed(self.cfg.seed, step), dynamic=a.dynamic_sampling,
                                max_rounds=a.dynamic_sampling_max_rounds)
            scored = batch.train
            advantages = compute_advantages(a.advantage, scored.rewards, scored.groups,
                                            **self.advantage_options)
            rollouts = scored.rollouts
            data = RolloutBatch.from_lists(
                [o.prompt_ids for o in rollouts], [o.response_ids for o in rollouts],
                [o.response_log_probs for o in rollouts], scored.rewards, advantages, scored.groups,
                [o.finish_reason for o in rollouts], routes=[o.routed_experts for o in rollouts])
            # the engine's cumulative fault counters (retries, restarts, ...) go into metrics.jsonl
            return data, dict(batch.stats(), **self.engine.counters()), batch.end_position

        payload = self._on_rank0(sample)  # an engine failure stops every rank, none is left waiting
        batch = None
        if self.rank == 0:
            batch, stats, position = payload
            header = (stats, position, bool((batch.advantages != 0).any()), batch.shape.header())
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            self.data_position = position
            return batch, batch.shape, stats, header[2]
        box = [header if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)  # small: stats, data position, flags, N
        stats, self.data_position, informative, shape_header = box[0]  # every rank advances alike
        lengths = (batch.shape.to_tensor().to(self.device) if self.rank == 0
                   else torch.empty((3, shape_header[0]), dtype=torch.long, device=self.device))
        dist.broadcast(lengths, src=0)
        shape = batch.shape if self.rank == 0 else BatchShape.from_parts(shape_header, lengths)
        return batch, shape, stats, informative

    def _mini_batches(self, num_samples: int, epoch: int, step: int) -> list[list[int]]:
        order = list(range(num_samples))
        random.Random(rollout_seed(self.cfg.seed, step) + epoch).shuffle(order)
        return [m for m in split_evenly(order, self.cfg.train.mini_batches) if m]

    def _plan(self, shape: BatchShape, indices: list[int]) -> list[list[list[int]]]:
        """Every DP rank's micro-batches of samples ``indices`` (from lengths only: the same on
        every rank)."""
        t, layout = self.cfg.train, self.layout
        if t.packing:
            lengths = dict(zip(indices, shape.lengths[torch.as_tensor(indices, dtype=torch.long)].tolist()))
            return [plan_packed_micro_batches(lengths, indices, r, layout.dp, t.max_tokens_per_microbatch)
                    for r in range(layout.dp)]
        return [plan_micro_batches(indices, r, layout.dp, t.micro_batch_size) for r in range(layout.dp)]

    def _build(self, batch: RolloutBatch, plans: list[list[list[int]]]):
        """This DP rank's micro-batches of ``plans`` (every DP rank's, from ``_plan``), built from
        ``batch`` (which holds this rank's samples), and under context parallelism this CP rank's
        part of each."""
        from megatron.core import parallel_state as ps

        from gmpo_megatron.megatron.cp_batches import cp_seq_multiple, split_for_context_parallel

        t, layout = self.cfg.train, self.layout
        config = self.model.config
        seq_multiple = sequence_multiple(layout.tp, config.sequence_parallel, bool(config.fp8))
        if layout.cp > 1:  # rows split in 2*CP chunks (each rank's part split again by SP / FP8's 16)
            seq_multiple = cp_seq_multiple(layout.cp, seq_multiple)
        min_shapes = [(0, 0)] * len(plans[layout.dp_rank])
        if self._uniform_tokens:
            # allgather dispatcher: micro-batch k has the same shape on every DP (hence EP) rank
            shapes = [[model_input_shape(batch.shape.lengths, chunk, seq_multiple, t.packing) for chunk in plan]
                      for plan in plans]
            min_shapes = [tuple(max(dim) for dim in zip(*column)) for column in zip(*shapes)]
        batches = [build_micro_batch(batch, chunk, pad_id=self.tokenizer.pad_token_id,
                                     seq_multiple=seq_multiple, device=self.device, packed=t.packing,
                                     min_shape=shape)
                   for chunk, shape in zip(plans[layout.dp_rank], min_shapes)]
        if self.thd:
            if layout.cp > 1:
                raise ValueError("THD packed micro-batches under context parallelism are not built: "
                                 "set train.packing=false or parallel.cp=1")
            from gmpo_megatron.megatron.packed_seq import with_packed_seq_params

            batches = [with_packed_seq_params(b) for b in batches]
        cp_rank = ps.get_context_parallel_rank()
        return [split_for_context_parallel(b, layout.cp, cp_rank) for b in batches]

    @property
    def _uniform_tokens(self) -> bool:
        config = self.model.config
        return bool(config.num_moe_experts) and self.layout.ep > 1 and (
            config.moe_token_dispatcher_type == "allgather")

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        full, shape, stats, informative = self._rollout(step)
        t_rollout = time.perf_counter() - t0
        num_samples = shape.num_samples
        if not informative or num_samples < self.layout.dp:
            return self._skipped_step(step, num_samples, stats, t0, t_rollout)
        if self.cfg.moe.routing_replay == "r3" and shape.route_counts is None:
            raise RuntimeError("moe.routing_replay=r3: the rollout engine returned samples without "
                               "routed experts")
        metrics = Metrics()
        grad_norms = []
        # every plan of the step up front (lengths only), so each rank receives just its samples
        old_plans = self._plan(shape, list(range(num_samples)))
        update_plans = [self._plan(shape, mini) for epoch in range(self.cfg.train.ppo_epochs)
                        for mini in self._mini_batches(num_samples, epoch, step)]
        owned = step_data.flat_samples(old_plans)
        update_needs = step_data.needed_samples(update_plans, self.layout.dp)
        batch = step_data.distribute(full, shape, step_data.needed_samples([old_plans, *update_plans],
                                                                            self.layout.dp), self.data_groups)
        del full
        engine_routes = None
        if self.cfg.moe.routing_replay == "r3":  # the engine's experts, for every pass (R3)
            engine_routes = {i: batch.sample_routes(i) for i in batch.sample_index.tolist()}
        routes = compute_old_log_probs(self.model, batch, self._build(batch, old_plans),
                                       self.loss_settings.temperature, replay=self.routing_replay,
                                       engine_routes=engine_routes)
        if self.layout.is_last_stage:
            step_data.exchange_old_log_probs(batch, owned, update_needs, self.data_groups)
        if self.routing_replay is not None and engine_routes is None:  # R2: routes to the updates
            replay = self.routing_replay
            routes = step_data.exchange_sequence_routes(routes, shape, owned, update_needs, replay.layers,
                                                        replay.top_k, replay.dtype, self.data_groups)
        if self.expert_load is not None:
            self.expert_load.reset()  # the load metrics describe the update passes
        for plans in update_plans:  # epoch-major: the mini-batches of each epoch, in order
            part, grad_norm, ok = train_on_batches(self.model, self.optimizer, self._build(batch, plans),
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
            step=step, skipped=0, grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            grad_norm_max=max(grad_norms) if grad_norms else float("nan"),
            lr=self.optimizer.param_groups[0]["lr"], weight_version=self.weight_version,
            num_samples=num_samples, time_rollout_s=t_rollout, time_train_s=t_train,
            time_sync_s=t_sync, time_step_s=time.perf_counter() - t0,
        )
        return row

    def _skipped_step(self, step: int, num_samples: int, stats: dict[str, float], t0: float,
                      t_rollout: float) -> dict[str, float]:
        """A step with no informative group (every advantage is 0: each group's rewards are all
        equal) or fewer samples than data-parallel ranks makes no update: its policy gradient
        would be exactly 0 (an entropy bonus is not applied either), and an Adam step on a zero
        gradient would still move the weights by the old momentum. The learning-rate schedule
        advances as if it had run, so the lr stays a function of the step; the weights, hence the
        engine's, are unchanged (no sync)."""
        t = self.cfg.train
        self.scheduler.step(t.ppo_epochs * t.mini_batches)
        row = dict(stats)
        row.update(step=step, skipped=1, lr=self.optimizer.param_groups[0]["lr"],
                   weight_version=self.weight_version, num_samples=num_samples,
                   time_rollout_s=t_rollout, time_train_s=0.0, time_sync_s=0.0,
                   time_step_s=time.perf_counter() - t0)
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
        """Continue from the newest intact finished checkpoint (damaged ones are named and passed
        over). The learning-rate settings are the current config's (a resume may change them,
        ``gmpo_megatron/resume.py``): only the step count of the schedule comes from the
        checkpoint."""
        fresh_lrs = [(g.get("max_lr"), g.get("min_lr")) for g in self.optimizer.param_groups]
        path, state, passed_over = ckpt.load_newest_intact(self.checkpoint_dir, self.model,
                                                            self.optimizer, self._warn)
        if state.get("config"):  # the checkpoint resumed (after a fallback, an older one)
            self.resume_changes = check_resume_config(state["config"], self.cfg.model_dump(mode="json"), path)
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.weight_version = int(state["weight_version"])
        for group, (max_lr, min_lr) in zip(self.optimizer.param_groups, fresh_lrs):
            group["max_lr"], group["min_lr"] = max_lr, min_lr  # the checkpoint's are the old config's
        self.scheduler.override_opt_param_scheduler = True  # schedule settings: this config's
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state.get("rng", {}))
        changed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.resume_changes.items())
        self._warn(f"resuming from {path} (step {self.step})" + (f"; changed: {changed}" if changed else ""),
                   prefix="")
        if self.rank == 0:
            record_resume(self.output_dir, path, self.step, self.resume_changes, passed_over)

    def _warn(self, message: str, prefix: str = "warning: ") -> None:
        if self.rank == 0:
            print(f"gmpo-train: {prefix}{message}", file=sys.stderr, flush=True)

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
                    run_log.dashboard()
        finally:
            run_log.close()
        return rows

    def close(self, rollout_only: bool = False) -> None:
        """Stop the weight-update group, the engine (and the servers it launched), the reward
        workers, torch.distributed and the run lock. Every piece is closed even when an earlier one
        fails (after a server died the weight group's teardown can fail; the other servers must
        still be stopped); the first failure is raised. ``rollout_only``: the first two only."""
        from gmpo_megatron.megatron.parallel import destroy_distributed
        from gmpo_megatron.rewards import RewardWorkers

        steps = []
        if self.distributed_sync is not None:
            steps.append(self.distributed_sync.close)  # before the engine stops the servers it launched
        if self.engine is not None:
            steps.append(self.engine.close)
        if not rollout_only:
            if isinstance(self.reward_fn, RewardWorkers):
                steps.append(self.reward_fn.close)
            steps.append(destroy_distributed)
            if self.run_lock is not None:
                steps.append(self.run_lock.release)
        failure = None
        for step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - re-raised below, after the rest is closed
                failure = failure or error
        if failure is not None:
            raise failure

    def close_after_failure(self, rollout_only: bool = False) -> None:
        """close() on the way out of a failure: a teardown error must not hide the failure that
        stopped the run; it is printed, and the original error is the one raised."""
        try:
            self.close(rollout_only)
        except Exception as error:  # noqa: BLE001 - the failure being raised matters more
            print(f"gmpo-train: while closing after a failure: {type(error).__name__}: {error}",
                  file=sys.stderr, flush=True)


def _check_finite(row: dict[str, float]) -> None:
    # a skipped step (no informative group: no update) has no loss or grad_norm to check
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
        rows = trainer.fit()
    except BaseException:
        trainer.close_after_failure()
        raise
    trainer.close()
    return rows
