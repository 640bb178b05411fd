"""The one typed config. YAML files, ``key=value`` overrides and launch scripts only fill it.

Defaults are safe for the tiny CPU run; real-cluster values are documented per field and in
``examples/moe/*.yaml``. Unknown keys and bad values are rejected with the key, the allowed values
and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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
    routing_replay: Literal["none", "r2"] = "none"
    """r2: the experts chosen in the old-log-prob pass are replayed in every update pass of the
    step (docs/routing_replay.md). R3 (the rollout engine's routes) needs an engine that returns
    them; the embedded engine does not."""
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
    task_options: dict[str, Any] = Field(default_factory=dict)
    max_prompt_length: int = Field(64, ge=1)


class RolloutConfig(_Section):
    engine: Literal["embedded"] = "embedded"
    """'embedded' runs transformers in-process; the SGLang engine arrives with its own issue."""
    n: int = Field(8, ge=1)
    """Samples per prompt (the group size of GRPO-style advantages)."""
    prompts_per_step: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(8, ge=1)
    max_batch_size: int = Field(256, ge=1)


class AlgorithmConfig(_Section):
    loss: Literal["gmpo", "grpo", "dapo", "dr_grpo", "gspo"] = "gmpo"
    clip_eps_low: float | None = Field(None, ge=0.0)
    """None: the loss's default (gmpo 0.4 in log space; grpo 0.2 in ratio space; ...)."""
    clip_eps_high: float | None = Field(None, ge=0.0)
    clip_level: Literal["token", "sequence", "none"] | None = None
    """gmpo only (paper Table 4): token (default), sequence, none."""
    length_norm: bool | None = None
    """gmpo only: the 1/|o_i| in the exponent (paper Table 4 row 4 turns it off)."""
    advantage: Literal["grpo", "dr_grpo", "log_reward_baseline"] = "grpo"
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (DAPO); they carry no signal."""
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
    save_interval: int = Field(0, ge=0)
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = Field(2, ge=1)


class RewardConfig(_Section):
    fn: str | None = None
    """A registered reward (arithmetic, countdown, math) or 'pkg.module:function'; None: the task's."""


class LoggingConfig(_Section):
    tensorboard: bool = True
    progress_bar: bool = True


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
        if alg.loss != "gmpo" and (alg.clip_level is not None or alg.length_norm is not None):
            raise ValueError(
                f"algorithm.clip_level / algorithm.length_norm are GMPO options (paper Table 4) "
                f"but algorithm.loss={alg.loss!r}: remove them or set algorithm.loss=gmpo"
            )
        if self.train.min_lr > 0 and self.train.lr_schedule == "constant":
            raise ValueError(f"train.min_lr={self.train.min_lr} has no effect with "
                             "train.lr_schedule=constant: set lr_schedule=cosine|linear or drop min_lr")
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
        if self.model.hf_config is None and self.model.hf_checkpoint is None:
            raise ValueError("model.hf_config=null needs model.hf_checkpoint (a local HF directory)")
        if not self.data.train_files and self.data.task is None:
            raise ValueError("no data: set data.train_files=[...] or data.task=arithmetic|countdown")
        return self

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


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def _explain(error: ValidationError) -> str:
    known = _known_keys(Config)
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<config>"
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            section = key.rsplit(".", 1)[0] + "." if "." in key else ""
            siblings = [k for k in known if k.startswith(section) and k.count(".") == key.count(".")]
            lines.append(f"unknown config key {key!r}.{hint} Allowed here: {', '.join(siblings)}")
        else:
            lines.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
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
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_explain(error)) from None
