"""The example configs, launch scripts and model config files in examples/moe/ are consistent.

Every example YAML loads through the typed config. For the full-size configs, the launch script's
torchrun command (printed with DRY_RUN=1) and the config together form a valid Megatron layout:
heads / KV groups divisible by tp, experts by ep, layers over (uneven) pipeline stages, a world size
(nnodes * nproc_per_node) divisible by tp*pp*cp and by etp*ep*pp, and a batch that splits evenly
into mini-batches over the data-parallel ranks. The ``# alt-layout:`` comment lines of each config
are checked the same way. Nothing is built: ``transformer_config`` is Megatron's own check.

Every full-size config rolls out on SGLang servers on rollout nodes (no model copy on a training
rank): the launch scripts take the workers and the router from ROLLOUT_URLS / ROUTER_URL and refuse
without them, and ``launch_sglang_rollout.sh`` starts workers whose layout fits the config's model
(dry runs; its process handling needs real GPU servers and is not exercised here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from gmpo_megatron.config import Config, load_config
from gmpo_megatron.megatron.model_builder import BuildOptions, te_available, transformer_config
from gmpo_megatron.models.presets import PUBLIC_CONFIGS, load_hf_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "moe"
# config -> (launch script, expected default nodes x GPUs per node)
FULL_SIZE = {
    "qwen3_30b_a3b.yaml": ("launch_qwen3_30b_a3b.sh", (1, 8)),
    "qwen3_235b_a22b.yaml": ("launch_qwen3_235b_a22b.sh", (16, 8)),
    "qwen3_32b.yaml": ("launch_qwen3_32b.sh", (2, 8)),
}
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.sh"))
ROLLOUT_SCRIPT = "launch_sglang_rollout.sh"
LAUNCH_ENV_KEYS = ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "CONFIG",
                   "DRY_RUN", "TORCHRUN", "CLIP_EPS_VALUES", "OUTPUT_ROOT", "NCCL_CUMEM_ENABLE",
                   "NCCL_NVLS_ENABLE", "CUDA_DEVICE_MAX_CONNECTIONS",
                   "TORCH_NCCL_AVOID_RECORD_STREAMS", "ROLLOUT_URLS", "ROUTER_URL", "SGLANG_PYTHON",
                   # launch_sglang_rollout.sh
                   "MODEL_PATH", "LAYOUT", "TP", "EP", "DP", "GPUS_PER_NODE", "BASE_GPU_ID",
                   "NUM_SERVERS", "HOST", "BASE_PORT", "MEM_FRACTION", "CONTEXT_LENGTH",
                   "ROUTED_EXPERTS", "WEIGHT_VERSION", "LOG_DIR", "STARTUP_TIMEOUT_S", "ROUTER_PORT",
                   "ROUTER_POLICY", "ROUTER_TIMEOUT_S", "SGLANG_RETURN_ORIGINAL_LOGPROB")
PLACEHOLDER = "/path/to/"
# What the rollout nodes' scripts print; the training launch scripts take it from the environment.
WORKERS = ["http://10.0.1.1:30000", "http://10.0.1.1:30001", "http://10.0.1.2:30000"]
ROUTER = "http://10.0.1.1:31000"
ROLLOUT_ENV = {"ROLLOUT_URLS": ",".join(WORKERS), "ROUTER_URL": ROUTER}
ROLLOUT_OVERRIDES = [f"rollout.sglang.urls=[{','.join(WORKERS)}]", f"rollout.sglang.router_url={ROUTER}"]
MAX_TOKENS_PER_MICRO_BATCH = 20480  # anchors' ~20k tokens per GPU for Qwen3-30B-A3B (docs/models.md, Recipe)


# -- helpers -----------------------------------------------------------------------------------
def run_script(script: str, env: dict[str, str | None] | None = None, args: tuple[str, ...] = (),
               dry_run: bool = True) -> subprocess.CompletedProcess:
    """``script`` with a clean launch environment plus ROLLOUT_ENV and ``env`` (None unsets)."""
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS}
    clean.update(ROLLOUT_ENV)
    clean.update(env or {})
    clean = {k: v for k, v in clean.items() if v is not None}
    if dry_run:
        clean["DRY_RUN"] = "1"
    return subprocess.run(["bash", str(EXAMPLES / script), *args], capture_output=True, text=True,
                          env=clean, timeout=30)


def parse_dry_run(line: str) -> dict:
    """A DRY_RUN line: ``VAR=v ... torchrun --nnodes N ... -m gmpo_megatron.cli --config C ...``"""
    words = shlex.split(line)
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    torchrun_args = words[1:words.index("-m")]
    assert words[words.index("-m") + 1] == "gmpo_megatron.cli", line
    options = {}
    for i, word in enumerate(torchrun_args):
        if word.startswith("--"):
            following = torchrun_args[i + 1] if i + 1 < len(torchrun_args) else "--"
            options[word[2:]] = None if following.startswith("--") else following
    cli = words[words.index("-m") + 2:]
    assert cli[0] == "--config", line
    return {"env": env, "torchrun": options, "config": cli[1], "overrides": cli[2:],
            "world": int(options["nnodes"]) * int(options["nproc_per_node"])}


def build_options(cfg: Config, *, fp8: bool = True) -> BuildOptions:
    """The trainer's BuildOptions for ``cfg`` (see gmpo_megatron/trainer.py)."""
    p = cfg.parallel
    return BuildOptions(
        tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, cp=p.cp, sequence_parallel=p.sequence_parallel,
        pp_first_stage_layers=p.pp_first_stage_layers, pp_last_stage_layers=p.pp_last_stage_layers,
        params_dtype=torch.bfloat16 if cfg.precision.params_dtype == "bf16" else torch.float32,
        fp8=cfg.precision.fp8 if fp8 else None, fp8_recipe=cfg.precision.fp8_recipe,
        moe_dispatcher=p.moe_dispatcher, moe_aux_loss_coeff=cfg.moe.aux_loss_coeff,
        moe_z_loss_coeff=cfg.moe.z_loss_coeff, moe_router_dtype=cfg.moe.router_dtype,
        recompute=cfg.train.recompute, recompute_method=cfg.train.recompute_method,
        recompute_num_layers=cfg.train.recompute_num_layers,
        recompute_modules=cfg.train.recompute_modules,
    )


