"""Routing replay for Megatron-Core MoE routers: R2 (replay the old-log-prob pass's experts in the
update passes) and R3 (replay the rollout engine's experts).

Why. Between the old-log-prob pass and an update pass the router weights move (and in R3 the
engine's kernels differ), so a token may be sent to different experts: the policy ratio then
compares two different sub-networks and MoE RL training collapses (GSPO, arXiv 2507.18071: GRPO
on Qwen3-30B-A3B converges only with Routing Replay; R3, arXiv 2510.11370). Replay keeps
the *set* of experts per token fixed; the router still computes its logits with the current
weights, so the gate probabilities are the current ones over the replayed experts and the router
keeps its gradient.

Format ("routes"). Per MoE layer, keyed by its global index ``L = layer_number - 1``: a tensor
``[tokens, top_k]`` of global expert ids, ``uint8`` when ``num_experts <= 256``, else ``int16``
(1 byte x top_k x MoE layers per token: Qwen3-30B-A3B is 48 x 8 x 1 = 384 B/token). Tokens are in
the order the router sees them: Megatron's ``[s, b]`` hidden states flattened, so token ``t`` of row
``j`` of a micro-batch with ``b`` rows is row ``t * b + j``. Under sequence parallelism a rank's
router sees only its slice of ``s`` (rows ``[r * s/tp * b, (r+1) * s/tp * b)`` of TP rank ``r``);
under expert parallelism the router runs before the dispatch, so ids are global; with pipeline
parallelism each stage holds only its own layers.

Keys. A ``key`` (any hashable) names one micro-batch's token set as this rank's routers see it.
The old-log-prob and update passes batch sequences differently (other micro-batches, other
padding or packing, other DP ranks), so R2 goes through per-sequence routes (``sequence_routes``,
then ``step_data.exchange_sequence_routes`` to the data-parallel ranks that train on them, then
``set_sequence_routes`` in the update micro-batch; positions without a route route freshly). R3
routes from a rollout engine are per-sequence routes too. Layouts: ``sequence_routes.py``.

How. Megatron 0.16.1 picks the top-k inside ``topk_routing_with_score_function``, which defers to
``router.router_replay.get_replay_topk(scores, topk, num_groups, group_topk, compute_topk)`` when
that attribute is set. We put a small per-layer hook there (``remove()`` puts the old value back):
recording keeps Megatron's own top-k; replay returns ``scores.gather(1, recorded)``, and Megatron's
code then does what it always does with the selected scores: softmax over the selected logits
(``moe_router_pre_softmax=False``, Qwen3's renormalised top-k), the full softmax's values as they
are (``pre_softmax=True``), sigmoid normalisation, scaling factor.

Activation recompute re-runs the router inside the backward pass, outside any context manager.
A forward that runs inside a checkpoint (grad enabled when the context was entered, disabled
inside) queues the experts it used per layer, and a router call during backward takes them from
that queue in order (Megatron's schedules run each micro-batch's backward in forward order).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Hashable, Iterator, Sequence

import torch

from gmpo_megatron.megatron.sequence_routes import Routes, Span, lay_out_routes, split_routes


def route_dtype(num_experts: int) -> torch.dtype:
    """The compact dtype of expert ids: uint8 up to 256 experts, int16 up to 32768."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32768:
        return torch.int16
    return torch.int32


def moe_routers(model_chunks) -> dict[int, torch.nn.Module]:
    """Every ``TopKRouter`` of this rank's model chunks, by global layer index (layer_number - 1)."""
    from megatron.core.transformer.moe.router import TopKRouter

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    routers: dict[int, torch.nn.Module] = {}
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if not isinstance(module, TopKRouter):
                continue
            if module.layer_number is None:
                raise ValueError(f"router {name} has no layer_number (Megatron sets it when the "
                                 "transformer layer is built): build the model with build_model")
            layer = module.layer_number - 1
            if layer in routers:
                raise ValueError(f"two routers claim global layer {layer} (second: {name}); "
                                 "pass each model chunk once")
            routers[layer] = module
    return dict(sorted(routers.items()))


