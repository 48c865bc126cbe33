"""End-think boost (reference §5.3): push a reasoning model towards closing `</think>` as the budget runs out.

While a row has not generated the `</think>` token sequence, the first still-masked position `pos` of the current
block gets `boost * progress ** power` added to the logit of the next `</think>` token, where
`progress = clip((pos - prompt_len + 1) / gen_length, 0, 1)`. "Next" follows prefix matching: if the generated
tokens just before `pos` spell the first j tokens of the sequence (longest such j), the boosted token is the
(j+1)-th. A match never reaches into the prompt, as in the official `var_generate`.
"""
from __future__ import annotations

from typing import Sequence

import torch


def contains_sequence(tokens: torch.Tensor, sequence: Sequence[int], start: int = 0) -> torch.Tensor:
    """(B,) bool: whether `sequence` occurs contiguously in tokens[:, start:] (B, L)."""
    window = tokens[:, start:]
    n = len(sequence)
    if n == 0 or window.shape[1] < n:
        return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    seq = torch.tensor(list(sequence), device=tokens.device)
    return (window.unfold(1, n, 1) == seq).all(-1).any(-1)


def end_think_boost(
    logits: torch.Tensor,
    canvas: torch.Tensor,
    block_start: int,
    mask_id: int,
    prompt_len: int,
    gen_length: int,
    think_ids: Sequence[int],
    boost: float,
    power: float,
) -> torch.Tensor:
    """Boosted copy of the block logits (B, n, V); `canvas` (B, L) holds the block at block_start..block_start+n.

    Rows that already contain `</think>` in their generation (canvas[:, prompt_len:]), or have no masked position
    left in the block, are unchanged.
    """
    if boost == 0 or not think_ids:
        return logits
    b, n, _ = logits.shape
    block = canvas[:, block_start:block_start + n]
    masked = block == mask_id
    has_mask = masked.any(-1)
    offset = masked.long().argmax(-1)  # first masked position in the block (0 when none; filtered by has_mask)
    pos = block_start + offset  # absolute canvas position
    active = has_mask & ~contains_sequence(canvas, think_ids, prompt_len)

    # Longest j < len(think_ids) with canvas[pos - j : pos] == think_ids[:j]; j = 0 always matches.
    seq = torch.tensor(list(think_ids), device=canvas.device)
    matched = torch.zeros(b, dtype=torch.long, device=canvas.device)
    for j in range(1, len(think_ids)):  # loop over the (short) sequence, not over rows
        idx = pos[:, None] - j + torch.arange(j, device=canvas.device)[None, :]
        valid = (idx >= prompt_len).all(-1)  # generated tokens only
        before = canvas.gather(1, idx.clamp_min(0))
        match = valid & (before == seq[:j]).all(-1)
        matched = torch.where(match, torch.full_like(matched, j), matched)
    target = seq[matched]

    progress = ((pos - prompt_len + 1).double() / gen_length).clamp(0.0, 1.0)
    amount = (boost * progress ** power).to(logits.dtype) * active.to(logits.dtype)
    logits = logits.clone()
    rows = torch.arange(b, device=logits.device)
    logits[rows, offset, target] += amount
    return logits
