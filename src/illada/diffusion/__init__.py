"""Masked diffusion training pieces: the forward masking process (`noise`) and the losses (`objective`).

Schedule (`illada.training.lr_schedule`), objective (here) and sampler (`illada.sampling`) are separate, so each
can be swapped without touching the others.
"""
from illada.diffusion.noise import forward_mask, mask_probability
from illada.diffusion.objective import (
    AutoregressiveObjective,
    DiffusionObjective,
    Objective,
    SFTPairsObjective,
    ar_loss,
    diffusion_loss,
    elbo_nll,
    pretrain_loss,
    random_split_segments,
    random_truncate,
    sft_pairs_loss,
)

__all__ = [
    "AutoregressiveObjective", "DiffusionObjective", "Objective", "SFTPairsObjective", "ar_loss", "diffusion_loss",
    "elbo_nll", "forward_mask", "mask_probability", "pretrain_loss", "random_split_segments", "random_truncate",
    "sft_pairs_loss",
]
