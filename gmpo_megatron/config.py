"""The one typed config. YAML files, ``key=value`` overrides and launch scripts only fill it.

Defaults are safe for the tiny CPU run; real-cluster values are documented per field and in
``examples/moe/*.yaml``. Unknown keys and bad values are rejected with the key, the allowed values
and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gmpo_megatron.megatron.recompute import check_recompute
from gmpo_megatron.rewards.scoring import MAX_ABS_REWARD


class ConfigError(ValueError):
    """A bad config key or value; the message names it and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    hf_config: str | None = "tiny-qwen3-moe"
    """A preset name (tiny-qwen3-moe, ...) or a local HF model directory / config.json; null:
    the config.json of hf_checkpoint. Given together with hf_checkpoint, the two must agree."""
    hf_checkpoint: str | None = None
    """Local HF directory with safetensors to start from; None: random init (seeded) from hf_config."""
    tokenizer: str = "task"
    """'task': the built-in character tokenizer of the procedural tasks; or a local HF tokenizer dir."""


class ParallelConfig(_Section):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    etp: int | None = Field(None, ge=1)
    """Expert tensor parallel size; None follows Megatron (= tp). TP2+EP2 on 2 processes needs 1."""
    cp: int = Field(1, ge=1)
    """Context parallel needs Transformer-Engine attention (GPU)."""
    sequence_parallel: bool | None = None
    """None: on when tp > 1 (MoE with TP requires it)."""
    pp_first_stage_layers: int | None = None
    pp_last_stage_layers: int | None = None
    moe_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    distributed_optimizer: bool = True


class PrecisionConfig(_Section):
    params_dtype: Literal["fp32", "bf16"] = "fp32"
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["tensorwise", "blockwise", "delayed"] = "tensorwise"


class MoEConfig(_Section):
    routing_replay: Literal["none", "r2", "r3"] = "none"
    """r2: the experts chosen in the old-log-prob pass are replayed in every update pass of the
    step; r3: the experts the rollout engine (SGLang) routed each token through are replayed in
    the old-log-prob pass and every update pass (docs/routing_replay.md). r3 needs
    rollout.engine=sglang."""
    aux_loss_coeff: float = Field(0.0, ge=0.0)
    z_loss_coeff: float | None = Field(None, ge=0.0)
    router_dtype: Literal["fp32", "fp64"] = "fp32"


class DataConfig(_Section):
    task: Literal["arithmetic", "countdown"] | None = "arithmetic"
    """Procedural task generated into output_dir/data when train_files is empty."""
    train_files: list[str] = Field(default_factory=list)
    """Parquet / jsonl files with a prompt column and a ground truth (verl schema or flat column)."""
    prompt_key: str = "prompt"
    answer_key: str | None = None
    num_rows: int = Field(4096, ge=1)
    task_options: dict[Literal["arithmetic", "countdown"], dict[str, Any]] = Field(default_factory=dict)
    """Generator options per task (data/tasks.py), e.g. {arithmetic: {max_operand: 4}}; only
    data.task's are used, so switching data.task never hands one task's options to another."""
    max_prompt_length: int = Field(64, ge=1)

    @field_validator("task_options", mode="before")
    @classmethod
    def _keyed_by_task(cls, value: Any) -> Any:
        tasks = ("arithmetic", "countdown")
        if isinstance(value, dict) and value and not set(value) <= set(tasks):
            flat = ", ".join(f"{k}: {v}" for k, v in value.items())
            raise ValueError(f"data.task_options is keyed by task ({'/'.join(tasks)}): write it as "
                             f"task_options: {{arithmetic: {{{flat}}}}} (or countdown: {{...}})")
        return value

    def options_for(self, task: str) -> dict[str, Any]:
        return dict(self.task_options.get(task, {}))


