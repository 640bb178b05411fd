"""torchrun worker for test_convert_layouts_mp.py: one launch checks every (model, layout) pair.

For each pair, collectively: (1) load the TP1 Megatron checkpoint at the layout, gather the full
HF tensors with ``iter_hf_weights`` and compare them bit for bit with the original HF files, and
compare the Megatron logits with transformers'; (2) convert HF -> Megatron *at* the layout (the
parent exports it in one process and compares); (3) export the TP1 checkpoint to HF through a model
built at the layout (``--reader model``). Rank 0 writes a JSON report.

    torchrun --nproc_per_node 2 mp_layouts_worker.py <plan.json> <report.json>
"""

from __future__ import annotations

import json
import sys

import torch


def check_pair(kind: str, layout: dict, plan: dict, hf_logits_cache: dict) -> dict:
    import torch.distributed as dist

    from gmpo_megatron.convert.hf_io import open_hf_checkpoint
    from gmpo_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from gmpo_megatron.convert.megatron_ckpt import checkpoint_info, load_megatron_model
    from gmpo_megatron.convert.megatron_to_hf import convert_megatron_to_hf
    from gmpo_megatron.convert.verify import compare_logits, hf_logits, megatron_logits, random_tokens
    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
    from gmpo_megatron.megatron.parallel import init_distributed
    from gmpo_megatron.megatron.weights import iter_hf_weights
    from gmpo_megatron.models import get_mapping

    hf_dir, megatron_dir = plan["hf"][kind], plan["megatron"][kind]
    tag = f"{kind}_" + "_".join(f"{k}{v}" for k, v in layout.items())
    result: dict = {"kind": kind, "layout": layout, "tag": tag}
    info = checkpoint_info(megatron_dir)
    mapping = get_mapping(info.hf_config)
    current = init_distributed(**layout)
    rank0 = dist.get_rank() == 0

    # (1) load at the layout; gathered tensors and logits
    model = build_model(info.hf_config, BuildOptions(**layout))
    load_megatron_model(model, megatron_dir)
    mismatched, seen = [], 0
    with open_hf_checkpoint(hf_dir) as ref:
        for name, tensor in iter_hf_weights(model, mapping):
            seen += 1
            if rank0:
                expected = ref.read(name)
                if expected.dtype != tensor.dtype or not torch.equal(expected, tensor):
                    mismatched.append(name)
        result["gathered_tensors"] = seen
        result["expected_tensors"] = len(ref.keys())
    result["gathered_mismatches"] = mismatched
    tokens = random_tokens(info.hf_config.vocab_size, 2, 16, seed=1)
    logits = megatron_logits(model, tokens)
    report = None
    if logits is not None and current.tp_rank == 0 and current.dp_rank == 0:
        if kind not in hf_logits_cache:
            hf_logits_cache[kind] = hf_logits(hf_dir, tokens, torch.float32)
        report = vars(compare_logits(hf_logits_cache[kind], logits, tokens, 1e-4, 0.9999, layout))
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    result["logits"] = next(r for r in reports if r is not None)
    del model

    # (2) convert at the layout; (3) export through a model at the layout
    convert_hf_to_megatron(hf_dir, f"{plan['out']}/{tag}_megatron", **layout, log=lambda m: None)
    convert_megatron_to_hf(megatron_dir, f"{plan['out']}/{tag}_hf", reader="model", **layout,
                           log=lambda m: None)
    result["converted"] = f"{plan['out']}/{tag}_megatron"
    result["exported"] = f"{plan['out']}/{tag}_hf"
    return result


def main(plan_path: str, report_path: str) -> None:
    import torch.distributed as dist

    from gmpo_megatron.megatron.parallel import init_distributed

    with open(plan_path) as f:
        plan = json.load(f)
    init_distributed()
    results, cache = [], {}
    for kind, layout in plan["pairs"]:
        results.append(check_pair(kind, layout, plan, cache))
    if dist.get_rank() == 0:
        with open(report_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
