"""Full-size presets (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-32B, Qwen2.5-7B) built by Megatron on
the meta device have exactly the parameter count of the HF config's own arithmetic.

Three counts must agree: the arithmetic below (written from the HF config fields alone: embedding
V*H; per layer q/k/v/o (+ QKV bias for Qwen2.5), two RMSNorms, QK-norms (Qwen3), router +
experts * 3*H*I or a dense 3*H*I MLP; final norm; untied lm_head), transformers' own model on the
meta device, and Megatron's ``GPTModel`` from ``build_model(..., BuildOptions(meta_device=True))``.
The exact numbers are stated here and in docs/models.md; the model cards' rounded figures
(30.5B / 3.3B, 235B / 22B, 32.8B, 7.61B, and the non-embedding counts) are checked too.

A 2-process gloo launch (marked slow) builds Qwen3-30B-A3B at TP2+EP2+ETP1 and at PP2 with an uneven
first stage and checks every rank's local count against the same arithmetic divided by the layout.

Run as a script under torchrun, this file is that launch's worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gmpo_megatron.models.presets import load_hf_config

FULL_SIZE = ["qwen3-30b-a3b", "qwen3-235b-a22b", "qwen3-32b", "qwen2.5-7b"]

# Exact counts (untied embeddings counted twice: embed_tokens and lm_head).
EXPECTED_TOTAL = {
    "qwen3-30b-a3b": 30_532_122_624,
    "qwen3-235b-a22b": 235_093_634_560,
    "qwen3-32b": 32_762_123_264,
    "qwen2.5-7b": 7_615_616_512,
}
# Active per token: every non-expert parameter (router included) + top_k experts per layer.
EXPECTED_ACTIVE = {
    "qwen3-30b-a3b": 3_353_032_704,
    "qwen3-235b-a22b": 22_190_763_520,
    "qwen3-32b": 32_762_123_264,
    "qwen2.5-7b": 7_615_616_512,
}
# The model cards' figures: (total, active, non-embedding) in billions, as the cards print them.
MODEL_CARD_BILLIONS = {
    "qwen3-30b-a3b": (30.5, 3.3, 29.9),
    "qwen3-235b-a22b": (235, 22, 234),
    "qwen3-32b": (32.8, 32.8, 31.2),
    "qwen2.5-7b": (7.61, 7.61, 6.53),
}


@dataclass(frozen=True)
class Layout:
    """The parallel sizes that divide a rank's parameters (one rank's view)."""

    tp: int = 1
    ep: int = 1
    etp: int = 1
    pp_layers: tuple[int, int] | None = None  # this stage's [first, last) global layers
    first_stage: bool = True
    last_stage: bool = True


def hf_parameter_count(c, layout: Layout = Layout()) -> dict[str, int]:
    """Parameters from the HF config's fields alone, on one rank of ``layout``.

    Column/row-parallel matrices (q/k/v/o, embedding, lm_head) are split by tp, expert matrices by
    etp and the experts themselves by ep; norms and the router are replicated."""
    hidden, vocab = c.hidden_size, c.vocab_size
    heads, groups = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    q_out, kv_out = heads * head_dim, groups * head_dim
    attention = (hidden * q_out + 2 * hidden * kv_out + q_out * hidden) // layout.tp
    if c.model_type == "qwen2":  # QKV bias
        attention += (q_out + 2 * kv_out) // layout.tp
    qk_norms = 2 * head_dim if c.model_type in ("qwen3", "qwen3_moe") else 0
    norms = 2 * hidden + qk_norms
    if c.model_type == "qwen3_moe":
        expert = 3 * hidden * c.moe_intermediate_size // layout.etp  # gate, up, down
        router = c.num_experts * hidden
        mlp = router + (c.num_experts // layout.ep) * expert
        mlp_active = router + c.num_experts_per_tok * expert
        experts = (c.num_experts // layout.ep) * expert
    else:
        mlp = mlp_active = 3 * hidden * c.intermediate_size // layout.tp
        experts = 0
    first, last = layout.pp_layers or (0, c.num_hidden_layers)
    layers = last - first
    embedding = vocab * hidden // layout.tp if layout.first_stage else 0
    head = 0
    if layout.last_stage:
        head = hidden + (0 if c.tie_word_embeddings else vocab * hidden // layout.tp)
    total = embedding + layers * (attention + norms + mlp) + head
    active = embedding + layers * (attention + norms + mlp_active) + head
    final_norm = hidden if layout.last_stage else 0
    return {"total": total, "active": active, "experts": layers * experts,
            "non_embedding": layers * (attention + norms + mlp) + final_norm}


def megatron_counts(model) -> dict[str, int]:
    params = dict(model.named_parameters())
    return {
        "total": sum(p.numel() for p in params.values()),
        "experts": sum(p.numel() for n, p in params.items() if ".experts." in n),
        "meta": all(p.is_meta for p in params.values()),
        "layer_numbers": [layer.layer_number for layer in model.decoder.layers],
    }


# -- the arithmetic ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", FULL_SIZE)
def test_hf_arithmetic_gives_the_stated_exact_counts(name):
    counts = hf_parameter_count(load_hf_config(name))
    assert counts["total"] == EXPECTED_TOTAL[name]
    assert counts["active"] == EXPECTED_ACTIVE[name]


@pytest.mark.parametrize("name", FULL_SIZE)
def test_counts_round_to_the_model_card_figures(name):
    counts = hf_parameter_count(load_hf_config(name))
    for key, card in zip(("total", "active", "non_embedding"), MODEL_CARD_BILLIONS[name]):
        # The cards truncate some figures (3.353B active -> "3.3B") and round others (6.526B
        # non-embedding -> "6.53B"): agree to within one unit of the card's last digit.
        unit = 10.0 ** -len(str(card).partition(".")[2])
        assert abs(counts[key] / 1e9 - card) < unit, (key, counts[key], card)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_transformers_meta_model_has_the_arithmetic_count(name):
    from transformers import AutoModelForCausalLM

    config = load_hf_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == hf_parameter_count(config)["total"]


# -- Megatron, one process ---------------------------------------------------------------------
@pytest.mark.parametrize("name", FULL_SIZE)
def test_megatron_meta_build_has_the_arithmetic_count(megatron_single_process, name):
    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model

    config = load_hf_config(name)
    model = build_model(config, BuildOptions(params_dtype=torch.bfloat16, meta_device=True))
    counts, expected = megatron_counts(model), hf_parameter_count(config)
    assert counts["meta"], "meta_device=True allocated real parameters"
    assert counts["total"] == expected["total"] == EXPECTED_TOTAL[name]
    assert counts["experts"] == expected["experts"]
    assert counts["layer_numbers"] == list(range(1, config.num_hidden_layers + 1))


def test_meta_device_refuses_the_transformer_engine_spec():
    from gmpo_megatron.megatron.model_builder import BuildOptions, transformer_config

    with pytest.raises(ValueError, match="meta_device=True builds the local spec"):
        transformer_config(load_hf_config("tiny-qwen3-moe"),
                           BuildOptions(meta_device=True, use_te=True))


# -- Megatron, two processes -------------------------------------------------------------------
# (name, BuildOptions kwargs, per-rank Layout for the arithmetic)
MULTI_RANK = {
    "tp2_ep2_etp1": ("qwen3-30b-a3b", dict(tp=2, ep=2, etp=1),
                     [Layout(tp=2, ep=2, etp=1), Layout(tp=2, ep=2, etp=1)]),
    "pp2_first20": ("qwen3-30b-a3b", dict(pp=2, pp_first_stage_layers=20),
                    [Layout(pp_layers=(0, 20), last_stage=False),
                     Layout(pp_layers=(20, 48), first_stage=False)]),
}


@pytest.fixture(scope="module")
def multi_rank_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("full_size_mp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         __file__, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("tag", sorted(MULTI_RANK))
def test_every_rank_holds_its_share_of_the_arithmetic(multi_rank_report, tag):
    name, _, layouts = MULTI_RANK[tag]
    config = load_hf_config(name)
    for rank, layout in enumerate(layouts):
        counts = multi_rank_report[rank][tag]
        expected = hf_parameter_count(config, layout)
        assert counts["meta"]
        assert counts["total"] == expected["total"], rank
        assert counts["experts"] == expected["experts"], rank
        first, last = layout.pp_layers or (0, config.num_hidden_layers)
        assert counts["layer_numbers"] == list(range(first + 1, last + 1)), rank


def _worker(out_dir: str) -> None:
    """One rank of the 2-process launch: build each MULTI_RANK layout on the meta device."""
    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
    from gmpo_megatron.megatron.parallel import destroy_distributed, init_distributed

    report = {}
    for tag, (name, kwargs, _) in sorted(MULTI_RANK.items()):
        parallel = {k: v for k, v in kwargs.items() if k in ("tp", "pp", "ep", "etp")}
        layout = init_distributed(seed=0, **parallel)
        model = build_model(load_hf_config(name),
                            BuildOptions(params_dtype=torch.bfloat16, meta_device=True, **kwargs))
        report[tag] = megatron_counts(model)
        del model
    Path(out_dir, f"rank{layout.rank}.json").write_text(json.dumps(report))
    destroy_distributed()


if __name__ == "__main__":
    _worker(sys.argv[1])
