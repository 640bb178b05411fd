"""Random policy-loss batches with the awkward cases built in.

Every batch has a padding row (no response token), a length-1 response, an A = 0 sequence,
prompt-like masked prefixes, and garbage values at masked positions; `scale` sets the spread of
the token log-ratios (0.5 clips tokens on both sides at GMPO's 0.4 / GRPO's 0.2), `extreme`
puts log-ratios of +-50 on some response tokens.
"""

from __future__ import annotations

import torch

MODE_OPTIONS = {
    "gmpo": {},
    "grpo": {},
    "dapo": {},
    "dr_grpo": {"max_response_length": 16},
    "gspo": {},
}

# typical log-ratio spread per mode: enough to clip some units on both sides, not all of them
MODE_SCALE = {"gmpo": 0.5, "grpo": 0.3, "dapo": 0.3, "dr_grpo": 0.3, "gspo": 2e-3}


def random_batch(seed, *, batch=6, length=10, dtype=torch.float64, scale=0.5, extreme=False,
                 token_advantages=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    lengths[0], lengths[1] = 0, 1
    starts = (torch.rand(batch, generator=g) * (length - lengths + 1)).long()
    pos = torch.arange(length)
    mask = (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])

    old = -3 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    log_prob = old + scale * torch.randn(batch, length, generator=g, dtype=torch.float64)
    if extreme:
        pick = mask & (torch.rand(batch, length, generator=g) < 0.3)
        sign = torch.where(torch.rand(batch, length, generator=g) < 0.5, -1.0, 1.0).double()
        log_prob = torch.where(pick, old + 50 * sign, log_prob)
    rollout = old + 0.05 * torch.randn(batch, length, generator=g, dtype=torch.float64)

    advantages = torch.randn(batch, generator=g, dtype=torch.float64)
    advantages[2] = 0.0
    if token_advantages:
        advantages = advantages[:, None] + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
        advantages[2] = 0.0

    garbage = 1e4 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    fill = lambda x: torch.where(mask, x, garbage)  # noqa: E731
    perm = torch.randperm(batch, generator=g)  # the special rows anywhere in the batch
    out = {
        "log_prob": fill(log_prob)[perm],
        "old_log_prob": fill(old)[perm],
        "rollout_log_prob": fill(rollout)[perm],
        "advantages": (fill(advantages) if token_advantages else advantages)[perm],
        "response_mask": mask[perm],
    }
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}
