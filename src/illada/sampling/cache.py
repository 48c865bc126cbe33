"""Cache policy: which part of the canvas one denoising step recomputes (reference §5.4, approximate KV cache).

- "none": every step is a full forward over the canvas.
- "prefix": a full forward at the start of each block (and every `refresh_every` steps) stores all keys/values;
  other steps recompute only tokens from the block start to the end of the canvas, attending to the cached prefix.
- "dual": like prefix, but only the current block is recomputed; prefix and suffix come from the cache.

Only the current block's logits are returned: that is all a step needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from illada.model import KVCache

from illada.sampling.config import CACHES as CACHE_POLICIES


@dataclass
class BlockForward:
    """Runs the model for one step and returns logits (N, block_end - block_start, V) of the current block."""

    model: nn.Module
    policy: str = "none"
    refresh_every: int | None = None
    cache: KVCache | None = field(default=None, repr=False)

    def reset(self) -> None:
        """Drop the cache (call when the canvas changes shape, e.g. a block is appended)."""
        self.cache = None

    def __call__(self, canvas: torch.Tensor, attention_mask: torch.Tensor | None, block_start: int, block_end: int,
                 step_in_block: int) -> torch.Tensor:
        if self.policy == "none":
            return self.model(canvas, attention_mask=attention_mask)[:, block_start:block_end]
        refresh = (self.cache is None or step_in_block == 0
                   or (self.refresh_every is not None and step_in_block % self.refresh_every == 0))
        if refresh:
            self.cache = KVCache()
            return self.model(canvas, attention_mask=attention_mask, kv_cache=self.cache)[:, block_start:block_end]
        end = canvas.shape[1] if self.policy == "prefix" else block_end
        # a shifted model predicts a block's first token at the position before it: recompute that one too
        start = block_start - 1 if getattr(getattr(self.model, "config", None), "shift_logits", False) else block_start
        logits = self.model(canvas[:, start:end], attention_mask=attention_mask, kv_cache=self.cache,
                            cache_start=start)
        return logits[:, block_start - start:block_end - start]
