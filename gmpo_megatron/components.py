"""The run's components, built from the config: tokenizer, prompt dataset, reward function, loss
settings, initial HF weights and rollout engine. ``Trainer`` wires them together."""

from __future__ import annotations

import hashlib
import json
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
    from gmpo_megatron.rewards import ground_truth_check

    d = cfg.data
    files = list(d.train_files)
    if not files:
        # the name carries what generated the file, so other task settings never reuse it
        settings = json.dumps({"num_rows": d.num_rows, "options": d.options_for(d.task)}, sort_keys=True)
        digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
        path = output_dir / "data" / f"{d.task}_seed{cfg.seed}_{digest}.parquet"
        if rank == 0 and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_task_parquet(d.task, str(path), d.num_rows, cfg.seed, **d.options_for(d.task))
        if dist.is_initialized():
            dist.barrier()
        files = [str(path)]
    reward = cfg.reward.fn or d.task
    return load_prompt_dataset(files, tokenizer=tokenizer, max_prompt_length=d.max_prompt_length,
                               prompt_key=d.prompt_key, answer_key=d.answer_key,
                               check_ground_truth=ground_truth_check(reward) if reward else None)


def reward_fn(cfg: Config):
    """The reward function, or a pool of worker processes scoring with it (reward.num_workers;
    started on first use, so only the scoring rank starts them; close() stops them)."""
    from gmpo_megatron.rewards import RewardWorkers, get_reward_fn

    name = cfg.reward.fn or cfg.data.task
    if name is None:
        raise ValueError("reward.fn is required with data.train_files (e.g. reward.fn=math)")
    r = cfg.reward
    if r.num_workers == 0:
        return get_reward_fn(name)
    return RewardWorkers(name, r.num_workers, timeout_s=r.timeout_s, timeout_score=r.timeout_score)


def loss_settings(cfg: Config) -> LossSettings:
    """The policy loss and its options; the combination is validated here, before any step."""
    a = cfg.algorithm
    options: dict[str, Any] = {}
    for key in ("clip_eps_low", "clip_eps_high", "clip_level", "length_norm", "dual_clip"):
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


def advantage_options(cfg: Config) -> dict[str, Any]:
    """The keyword options of ``compute_advantages`` set in the config (log_reward_baseline's)."""
    a = cfg.algorithm
    return {key: getattr(a, key) for key in ("log_reward_eps", "normalize_std") if getattr(a, key) is not None}


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


def rollout_engine(cfg: Config, hf_config, tokenizer, device: torch.device, output_dir: Path,
                   sync_root: Path):
    """The configured engine (built on global rank 0 only). Launched SGLang servers start at
    the first weight sync, from the weights it writes."""
    if cfg.rollout.engine == "sglang":
        return sglang_engine(cfg, hf_config, output_dir)
    from gmpo_megatron.rollout.embedded import EmbeddedEngine

    return EmbeddedEngine(
        hf_config, device=device, dtype=DTYPES[cfg.precision.params_dtype],
        pad_token_id=tokenizer.pad_token_id, max_batch_size=cfg.rollout.max_batch_size,
        init_seed=cfg.seed,
    )


