"""Block policy: where the blocks of a generation lie on the canvas.

- Fixed canvas (LLaDA, reference §5.1): prompt + `gen_length` masks from the start, denoised block by block left to
  right, the `steps` shared equally among the blocks.
- Variable length (iLLaDA, §5.2): no future masks; one block of masks is appended at a time and denoised with
  `steps` steps; generation stops after the block that contains a stop, or when the budget runs out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from illada.errors import IlladaError


@dataclass(frozen=True)
class BlockPlan:
    prompt_len: int
    block_length: int
    num_blocks: int
    steps_per_block: int
    variable_length: bool

    @property
    def budget(self) -> int:
        """The most tokens this plan can generate (gen_length rounded down to whole blocks)."""
        return self.num_blocks * self.block_length

    def block_range(self, index: int) -> tuple[int, int]:
        start = self.prompt_len + index * self.block_length
        return start, start + self.block_length


def plan_blocks(prompt_len: int, gen_length: int, block_length: int, steps: int, variable_length: bool,
                max_seq_len: int | None, scheduled: bool = True) -> BlockPlan:
    """Validate the lengths and lay out the blocks. `scheduled=False` (threshold/factor rules) ignores `steps`."""
    if gen_length < 1 or block_length < 1 or steps < 1:
        raise IlladaError("max_new_tokens, block_length and steps must be positive")
    context = max_seq_len if max_seq_len is not None else prompt_len + gen_length
    room = context - prompt_len
    if room < 1:
        raise IlladaError(f"the prompt ({prompt_len} tokens) fills the model context ({context} tokens)")
    if variable_length:
        # Budget: gen_length capped by the context, rounded down to whole blocks; a budget shorter than one block
        # becomes one shorter block.
        budget = min(gen_length, room)
        block_length = min(block_length, budget)
        return BlockPlan(prompt_len, block_length, budget // block_length, steps, True)
    if prompt_len + gen_length > context:
        raise IlladaError(f"prompt ({prompt_len} tokens) + max_new_tokens ({gen_length}) exceeds the model "
                          f"context ({context} tokens)")
    block_length = min(block_length, gen_length)
    if gen_length % block_length:
        raise IlladaError(f"max_new_tokens ({gen_length}) must be a multiple of block_length ({block_length}) "
                          f"for a fixed canvas")
    num_blocks = gen_length // block_length
    if scheduled and steps % num_blocks:
        raise IlladaError(f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks} = "
                          f"max_new_tokens {gen_length} / block_length {block_length})")
    return BlockPlan(prompt_len, block_length, num_blocks, max(steps // num_blocks, 1), False)


def initial_canvas(prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None, plan: BlockPlan,
                   mask_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The starting canvas (prompt + every block of masks for a fixed canvas, the prompt alone for variable length)
    and its key-padding mask (None when no row is padded)."""
    if plan.variable_length:
        return prompt_ids.clone(), attention_mask
    return append_block(prompt_ids, attention_mask, plan.budget, mask_id)


def append_block(canvas: torch.Tensor, attention_mask: torch.Tensor | None, length: int,
                 mask_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`length` masks appended to every row (real tokens for the attention mask)."""
    masks = torch.full((canvas.shape[0], length), mask_id, dtype=canvas.dtype, device=canvas.device)
    canvas = torch.cat([canvas, masks], dim=1)
    if attention_mask is not None:
        ones = torch.ones(attention_mask.shape[0], length, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([attention_mask, ones], dim=1)
    return canvas, attention_mask