def check_layout(cfg: Config, world: int) -> dict[str, int]:
    """Every divisibility the run needs, from the config and the world size alone."""
    hf = load_hf_config(cfg.model.hf_config)
    p = cfg.parallel
    etp = p.tp if p.etp is None else p.etp
    transformer_config(hf, build_options(cfg, fp8=False))  # Megatron's and our checks; no model
    assert hf.num_attention_heads % p.tp == 0 and hf.num_key_value_heads % p.tp == 0, "heads / tp"
    if getattr(hf, "num_experts", None):
        assert hf.num_experts % p.ep == 0, f"{hf.num_experts} experts / ep {p.ep}"
        assert hf.moe_intermediate_size % etp == 0, f"expert ffn / etp {etp}"
    assert world % (p.tp * p.pp * p.cp) == 0, f"world {world} vs tp*pp*cp"
    assert world % (etp * p.ep * p.pp) == 0, f"world {world} vs etp*ep*pp"
    dp = world // (p.tp * p.pp * p.cp)
    if p.pp > 1:
        fixed = [n for n in (p.pp_first_stage_layers, p.pp_last_stage_layers) if n is not None]
        middle_stages = p.pp - len(fixed)
        middle_layers = hf.num_hidden_layers - sum(fixed)
        assert middle_stages > 0 and middle_layers % middle_stages == 0, "uneven middle stages"
        assert all(0 < n <= middle_layers // middle_stages for n in fixed), "first/last stages"
    rollouts = cfg.rollout.prompts_per_step * cfg.rollout.n
    mini_batch = rollouts // cfg.train.mini_batches
    assert rollouts % cfg.train.mini_batches == 0, f"{rollouts} rollouts / {cfg.train.mini_batches}"
    assert cfg.rollout.prompts_per_step % cfg.train.mini_batches == 0, "groups split across minis"
    assert mini_batch % dp == 0, f"mini-batch {mini_batch} over dp {dp}"
    sequence = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    assert sequence <= hf.max_position_embeddings, f"{sequence} tokens > max_position_embeddings"
    # GPU configs use padded micro-batches: packing is verified on the local spec only
    assert not cfg.train.packing, "full-size (Transformer-Engine) configs must set train.packing=false"
    assert mini_batch // dp >= cfg.train.micro_batch_size, "micro-batch larger than a DP share"
    assert cfg.train.micro_batch_size * sequence <= MAX_TOKENS_PER_MICRO_BATCH, "tokens per micro"
    return {"dp": dp, "expert_dp": world // (etp * p.ep * p.pp), "mini_batch": mini_batch}


def alt_layouts(config_name: str) -> list[tuple[dict[str, str], list[str]]]:
    """The ``# alt-layout: ENV=v ... key=value ...`` lines of a config."""
    out = []
    for line in (EXAMPLES / config_name).read_text().splitlines():
        if line.startswith("# alt-layout:"):
            words = line.split(":", 1)[1].split()
            env = dict(w.split("=", 1) for w in words if w.split("=", 1)[0].isupper())
            out.append((env, [w for w in words if not w.split("=", 1)[0].isupper()]))
    return out


def _strings(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _strings(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _strings(value)
    elif isinstance(tree, str):
        yield tree


# -- every example -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_config_loads(name):
    load_config(EXAMPLES / name)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_passes_bash_syntax_check(script):
    result = subprocess.run(["bash", "-n", str(EXAMPLES / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- full-size configs + launch scripts -----------------------------------------------------------
@pytest.mark.parametrize("config_name", sorted(FULL_SIZE))
def test_default_launch_and_config_form_a_valid_layout(config_name):
    script, (nodes, gpus) = FULL_SIZE[config_name]
    env = {"MASTER_ADDR": "10.0.0.1"} if nodes > 1 else {}
    result = run_script(script, env, ("train.steps=2",))
    assert result.returncode == 0, result.stderr
    launch = parse_dry_run(result.stdout.strip())
    assert Path(launch["config"]) == EXAMPLES / config_name
    torchrun = launch["torchrun"]
    assert (int(torchrun["nnodes"]), int(torchrun["nproc_per_node"])) == (nodes, gpus)
    assert launch["overrides"] == [*ROLLOUT_OVERRIDES, "train.steps=2"]
    cfg = load_config(launch["config"], launch["overrides"])
    assert cfg.train.steps == 2
    assert (cfg.rollout.sglang.urls, cfg.rollout.sglang.router_url) == (WORKERS, ROUTER)
    check_layout(cfg, launch["world"])


@pytest.mark.parametrize("config_name, env, overrides", [
    (name, env, overrides) for name in sorted(FULL_SIZE) for env, overrides in alt_layouts(name)])
def test_alternative_layouts_in_the_config_comments_are_valid(config_name, env, overrides):
    script, _ = FULL_SIZE[config_name]
    result = run_script(script, {"MASTER_ADDR": "10.0.0.1", **env}, tuple(overrides))
    assert result.returncode == 0, result.stderr
    launch = parse_dry_run(result.stdout.strip())
    cfg = load_config(launch["config"], launch["overrides"])
    check_layout(cfg, launch["world"])
    if cfg.precision.fp8 is not None and not te_available():
        with pytest.raises(ValueError, match="needs Transformer-Engine"):
            transformer_config(load_hf_config(cfg.model.hf_config), build_options(cfg))


def test_the_anchor_layouts_of_qwen3_30b_a3b_are_all_listed():
    """docs/models.md: TP4/PP1/EP8/ETP1 (default), TP1/EP8, TP2/EP8, FP8 blockwise TP1/PP4/EP4."""
    layouts = set()
    for env, overrides in [({}, [])] + alt_layouts("qwen3_30b_a3b.yaml"):
        cfg = load_config(EXAMPLES / "qwen3_30b_a3b.yaml", overrides)
        p = cfg.parallel
        fp8 = cfg.precision.fp8_recipe if cfg.precision.fp8 else None
        layouts.add((p.tp, p.pp, p.ep, p.etp, fp8, int(env.get("NNODES", 1))))
    assert {(4, 1, 8, 1, None, 1), (1, 1, 8, 1, None, 1), (2, 1, 8, 1, None, 1),
            (1, 4, 4, 1, "blockwise", 2)} <= layouts


def test_qwen3_235b_a22b_splits_94_layers_as_11_6x12_11():
    cfg = load_config(EXAMPLES / "qwen3_235b_a22b.yaml")
    p = cfg.parallel
    assert (p.pp, p.pp_first_stage_layers, p.pp_last_stage_layers) == (8, 11, 11)
    assert (94 - 11 - 11) / (8 - 2) == 12


@pytest.mark.parametrize("config_name", sorted(FULL_SIZE))
def test_full_size_configs_use_the_moe_recipe_and_obvious_placeholders(config_name):
    cfg = load_config(EXAMPLES / config_name)
    hf = load_hf_config(cfg.model.hf_config)
    is_moe = hf.model_type == "qwen3_moe"
    # DAPO-style recipe (docs/models.md, Recipe): 512 prompts, mini-batches of 32 prompts, n=16,
    # 8192-token responses, lr 1e-6 with 10 warmup steps, weight decay 0.1, grad clip 1.0, bf16.
    rollout = cfg.rollout
    assert (rollout.prompts_per_step, rollout.n, rollout.max_new_tokens) == (512, 16, 8192)
    assert cfg.rollout.prompts_per_step // cfg.train.mini_batches == 32
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay, cfg.train.grad_clip) == (
        1e-6, 10, 0.1, 1.0)
    assert cfg.precision.params_dtype == "bf16" and cfg.algorithm.loss == "gmpo"
    clip = (cfg.algorithm.clip_eps_low, cfg.algorithm.clip_eps_high)
    assert clip == ((0.2, 0.2) if is_moe else (0.4, 0.4))  # the authors' MoE advice; paper default
    if is_moe:
        assert cfg.moe.aux_loss_coeff == 0.0 and cfg.moe.router_dtype == "fp32"
    assert cfg.model.hf_checkpoint.startswith(PLACEHOLDER)
    paths = [s for s in _strings(cfg.model_dump(mode="json")) if s.startswith("/")]
    assert paths and all(s.startswith(PLACEHOLDER) for s in paths), paths
    text = (EXAMPLES / config_name).read_text()
    unmarked = [line for line in text.splitlines() if (PLACEHOLDER in line or "http://" in line)
                and not line.lstrip().startswith("#") and "PLACEHOLDER" not in line]
    assert unmarked == [], "mark every placeholder line (paths, server URLs) with a PLACEHOLDER comment"


# -- rollout on SGLang servers ------------------------------------------------------------------------
@pytest.mark.parametrize("config_name", sorted(FULL_SIZE))
def test_full_size_configs_roll_out_on_sglang_servers_behind_a_router(config_name):
    """No second model copy on a training rank: attached servers on rollout nodes, a router in
    front, weights through a shared directory."""
    cfg = load_config(EXAMPLES / config_name)
    sg = cfg.rollout.sglang
    assert cfg.rollout.engine == "sglang" and sg.launch is None
    assert sg.urls and all(url.startswith("http://") for url in sg.urls)
    assert len(set(sg.urls)) == len(sg.urls), "each worker once"
    assert sg.router_url and sg.router_url not in sg.urls
    assert sg.weight_sync == "disk" and sg.sync_dir.startswith(PLACEHOLDER + "shared/")
    # through the router max_in_flight bounds the total: a whole number per worker
    assert sg.max_in_flight % len(sg.urls) == 0 and sg.max_in_flight // len(sg.urls) >= 64
    assert sg.request_timeout_s >= 3600 and sg.max_retries >= 1


@pytest.mark.parametrize("config_name", sorted(FULL_SIZE))
def test_each_config_names_a_rollout_layout_that_fits_its_model(config_name, tmp_path):
    """The header's ``LAYOUT=<config>`` worker command: the servers' TP / EP divide the model,
    fill an 8-GPU node, serve the config's whole sequence, and the config's URL list is a whole
    number of such nodes."""
    layout = config_name.removesuffix(".yaml")
    assert f"LAYOUT={layout}" in (EXAMPLES / config_name).read_text()
    cfg = load_config(EXAMPLES / config_name)
    hf = load_hf_config(cfg.model.hf_config)
    result = run_script(ROLLOUT_SCRIPT, {"MODEL_PATH": str(tmp_path), "LAYOUT": layout}, ("workers",))
    assert result.returncode == 0, result.stderr
    servers = [parse_server(line) for line in result.stdout.splitlines() if "sglang.launch_server" in line]
    gpus = 0
    for server in servers:
        tp, ep = int(server["tp-size"]), int(server.get("ep-size", 1))
        assert hf.num_attention_heads % tp == 0, "attention heads / tp"
        assert ep in (1, tp), "sglang: ep_size * moe_dp_size = tp_size"
        if getattr(hf, "num_experts", None):
            assert ep == tp > 1 and hf.num_experts % ep == 0, "MoE servers shard the experts"
        assert int(server["base-gpu-id"]) == gpus
        gpus += tp
        assert int(server["context-length"]) == cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
        assert server["weight-version"] == "0" and server["model-path"] == str(tmp_path)
    assert gpus == 8
    assert len(cfg.rollout.sglang.urls) % len(servers) == 0, "whole rollout nodes"


def parse_server(line: str) -> dict[str, str | None]:
    """``python -m sglang.launch_server --flag value ...`` -> {flag: value (None for a switch)}."""
    words = shlex.split(line)
    assert words[1:3] == ["-m", "sglang.launch_server"], line
    flags = {}
    for i, word in enumerate(words[3:], start=3):
        if word.startswith("--"):
            following = words[i + 1] if i + 1 < len(words) else "--"
            flags[word[2:]] = None if following.startswith("--") else following
    return flags


# -- launch scripts ------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [s for s, _ in FULL_SIZE.values()])
def test_launch_refuses_multi_node_without_master_addr(script):
    result = run_script(script, {"NNODES": "2", "NODE_RANK": "0"})
    assert result.returncode == 2 and result.stdout == ""
    assert "NNODES=2 needs MASTER_ADDR" in result.stderr


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 must be in 0..1"),
    ({"NPROC_PER_NODE": "eight"}, "NPROC_PER_NODE=eight is not a non-negative integer"),
    ({"CONFIG": "/nonexistent.yaml"}, "config file /nonexistent.yaml does not exist"),
])
def test_launch_refuses_a_bad_environment_with_the_fix(env, message):
    result = run_script("launch_qwen3_30b_a3b.sh", env)
    assert result.returncode == 2 and message in result.stderr


def test_multi_node_launch_uses_the_master_address_and_node_rank():
    result = run_script("launch_qwen3_235b_a22b.sh",
                        {"NODE_RANK": "5", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "6000"},
                        ("--resume", "train.steps=400"))
    launch = parse_dry_run(result.stdout.strip())
    assert launch["torchrun"] == {"nnodes": "16", "nproc_per_node": "8", "node_rank": "5",
                                  "master_addr": "10.1.2.3", "master_port": "6000"}
    assert launch["overrides"] == [*ROLLOUT_OVERRIDES, "--resume", "train.steps=400"]


def test_single_node_launch_is_standalone_with_the_nccl_settings():
    launch = parse_dry_run(run_script("launch_qwen3_30b_a3b.sh").stdout.strip())
    assert "standalone" in launch["torchrun"] and "master_addr" not in launch["torchrun"]
    assert launch["env"] == {"NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0",
                             "CUDA_DEVICE_MAX_CONNECTIONS": "1",
                             "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}
    kept = parse_dry_run(run_script("launch_qwen3_30b_a3b.sh", {"NCCL_NVLS_ENABLE": "1"}).stdout)
    assert kept["env"]["NCCL_NVLS_ENABLE"] == "1"  # the user's environment wins


def test_launch_without_dry_run_execs_torchrun_with_that_command(tmp_path):
    fake = tmp_path / "torchrun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$NCCL_CUMEM_ENABLE" "$@"\n')
    fake.chmod(0o755)
    result = run_script("launch_qwen3_32b.sh", {"TORCHRUN": str(fake), "MASTER_ADDR": "h"},
                        ("train.steps=1",), dry_run=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "0"  # NCCL_CUMEM_ENABLE exported to torchrun
    assert lines[-5:] == ["--config", str(EXAMPLES / "qwen3_32b.yaml"), *ROLLOUT_OVERRIDES, "train.steps=1"]


# -- the launch scripts' rollout environment -------------------------------------------------------
@pytest.mark.parametrize("script", [s for s, _ in FULL_SIZE.values()])
def test_launch_refuses_without_rollout_urls_and_names_the_rollout_script(script):
    result = run_script(script, {"MASTER_ADDR": "h", "ROLLOUT_URLS": None})
    assert result.returncode == 2 and result.stdout == ""
    assert "ROLLOUT_URLS is not set" in result.stderr and "launch_sglang_rollout.sh workers" in result.stderr


@pytest.mark.parametrize("env, message", [
    ({"ROUTER_URL": None}, "ROUTER_URL is not set"),
    ({"ROLLOUT_URLS": "http://10.0.1.1:30000,10.0.1.2:30000"}, "entry '10.0.1.2:30000' is not http://host:port"),
    ({"ROLLOUT_URLS": "http://10.0.1.1"}, "entry 'http://10.0.1.1' is not http://host:port"),
    ({"ROUTER_URL": "10.0.1.1:31000"}, "ROUTER_URL=10.0.1.1:31000 is not http://host:port or none"),
    ({"ROLLOUT_URLS": "launch", "ROUTER_URL": None}, "ROLLOUT_URLS=launch needs rollout.sglang.launch.*"),
    ({"ROLLOUT_URLS": "launch"}, "with ROLLOUT_URLS=launch: the servers the trainer starts are not"),
])
def test_launch_refuses_a_bad_rollout_environment_with_the_fix(env, message):
    result = run_script("launch_qwen3_30b_a3b.sh", env)
    assert result.returncode == 2 and result.stdout == "" and message in result.stderr, result.stderr


def test_launch_takes_space_separated_workers_and_no_router():
    result = run_script("launch_qwen3_32b.sh", {"MASTER_ADDR": "h", "ROLLOUT_URLS": " ".join(WORKERS),
                                                "ROUTER_URL": "none"})
    launch = parse_dry_run(result.stdout.strip())
    cfg = load_config(launch["config"], launch["overrides"])
    assert (cfg.rollout.sglang.urls, cfg.rollout.sglang.router_url) == (WORKERS, None)


def test_launch_with_rollout_urls_launch_lets_the_trainer_start_its_servers():
    layout = ("NPROC_PER_NODE=4", "rollout.sglang.launch.num_servers=1", "rollout.sglang.launch.tp=4",
              "rollout.sglang.launch.base_gpu_id=4")
    result = run_script("launch_qwen3_30b_a3b.sh", {"ROLLOUT_URLS": "launch", "ROUTER_URL": None,
                                                    "SGLANG_PYTHON": "/opt/sglang/bin/python"},
                        layout[1:])
    assert result.returncode == 0, result.stderr
    launch = parse_dry_run(result.stdout.strip())
    cfg = load_config(launch["config"], launch["overrides"])
    sg = cfg.rollout.sglang
    assert (sg.urls, sg.router_url) == ([], None)
    assert (sg.launch.python, sg.launch.num_servers, sg.launch.tp, sg.launch.base_gpu_id) == (
        "/opt/sglang/bin/python", 1, 4, 4)


def test_command_line_overrides_win_over_the_rollout_environment():
    result = run_script("launch_qwen3_30b_a3b.sh", args=("rollout.sglang.router_url=null",))
    launch = parse_dry_run(result.stdout.strip())
    assert load_config(launch["config"], launch["overrides"]).rollout.sglang.router_url is None


# -- launch_sglang_rollout.sh ---------------------------------------------------------------------------
def test_rollout_workers_fill_the_node_with_servers_on_their_own_gpus_and_ports(tmp_path):
    env = {"MODEL_PATH": str(tmp_path), "LAYOUT": "qwen3_30b_a3b", "TP": "2", "EP": "2", "HOST": "10.0.1.7",
           "ROUTED_EXPERTS": "1", "BASE_PORT": "32000"}
    result = run_script(ROLLOUT_SCRIPT, env, ("workers", "--chunked-prefill-size", "8192"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    servers = [parse_server(line) for line in lines[:-1]]
    assert [(s["port"], s["base-gpu-id"], s["tp-size"], s["ep-size"]) for s in servers] == [
        ("32000", "0", "2", "2"), ("32001", "2", "2", "2"), ("32002", "4", "2", "2"), ("32003", "6", "2", "2")]
    for server in servers:
        assert server["host"] == "10.0.1.7" and server["mem-fraction-static"] == "0.85"
        assert "enable-return-routed-experts" in server and server["chunked-prefill-size"] == "8192"
    assert lines[-1] == "ROLLOUT_URLS=" + ",".join(f"http://10.0.1.7:{port}" for port in range(32000, 32004))


def test_rollout_workers_bind_loopback_unless_told(tmp_path):
    result = run_script(ROLLOUT_SCRIPT, {"MODEL_PATH": str(tmp_path), "LAYOUT": "qwen3_235b_a22b"}, ("workers",))
    lines = result.stdout.strip().splitlines()
    (server,) = [parse_server(line) for line in lines[:-1]]
    assert (server["host"], server["tp-size"], server["ep-size"], server["mem-fraction-static"]) == (
        "127.0.0.1", "8", "8", "0.88")
    assert "enable-return-routed-experts" not in server and "dp-size" not in server
    assert lines[-1] == "ROLLOUT_URLS=http://127.0.0.1:30000"


def test_rollout_router_fronts_every_worker_with_cache_aware_routing():
    result = run_script(ROLLOUT_SCRIPT, {"HOST": "10.0.1.1", "SGLANG_PYTHON": "/opt/sglang/bin/python"},
                        ("router",))
    assert result.returncode == 0, result.stderr
    command, printed = result.stdout.strip().splitlines()
    words = shlex.split(command)
    assert words[:3] == ["/opt/sglang/bin/python", "-m", "sglang_router.launch_router"]
    start = words.index("--worker-urls") + 1
    assert words[start:start + len(WORKERS)] == WORKERS
    options = dict(zip(words[start + len(WORKERS)::2], words[start + len(WORKERS) + 1::2]))
    assert options == {"--policy": "cache_aware", "--host": "10.0.1.1", "--port": "31000",
                       "--request-timeout-secs": "3600", "--health-check-endpoint": "/ready"}
    assert printed == f"ROUTER_URL={ROUTER}"
    # the router's request timeout covers the configs' own
    assert all(load_config(EXAMPLES / name).rollout.sglang.request_timeout_s <= 3600 for name in FULL_SIZE)


@pytest.mark.parametrize("env, args, message", [
    ({}, (), "usage: [environment] bash"),
    ({}, ("serve",), "unknown mode 'serve'"),
    ({"LAYOUT": "qwen3_30b_a3b", "MODEL_PATH": None}, ("workers",), "MODEL_PATH is not set"),
    ({"LAYOUT": "qwen3_30b_a3b", "MODEL_PATH": "/nonexistent"}, ("workers",), "MODEL_PATH=/nonexistent is not a directory"),
    ({"MODEL_PATH": "."}, ("workers",), "set LAYOUT=qwen3_30b_a3b|qwen3_235b_a22b|qwen3_32b or TP="),
    ({"MODEL_PATH": ".", "LAYOUT": "qwen3_8b"}, ("workers",), "LAYOUT=qwen3_8b is not one of"),
    ({"MODEL_PATH": ".", "TP": "4", "EP": "2"}, ("workers",), "so use EP=4 or EP=1"),
    ({"MODEL_PATH": ".", "TP": "4", "NUM_SERVERS": "3"}, ("workers",), "need 12 GPUs; this node has GPUS_PER_NODE=8"),
    ({"MODEL_PATH": ".", "TP": "16"}, ("workers",), "NUM_SERVERS=0: a server needs TP*DP=16 GPUs"),
    ({"MODEL_PATH": ".", "TP": "1", "ROUTED_EXPERTS": "yes"}, ("workers",), "ROUTED_EXPERTS=yes: use 1"),
    ({"MODEL_PATH": ".", "TP": "1"}, ("workers", "--tp-size", "2"), "extra flag --tp-size is set by this script"),
    ({"ROLLOUT_URLS": None}, ("router",), "ROLLOUT_URLS is not set: the router needs every worker's URL"),
    ({"ROUTER_POLICY": "least_loaded"}, ("router",), "ROUTER_POLICY=least_loaded is not one of"),
    ({"HOST": "10.0.1.1 10.0.1.2"}, ("router",), "HOST='10.0.1.1 10.0.1.2' is not an address"),
])
def test_rollout_script_refuses_with_the_fix(env, args, message):
    result = run_script(ROLLOUT_SCRIPT, env, args)
    assert result.returncode == 2 and result.stdout == "" and message in result.stderr, result.stderr


def test_clip_sweep_runs_each_eps_symmetrically_into_its_own_output_dir():
    result = run_script("clip_sweep_30b_a3b.sh", args=("train.steps=200",))
    assert result.returncode == 0, result.stderr
    runs = [parse_dry_run(line) for line in result.stdout.strip().splitlines()]
    seen = []
    for launch in runs:
        cfg = load_config(launch["config"], launch["overrides"])
        assert cfg.train.steps == 200 and cfg.algorithm.clip_eps_low == cfg.algorithm.clip_eps_high
        seen.append((cfg.algorithm.clip_eps_low, cfg.output_dir))
        check_layout(cfg, launch["world"])
    assert seen == [(0.1, "outputs/qwen3_30b_a3b_clip_sweep/eps_0.1"),
                    (0.2, "outputs/qwen3_30b_a3b_clip_sweep/eps_0.2"),
                    (0.4, "outputs/qwen3_30b_a3b_clip_sweep/eps_0.4")]


def test_clip_sweep_refuses_a_non_numeric_eps():
    result = run_script("clip_sweep_30b_a3b.sh", {"CLIP_EPS_VALUES": "0.2 wide"})
    assert result.returncode == 2 and result.stdout == ""
    assert "'wide' is not a non-negative number" in result.stderr


# -- model config files ----------------------------------------------------------------------------
def _write_configs_module():
    spec = importlib.util.spec_from_file_location("write_configs",
                                                  EXAMPLES / "configs" / "write_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_json_files_are_exactly_the_presets():
    write_configs = _write_configs_module()
    dirs = sorted(p.name for p in (EXAMPLES / "configs").iterdir() if p.is_dir())
    assert dirs == sorted(PUBLIC_CONFIGS), "run python examples/moe/configs/write_configs.py"
    for name in PUBLIC_CONFIGS:
        text = (EXAMPLES / "configs" / name / "config.json").read_text()
        assert text == write_configs.render(name), f"{name}: run write_configs.py"
        assert json.loads(text) == PUBLIC_CONFIGS[name]


@pytest.mark.parametrize("name", sorted(PUBLIC_CONFIGS))
def test_config_dir_loads_as_the_same_transformers_config_as_the_preset(name):
    from_dir = load_hf_config(str(EXAMPLES / "configs" / name)).to_dict()
    preset = load_hf_config(name).to_dict()
    from_dir.pop("_name_or_path"), preset.pop("_name_or_path")
    assert from_dir == preset


def test_write_configs_writes_the_committed_files(tmp_path):
    written = _write_configs_module().main(tmp_path)
    assert sorted(p.parent.name for p in written) == sorted(PUBLIC_CONFIGS)
    for path in written:
        committed = EXAMPLES / "configs" / path.parent.name / "config.json"
        assert path.read_text() == committed.read_text()
