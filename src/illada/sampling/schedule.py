"""How many masked tokens to commit per step: the linear schedule (reference §5.1) and the confidence rules of
parallel decoding (threshold and factor, §5.4). Each returns a count per batch row; `remasking.select_top` picks
which positions."""
from __future__ import annotations

import torch


def linear_schedule(masked: torch.Tensor, steps: int | torch.Tensor) -> torch.Tensor:
    """Tokens to commit at each step, (B, max steps), for `masked` (B,) masked tokens per row and `steps` steps
    (one int, or (B,) per row: the columns past a row's steps are 0).

    Every step gets `m // steps`; the first `m % steps` steps get one more, so the counts sum to m.
    """
    masked = masked.long()
    per_row = torch.as_tensor(steps, device=masked.device).long().expand_as(masked).clamp(min=1)
    width = int(per_row.max()) if per_row.numel() else 1
    cols = torch.arange(width, device=masked.device)[None, :]
    base = (masked // per_row)[:, None]
    extra = (cols < (masked % per_row)[:, None]).long()
    return torch.where(cols < per_row[:, None], base + extra, torch.zeros_like(base + extra))


def _sorted_eligible(confidence: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Confidences of eligible positions sorted in descending order; ineligible ones become -inf (sorted last)."""
    masked = confidence.masked_fill(~eligible, float("-inf"))
    return masked.sort(dim=-1, descending=True).values


def threshold_count(confidence: torch.Tensor, eligible: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row: how many eligible positions have confidence > threshold, at least 1 (0 if nothing is eligible)."""
    count = ((confidence > threshold) & eligible).sum(-1)
    return torch.minimum(count.clamp(min=1), eligible.sum(-1))


def factor_count(confidence: torch.Tensor, eligible: torch.Tensor, factor: float) -> torch.Tensor:
    """Per row: the largest n with (n' + 1) * (1 - c_n') < factor for every n' <= n, where c_1 >= c_2 >= ... are the
    sorted eligible confidences; at least 1 (0 if nothing is eligible).

    (n + 1)(1 - c_n) grows with n, so the condition holds on a leading run and the run length is the count.
    """
    c = _sorted_eligible(confidence, eligible).double()
    n = torch.arange(1, c.shape[-1] + 1, device=c.device, dtype=torch.float64)
    ok = (n + 1) * (1 - c) < factor  # -inf confidences give +inf, never ok
    count = ok.long().cumprod(dim=-1).sum(-1)
    return torch.minimum(count.clamp(min=1), eligible.sum(-1))


def commit_counts(confidence: torch.Tensor, eligible: torch.Tensor, *, threshold: float | None,
                  factor: float | None, schedule: torch.Tensor | None, step: int) -> torch.Tensor:
    """(B,) positions to commit this step: by the threshold or factor rule, else column `step` of the linear
    schedule (all that is left once the schedule is spent)."""
    if threshold is not None:
        return threshold_count(confidence, eligible, threshold)
    if factor is not None:
        return factor_count(confidence, eligible, factor)
    assert schedule is not None
    return schedule[:, step] if step < schedule.shape[1] else eligible.sum(-1)
