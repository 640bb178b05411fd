"""Routing replay (R2/R3) and expert-load metrics on the tiny Qwen3-MoE (8 experts, top-2, fp32).

The replay tests move the router weights so far that fresh routing picks other experts (and assert
that it does), so a replay that silently routed afresh would fail them.
"""

from contextlib import contextmanager

import pytest
import torch

from gmpo_megatron.megatron.expert_load import ExpertLoad, expert_load_metrics, reduce_expert_load
from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
from gmpo_megatron.megatron.routing_replay import RoutingReplay, moe_routers, route_dtype
from gmpo_megatron.models.presets import tiny_qwen3_moe

SEQ, ROWS, TOP_K, EXPERTS = 16, 3, 2, 8


@pytest.fixture(scope="module")
def base_model(megatron_single_process):
    torch.manual_seed(0)
    return build_model(tiny_qwen3_moe(), BuildOptions())


@pytest.fixture
def model(base_model):
    """A fresh copy per test: a failing test cannot leave its routers wrapped for the next one."""
    return _model_like(base_model)


def _model_like(source, **options):
    """A fresh model with ``source``'s weights (``pre_softmax`` picks Megatron's other top-k gate)."""
    pre_softmax = options.pop("pre_softmax", False)
    model = build_model(tiny_qwen3_moe(norm_topk_prob=not pre_softmax), BuildOptions(**options))
    model.load_state_dict(source.state_dict())
    return model