class SGLangLaunchConfig(_Section):
    """SGLang servers the trainer starts itself (on the node of global rank 0), one per
    ``num_servers``; each is ``python -m sglang.launch_server`` (docs/sglang.md)."""

    num_servers: int = Field(1, ge=1)
    python: str | None = None
    """Interpreter of an environment with sglang; None: the trainer's own. The GPU image keeps
    sglang in its own venv: /opt/sglang/bin/python. On CPU, tools/sglang_cpu/setup.sh builds
    .venv-sglang: use .venv-sglang/bin/python."""
    tp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    dp: int = Field(1, ge=1)
    host: str = "127.0.0.1"
    """Address the servers bind to (loopback unless you need them reachable from other nodes)."""
    base_port: int = Field(0, ge=0, le=65535)
    """Server i listens on base_port + i; 0: free ports chosen at launch."""
    base_gpu_id: int | None = Field(None, ge=0)
    """First GPU of server 0; server i starts at base_gpu_id + i * tp * dp (keep them off the
    training GPUs). None: sglang's default (0)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    mem_fraction_static: float | None = Field(None, gt=0.0, lt=1.0)
    context_length: int | None = Field(None, ge=1)
    """None: data.max_prompt_length + rollout.max_new_tokens."""
    max_total_tokens: int | None = Field(None, ge=1)
    """KV-cache tokens per server. None: sglang's choice from free memory on GPU; on CPU
    max_in_flight * context_length (sglang would otherwise take about half the machine)."""
    cpu: bool | None = None
    """Add sglang's CPU-engine flags; None: when this machine has no CUDA."""
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout_s: float = Field(600.0, gt=0.0)
    max_restarts: int = Field(2, ge=0)
    """Restarts of dead servers per run (each reloads the current weights)."""


class SGLangConfig(_Section):
    """``rollout.engine=sglang``: attach to ``urls`` or ``launch`` servers (exactly one of them)."""

    urls: list[str] = Field(default_factory=list)
    """Servers someone else started (e.g. on rollout nodes), http://host:port each; weight
    updates and health checks go to each of them."""
    router_url: str | None = None
    """An sglang_router in front of ``urls``: generation requests go there, weight updates to urls."""
    launch: SGLangLaunchConfig | None = None
    weight_sync: Literal["disk", "distributed"] = "disk"
    """disk: HF safetensors under sync_dir + /update_weights_from_disk (everywhere; the servers must
    see sync_dir at the same path). distributed: a torch.distributed broadcast into the servers
    (NCCL on GPU, gloo on CPU; no shared filesystem), docs/sglang.md "Weight sync transports"."""
    sync_dir: str | None = None
    """None: <output_dir>/weight_sync."""
    bucket_mb: int = Field(512, ge=1)
    """distributed: largest flattened bucket of one broadcast, MiB (a larger tensor goes alone)."""
    check_weights: bool = False
    """After every sync, compare the servers' log-probs of a probe sequence with the trainer's."""
    check_weights_tol: float = Field(1e-3, gt=0.0)
    """Largest |log-prob difference| check_weights accepts (fp32 on CPU measures ~1e-6)."""
    max_in_flight: int = Field(256, ge=1)
    """Requests in flight per server (or to the router)."""
    requests_per_call: int = Field(16, ge=1)
    """Requests batched into one /generate HTTP call (each keeps its own seed); 1: one call each."""
    request_timeout_s: float = Field(600.0, gt=0.0)
    max_retries: int = Field(3, ge=0)
    """Retries of one request after connection errors, timeouts or 5xx (exponential backoff)."""
    retry_backoff_s: float = Field(0.5, ge=0.0)


class RolloutConfig(_Section):
    engine: Literal["embedded", "sglang"] = "embedded"
    """'embedded': transformers in global rank 0's process (the tiny CPU demo); 'sglang': SGLang
    servers (rollout.sglang), the engine of every real run."""
    sglang: SGLangConfig = Field(default_factory=SGLangConfig)
    n: int = Field(8, ge=1)
    """Samples per prompt (the group size of GRPO-style advantages)."""
    prompts_per_step: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(8, ge=1)
    max_batch_size: int = Field(256, ge=1)
    weight_gather_mb: int = Field(256, ge=1)
    """Weight sync, every engine and transport: the trainer gathers its shards into full tensors
    in buckets of at most this many MiB per collective (a larger tensor goes alone), only on the
    ranks that send them (megatron/weight_gather.py)."""


