"""Expert load of MoE layers: tokens per expert, per layer, from the routers' routing maps.

A collapsed router sends most tokens to a few experts; the per-layer minimum and maximum tokens per
expert (and their ratio to the mean) show it long before the loss does.

Reduction. Each rank counts the tokens its own routers saw. Within a pipeline stage the ranks see
disjoint tokens: data-parallel ranks other samples, context-parallel ranks other sequence chunks,
tensor-parallel ranks other sequence-parallel shards (MoE with TP requires SP), and expert-parallel
ranks are data-parallel ranks for the router (it runs before the dispatch). So the global count of
a layer is the sum over every rank of the stage holding it, i.e. Megatron's tp-dp-cp group, and
``reduce_expert_load`` does that for all stages at once with one all-reduce over the world of a
``[num_layers, num_experts]`` table in which each stage fills only its own layers' rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gmpo_megatron.megatron.routing_replay import in_backward, moe_routers


class ExpertLoad:
    """Counts tokens per expert for every MoE router of ``model_chunks``, accumulated over router
    forwards since ``reset()``; the forwards that activation recompute re-runs in the backward
    pass are not counted again. Counts include right-padding tokens, which occupy experts too."""

    def __init__(self, model_chunks) -> None:
        self._routers = moe_routers(model_chunks)
        chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        config = next((m.config for c in chunks for m in c.modules()
                       if getattr(getattr(m, "config", None), "num_layers", None) is not None), None)
        if config is None:
            raise ValueError("model_chunks hold no Megatron module with a TransformerConfig: pass "
                             "the model (chunks) returned by build_model")
        self.num_layers, self.num_experts = config.num_layers, config.num_moe_experts or 0
        self._counts: dict[int, torch.Tensor] = {}
        self._handles = [router.register_forward_hook(self._hook(layer))
                         for layer, router in self._routers.items()]

    def _hook(self, layer: int):
        def count(router, inputs, outputs) -> None:
            if in_backward():
                return
            routing_map = outputs[1]  # [tokens, num_experts] bool
            tokens = routing_map.sum(dim=0, dtype=torch.int64).detach()
            self._counts[layer] = self._counts[layer] + tokens if layer in self._counts else tokens

        return count

    def counts(self) -> dict[int, torch.Tensor]:
        """Global layer -> ``[num_experts]`` int64 tokens per expert seen by this rank."""
        return dict(self._counts)

    def reset(self) -> None:
        self._counts.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def metrics(self, group=None) -> dict[str, float]:
        """``expert_load_metrics`` of the counts reduced over ``group`` (default: the world; a
        collective, every rank calls it)."""
        reduced = reduce_expert_load(self.counts(), self.num_layers, self.num_experts, group)
        return expert_load_metrics(reduced)


def reduce_expert_load(counts: dict[int, torch.Tensor], num_layers: int, num_experts: int,
                       group=None) -> dict[int, torch.Tensor]:
    """Sum every rank's counts, layer by layer, over ``group`` (default the world; module doc).

    Every rank of the group gets all layers of all pipeline stages. Layers that routed no token
    anywhere are left out. Without torch.distributed the counts come back unchanged."""
    if not dist.is_initialized():
        return {layer: c.detach().cpu() for layer, c in counts.items()}
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    table = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
    for layer, c in counts.items():
        table[layer] = c.to(device)
    dist.all_reduce(table, group=group)
    table = table.cpu()
    return {layer: table[layer] for layer in range(num_layers) if table[layer].any()}


def expert_load_metrics(counts: dict[int, torch.Tensor]) -> dict[str, float]:
    """Per layer ``L`` (global index): ``moe_load_min_layer{L}`` / ``moe_load_max_layer{L}``, the
    fewest / most tokens any expert received; ``moe_load_imbalance``: max over layers of
    (most tokens of an expert / mean tokens per expert), 1.0 when perfectly balanced."""
    metrics: dict[str, float] = {}
    worst = 0.0
    for layer, c in sorted(counts.items()):
        c = c.to(torch.float64)
        metrics[f"moe_load_min_layer{layer}"] = float(c.min())
        metrics[f"moe_load_max_layer{layer}"] = float(c.max())
        if c.sum() > 0:
            worst = max(worst, float(c.max() / c.mean()))
    if counts:
        metrics["moe_load_imbalance"] = worst
    return metrics