def in_backward() -> bool:
    """True while autograd runs a backward pass (where activation recompute re-runs forwards)."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    if graph_task_id is not None:
        return graph_task_id() != -1
    from megatron.core.tensor_parallel.random import is_checkpointing

    return is_checkpointing() and torch.is_grad_enabled()


def _replay_problems(layer: int, router) -> list[str]:
    """Router settings under which a replayed pass could still route differently."""
    c, problems = router.config, []
    if isinstance(router.router_replay, _LayerHook):
        problems.append(f"layer {layer}: already wrapped by another RoutingReplay; call its remove()")
    elif router.router_replay is not None:
        problems.append(f"layer {layer}: Megatron's own RouterReplay is on (moe_enable_routing_replay"
                        "=True); use one replay mechanism: set moe_enable_routing_replay=False")
    if c.moe_router_fusion:
        problems.append("moe_router_fusion=True takes Transformer-Engine's fused top-k, which has no "
                        "replay hook: set moe_router_fusion=False")
    if router.routing_type == "sinkhorn":
        problems.append("sinkhorn routing does not go through the replayable top-k: use "
                        "moe_router_load_balancing_type none or aux_loss")
    if c.moe_expert_capacity_factor is not None:
        problems.append(f"moe_expert_capacity_factor={c.moe_expert_capacity_factor}: token dropping "
                        "re-decides from the current probabilities which tokens are dropped, so a "
                        "replayed pass could drop differently; use dropless routing (None)")
    if c.moe_router_force_load_balancing:
        problems.append("moe_router_force_load_balancing=True routes on random logits (benchmarks "
                        "only): set it to False")
    return problems


def _moe_layer_indices(config) -> set[int]:
    """Global indices of the model's MoE layers on all pipeline stages (Megatron's rule)."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return {i for i in range(config.num_layers) if i % freq == 0}
    return {i for i, is_moe in enumerate(freq) if is_moe}


class _LayerHook:
    """Sits in Megatron's ``router.router_replay`` slot for one layer and defers to its owner."""

    def __init__(self, owner: RoutingReplay, layer: int, router) -> None:
        self.owner, self.layer, self.router = owner, layer, router

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                        default_compute_topk=None):
        def fresh():
            return default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)

        return self.owner._topk(self, scores, fresh)


