"""Confidence-based scoring of a candidate continuation (iLLaDA, reference §6.2) — a ranking score, not a likelihood.

Input = [BOS] + context + candidate + [EOS], the candidate fully masked. Repeat L times: one forward pass; among
the still-masked candidate positions take the one where the model gives the *gold* token the highest probability,
add that log-probability to the score and reveal the gold token there. Score = the sum (no length normalisation).
L passes per candidate; deterministic (ties go to the leftmost position).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from illada.errors import IlladaError
from illada.scoring.likelihood import (
    Tokens,
    as_pairs,
    check_fits,
    config_value,
    left_pad_rows,
    model_device,
    resolve_mask_id,
)


@torch.no_grad()
def confidence_scores_greedy(
    model: nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    *,
    mask_id: int,
    append_eos: bool = True,
    eos_id: int | None = None,
    bos_id: int | None = None,
    batch_size: int = 16,
) -> tuple[list[float], list[bool]]:
    """Scores of (context, candidate) pairs, and whether every revealed gold token was also the model's argmax
    at its position (lm-evaluation-harness's `is_greedy`). Candidates of similar length are batched together."""
    if append_eos:
        eos_id = eos_id if eos_id is not None else config_value(model, "eos_token_id")
        if eos_id is None:
            raise IlladaError("confidence scoring appends EOS but no eos_id is known; pass eos_id= or append_eos=False")
    prefix = [bos_id] if bos_id is not None else []
    suffix = [eos_id] if append_eos else []
    check_fits(model, pairs, extra=len(prefix) + len(suffix))
    device = model_device(model)
    scores, greedy = [0.0] * len(pairs), [True] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        rows = [prefix + pairs[i][0] + [mask_id] * len(pairs[i][1]) + suffix for i in members]
        ids, attention_mask = left_pad_rows(rows, mask_id, device)
        width = ids.shape[1]
        lengths = torch.tensor([len(pairs[i][1]) for i in members], device=device)
        span = int(lengths.max())
        # Candidate columns, right-aligned before the suffix: (B, span); shorter candidates start later and their
        # leading slots are marked invalid.
        first = width - len(suffix) - span
        cols = first + torch.arange(span, device=device)
        valid = torch.arange(span, device=device)[None, :] >= (span - lengths)[:, None]
        gold = torch.full((len(members), span), mask_id, dtype=torch.long, device=device)
        for r, i in enumerate(members):
            cont = pairs[i][1]
            gold[r, span - len(cont):] = torch.tensor(cont, device=device)
        masked = valid.clone()
        total = torch.zeros(len(members), dtype=torch.float64, device=device)
        is_greedy = torch.ones(len(members), dtype=torch.bool, device=device)
        for _ in range(span):
            # Only rows with masks left go through the model: the cost is exactly one pass per candidate token.
            busy = masked.any(-1).nonzero().flatten()
            sub_mask = None if attention_mask is None else attention_mask[busy]
            logp = torch.log_softmax(model(ids[busy], attention_mask=sub_mask)[:, cols].float(), -1)  # (b, span, V)
            gold_logp = logp.gather(-1, gold[busy][..., None]).squeeze(-1)
            choice = gold_logp.masked_fill(~masked[busy], float("-inf")).argmax(-1)  # first maximum: leftmost
            here = torch.arange(len(busy), device=device)
            total[busy] += gold_logp[here, choice].double()
            is_greedy[busy] &= logp[here, choice].argmax(-1) == gold[busy, choice]
            masked[busy, choice] = False
            ids[busy, cols[choice]] = gold[busy, choice]
        for r, i in enumerate(members):
            scores[i] = float(total[r])
            greedy[i] = bool(is_greedy[r])
    return scores, greedy


def confidence_score(
    model: nn.Module,
    context_ids: Tokens | Sequence[Tokens],
    continuation_ids: Tokens | Sequence[Tokens],
    *,
    mask_id: int | None = None,
    append_eos: bool = True,
    eos_id: int | None = None,
    bos_id: int | None = None,
    batch_size: int = 16,
) -> float | list[float]:
    """iLLaDA's confidence score (reference §6.2) of one candidate (returns a float) or of a list of candidates
    (returns a list; `context_ids` one shared context or one per candidate). `bos_id` None: no BOS is prepended;
    `eos_id` None: the model config's eos_token_id. Higher is better; pick the highest-scoring option."""
    mask_id = resolve_mask_id(model, mask_id)
    pairs, single = as_pairs(context_ids, continuation_ids)
    scores, _ = confidence_scores_greedy(model, pairs, mask_id=mask_id, append_eos=append_eos, eos_id=eos_id,
                                         bos_id=bos_id, batch_size=batch_size)
    return scores[0] if single else scores
