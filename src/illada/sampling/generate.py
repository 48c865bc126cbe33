"""The sampling loop: composes the block policy, cache policy, logit processing, remasking rule and commit schedule.

One core (`_Decoder.events`) yields a `StepEvent` per denoising step; `stream` exposes it and `generate` consumes
it, so both always agree. Everything is vectorised over batch rows; a left-padded row gives (at temperature 0)
exactly what it gives alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from illada.errors import IlladaError
from illada.sampling.blocks import BlockPlan, append_block, initial_canvas, plan_blocks
from illada.sampling.cache import BlockForward
from illada.sampling.config import SamplingConfig, token_ids
from illada.sampling.endthink import end_think_boost
from illada.sampling.remasking import propose, select_top
from illada.sampling.schedule import commit_counts, linear_schedule

@dataclass
class StepEvent:
    """One denoising step (or, with done=True, the end: canvas is then the final sequences and output is set)."""

    step: int  # global step index (0-based)
    block: int  # block index
    committed: torch.Tensor  # (B, L) bool: positions committed at this step
    canvas: torch.Tensor  # (B, L) tokens after this step (masks where not yet committed)
    step_of: torch.Tensor  # (B, L) step that committed each position, -1 for prompt and masks
    finished: torch.Tensor  # (B,) bool: rows that have stopped
    nfe: int  # forward passes so far
    done: bool = False
    output: "GenerationOutput | None" = None


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, P + G): prompt + generation; after a row's stop point or budget, pad_token_id
    nfe: int  # model forward passes (CFG counts 2 per step)
    generated_lengths: torch.Tensor  # (B,) tokens before the first EOS/EOT/stop token (incl. a stop string's tokens)
    tokens_per_forward: float  # committed tokens per row per forward pass
    prompt_length: int  # P: the generation of every row starts at this column
    history: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per step: (canvas, step_of), as in StepEvent
    row_nfe: torch.Tensor | None = None  # (B,) passes that had work for each row (a finished row rides along free)
    budgets: torch.Tensor | None = None  # (B,) each row's budget: max_new_tokens, capped by the context
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. a budget capped by the context

    def generated_tokens(self) -> list[list[int]]:
        """Each row's generation up to its stop point."""
        gen = self.sequences[:, self.prompt_length:].tolist()
        return [row[:n] for row, n in zip(gen, self.generated_lengths.tolist())]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, attention_mask), both (B, max_len) long tensors."""
    if not sequences:
        raise IlladaError("no prompts given")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


class _Decoder:
    """State of one batched generation; `events()` runs it."""

    def __init__(self, model: nn.Module, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 cfg: SamplingConfig, decode: Callable[[list[int]], str] | None,
                 generator: torch.Generator | None, row_budgets: Sequence[int] | None = None) -> None:
        self.model, self.cfg, self.decode = model, cfg, decode
        device = next(model.parameters()).device
        prompt_ids = torch.as_tensor(prompt_ids)
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
            attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(1, -1)
        if prompt_ids.dim() != 2 or prompt_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise IlladaError("prompt_ids must be a (batch, length) integer tensor")
        self.prompt_ids = prompt_ids.long().to(device)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).to(device)
            if attention_mask.shape != prompt_ids.shape:
                raise IlladaError(f"attention_mask shape {tuple(attention_mask.shape)} != prompt_ids shape "
                                  f"{tuple(prompt_ids.shape)}")
            mask = attention_mask.bool()
            if not (mask[:, 1:] >= mask[:, :-1]).all():
                raise IlladaError("attention_mask must describe left padding (0s before 1s in every row)")
            attention_mask = None if mask.all() else mask.long()
        self.attention_mask = attention_mask

        self.mask_id, self.eos_ids, eos = token_ids(cfg, model)
        self.stop_ids = sorted(set(self.eos_ids) | set(cfg.stop_token_ids))
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
        self.pad_id = pad if pad is not None else self.mask_id
        if cfg.stop_strings and decode is None:
            raise IlladaError("stop_strings need a decode function (the tokenizer)")
        if cfg.end_think_boost and not cfg.end_think_ids:
            raise IlladaError("end_think_boost needs end_think_ids (the tokens of </think>)")

        self.scheduled = cfg.scheduled
        # each row's budget from its own prompt length, never from the padded width: a row gives what it gives alone
        width = self.prompt_ids.shape[1]
        lens = ([width] * self.prompt_ids.shape[0] if attention_mask is None
                else attention_mask.sum(-1).tolist())
        self.plan: BlockPlan = plan_blocks(lens, cfg.gen_length, cfg.resolved_block_length, cfg.resolved_steps,
                                           cfg.variable_length, getattr(getattr(model, "config", None),
                                                                        "max_seq_len", None),
                                           self.scheduled, width, row_budgets)
        self.budgets = torch.tensor(self.plan.budgets, dtype=torch.long, device=device)  # (B,)
        self.in_budget = self.plan.in_budget(device)  # (B, budget): the generation columns of each row
        if generator is None and cfg.seed is not None:
            generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.generator = generator
        self.nfe = 0

    # -- one step -----------------------------------------------------------------------------------------------
    def _block_logits(self, forward: BlockForward, canvas: torch.Tensor, attention_mask: torch.Tensor | None,
                      start: int, end: int, step_in_block: int) -> torch.Tensor:
        """Float32 logits (B, n, V) of the block, with unsupervised classifier-free guidance when cfg_scale > 0."""
        w = self.cfg.cfg_scale
        if w == 0:
            self.nfe += 1
            return forward(canvas, attention_mask, start, end, step_in_block).float()
        # Unconditional input: the same canvas with the (real) prompt tokens replaced by masks.
        p = self.plan.prompt_len
        prompt_real = (torch.ones_like(canvas[:, :p], dtype=torch.bool) if attention_mask is None
                       else attention_mask[:, :p].bool())
        uncond = canvas.clone()
        uncond[:, :p] = torch.where(prompt_real, torch.full_like(canvas[:, :p], self.mask_id), canvas[:, :p])
        both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
        self.nfe += 2
        cond, unc = forward(torch.cat([canvas, uncond]), both_mask, start, end, step_in_block).float().chunk(2)
        return unc + (w + 1) * (cond - unc)

    def _propose(self, logits: torch.Tensor, canvas: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidates, confidence) after the processors in order: end-think boost, then `propose` (the user's bans
        (forbid_eos), top-k, top-p; the mask never a candidate; EOS/EOT last under eos_confidence="neg_inf")."""
        cfg = self.cfg
        if cfg.end_think_boost and cfg.end_think_ids:
            logits = end_think_boost(logits, canvas, start, self.mask_id, self.plan.prompt_len, self.budgets,
                                     cfg.end_think_ids, cfg.end_think_boost, cfg.end_think_power)
        return propose(logits, self.mask_id, bans=self.eos_ids if cfg.forbid_eos else (), top_k=cfg.top_k,
                       top_p=cfg.top_p, temperature=cfg.temperature, remasking=cfg.remasking,
                       generator=self.generator, last_ids=self.eos_ids if cfg.eos_confidence == "neg_inf" else ())

    # -- stopping -----------------------------------------------------------------------------------------------
    def _find_stops(self, canvas: torch.Tensor, upto: int, stop_len: torch.Tensor, check: torch.Tensor) -> None:
        """Set stop_len[row] (tokens of generation kept) for rows in `check` whose committed generation
        canvas[row, P:upto] contains a stop token (cut before it) or a stop string (cut after its last token)."""
        p = self.plan.prompt_len
        gen = canvas[:, p:upto]
        if self.stop_ids:  # columns past a row's budget (padding) are not its generation
            is_stop = torch.isin(gen, torch.tensor(self.stop_ids, device=gen.device)) & self.in_budget[:, :upto - p]
            found = is_stop.any(-1) & check
            first = is_stop.long().argmax(-1)
            stop_len.copy_(torch.where(found, first, stop_len))
        if self.cfg.stop_strings and self.decode is not None:
            limits = torch.where(stop_len >= 0, stop_len, self.budgets.clamp(max=gen.shape[1]))
            rows = check.nonzero().flatten().tolist()
            for row, limit, tokens in zip(rows, limits[rows].tolist(), gen[rows].tolist()):  # tokenizer: per row
                n = self._stop_string_end(tokens[:limit])
                if n is not None:
                    stop_len[row] = n

    def _stop_string_end(self, tokens: list[int]) -> int | None:
        """Smallest n such that decode(tokens[:n]) contains a stop string, or None."""
        def hit(n: int) -> bool:
            text = self.decode(tokens[:n])
            return any(s and s in text for s in self.cfg.stop_strings)

        if not tokens or not hit(len(tokens)):
            return None
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if hit(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    # -- the loop -----------------------------------------------------------------------------------------------
    @torch.no_grad()  # on a generator function torch enters/leaves no_grad around each resume only
    def events(self) -> Iterator[StepEvent]:
        cfg, plan, mask_id = self.cfg, self.plan, self.mask_id
        canvas, attention_mask = initial_canvas(self.prompt_ids, self.attention_mask, plan, mask_id, self.pad_id)
        b = canvas.shape[0]
        device = canvas.device
        step_of = torch.full_like(canvas, -1)
        active = torch.ones(b, dtype=torch.bool, device=device)
        stop_len = torch.full((b,), -1, dtype=torch.long, device=device)
        committed_total = torch.zeros(b, dtype=torch.long, device=device)
        row_nfe = torch.zeros(b, dtype=torch.long, device=device)
        forward = BlockForward(self.model, cfg.cache, cfg.cache_refresh)
        step = 0

        for block in range(plan.num_blocks):
            start, end = plan.block_range(block)
            if plan.variable_length:
                canvas, attention_mask = append_block(canvas, attention_mask, end - start, mask_id, plan, self.pad_id)
                step_of = torch.cat([step_of, torch.full_like(canvas[:, step_of.shape[1]:], -1)], dim=1)
                forward.reset()
            inside = self.in_budget[:, start - plan.prompt_len:end - plan.prompt_len]
            eligible = (canvas[:, start:end] == mask_id) & inside & active[:, None]
            block_steps = torch.tensor(plan.row_block_steps(block), dtype=torch.long, device=device)
            schedule = linear_schedule(eligible.sum(-1), block_steps) if self.scheduled else None
            i = 0
            while eligible.any():
                if i > plan.block_length + plan.max_block_steps:  # every step commits >= 1 token per busy row
                    raise RuntimeError("sampler made no progress on a block (bug)")
                row_nfe += eligible.any(-1).long() * (2 if cfg.cfg_scale else 1)
                logits = self._block_logits(forward, canvas, attention_mask, start, end, i)
                candidates, confidence = self._propose(logits, canvas, start)
                counts = commit_counts(confidence, eligible, threshold=cfg.threshold, factor=cfg.factor,
                                       schedule=schedule, step=i)
                commit = select_top(confidence, eligible, counts)

                canvas[:, start:end] = torch.where(commit, candidates, canvas[:, start:end])
                step_of[:, start:end].masked_fill_(commit, step)
                committed_total += commit.sum(-1)
                eligible &= ~commit
                committed = torch.zeros_like(canvas, dtype=torch.bool)
                committed[:, start:end] = commit
                yield StepEvent(step, block, committed, canvas.clone(), step_of.clone(), ~active.clone(), self.nfe)
                step += 1
                i += 1

            # Stops are final once found in finished blocks: everything after them is cut.
            self._find_stops(canvas, end, stop_len, active & (stop_len < 0))
            if plan.variable_length or cfg.early_stop:
                active &= stop_len < 0
            active &= self.budgets > end - plan.prompt_len  # a row whose budget is spent is done
            if not active.any():
                break

        gen_width = canvas.shape[1] - plan.prompt_len
        lengths = torch.where(stop_len >= 0, stop_len, self.budgets.clamp(max=gen_width))
        keep = torch.arange(gen_width, device=device)[None, :] < lengths[:, None]
        sequences = canvas.clone()
        sequences[:, plan.prompt_len:] = torch.where(keep, canvas[:, plan.prompt_len:],
                                                     torch.full_like(canvas[:, plan.prompt_len:], self.pad_id))
        per_row = committed_total.float().mean().item()
        output = GenerationOutput(sequences=sequences, nfe=self.nfe, generated_lengths=lengths,
                                  tokens_per_forward=per_row / self.nfe if self.nfe else 0.0,
                                  prompt_length=plan.prompt_len, row_nfe=row_nfe, budgets=self.budgets,
                                  notes=list(plan.notes))
        yield StepEvent(step, block, torch.zeros_like(canvas, dtype=torch.bool), sequences, step_of,
                        torch.ones(b, dtype=torch.bool, device=device), self.nfe, done=True, output=output)


def _resolve_config(config: SamplingConfig | None, options: dict) -> SamplingConfig:
    base = config if config is not None else SamplingConfig()
    return base.replace(**options) if options else base


def stream(model: nn.Module, prompt_ids: torch.Tensor, *, config: SamplingConfig | None = None,
           attention_mask: torch.Tensor | None = None, decode: Callable[[list[int]], str] | None = None,
           generator: torch.Generator | None = None, row_budgets: Sequence[int] | None = None,
           **options) -> Iterator[StepEvent]:
    """Iterate over the denoising steps: one `StepEvent` per step, then a final one with done=True whose `output`
    is the `GenerationOutput` (without history). Options are `SamplingConfig` fields. `row_budgets`: a
    max_new_tokens per row instead of gen_length (the server's rows of one batch, each with its own budget)."""
    cfg = _resolve_config(config, options)
    return _Decoder(model, prompt_ids, attention_mask, cfg, decode, generator, row_budgets).events()


def generate(model: nn.Module, prompt_ids: torch.Tensor, *, config: SamplingConfig | None = None,
             attention_mask: torch.Tensor | None = None, decode: Callable[[list[int]], str] | None = None,
             generator: torch.Generator | None = None, return_history: bool = False,
             callback: Callable[[StepEvent], None] | None = None, **options) -> GenerationOutput:
    """Sample continuations of `prompt_ids` (B, P), left-padded with `attention_mask` (B, P) when rows differ.

    Options are `SamplingConfig` fields (gen_length/max_new_tokens, steps, block_length, remasking, temperature,
    cfg_scale, mask_id, variable_length, threshold, factor, cache, top_k, top_p, eos_token_id, eot_token_id,
    forbid_eos, eos_confidence, stop_token_ids, stop_strings, end_think_ids, end_think_boost, end_think_power,
    seed, ...). `decode` (token ids -> text) is needed for stop_strings; `callback` sees every StepEvent.
    Every row generates at most max_new_tokens (exactly that many when nothing stops it), capped by the model
    context after its own prompt; `output.notes` says when a cap applied.
    """
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    output = None
    for event in stream(model, prompt_ids, config=config, attention_mask=attention_mask, decode=decode,
                        generator=generator, **options):
        if callback is not None:
            callback(event)
        if event.done:
            output = event.output
        elif return_history:
            history.append((event.canvas, event.step_of))
    assert output is not None
    if return_history:
        output.history = history
    return output
