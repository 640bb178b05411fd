"""Helpers for the converter tests. Tiny random HF checkpoints (transformers configs,
save_pretrained, small shards), one per architecture feature that breaks converters:

- ``qwen2``: Qwen2.5-style QKV bias, tied embeddings (no lm_head in the file);
- ``qwen3``: dense, QK-norm, head_dim != hidden / heads; its Megatron block is homogeneous, so
  dist_checkpointing stores layers stacked along a leading axis;
- ``qwen3_moe``: experts + router, head_dim != hidden / heads, untied.

Every parameter (norms included) is random, so a swapped or mis-split tensor cannot go unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = ("qwen2", "qwen3", "qwen3_moe")
ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def hf_config(kind: str, **overrides):
    from transformers import Qwen2Config, Qwen3Config

    from gmpo_megatron.models.presets import tiny_qwen3_moe

    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                  rms_norm_eps=1e-6, rope_parameters=ROPE)
    if kind == "qwen2":
        return Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
    if kind == "qwen3":
        return Qwen3Config(**{**common, "head_dim": 32, "tie_word_embeddings": False, **overrides})
    if kind == "qwen3_moe":
        return tiny_qwen3_moe(**overrides)
    raise ValueError(kind)


def make_model(kind: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(1.0 + noise if "norm" in name else noise)
    return model.eval()


def save_model(model, directory: str, dtype: torch.dtype = torch.float32,
               max_shard_size: str = "40KB") -> str:
    model.to(dtype).save_pretrained(directory, max_shard_size=max_shard_size)
    model.to(torch.float32)
    # Stand-ins for tokenizer files: the converters must carry them along unchanged.
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 128}, f)
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write("{{ messages }}")
    return directory


def run_cli(*args: str, nproc: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    """``tools/convert/convert.py`` in a subprocess (under torchrun when ``nproc``)."""
    script = os.path.join(REPO, "tools", "convert", "convert.py")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(nproc)] if nproc else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.run([*launcher, script, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_same_tensors(reference_dir: str, candidate_dir: str) -> int:
    """Every tensor bit-identical, same names and dtypes; returns the count."""
    from gmpo_megatron.convert.hf_io import open_hf_checkpoint

    with open_hf_checkpoint(reference_dir) as ref, open_hf_checkpoint(candidate_dir) as got:
        assert sorted(ref.keys()) == sorted(got.keys())
        for name in ref.keys():
            a, b = ref.read(name), got.read(name)
            assert a.dtype == b.dtype, name
            assert torch.equal(a, b), name
        return len(ref.keys())
