"""Algorithm options set from the config reach the loss and the advantages, and change them."""

import pytest
import torch

from gmpo_megatron import components
from gmpo_megatron.algo.advantages import compute_advantages
from gmpo_megatron.algo.policy_loss import policy_loss
from gmpo_megatron.config import ConfigError, load_config

TINY = "examples/moe/tiny_cpu.yaml"


def _loss(cfg) -> float:
    """GMPO loss of a batch whose negative-advantage sequence moved far up (log-ratio 1.0/token)."""
    settings = components.loss_settings(cfg)
    old = torch.zeros(2, 3, dtype=torch.float64)
    new = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(settings.mode, new, old, torch.tensor([1.0, -1.0], dtype=torch.float64),
                          torch.ones(2, 3, dtype=torch.bool), **settings.options)
    return float(loss)


def test_dual_clip_from_the_config_caps_negative_advantage_ratios():
    dual = load_config(TINY, ["algorithm.dual_clip=0.5"])
    assert components.loss_settings(dual).options["dual_clip"] == 0.5
    assert _loss(dual) != _loss(load_config(TINY))  # the cap binds: 1.0 > 0.5 on the A<0 row
    assert _loss(load_config(TINY, ["algorithm.dual_clip=2.0"])) == _loss(load_config(TINY))  # above: no-op
    with pytest.raises(ConfigError, match="algorithm.dual_clip.*GMPO option.*algorithm.loss='grpo'"):
        load_config(TINY, ["algorithm.loss=grpo", "algorithm.dual_clip=0.5"])
    with pytest.raises(ConfigError, match="dual_clip"):
        load_config(TINY, ["algorithm.dual_clip=0"])


def test_log_reward_baseline_options_from_the_config_change_the_advantages():
    rewards = torch.tensor([0.0, 0.5, 2.0, 4.0], dtype=torch.float64)

    def advantages(*overrides):
        cfg = load_config(TINY, ["algorithm.advantage=log_reward_baseline", *overrides])
        return compute_advantages(cfg.algorithm.advantage, rewards, 4, **components.advantage_options(cfg))

    default = advantages()
    assert not torch.allclose(default, advantages("algorithm.log_reward_eps=0.1"))
    assert not torch.allclose(default, advantages("algorithm.normalize_std=true"))
    with pytest.raises(ConfigError, match="algorithm.log_reward_eps.*algorithm.advantage=log_reward_baseline"):
        load_config(TINY, ["algorithm.log_reward_eps=0.1"])  # the tiny config uses grpo advantages
    assert components.advantage_options(load_config(TINY)) == {}


def test_every_normalizer_kind_is_used_by_a_loss_mode():
    from typing import get_args

    from gmpo_megatron.algo.policy_loss import LOSS_MODES, NormalizerKind

    assert set(get_args(NormalizerKind)) == {spec.normalizer_kind for spec in LOSS_MODES.values()}