class AlgorithmConfig(_Section):
    loss: Literal["gmpo", "grpo", "dapo", "dr_grpo", "gspo"] = "gmpo"
    clip_eps_low: float | None = Field(None, ge=0.0)
    """None: the loss's default (gmpo 0.4 in log space; grpo 0.2 in ratio space; ...)."""
    clip_eps_high: float | None = Field(None, ge=0.0)
    clip_level: Literal["token", "sequence", "none"] | None = None
    """gmpo only (paper Table 4): token (default), sequence, none."""
    length_norm: bool | None = None
    """gmpo only: the 1/|o_i| in the exponent (paper Table 4 row 4 turns it off)."""
    dual_clip: float | None = Field(None, gt=0.0)
    """gmpo only: a log-space cap on the clipped log-ratio of negative-advantage tokens
    (PPO's dual clip; its c=3 is log(3)=1.0986 here). None: off."""
    advantage: Literal["grpo", "dr_grpo", "log_reward_baseline"] = "grpo"
    log_reward_eps: float | None = Field(None, gt=0.0)
    """log_reward_baseline only: rewards are clamped to at least this before the log (None: 1e-6)."""
    normalize_std: bool | None = None
    """log_reward_baseline only: divide by the group std of the log-rewards (None: no)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: keep only groups whose rewards are not all equal (the others carry
    no signal) and draw more prompts until rollout.prompts_per_step such groups are kept
    (rollout/dynamic_sampling.py). Off: a step whose groups all have equal rewards is skipped."""
    dynamic_sampling_max_rounds: int = Field(4, ge=1)
    """Most sampling rounds of rollout.prompts_per_step prompts per step with dynamic_sampling;
    a step that still has no informative group is skipped (logged as skipped: 1)."""
    tis_level: Literal["token", "sequence", "geometric"] | None = None
    tis_cap: float = Field(2.0, gt=0.0)
    entropy_coef: float = 0.0
    max_response_length: int | None = None
    """dr_grpo's constant normaliser; None: rollout.max_new_tokens."""


