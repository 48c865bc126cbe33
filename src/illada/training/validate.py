"""The trainer's validation component (torchtitan's Validator): when validation runs and what it computes."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from illada.training.batches import PackedRows, PairRows
from illada.training.config import TrainConfig
from illada.training.metrics import TrainMetrics


class Validator:
    """The validation loss every `eval_every` steps and at the run's last step (`steps`, wherever this call ends),
    on the first `eval_batches` micro-batches of the held-out rows; each value is recorded through `metrics`.
    `last` is the newest value of this call (None before the first)."""

    def __init__(self, cfg: TrainConfig, source: PackedRows | PairRows, model: torch.nn.Module,
                 wrapped: torch.nn.Module, objective, mask_token_id: int | None, device: torch.device,
                 autocast: contextlib.AbstractContextManager, metrics: TrainMetrics) -> None:
        self.cfg, self.source, self.model, self.wrapped, self.objective = cfg, source, model, wrapped, objective
        self.mask_token_id, self.device, self.autocast, self.metrics = mask_token_id, device, autocast, metrics
        self.last: float | None = None

    def should_run(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.cfg.steps

    def maybe_run(self, step: int) -> float | None:
        """Validate after step `step` (1-based) when it is due; the loss, or None."""
        if not self.should_run(step):
            return None
        self.last = self.validate()
        self.metrics.log_val(step, self.last)
        return self.last

    @torch.no_grad()
    def validate(self) -> float:
        """Validation loss in nats/token: the diffusion ELBO bound (fixed seeds) or the AR/SFT loss itself."""
        from illada.diffusion.objective import elbo_nll

        cfg = self.cfg
        self.model.eval()
        rows = self.source.validation_rows()[: cfg.eval_batches * cfg.micro_batch_size]
        losses = []
        for i in range(0, len(rows), cfg.micro_batch_size):
            batch = {k: v.to(self.device) for k, v in self.source.batch(rows[i:i + cfg.micro_batch_size]).items()}
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * (i + 1))
            with self.autocast:
                if cfg.objective == "diffusion":
                    value = elbo_nll(self.wrapped, batch["input_ids"], self.mask_token_id,
                                     num_samples=cfg.eval_mc_samples, generator=generator, eps=cfg.mask_eps)
                else:
                    value, _ = self.objective(self.wrapped, batch, generator)
            losses.append(float(value))
        self.model.train()
        # every rank scores the same validation rows, so the local mean is the global one
        return float(np.mean(losses)) if losses else float("nan")
