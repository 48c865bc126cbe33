"""Cache policy: which part of the canvas one denoising step recomputes (reference §5.4, approximate KV cache).

- "none": every step is a full forward over the canvas.
- "prefix": a full forward at the start of each block (and every `refresh_every` steps) stores all keys/values;
  other steps recompute only tokens from the block start to the end of the canvas, attending to the cached prefix.
- "dual": like prefix, but only the current block is recomputed; prefix and suffix come from the cache.
- "committed": no refresh. One full forward at the start stores every key/value; then each step recomputes the
  current block only, and a block's first step also the block just finished, whose keys/values (now of committed
  tokens) are written into the cache and kept from then on (dKV-Cache's delayed caching of decoded tokens). A
  pass costs about two blocks of tokens instead of the whole canvas at every block's start.

Only the current block's logits are returned: that is all a step needs.

A block-causal model (config `block_causal`) gets the pattern of the current block with every forward. Its
committed tokens never see later positions, so their keys/values are final once computed causally: every policy
gives the tokens of no cache exactly, and "committed" is the cheapest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from illada.model import KVCache, block_causal_pattern

from illada.sampling.config import CACHES as CACHE_POLICIES


@dataclass
class BlockForward:
    """Runs the model for one step and returns logits (N, block_end - block_start, V) of the current block."""

    model: nn.Module
    policy: str = "none"
    refresh_every: int | None = None
    cache: KVCache | None = field(default=None, repr=False)
    frozen: int = 0  # committed: positions before it hold their final keys/values

    def reset(self) -> None:
        """The canvas grew by a block: the prefix/dual caches are dropped (the next step refreshes), the committed
        cache keeps what it froze."""
        if self.policy != "committed":
            self.cache = None

    def __call__(self, canvas: torch.Tensor, attention_mask: torch.Tensor | None, block_start: int, block_end: int,
                 step_in_block: int) -> torch.Tensor:
        config = getattr(self.model, "config", None)
        extra = ({"attention_pattern": block_causal_pattern(canvas.shape[1], block_start, block_end, canvas.device)}
                 if getattr(config, "block_causal", False) else {})
        if self.policy == "none":
            return self.model(canvas, attention_mask=attention_mask, **extra)[:, block_start:block_end]
        shift = 1 if getattr(config, "shift_logits", False) else 0
        if self.policy == "committed":
            return self._committed(canvas, attention_mask, block_start, block_end, shift, extra)
        refresh = (self.cache is None or step_in_block == 0
                   or (self.refresh_every is not None and step_in_block % self.refresh_every == 0))
        if refresh:
            self.cache = KVCache()
            return self.model(canvas, attention_mask=attention_mask, kv_cache=self.cache,
                              **extra)[:, block_start:block_end]
        end = canvas.shape[1] if self.policy == "prefix" else block_end
        # a shifted model predicts a block's first token at the position before it: recompute that one too
        start = block_start - shift
        logits = self.model(canvas[:, start:end], attention_mask=attention_mask, kv_cache=self.cache,
                            cache_start=start, **extra)
        return logits[:, block_start - start:block_end - start]

    def _committed(self, canvas: torch.Tensor, attention_mask: torch.Tensor | None, block_start: int, block_end: int,
                   shift: int, extra: dict) -> torch.Tensor:
        if self.cache is None:
            self.cache, self.frozen = KVCache(), block_start
            return self.model(canvas, attention_mask=attention_mask, kv_cache=self.cache,
                              **extra)[:, block_start:block_end]
        start = min(self.frozen, block_start - shift)
        self.cache.write_before = block_start if self.frozen < block_start else 0
        logits = self.model(canvas[:, start:block_end], attention_mask=attention_mask, kv_cache=self.cache,
                            cache_start=start, **extra)
        self.frozen = block_start  # blocks only move forward
        return logits[:, block_start - start:block_end - start]
