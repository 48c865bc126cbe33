"""Filling masks anywhere in a canvas (text on both sides of a hole): the bidirectional model's own move.

Greedy, low-confidence remasking over every masked position at once: each pass commits the most confident masked
position of each row (or, with `threshold`, every position above it, at least one), until no mask is left.
Confidence is the candidate's probability under the model's softmax; the mask token is never a candidate.
Unmasked tokens are never changed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from illada.errors import IlladaError


@dataclass
class InfillOutput:
    sequences: torch.Tensor  # (B, L): the canvas with every mask filled
    nfe: int                 # forward passes
    filled: int              # masked positions filled, over all rows
    row_nfe: torch.Tensor    # (B,) passes that had a mask left to fill in each row


@torch.no_grad()
def fill_masks(model: nn.Module, canvas: torch.Tensor, mask_id: int, *, attention_mask: torch.Tensor | None = None,
               threshold: float | None = None) -> InfillOutput:
    """Fill every `mask_id` position of `canvas` (B, L); `attention_mask` marks padding keys (0) as in `generate`."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise IlladaError(f"threshold must be in [0, 1], got {threshold}")
    x = torch.as_tensor(canvas).long().clone()
    if x.dim() != 2:
        raise IlladaError("canvas must be a (batch, length) tensor of token ids")
    x = x.to(next(model.parameters()).device)
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask).to(x.device)
        masked = (x == mask_id) & attention_mask.bool()
    else:
        masked = x == mask_id
    filled, nfe = int(masked.sum()), 0
    row_nfe = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    while bool(masked.any()):
        row_nfe += masked.any(-1).long()
        logits = model(x, attention_mask=attention_mask).float()
        nfe += 1
        probs = torch.softmax(logits, dim=-1)
        probs[..., mask_id] = -1.0  # never a candidate; the others keep their own probabilities
        confidence, candidate = probs.max(dim=-1)
        confidence = torch.where(masked, confidence, torch.full_like(confidence, -2.0))
        commit = torch.zeros_like(masked)
        best = confidence.argmax(dim=-1, keepdim=True)
        commit.scatter_(1, best, True)
        if threshold is not None:
            commit |= confidence > threshold
        commit &= masked
        x = torch.where(commit, candidate, x)
        masked &= ~commit
    return InfillOutput(sequences=x, nfe=nfe, filled=filled, row_nfe=row_nfe)
