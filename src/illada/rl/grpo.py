"""Group-relative policy optimisation on sequence log-likelihood estimates.

Advantages are the rewards normalised within each prompt's group of G rollouts (GRPO). The policy ratio is taken at
the sequence level and normalised by completion length, exp((l_new - l_old) / n) (as in GSPO), because a masked
diffusion model's estimators score whole completions rather than one token after another; it is clipped to
[1 - clip, 1 + clip] as in PPO. The KL penalty to a frozen reference uses the k3 estimator on the same
length-normalised difference: exp(d) - d - 1 with d = (l_ref - l_new) / n, which is >= 0 and unbiased for KL(new||ref)
when the rollouts come from the policy.

`token_policy_loss` is the token-level form of d1 / diffu-GRPO: one ratio per completion position from the
estimator's per-position terms, each clipped, averaged over the completion of each row and then over the rows;
the KL is the k3 estimator per position, averaged the same way.
"""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(N,) rewards in consecutive groups of `group_size` -> (r - group mean) / (group std + eps); 0 in a group
    whose rewards are all equal (nothing to learn from it)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    return torch.where(std > eps, centred / (std + eps), torch.zeros_like(centred)).view(-1)


def policy_loss(new: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor, *,
                clip: float = 0.2, ref: torch.Tensor | None = None, kl_coef: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate (to minimise) from (N,) log-likelihood estimates of the current policy (`new`, with grad),
    the rollout policy (`old`) and optionally the reference; `lengths` are completion lengths in tokens."""
    n = lengths.float().clamp(min=1)
    log_ratio = (new - old.detach()) / n
    ratio = log_ratio.exp()
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    loss = -surrogate.mean()
    stats = {"ratio_mean": float(ratio.detach().mean()),
             "clip_fraction": float(((ratio.detach() - 1).abs() > clip).float().mean())}
    if ref is not None:
        d = (ref.detach() - new) / n
        kl = (d.exp() - d - 1).mean()
        stats["kl"] = float(kl.detach())
        if kl_coef:
            loss = loss + kl_coef * kl
    return loss, stats


def token_policy_loss(new: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, completion: torch.Tensor, *,
                      clip: float = 0.2, ref: torch.Tensor | None = None, kl_coef: float = 0.0
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate (to minimise) from (N, L) per-position terms of the current policy (`new`, with grad), the
    rollout policy (`old`) and optionally the reference; `completion` (N, L) marks the positions that count."""
    weight = completion.float() / completion.float().sum(dim=1, keepdim=True).clamp(min=1)
    log_ratio = (new - old.detach()) * completion
    ratio = log_ratio.exp()
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    loss = -(surrogate * weight).sum(dim=1).mean()
    counted = completion.bool()
    stats = {"ratio_mean": float(ratio.detach()[counted].mean()) if counted.any() else 1.0,
             "clip_fraction": float(((ratio.detach() - 1).abs() > clip)[counted].float().mean())
             if counted.any() else 0.0}
    if ref is not None:
        d = (ref.detach() - new) * completion
        kl = ((d.exp() - d - 1) * weight).sum(dim=1).mean()
        stats["kl"] = float(kl.detach())
        if kl_coef:
            loss = loss + kl_coef * kl
    return loss, stats