def sglang_engine(cfg: Config, hf_config, output_dir: Path):
    import sys

    from gmpo_megatron.rollout.sglang import FaultPolicy, RouteLayout, SGLangEngine
    from gmpo_megatron.rollout.sglang_launch import ServerSpec, free_port

    sg = cfg.rollout.sglang
    if sg.weight_sync == "distributed" and sg.launch is not None and sg.launch.dp > 1:
        raise ValueError(f"rollout.sglang.weight_sync=distributed with launch.dp={sg.launch.dp}: SGLang "
                         "takes broadcast weights only at dp=1; launch num_servers servers at dp=1 "
                         "instead, or use weight_sync=disk")
    routes = None
    if cfg.moe.routing_replay == "r3":
        from gmpo_megatron.models import get_mapping

        mapping = get_mapping(hf_config)
        if not mapping.num_experts:
            raise ValueError("moe.routing_replay=r3 but the model has no experts: set moe.routing_replay=none")
        moe_layers = tuple(i for i in range(hf_config.num_hidden_layers) if mapping.is_moe_layer(i))
        routes = RouteLayout(hf_config.num_hidden_layers, moe_layers, hf_config.num_experts_per_tok,
                             mapping.num_experts)
    faults = FaultPolicy(max_retries=sg.max_retries, retry_backoff_s=sg.retry_backoff_s,
                         max_restarts=sg.launch.max_restarts if sg.launch else 0,
                         startup_timeout_s=sg.launch.startup_timeout_s if sg.launch else 600.0,
                         request_timeout_s=sg.request_timeout_s)
    if sg.launch is None:
        return SGLangEngine(urls=list(sg.urls), router_url=sg.router_url, max_in_flight=sg.max_in_flight,
                            requests_per_call=sg.requests_per_call,
                            faults=faults, routes=routes)
    launch = sg.launch
    logs = Path(output_dir) / "sglang"
    logs.mkdir(parents=True, exist_ok=True)
    cpu = launch.cpu if launch.cpu is not None else not torch.cuda.is_available()
    context = launch.context_length or cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    max_total_tokens = launch.max_total_tokens
    if cpu and max_total_tokens is None:
        # SGLang sizes its KV cache from the machine's memory (12.8 GB for the tiny model on a
        # 24 GB CPU box); what can be in flight is max_in_flight requests of <= context tokens
        max_total_tokens = sg.max_in_flight * context
    specs = []
    for i in range(launch.num_servers):
        port = launch.base_port + i if launch.base_port else free_port(launch.host)
        gpu = (launch.base_gpu_id + i * launch.tp * launch.dp) if launch.base_gpu_id is not None else None
        specs.append(ServerSpec(
            python=launch.python or sys.executable, host=launch.host, port=port, tp=launch.tp,
            ep=launch.ep, dp=launch.dp, dtype=launch.dtype, mem_fraction_static=launch.mem_fraction_static,
            context_length=context, max_total_tokens=max_total_tokens, base_gpu_id=gpu, cpu=cpu,
            routed_experts=routes is not None, extra_args=list(launch.extra_args), env=_server_env(sg, cpu),
            log_path=logs / f"server_{i}.log"))
    return SGLangEngine(launch=specs, max_in_flight=sg.max_in_flight, requests_per_call=sg.requests_per_call,
                        faults=faults, routes=routes)


def _server_env(sg, cpu: bool) -> dict[str, str]:
    """A launched server's environment: launch.env, plus, for NCCL weight broadcasts, what the
    weight-update group needs (docs/models.md lists them and why; launch.env can still override it)."""
    if sg.weight_sync != "distributed" or cpu:
        return dict(sg.launch.env)
    from gmpo_megatron.rollout.sglang_distributed import NCCL_ENV

    return {**NCCL_ENV, **sg.launch.env}


def stop_token_ids(tokenizer, hf_config) -> tuple[int, ...]:
    """Tokens that end a response, for every engine: the tokenizer's EOS and the model config's
    EOS ids (SGLang stops on the latter by itself, so the embedded engine must too)."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(hf_config, "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def sync_dir(cfg: Config) -> Path:
    return Path(cfg.rollout.sglang.sync_dir or Path(cfg.output_dir) / "weight_sync")


def sync_static_files(sync_root: Path, hf_config, tokenizer, stop_ids: tuple[int, ...], rank: int) -> Path:
    """``config.json`` + tokenizer files that every weight-sync version carries (so a server can
    boot from any version), written once by rank 0. The config's EOS ids are the trainer's stop
    tokens, so the server stops exactly where the trainer asks."""
    import copy

    static = Path(sync_root) / "static"
    if rank == 0 and not (static / "config.json").exists():
        static.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(hf_config)
        config.eos_token_id = list(stop_ids) if len(stop_ids) > 1 else stop_ids[0]
        config.pad_token_id = tokenizer.pad_token_id
        if not config.architectures:  # a preset built in memory names no class; servers need one
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.save_pretrained(str(static))
        tokenizer.save_pretrained(str(static))
        (static / "generation_config.json").unlink(missing_ok=True)
    return static


def probe_tokens(tokenizer, hf_config, length: int = 24) -> list[int]:
    """A fixed token sequence for the weight read-back check: seeded ids over the tokenizer's
    vocabulary (the same on every rank and every step)."""
    generator = torch.Generator().manual_seed(12345)
    vocab = min(len(tokenizer), hf_config.vocab_size)
    return torch.randint(0, vocab, (length,), generator=generator).tolist()


def checkpoint_layout_state(hf_model, mapping) -> dict[str, torch.Tensor]:
    """An HF model's tensors under checkpoint names (transformers 5 fuses experts in memory)."""
    from gmpo_megatron.rollout.embedded import checkpoint_state_dict

    state = checkpoint_state_dict(hf_model)
    missing = [n for n in mapping.hf_names() if n not in state]
    if missing:
        raise KeyError(f"random-init HF model lacks {missing[:5]} ... ({len(missing)} tensors)")
    return state
