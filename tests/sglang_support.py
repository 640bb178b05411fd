"""Helpers for tests against a real SGLang server (tools/sglang_cpu/setup.sh builds its environment).

A module of its own, not conftest: ``from conftest import ...`` resolves to whichever conftest.py
pytest imported first (tests/convert has one), so shared helpers live under a unique name.
"""

import os

import torch

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
SGLANG_PYTHON = os.environ.get("GMPO_SGLANG_PYTHON", str(REPO / ".venv-sglang" / "bin" / "python"))


def sglang_missing() -> str | None:
    if not os.path.exists(SGLANG_PYTHON):
        return (f"no SGLang server environment at {SGLANG_PYTHON}: build it with "
                "tools/sglang_cpu/setup.sh (or set GMPO_SGLANG_PYTHON)")
    return None


def tiny_dense_qwen3_config():
    import transformers

    # odd sizes on purpose: head_dim 20 != hidden 56 / 4 heads, GQA 4/2, 3 layers
    return transformers.Qwen3Config(vocab_size=64, hidden_size=56, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=20, intermediate_size=72,
                                    max_position_embeddings=256, tie_word_embeddings=False)


def write_hf_model_dir(path, hf_config, seed: int = 0):
    """A complete HF model directory (config, task tokenizer, random safetensors weights)."""
    import transformers
    from safetensors.torch import save_file

    from gmpo_megatron.components import stop_token_ids, sync_static_files
    from gmpo_megatron.data.tokenizer import build_task_tokenizer
    from gmpo_megatron.rollout.embedded import checkpoint_state_dict

    tokenizer = build_task_tokenizer()
    static = sync_static_files(path, hf_config, tokenizer, stop_token_ids(tokenizer, hf_config), 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in checkpoint_state_dict(model).items()}
    save_file(state, str(static / "model.safetensors"), metadata={"format": "pt"})
    return static, model, tokenizer


class SGLangTestServer:
    def __init__(self, kind: str, root) -> None:
        import time

        from gmpo_megatron.models.presets import load_hf_config
        from gmpo_megatron.rollout.sglang_launch import ServerProcess, ServerSpec, free_port

        self.kind = kind
        self.hf_config = load_hf_config("tiny-qwen3-moe") if kind == "moe" else tiny_dense_qwen3_config()
        self.model_dir, self.hf_model, self.tokenizer = write_hf_model_dir(root / kind, self.hf_config)
        spec = ServerSpec(python=SGLANG_PYTHON, host="127.0.0.1", port=free_port(), dtype="float32",
                          context_length=256, max_total_tokens=16384, mem_fraction_static=0.3, cpu=True,
                          routed_experts=kind == "moe", log_path=root / f"{kind}.log")
        self.url = spec.url
        self.process = ServerProcess(spec)
        self.process.start(self.model_dir, 1)
        deadline = time.monotonic() + 600
        import urllib.request

        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"the {kind} SGLang test server died:\n{self.process.log_tail()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5)
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"the {kind} SGLang test server did not start:\n{self.process.log_tail()}")
