"""The forward (noising) process of masked diffusion: each token is replaced by [MASK] independently.

Reference §3: per sequence t ~ U(0, 1], masking probability `p = (1 - eps) * t + eps`. The floor `eps` keeps
`1 / p` (the loss weight) bounded by `1 / eps`.
"""
from __future__ import annotations

import torch


def mask_probability(t: torch.Tensor, eps: float) -> torch.Tensor:
    """p = (1 - eps) * t + eps."""
    return (1.0 - eps) * t + eps


def sample_t(batch_size: int, *, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
    """t ~ U(0, 1] (float32, shape (batch_size,)); 1 - U[0, 1) so t is never 0."""
    return 1.0 - torch.rand(batch_size, generator=generator, device=device)


def forward_mask(
    input_ids: torch.Tensor,
    mask_id: int,
    *,
    eps: float = 1e-3,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    maskable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupt clean ids (B, L): returns (noisy_ids, masked (B, L) bool, p_mask (B,) float32).

    `t` (B,) overrides the draw of t. `maskable` (B, L) bool: only these positions may be masked (LLaDA SFT keeps
    the prompt clean; padding is never masked). Draws t first, then one uniform per token, from `generator`.
    """
    b, length = input_ids.shape
    if t is None:
        t = sample_t(b, generator=generator, device=input_ids.device)
    p_mask = mask_probability(t.to(device=input_ids.device, dtype=torch.float32), eps)
    masked = torch.rand(b, length, generator=generator, device=input_ids.device) < p_mask[:, None]
    if maskable is not None:
        masked = masked & maskable.bool()
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p_mask
