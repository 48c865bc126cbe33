"""Block policy: where the blocks of a generation lie on the canvas, and each row's budget.

- Fixed canvas (LLaDA, reference §5.1): prompt + the budget of masks from the start, denoised block by block left
  to right, the `steps` shared among the blocks in proportion to their lengths (equally when they are equal).
- Variable length (iLLaDA, §5.2): no future masks; one block of masks is appended at a time and denoised with
  `steps` steps; generation stops after the block that contains a stop, or when the budget runs out.

Budget: every row gets exactly `max_new_tokens` (gen_length), capped by the model context after its own prompt
(a note says so), in both modes; when the budget is not a multiple of `block_length` the last block is shorter.
A row's budget depends on its own prompt only, never on the other rows of a batch: in a left-padded batch a row
whose budget ends before the batch's widest one has the columns after its budget filled with padding that its
attention mask hides, so it sees exactly the canvas it would have alone.

Steps of a block of n tokens starting at generated offset s: `ceil(R (s + n)) - ceil(R s)` (at least 1), where R
is steps per token: `steps / block_length` for variable length (so a full block gets `steps`, a shorter last
block proportionally fewer: the same tokens per pass), `steps / max_new_tokens` for a fixed canvas (the steps
shared in proportion to the block lengths; a budget cut by the context keeps the rate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from illada.errors import IlladaError


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockPlan:
    prompt_len: int  # P: the (padded) prompt width; the generation starts at this column in every row
    block_length: int
    budgets: tuple[int, ...]  # tokens each row may generate (max_new_tokens capped by the context)
    steps: int  # as given: per block (variable length) or in total (fixed canvas)
    rate: tuple[int, int]  # steps per token, as a fraction (numerator, denominator)
    variable_length: bool
    notes: tuple[str, ...] = ()  # what a user should be told (a budget cut by the context)

    @property
    def budget(self) -> int:
        """Generation columns of the canvas: the largest row budget."""
        return max(self.budgets)

    @property
    def num_blocks(self) -> int:
        return _ceil_div(self.budget, self.block_length)

    @property
    def max_block_steps(self) -> int:
        """The most steps any block of any row gets (bounds the loop of a block)."""
        return max(self.segment_steps(0, min(self.block_length, self.budget)), 1)

    def block_range(self, index: int) -> tuple[int, int]:
        """Canvas columns [start, end) of block `index` (the last block may be shorter)."""
        start = self.prompt_len + index * self.block_length
        return start, self.prompt_len + min((index + 1) * self.block_length, self.budget)

    def row_block_lengths(self, index: int) -> list[int]:
        """Tokens of block `index` inside each row's budget (0 for a row whose budget ended before it)."""
        offset = index * self.block_length
        return [max(0, min(self.block_length, budget - offset)) for budget in self.budgets]

    def segment_steps(self, offset: int, length: int) -> int:
        """Steps for `length` tokens of the generation from `offset` (0 for no tokens); never more than `length`:
        every step commits at least one token, so more steps would only be empty columns of the schedule (and
        `steps: 10**12` an allocation of that many)."""
        if length <= 0:
            return 0
        num, den = self.rate
        return min(length, max(1, _ceil_div(num * (offset + length), den) - _ceil_div(num * offset, den)))

    def row_block_steps(self, index: int) -> list[int]:
        """Steps of block `index` for each row (from the row's own part of the block)."""
        offset = index * self.block_length
        return [self.segment_steps(offset, n) for n in self.row_block_lengths(index)]

    def in_budget(self, device: torch.device | None = None) -> torch.Tensor:
        """(B, budget) bool: the generation columns each row may use."""
        cols = torch.arange(self.budget, device=device)[None, :]
        return cols < torch.tensor(self.budgets, device=device)[:, None]


def plan_blocks(prompt_lens: int | Sequence[int], gen_length: int, block_length: int, steps: int,
                variable_length: bool, max_seq_len: int | None, scheduled: bool = True,
                width: int | None = None, row_gen_lengths: Sequence[int] | None = None) -> BlockPlan:
    """Validate the lengths and lay out the blocks for rows with real prompt lengths `prompt_lens` (one int: one
    row), left-padded to `width` (default: the longest). `scheduled=False` (threshold/factor rules) ignores
    `steps`. Each row's budget is `gen_length` (or its `row_gen_lengths` entry) capped by the context after its
    own prompt, with a note."""
    if gen_length < 1 or block_length < 1 or steps < 1:
        raise IlladaError("max_new_tokens, block_length and steps must be positive")
    lens = [int(prompt_lens)] if isinstance(prompt_lens, int) else [int(n) for n in prompt_lens]
    if not lens:
        raise IlladaError("no prompts given")
    width = max(lens) if width is None else width
    wanted = [gen_length] * len(lens) if row_gen_lengths is None else [int(g) for g in row_gen_lengths]
    if len(wanted) != len(lens) or min(wanted) < 1:
        raise IlladaError(f"row budgets must be one positive integer per row, got {wanted}")
    budgets, notes = [], []
    for row, (n, want) in enumerate(zip(lens, wanted)):
        context = max_seq_len if max_seq_len is not None else n + want
        room = context - n
        if room < 1:
            raise IlladaError(f"the prompt ({n} tokens) fills the model context ({context} tokens)")
        if room < want:
            where = f"row {row}: " if len(lens) > 1 else ""
            notes.append(f"{where}max_new_tokens {want} capped to {room}: the prompt ({n} tokens) leaves "
                         f"{room} of the model context ({context} tokens)")
        budgets.append(min(want, room))
    rate = (steps, block_length) if variable_length else (steps, gen_length)
    return BlockPlan(width, block_length, tuple(budgets), steps, rate, variable_length, tuple(notes))


def initial_canvas(prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None, plan: BlockPlan,
                   mask_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The starting canvas (prompt + every block of masks for a fixed canvas, the prompt alone for variable length)
    and its key-padding mask (None when no row is padded)."""
    if plan.variable_length:
        return prompt_ids.clone(), attention_mask
    return append_block(prompt_ids, attention_mask, plan.budget, mask_id, plan, pad_id)


def append_block(canvas: torch.Tensor, attention_mask: torch.Tensor | None, length: int, mask_id: int,
                 plan: BlockPlan | None = None, pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`length` masks appended to every row (real tokens for the attention mask). With a `plan`, columns past a
    row's budget get `pad_id` and are hidden by the attention mask instead (that row's canvas then is what it
    would be alone)."""
    b, start = canvas.shape[0], canvas.shape[1]
    masks = torch.full((b, length), mask_id, dtype=canvas.dtype, device=canvas.device)
    ones = torch.ones(b, length, dtype=torch.long, device=canvas.device)
    if plan is not None:
        offset = start - plan.prompt_len
        cols = offset + torch.arange(length, device=canvas.device)[None, :]
        inside = cols < torch.tensor(plan.budgets, device=canvas.device)[:, None]
        if not inside.all():
            masks = torch.where(inside, masks, torch.full_like(masks, mask_id if pad_id is None else pad_id))
            ones = inside.long()
            if attention_mask is None:
                attention_mask = torch.ones(b, start, dtype=torch.long, device=canvas.device)
    canvas = torch.cat([canvas, masks], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, ones.to(attention_mask.dtype)], dim=1)
    return canvas, attention_mask