class RoutingReplay:
    """Records and replays the experts of every MoE router of ``model_chunks`` (module docstring).

    ``storage_device``: where micro-batch routes live (None: where the router ran, which avoids
    a device sync per layer; "cpu" to keep accelerator memory free). Per-sequence routes are
    always on the CPU.
    """

    def __init__(self, model_chunks, storage_device: str | torch.device | None = None) -> None:
        self._routers = moe_routers(model_chunks)
        problems = [p for layer, r in self._routers.items() for p in _replay_problems(layer, r)]
        if problems:
            raise ValueError("routing replay cannot guarantee the recorded experts:\n  - "
                             + "\n  - ".join(dict.fromkeys(problems)))
        first = next(iter(self._routers.values()), None)
        self.num_experts = first.config.num_moe_experts if first is not None else 0
        self.top_k = first.topk if first is not None else 0
        self.dtype = route_dtype(self.num_experts)
        self._model_moe_layers = _moe_layer_indices(first.config) if first is not None else set()
        self._storage_device = storage_device
        self._routes: dict[Hashable, Routes] = {}
        self._fresh_rows: dict[Hashable, torch.Tensor] = {}  # rows that route freshly in replay
        self._recompute: dict[int, deque[torch.Tensor]] = {layer: deque() for layer in self._routers}
        self._mode: str | None = None
        self._key: Hashable = None
        self._grad_at_entry = False
        self._removed = False
        for layer, router in self._routers.items():
            router.router_replay = _LayerHook(self, layer, router)

    @property
    def layers(self) -> list[int]:
        """Global indices of this rank's MoE layers."""
        return list(self._routers)

    # -- record / replay ------------------------------------------------------------------------
    @contextlib.contextmanager
    def record(self, key: Hashable) -> Iterator[None]:
        """Each router stores the experts it picks for micro-batch ``key`` (one forward per key)."""
        if key in self._routes:
            raise ValueError(f"routes for key {key!r} are already stored: clear(key) first, or give "
                             "each micro-batch of a pass its own key")
        self._routes[key] = {}
        with self._active("record", key):
            try:
                yield
            except BaseException:
                del self._routes[key]
                raise

    @contextlib.contextmanager
    def replay(self, key: Hashable) -> Iterator[None]:
        """Each router uses the experts stored for ``key``, with gate probabilities computed from
        the current router weights."""
        routes = self.routes(key)
        missing = [layer for layer in self._routers if layer not in routes]
        if missing:
            raise KeyError(f"key {key!r} has no routes for MoE layers {missing} of this rank (it "
                           f"has {sorted(routes)}): record every layer or set_routes them all")
        with self._active("replay", key):
            yield

    @contextlib.contextmanager
    def _active(self, mode: str, key: Hashable) -> Iterator[None]:
        if self._removed:
            raise RuntimeError("this RoutingReplay was removed; build a new one on the model")
        if self._mode is not None:
            raise RuntimeError(f"{mode}({key!r}) inside {self._mode}({self._key!r}): contexts do not "
                               "nest; enter one per micro-batch forward")
        self._mode, self._key, self._grad_at_entry = mode, key, torch.is_grad_enabled()
        try:
            yield
        finally:
            self._mode, self._key = None, None

    def _topk(self, hook: _LayerHook, scores: torch.Tensor, fresh):
        """Called by Megatron at every top-k of a wrapped router: ``(selected scores, ids)``."""
        queue = self._recompute[hook.layer]
        if self._mode is None:
            if queue and in_backward():  # activation recompute of a forward run under a context
                indices = queue.popleft()
                self._check_tokens(hook.layer, "the recomputed forward", indices.shape[0], scores)
                return scores.gather(1, indices), indices
            return fresh()
        if self._mode == "record":
            values, indices = fresh()
            stored = self._routes[self._key]
            if hook.layer in stored:
                raise RuntimeError(f"layer {hook.layer} routed twice under record({self._key!r}): "
                                   "record one forward per key")
            device = self._storage_device or indices.device
            stored[hook.layer] = indices.to(device=device, dtype=self.dtype)
        else:
            indices = self._replayed(hook.layer, scores, fresh)
            values = scores.gather(1, indices)
        if self._grad_at_entry and not torch.is_grad_enabled() and hook.router.training:
            queue.append(indices)  # a checkpointed forward: the backward pass will recompute it
        return values, indices

    def _replayed(self, layer: int, scores: torch.Tensor, fresh) -> torch.Tensor:
        stored = self._routes[self._key][layer]
        self._check_tokens(layer, f"key {self._key!r}", stored.shape[0], scores)
        indices = stored.to(device=scores.device, dtype=torch.long, non_blocking=True)
        fresh_rows = self._fresh_rows.get(self._key)
        if fresh_rows is not None:
            indices = torch.where(fresh_rows.to(scores.device)[:, None], fresh()[1], indices)
        return indices

    def _check_tokens(self, layer: int, source: str, stored: int, scores: torch.Tensor) -> None:
        if stored != scores.shape[0]:
            raise ValueError(
                f"layer {layer}: {source} holds routes for {stored} tokens but the router now sees "
                f"{scores.shape[0]} ([s, b] flattened, this rank's sequence-parallel shard): the "
                "micro-batch differs from the one recorded (other samples, padding or layout); "
                "replay a key only on the same token set, or build its routes with "
                "set_sequence_routes")

    # -- stored routes --------------------------------------------------------------------------
    def routes(self, key: Hashable) -> Routes:
        """The routes stored for ``key``: global layer -> ``[tokens, top_k]`` ids (read-only)."""
        if key not in self._routes:
            known = list(self._routes)[:4]
            raise KeyError(f"no routes for key {key!r}: record(key) or set_routes(key, ...) first "
                           f"({len(self._routes)} keys stored, e.g. {known})")
        return dict(self._routes[key])

    def set_routes(self, key: Hashable, routes: Routes, fresh_rows: torch.Tensor | None = None) -> None:
        """Store routes for ``key`` from elsewhere (R3: a rollout engine; same format as
        ``routes``). Layers of other pipeline stages are ignored. ``fresh_rows`` (``[tokens]``
        bool) marks rows that route freshly in replay (their ids are not read)."""
        if key in self._routes:
            raise ValueError(f"routes for key {key!r} are already stored: clear(key) first")
        unknown = sorted(set(routes) - self._model_moe_layers) if self._routers else []
        missing = [layer for layer in self._routers if layer not in routes]
        if unknown or missing:
            raise KeyError(f"routes for key {key!r}: layers {unknown} are not MoE layers of the "
                           f"model; MoE layers {missing} of this rank are missing")
        for layer in self._routers:
            self._validate_shape(key, layer, routes[layer])
        counts = {routes[layer].shape[0] for layer in self._routers}
        if len(counts) > 1:
            raise ValueError(f"routes for key {key!r} have different token counts per layer: "
                             f"{ {layer: routes[layer].shape[0] for layer in self._routers} }")
        replayed = None
        if fresh_rows is not None:
            count = counts.pop() if counts else 0
            if fresh_rows.dtype != torch.bool or tuple(fresh_rows.shape) != (count,):
                raise ValueError(f"fresh_rows must be a bool tensor of shape [{count}], got "
                                 f"{fresh_rows.dtype} {tuple(fresh_rows.shape)}")
            replayed = ~fresh_rows.cpu()
        stored = {}
        for layer in self._routers:
            ids = routes[layer]
            self._validate_ids(key, layer, ids, replayed)
            stored[layer] = ids.to(device=self._storage_device or ids.device, dtype=self.dtype)
        self._routes[key] = stored
        if fresh_rows is not None:
            self._fresh_rows[key] = fresh_rows.to(self._storage_device or fresh_rows.device)

    def _validate_shape(self, key, layer: int, ids: torch.Tensor) -> None:
        where = f"routes[{layer}] for key {key!r}"
        if ids.dim() != 2 or ids.shape[1] != self.top_k:
            raise ValueError(f"{where} has shape {tuple(ids.shape)}; expected [tokens, {self.top_k}]")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"{where} has dtype {ids.dtype}; expected integer expert ids")

    def _validate_ids(self, key, layer: int, ids: torch.Tensor, replayed) -> None:
        where = f"routes[{layer}] for key {key!r}"
        checked = ids.cpu().long() if replayed is None else ids.cpu().long()[replayed]
        if checked.numel() and (checked.min() < 0 or checked.max() >= self.num_experts):
            raise ValueError(f"{where} has expert ids in [{int(checked.min())}, {int(checked.max())}]"
                             f"; the model has experts 0..{self.num_experts - 1}")
        ordered = checked.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if repeated.any():
            row = int(repeated.nonzero()[0])
            raise ValueError(f"{where}: a token lists an expert twice ({checked[row].tolist()}); "
                             f"each token needs {self.top_k} distinct experts")

    def clear(self, key: Hashable | None = None) -> None:
        """Forget one key's routes, or all routes (and pending recompute queues) when None."""
        if key is None:
            self._routes.clear()
            self._fresh_rows.clear()
            for queue in self._recompute.values():
                queue.clear()
        else:
            self._routes.pop(key, None)
            self._fresh_rows.pop(key, None)

    def memory_bytes(self) -> int:
        """Bytes held by stored micro-batch routes (and their fresh-row masks)."""
        tensors = [t for routes in self._routes.values() for t in routes.values()]
        tensors += list(self._fresh_rows.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def remove(self) -> None:
        """Give the routers back their original top-k: outputs equal a never-wrapped model's."""
        if self._mode is not None:
            raise RuntimeError(f"remove() inside {self._mode}({self._key!r})")
        for router in self._routers.values():
            router.router_replay = None
        self.clear()
        self._removed = True

    # -- per-sequence routes (R2 across micro-batch layouts, R3; see sequence_routes.py) -------
    def sequence_routes(self, key: Hashable, spans: Sequence[Span], shape: tuple[int, int],
                        tp_group=None, cp_group=None) -> list[Routes]:
        """``key``'s routes split into one ``{layer: [n, top_k]}`` per sequence (``split_routes``;
        under sequence / context parallelism a collective over ``tp_group`` / ``cp_group``;
        ``shape`` is the unsplit micro-batch's)."""
        return split_routes(self.routes(key), spans, shape, tp_group, name=f"key {key!r}",
                            cp_group=cp_group)

    def set_sequence_routes(self, key: Hashable, sequences: Sequence[Routes], spans: Sequence[Span],
                            shape: tuple[int, int], tp_rank: int = 0, tp_size: int = 1,
                            cp_positions: torch.Tensor | None = None) -> None:
        """Per-sequence routes laid out in a micro-batch (``lay_out_routes``; under context
        parallelism at this rank's ``cp_positions`` of the unsplit ``shape``) stored as ``key``'s
        routes; positions without a route route freshly."""
        routes, fresh_rows = lay_out_routes(sequences, spans, shape, self.layers, self.top_k,
                                            tp_rank, tp_size, name=f"key {key!r}",
                                            cp_positions=cp_positions)
        self.set_routes(key, routes, fresh_rows=fresh_rows)