def _batch(rows=ROWS, seq=SEQ, seed=1):
    tokens = torch.randint(0, 64, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.arange(seq).expand(rows, -1)


def _forward(model, batch):
    tokens, positions = batch
    return model(tokens, positions, attention_mask=None)


def _perturb_routers(model, seed=5):
    """Replace every router's weights with large random ones: fresh routing changes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in moe_routers(model).values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator))


@contextmanager
def _observed_routing(model):
    """Per layer: the router's input, probs [tokens, E] and routing_map [tokens, E] of each call."""
    seen = {layer: [] for layer in moe_routers(model)}
    handles = [router.register_forward_hook(
        lambda mod, args, out, layer=layer: seen[layer].append(
            (args[0].detach(), out[0].detach(), out[1].detach())))
        for layer, router in moe_routers(model).items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _map_of(ids: torch.Tensor) -> torch.Tensor:
    """[tokens, k] expert ids -> [tokens, E] bool routing map."""
    return torch.zeros(ids.shape[0], EXPERTS, dtype=torch.bool).scatter(1, ids.long(), True)


def _record(replay, model, batch, key):
    """The old-log-prob pass: eval mode, no grad."""
    model.eval()
    with torch.no_grad(), replay.record(key):
        _forward(model, batch)
    model.train()
    return replay.routes(key)


@pytest.mark.parametrize("pre_softmax", [False, True], ids=["softmax_over_topk", "pre_softmax"])
def test_replay_routes_to_recorded_experts_after_router_weights_move(base_model, pre_softmax):
    model = _model_like(base_model, pre_softmax=pre_softmax)
    replay = RoutingReplay(model)
    batch = _batch()
    recorded = _record(replay, model, batch, "old")
    _perturb_routers(model)

    with torch.no_grad(), _observed_routing(model) as fresh:
        _forward(model, batch)
    changed = (fresh[0][0][2] != _map_of(recorded[0])).any(dim=1).float().mean()
    assert changed > 0.5, "the perturbation must change fresh routing, or the test proves nothing"

    model.zero_grad()
    with _observed_routing(model) as seen:
        with replay.replay("old"):
            output = _forward(model, batch)
        output.square().mean().backward()
    for layer, router in moe_routers(model).items():
        hidden, probs, routing_map = seen[layer][0]
        ids = recorded[layer].long()
        assert torch.equal(routing_map, _map_of(ids))
        # The gate is the *current* router's: Megatron's normalisation over the recorded experts.
        logits = hidden.reshape(-1, hidden.shape[-1]).float() @ router.weight.float().T
        if pre_softmax:
            gate = torch.softmax(logits, dim=-1).gather(1, ids)
        else:
            gate = torch.softmax(logits.gather(1, ids), dim=-1)
        expected = torch.zeros_like(probs).scatter(1, ids, gate)
        torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    replay.remove()


def test_without_replay_routing_follows_current_router_weights(model):
    replay = RoutingReplay(model)
    batch = _batch()
    recorded = _record(replay, model, batch, "old")
    _perturb_routers(model)
    with torch.no_grad(), _observed_routing(model) as seen:
        _forward(model, batch)  # outside replay(): the recorded routes are not used
    for layer, router in moe_routers(model).items():
        hidden, _, routing_map = seen[layer][0]
        logits = hidden.reshape(-1, hidden.shape[-1]) @ router.weight.T
        assert torch.equal(routing_map, _map_of(logits.topk(TOP_K, dim=1).indices))
        assert not torch.equal(routing_map, _map_of(recorded[layer]))
    replay.remove()


def test_replay_on_unchanged_weights_is_bit_identical_to_fresh_routing(model):
    replay = RoutingReplay(model)
    batch = _batch()
    _record(replay, model, batch, "old")
    fresh_out = _forward(model, batch)
    fresh_out.square().mean().backward()
    fresh_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with replay.replay("old"):
        replay_out = _forward(model, batch)
    replay_out.square().mean().backward()
    assert torch.equal(replay_out, fresh_out)
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, fresh_grads[name]), name
    replay.remove()


def test_routes_are_compact_expert_ids_in_router_token_order(model):
    replay = RoutingReplay(model)
    routes = _record(replay, model, _batch(), "old")
    assert sorted(routes) == [0, 1]  # global layer index = layer_number - 1
    for ids in routes.values():
        assert ids.dtype == torch.uint8 and ids.shape == (SEQ * ROWS, TOP_K)
    assert replay.memory_bytes() == 2 * SEQ * ROWS * TOP_K * 1
    assert route_dtype(256) == torch.uint8
    assert route_dtype(257) == torch.int16 and route_dtype(32768) == torch.int16
    assert route_dtype(32769) == torch.int32
    replay.clear()
    assert replay.memory_bytes() == 0
    replay.remove()


def test_routes_are_in_megatron_s_b_order(model):
    """Row t*b + j is token t of micro-batch row j: recording rows separately gives the same ids."""
    replay = RoutingReplay(model)
    tokens, positions = _batch()
    together = _record(replay, model, (tokens, positions), "together")
    for j in range(ROWS):
        alone = _record(replay, model, (tokens[j:j + 1], positions[j:j + 1]), ("alone", j))
        for layer in together:
            assert torch.equal(together[layer].view(SEQ, ROWS, TOP_K)[:, j], alone[layer])
    replay.remove()


def test_replay_on_another_token_count_raises(model):
    replay = RoutingReplay(model)
    _record(replay, model, _batch(seq=SEQ), "old")
    with pytest.raises(ValueError, match=r"routes for 48 tokens but the router now sees 36"):
        with torch.no_grad(), replay.replay("old"):
            _forward(model, _batch(seq=12))
    replay.remove()


def test_bad_routes_and_misuse_raise_with_the_fix(model):
    replay = RoutingReplay(model)
    good = {layer: torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8) for layer in (0, 1)}
    with pytest.raises(KeyError, match="no routes for key 'nope'"):
        with replay.replay("nope"):
            pass
    with pytest.raises(KeyError, match=r"MoE layers \[1\] of this rank are missing"):
        replay.set_routes("k", {0: good[0]})
    with pytest.raises(KeyError, match=r"layers \[7\] are not MoE layers"):
        replay.set_routes("k", {**good, 7: good[0]})
    with pytest.raises(ValueError, match=r"expected \[tokens, 2\]"):
        replay.set_routes("k", {**good, 1: torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"expert ids in \[0, 8\]; the model has experts 0..7"):
        replay.set_routes("k", {**good, 1: torch.tensor([[0, 8], [1, 2]])})
    with pytest.raises(ValueError, match="lists an expert twice"):
        replay.set_routes("k", {**good, 1: torch.tensor([[3, 3], [1, 2]])})
    with pytest.raises(ValueError, match="float"):
        replay.set_routes("k", {**good, 1: torch.zeros(2, 2)})
    replay.set_routes("k", good)
    assert replay.routes("k")[1].dtype == torch.uint8
    with pytest.raises(ValueError, match="already stored: clear"):
        replay.set_routes("k", good)
    with pytest.raises(RuntimeError, match="do not nest"):
        with replay.replay("k"), replay.record("other"):
            pass
    _record(replay, model, _batch(), "old")
    with pytest.raises(ValueError, match="already stored"):
        _record(replay, model, _batch(), "old")
    with pytest.raises(ValueError, match="already wrapped by another RoutingReplay"):
        RoutingReplay(model)
    replay.remove()


def test_replay_refuses_token_dropping(megatron_single_process):
    model = build_model(tiny_qwen3_moe(), BuildOptions(extra={"moe_expert_capacity_factor": 1.0}))
    with pytest.raises(ValueError, match="moe_expert_capacity_factor=1.0.*dropless"):
        RoutingReplay(model)


def test_remove_restores_original_routing_bit_identically(base_model):
    never_wrapped = _model_like(base_model)
    model = _model_like(base_model)
    replay, load = RoutingReplay(model), ExpertLoad(model)
    batch = _batch()
    _record(replay, model, batch, "old")
    with replay.replay("old"):
        _forward(model, batch)
    replay.remove()
    load.remove()
    assert all(r.router_replay is None and not r._forward_hooks for r in moe_routers(model).values())
    _perturb_routers(model)
    _perturb_routers(never_wrapped)
    out = _forward(model, batch)
    expected = _forward(never_wrapped, batch)
    out.square().mean().backward()
    expected.square().mean().backward()
    assert torch.equal(out, expected)
    for (name, p), q in zip(model.named_parameters(), never_wrapped.parameters()):
        assert torch.equal(p.grad, q.grad), name
    with pytest.raises(RuntimeError, match="was removed"):
        with replay.record("again"):
            pass


def test_recompute_in_backward_reuses_the_replayed_experts(base_model):
    """Full activation recompute re-runs each router inside the backward pass, outside replay():
    it must take the experts the forward used, so gradients equal those without recompute."""
    plain, recomputed = _model_like(base_model), _model_like(base_model, recompute="full")
    assert recomputed.config.recompute_granularity == "full"
    batch, grads = _batch(), []
    for model in (plain, recomputed):
        replay = RoutingReplay(model)
        _record(replay, model, batch, "old")
        _perturb_routers(model)
        with _observed_routing(model) as seen:
            with replay.replay("old"):
                output = _forward(model, batch)
            output.square().mean().backward()
        calls = len(seen[0])
        assert calls == (2 if model is recomputed else 1)
        for layer in moe_routers(model):  # the forward and its recompute route alike
            assert all(torch.equal(call[2], _map_of(replay.routes("old")[layer])) for call in seen[layer])
        assert all(not queue for queue in replay._recompute.values())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        replay.remove()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_sequence_routes_replay_in_a_rebatched_micro_batch(model):
    """R2 with other micro-batches in the update (and R3's per-sequence format): routes recorded in
    one micro-batch, split per sequence, laid out in another micro-batch, replay per token."""
    replay = RoutingReplay(model)
    tokens, _ = _batch()
    lengths = [16, 11, 7]  # right padding past each length
    _record(replay, model, _batch(), "old")
    per_sequence = replay.sequence_routes("old", [(i, 0, n) for i, n in enumerate(lengths)], (ROWS, SEQ))
    assert [r[0].shape for r in per_sequence] == [(n, TOP_K) for n in lengths]
    assert all(r[0].dtype == torch.uint8 for r in per_sequence)

    _perturb_routers(model)
    with torch.no_grad(), replay.replay("old"):
        old_logits = _forward(model, _batch())
    order = [2, 0]  # the update micro-batch: other rows, other order
    rebatched = (tokens[order], torch.arange(SEQ).expand(len(order), -1))
    spans = [(row, 0, lengths[i]) for row, i in enumerate(order)]
    replay.set_sequence_routes("update", [per_sequence[i] for i in order], spans, (len(order), SEQ))
    with torch.no_grad(), _observed_routing(model) as seen, replay.replay("update"):
        new_logits = _forward(model, rebatched)
    for layer, router in moe_routers(model).items():
        hidden, _, routing_map = seen[layer][0]
        grid = routing_map.view(SEQ, len(order), EXPERTS)
        fresh = _map_of((hidden.reshape(-1, hidden.shape[-1]) @ router.weight.T).topk(TOP_K).indices)
        for row, i in enumerate(order):
            n = lengths[i]
            assert torch.equal(grid[:n, row], _map_of(per_sequence[i][layer]))
            assert torch.equal(grid[n:, row], fresh.view(SEQ, len(order), EXPERTS)[n:, row])
    for row, i in enumerate(order):
        n = lengths[i]
        torch.testing.assert_close(new_logits[row, :n], old_logits[i, :n], rtol=1e-5, atol=1e-5)
    replay.remove()


def _packed(sequences):
    """One packed row (THD layout on the local spec): a block-diagonal causal mask."""
    lengths = [len(s) for s in sequences]
    segment = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    visible = torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    visible &= segment[:, None] == segment[None, :]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    starts = torch.tensor([0] + lengths).cumsum(0)[:-1].tolist()
    return torch.cat(sequences)[None], positions, (~visible)[None, None], starts


def test_packed_and_padded_micro_batches_give_the_same_sequence_routes(model):
    replay = RoutingReplay(model)
    tokens, _ = _batch()
    lengths = [16, 11, 7]
    packed_tokens, positions, mask, starts = _packed([tokens[i, :n] for i, n in enumerate(lengths)])
    model.eval()
    with torch.no_grad(), replay.record("packed"):
        model(packed_tokens, positions, attention_mask=mask)
    model.train()
    assert replay.routes("packed")[0].shape == (sum(lengths), TOP_K)  # [s, b] with b = 1
    from_packed = replay.sequence_routes(
        "packed", [(0, start, n) for start, n in zip(starts, lengths)], (1, sum(lengths)))
    _record(replay, model, _batch(), "padded")
    from_padded = replay.sequence_routes("padded", [(i, 0, n) for i, n in enumerate(lengths)], (ROWS, SEQ))
    for packed_routes, padded_routes in zip(from_packed, from_padded):
        for layer in replay.layers:
            assert torch.equal(packed_routes[layer], padded_routes[layer])

    _perturb_routers(model)  # replay the packed recording in a padded micro-batch
    replay.set_sequence_routes("update", from_packed, [(i, 0, n) for i, n in enumerate(lengths)],
                               (ROWS, SEQ))
    with torch.no_grad(), _observed_routing(model) as seen, replay.replay("update"):
        _forward(model, _batch())
    for layer in replay.layers:
        grid = seen[layer][0][2].view(SEQ, ROWS, EXPERTS)
        for i, n in enumerate(lengths):
            assert torch.equal(grid[:n, i], _map_of(from_packed[i][layer]))
    replay.remove()


def test_set_sequence_routes_keeps_this_ranks_sequence_parallel_shard(model):
    replay = RoutingReplay(model)
    per_sequence = [{layer: torch.tensor([[t % 8, (t + 1) % 8] for t in range(n)])
                     for layer in (0, 1)} for n in (8, 5)]
    spans = [(0, 0, 8), (1, 0, 5)]
    replay.set_sequence_routes("rank1", per_sequence, spans, (2, 8), tp_rank=1, tp_size=2)
    ids = replay.routes("rank1")[0].long().view(4, 2, TOP_K)  # positions 4..7 of both rows
    assert torch.equal(ids[:, 0], per_sequence[0][0][4:8])
    assert torch.equal(ids[0, 1], per_sequence[1][0][4])
    assert torch.equal(replay._fresh_rows["rank1"].view(4, 2)[:, 1], torch.tensor([False] + [True] * 3))
    with pytest.raises(ValueError, match="overlaps another sequence"):
        replay.set_sequence_routes("bad", per_sequence, [(0, 0, 8), (0, 2, 5)], (2, 8))
    with pytest.raises(ValueError, match=r"does not fit a micro-batch of shape \(2, 8\)"):
        replay.set_sequence_routes("bad", per_sequence, [(0, 0, 8), (1, 4, 5)], (2, 8))
    with pytest.raises(ValueError, match="token count <= its length 4"):
        replay.set_sequence_routes("bad", per_sequence, [(0, 0, 8), (1, 0, 4)], (2, 8))
    replay.remove()


def test_expert_load_counts_sum_to_tokens_times_top_k(model):
    load = ExpertLoad(model)
    with torch.no_grad():
        _forward(model, _batch())
    counts = load.counts()
    assert sorted(counts) == [0, 1]
    for c in counts.values():
        assert c.shape == (EXPERTS,) and int(c.sum()) == SEQ * ROWS * TOP_K
    metrics = load.metrics()  # reduced over the (one-rank) world
    for layer, c in counts.items():
        assert metrics[f"moe_load_min_layer{layer}"] == float(c.min())
        assert metrics[f"moe_load_max_layer{layer}"] == float(c.max())
    assert metrics["moe_load_imbalance"] == max(float(c.max()) / (SEQ * ROWS * TOP_K / EXPERTS)
                                                for c in counts.values())
    with torch.no_grad():
        _forward(model, _batch(rows=1))
    assert all(int(c.sum()) == (SEQ * ROWS + SEQ) * TOP_K for c in load.counts().values())
    load.reset()
    assert load.counts() == {} and load.metrics() == {}
    load.remove()


def test_expert_load_counts_a_recomputed_forward_once(base_model):
    model = _model_like(base_model, recompute="full")
    load = ExpertLoad(model)
    _forward(model, _batch()).square().mean().backward()
    assert all(int(c.sum()) == SEQ * ROWS * TOP_K for c in load.counts().values())
    load.remove()


def test_expert_load_reduction_and_metrics_of_a_known_table(megatron_single_process):
    counts = {0: torch.tensor([2, 2, 2, 2]), 3: torch.tensor([1, 3, 0, 4]), 2: torch.zeros(4)}
    reduced = reduce_expert_load(counts, num_layers=4, num_experts=4)  # the one-rank world
    assert sorted(reduced) == [0, 3]  # a layer that routed no token is left out
    assert torch.equal(reduced[3], counts[3])
    assert expert_load_metrics(reduced) == {
        "moe_load_min_layer0": 2.0, "moe_load_max_layer0": 2.0,
        "moe_load_min_layer3": 0.0, "moe_load_max_layer3": 4.0,
        "moe_load_imbalance": 2.0,  # layer 3: 4 / mean 2
    }
