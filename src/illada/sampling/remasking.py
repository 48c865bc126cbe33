"""Per-step token choice: logit filters, Gumbel-max candidates, the confidence of each candidate (the remasking
rule) and the vectorised commit of the most confident positions (reference §5.1).

All functions work on (B, n, V) logits of the n positions of the current block and are vectorised over rows.
"""
from __future__ import annotations

from typing import Iterable

import torch

from illada.sampling.config import REMASKING as REMASKING_RULES
NEG_INF = float("-inf")


def suppress_tokens(logits: torch.Tensor, token_ids: Iterable[int]) -> torch.Tensor:
    """Logits with the given token ids set to -inf (they can never be chosen)."""
    ids = sorted({int(t) for t in token_ids if t is not None and 0 <= int(t) < logits.shape[-1]})
    if not ids:
        return logits
    logits = logits.clone()
    logits[..., ids] = NEG_INF
    return logits


def filter_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits per position (ties with the k-th kept), the others -inf."""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def filter_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose probabilities sum to >= p."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # the top token has 0 before it, so it is always kept
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def gumbel_noise(shape: torch.Size | tuple[int, ...], device: torch.device | str,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u) in float64 (float32 noise visibly biases low-temperature sampling)."""
    u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
    u = u.clamp_min(torch.finfo(torch.float64).tiny)
    return -torch.log(-torch.log(u))


def sample_candidates(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Candidate token per position: argmax (temperature 0) or Gumbel-max, i.e. a sample of softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(-1)
    perturbed = logits.double() / temperature + gumbel_noise(logits.shape, logits.device, generator)
    return perturbed.argmax(-1)


def confidence_score(logits: torch.Tensor, candidates: torch.Tensor, rule: str,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Confidence (B, n) of each position under the remasking rule; higher is committed first.

    low_confidence: softmax probability of the candidate; margin: top-1 minus top-2 probability; entropy: minus the
    entropy of the distribution; random: uniform noise (order independent of the model).
    """
    if rule == "random":
        return torch.rand(candidates.shape, device=logits.device, generator=generator)
    probs = logits.float().softmax(-1)
    if rule == "low_confidence":
        return probs.gather(-1, candidates[..., None]).squeeze(-1)
    if rule == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if rule == "entropy":
        return torch.special.xlogy(probs, probs).sum(-1)  # = -entropy; xlogy gives 0 for p = 0
    raise ValueError(f"unknown remasking rule {rule!r}")


def select_top(confidence: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean (B, n): per row the `counts[row]` most confident eligible positions.

    Eligible positions whose confidence is -inf (e.g. EOS under eos_confidence="neg_inf") still rank above ineligible
    ones, so a row whose remaining positions are all -inf still commits what the schedule asks (no deadlock).
    Ties go to the leftmost position.
    """
    counts = torch.minimum(counts.long(), eligible.sum(-1))
    k_max = int(counts.max().item()) if counts.numel() else 0
    if k_max == 0:
        return torch.zeros_like(eligible)
    lowest = torch.finfo(confidence.dtype).min if confidence.is_floating_point() else NEG_INF
    key = torch.where(eligible, confidence.clamp_min(lowest), torch.full_like(confidence, NEG_INF))
    top = key.argsort(dim=-1, descending=True, stable=True)[:, :k_max]
    take = torch.arange(k_max, device=counts.device)[None, :] < counts[:, None]
    return torch.zeros_like(eligible).scatter(-1, top, take)


def propose(logits: torch.Tensor, mask_id: int, *, bans: Iterable[int] = (), top_k: int | None = None,
            top_p: float | None = None, temperature: float = 0.0, remasking: str = "low_confidence",
            generator: torch.Generator | None = None, last_ids: Iterable[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates, confidence) of one sampler step, shared by generation and infilling.

    The mask token is never a candidate (committing it would leave the position masked), but as in the official
    LLaDA sampler it keeps its share of the softmax the confidence is measured on; the user's `bans` and the top-k /
    top-p filters renormalise, as the official EOS flag does. Candidates in `last_ids` get confidence -inf (they are
    committed last)."""
    bans = list(bans)

    def filtered(banned: list[int]) -> torch.Tensor:
        return filter_top_p(filter_top_k(suppress_tokens(logits, banned), top_k), top_p)

    candidates = sample_candidates(filtered([mask_id, *bans]), temperature, generator)
    confidence = confidence_score(filtered(bans), candidates, remasking, generator)
    last = list(last_ids)
    if last:
        last_tensor = torch.tensor(last, dtype=candidates.dtype, device=candidates.device)
        confidence = confidence.masked_fill(torch.isin(candidates, last_tensor), float("-inf"))
    return candidates, confidence