class TrainConfig(_Section):
    steps: int = Field(100, ge=1)
    ppo_epochs: int = Field(1, ge=1)
    mini_batches: int = Field(1, ge=1)
    """Optimizer steps per epoch: the rollout batch is split into this many mini-batches."""
    packing: bool = True
    """Pack the sequences of a micro-batch into one row (THD layout, no padding between them)."""
    max_tokens_per_microbatch: int = Field(4096, ge=1)
    """Token budget of a packed micro-batch on one data-parallel rank (packing=true)."""
    micro_batch_size: int = Field(64, ge=1)
    """Sequences per micro-batch on each data-parallel rank (packing=false)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute, for long responses (gmpo_megatron/megatron/recompute.py): full
    checkpoints whole layers, selective the recompute_modules of every layer. Same gradients."""
    recompute_method: Literal["uniform", "block"] | None = None
    """full only: uniform (chunks of recompute_num_layers layers, the default) or block (only the
    first recompute_num_layers layers of each pipeline stage)."""
    recompute_num_layers: int | None = Field(None, ge=1)
    """full only: uniform's chunk size (default 1; must divide each stage's layers) or block's count."""
    recompute_modules: list[str] | None = None
    """selective only (default [core_attn]): any of core_attn, layernorm, mlp (dense layers),
    moe (whole MoE layers), moe_act (Transformer-Engine grouped-GEMM experts only)."""
    lr: float = Field(1e-3, gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """After warmup; the paper trains at a constant lr."""
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = Field(1.0, ge=0.0)
    save_interval: int = Field(50, ge=0)
    """Checkpoint every N steps, and at the end (0: only at the end). A crash loses at most
    N steps: 50 is ~15 s of the tiny CPU run (a save of its 3.7 MB took 0.8-4 s on 2 loaded cores,
    mostly forking the writers); on a cluster, choose N so that N steps cost much more than a save
    of model + optimizer."""
    keep_last: int = Field(2, ge=1)
    """Finished checkpoints kept (older ones are deleted after each save); 2 leaves one to fall
    back to when the newest is found damaged."""


class RewardConfig(_Section):
    fn: str | None = None
    """A registered reward (arithmetic, countdown, math) or 'pkg.module:function'; None: the task's."""
    num_workers: int = Field(2, ge=0)
    """Processes that score the step's responses in parallel (each imports reward.fn itself);
    0: one after another in the trainer's rank-0 process, with no time limit."""
    timeout_s: float = Field(30.0, gt=0.0)
    """Time limit of one reward call (num_workers >= 1): a call past it is stopped and scores
    timeout_score; each step logs how many did as reward_timeouts."""
    timeout_score: float = Field(0.0, ge=-MAX_ABS_REWARD, le=MAX_ABS_REWARD, allow_inf_nan=False)


class LoggingConfig(_Section):
    tensorboard: bool = True
    progress_bar: bool = True
    dashboard: bool = True
    """Write output_dir/dashboard.png (gmpo-plot) at each checkpoint and at the end of the run."""
    wandb: bool = False
    """Log every step's metrics to Weights & Biases (needs the `wandb` extra). Offline, into
    output_dir/wandb, unless the environment sets WANDB_MODE (e.g. online)."""
    wandb_project: str = "gmpo-megatron"
    wandb_run_name: str | None = None
    """None: the output_dir's name."""


class Config(_Section):
    seed: int = 1
    output_dir: str = "outputs/tiny_cpu"
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> "Config":
        alg = self.algorithm
        gmpo_only = [k for k in ("clip_level", "length_norm", "dual_clip") if getattr(alg, k) is not None]
        if alg.loss != "gmpo" and gmpo_only:
            raise ValueError(
                f"algorithm.{' / algorithm.'.join(gmpo_only)}: GMPO option(s) (paper Table 4) "
                f"but algorithm.loss={alg.loss!r}: remove them or set algorithm.loss=gmpo"
            )
        baseline_only = [k for k in ("log_reward_eps", "normalize_std") if getattr(alg, k) is not None]
        if alg.advantage != "log_reward_baseline" and baseline_only:
            raise ValueError(
                f"algorithm.{' / algorithm.'.join(baseline_only)}: option(s) of "
                f"algorithm.advantage=log_reward_baseline, but algorithm.advantage={alg.advantage!r} "
                "(grpo always divides by the group std, dr_grpo never): remove them or set the advantage"
            )
        if self.train.min_lr > 0 and self.train.lr_schedule == "constant":
            raise ValueError(f"train.min_lr={self.train.min_lr} has no effect with "
                             "train.lr_schedule=constant: set lr_schedule=cosine|linear or drop min_lr")
        if self.rollout.n < 2:
            # every advantage mode is group-relative: a group of one has no spread, so every
            # advantage is 0 and the run would train nothing (loss 0, grad norm 0 every step)
            raise ValueError(
                f"rollout.n={self.rollout.n} with algorithm.advantage={alg.advantage}: the advantage "
                "is relative to the other samples of the same prompt, so one sample per prompt "
                "gets advantage 0 and nothing trains; set rollout.n=2 or more (e.g. 8)"
            )
        timed = self.reward.model_fields_set & {"timeout_s", "timeout_score"}
        if self.reward.num_workers == 0 and timed:
            raise ValueError(f"reward.{sorted(timed)[0]} is set but reward.num_workers=0: a call in "
                             "the trainer's process cannot be stopped; set reward.num_workers=1 or more")
        if "dynamic_sampling_max_rounds" in alg.model_fields_set and not alg.dynamic_sampling:
            raise ValueError("algorithm.dynamic_sampling_max_rounds is set but algorithm.dynamic_sampling "
                             "is false: set dynamic_sampling=true, or drop dynamic_sampling_max_rounds")
        if "tis_cap" in alg.model_fields_set and alg.tis_level is None:
            raise ValueError("algorithm.tis_cap is set but algorithm.tis_level is not: set "
                             "tis_level=token|sequence|geometric, or drop tis_cap")
        longest = self.data.max_prompt_length + self.rollout.max_new_tokens
        if self.train.packing and self.train.max_tokens_per_microbatch < longest:
            raise ValueError(
                f"train.max_tokens_per_microbatch={self.train.max_tokens_per_microbatch} cannot hold "
                f"the longest possible sequence, data.max_prompt_length + rollout.max_new_tokens = "
                f"{longest}: raise it to at least {longest}"
            )
        t = self.train
        check_recompute(t.recompute, t.recompute_method, t.recompute_num_layers, t.recompute_modules)
        self._check_rollout_engine()
        if self.model.hf_config is None and self.model.hf_checkpoint is None:
            raise ValueError("model.hf_config=null needs model.hf_checkpoint (a local HF directory)")
        from gmpo_megatron.data.tasks import make_task

        for task, options in self.data.task_options.items():
            try:
                make_task(task, **options)
            except (TypeError, ValueError) as error:
                raise ValueError(f"data.task_options.{task}: {error}") from None
        if not self.data.train_files and self.data.task is None:
            raise ValueError("no data: set data.train_files=[...] or data.task=arithmetic|countdown")
        return self

    def _check_rollout_engine(self) -> None:
        r = self.rollout
        sg = r.sglang
        if r.engine != "sglang":
            if "sglang" in r.model_fields_set:
                raise ValueError(f"rollout.sglang.* is set but rollout.engine={r.engine!r}: set "
                                 "rollout.engine=sglang, or drop the rollout.sglang section")
            if self.moe.routing_replay == "r3":
                raise ValueError("moe.routing_replay=r3 replays the rollout engine's experts, which "
                                 f"rollout.engine={r.engine!r} does not report: set rollout.engine=sglang "
                                 "(R3), or moe.routing_replay=r2 (the old-log-prob pass's experts)")
            return
        if bool(sg.urls) == (sg.launch is not None):
            raise ValueError("rollout.engine=sglang needs exactly one of rollout.sglang.urls=[http://host:port, "
                             "...] (servers you started) or rollout.sglang.launch={...} (the trainer starts "
                             "them), e.g. rollout.sglang.launch.python=.venv-sglang/bin/python")
        if sg.router_url and not sg.urls:
            raise ValueError("rollout.sglang.router_url needs rollout.sglang.urls (the router's workers, "
                             "which receive the weight updates)")
        for url in [*sg.urls, *([sg.router_url] if sg.router_url else [])]:
            if not (url.startswith("http://") or url.startswith("https://")):
                raise ValueError(f"rollout.sglang url {url!r} must start with http:// or https://")
        if "bucket_mb" in sg.model_fields_set and sg.weight_sync != "distributed":
            raise ValueError("rollout.sglang.bucket_mb sizes the NCCL buckets of weight_sync=distributed; "
                             "drop it or set rollout.sglang.weight_sync=distributed")
        if "check_weights_tol" in sg.model_fields_set and not sg.check_weights:
            raise ValueError("rollout.sglang.check_weights_tol is set but check_weights is false: "
                             "set rollout.sglang.check_weights=true or drop the tolerance")

    # -- I/O ------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _section_model(annotation) -> type[BaseModel] | None:
    """The section class of a field (``SGLangLaunchConfig | None`` too), or None for a value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _suggest(path: list[str], value: Any) -> tuple[list[str], list[str]]:
    """(close matches, the keys allowed where they point) for the unknown key ``path``.

    The last name is matched against the names of its own section; when it resembles a section
    and was given keys (``trian.steps=3``), each of those keys is matched inside that section,
    so the suggestion is ``train.steps`` and the keys listed are train's."""
    model: type[BaseModel] = Config
    for part in path[:-1]:  # pydantic reached the unknown key through these sections
        model = _section_model(model.model_fields[part].annotation) or model
    prefix = "".join(f"{part}." for part in path[:-1])
    close = difflib.get_close_matches(path[-1], list(model.model_fields), n=3)
    suggestions, listed, listed_prefix = [], model, prefix
    for rank, name in enumerate(close):
        section = _section_model(model.model_fields[name].annotation)
        if section is None or not isinstance(value, dict) or not value:
            suggestions.append(prefix + name)
            continue
        for leaf in value:
            leaf_close = difflib.get_close_matches(str(leaf), list(section.model_fields), n=1)
            suggestions.append(f"{prefix}{name}.{leaf_close[0] if leaf_close else leaf}")
        if rank == 0:
            listed, listed_prefix = section, f"{prefix}{name}."
    allowed = [listed_prefix + name for name in listed.model_fields]
    return list(dict.fromkeys(suggestions)), allowed


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<config>"
        if item["type"] == "extra_forbidden":
            close, allowed = _suggest([str(p) for p in item["loc"]], item.get("input"))
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            lines.append(f"unknown config key {key!r}.{hint} Allowed here: {', '.join(allowed)}")
        elif not item["loc"]:  # a whole-config check: its message names the keys
            lines.append(str(item["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    if len(lines) == 1:  # the common case: one line
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  - " + "\n  - ".join(lines)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` with the value parsed as YAML (so 1, 1e-3, true, null, [a, b] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            context = getattr(error, "context", None)
            raise ConfigError(f"{where}: not valid YAML ({problem}{', ' + context if context else ''}); "
                              "fix the file at that line (YAML: `section:` then indented `key: value`)") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_explain(error)) from None
