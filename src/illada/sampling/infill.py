"""Filling holes anywhere in a canvas (text on both sides of every hole): the bidirectional model's own move.

A canvas is a (B, L) tensor of token ids; its holes are spans of columns (given per row, or the runs of
`mask_id`). Only the holes change: every other real token (the prefix, the suffix, the literal text between
holes) is kept exactly. All holes of a row are denoised together, with the same rules as `generate`:

- schedule: `steps` passes per row shared by its masked positions as the linear schedule does (the first
  `m % steps` steps commit one more); None: one position per pass (each row its own mask count);
- `threshold` / `factor` (parallel decoding): every confident position per pass, at least one;
- remasking rules low_confidence | margin | entropy | random, `temperature` (Gumbel-max), `top_k` / `top_p`,
  `forbid_eos`, `eos_confidence="neg_inf"`, `cfg_scale` (the unconditional input masks the context: every real
  token outside the holes; the committed hole tokens stay);
- `allow_shorter`: EOS / EOT / padding tokens the model commits at the *end* of a hole are dropped from that
  hole's tokens (`InfillOutput.span_tokens`), so a caller need not know the exact length.

The mask token is never a candidate; the confidence is measured on the full softmax (the mask keeps its share),
as in `generate`. Rows are padded with `attention_mask` (0 for padding keys, anywhere in the row); each row's
schedule comes from its own holes, so at temperature 0 a row gives exactly what it gives alone.

Caches (`cache="prefix" | "dual"`, the approximate KV caches of `generate`): the hole plays the block. The holes of
a row are then filled one after another, left to right (round h fills hole h of every row; a batch's window spans
them); each round starts with a full pass that stores every key/value (and again every `cache_refresh` passes),
and its other passes recompute only the window (dual) or the window to the end of the canvas (prefix), reading
the rest from the cache. `steps` is then shared among the holes in proportion to their lengths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from illada.errors import IlladaError
from illada.sampling.cache import BlockForward
from illada.sampling.config import token_ids
from illada.sampling.generate import StepEvent
from illada.sampling.remasking import propose, select_top
from illada.sampling.schedule import commit_counts, linear_schedule

Span = tuple[int, int]


@dataclass
class InfillConfig:
    """The sampler knobs that apply to a canvas with holes (names as in `SamplingConfig`)."""

    steps: int | None = None  # passes per row; None: one committed position per pass
    remasking: str = "low_confidence"
    temperature: float = 0.0
    cfg_scale: float = 0.0
    threshold: float | None = None
    factor: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    forbid_eos: bool = False
    eos_confidence: str = "normal"
    allow_shorter: bool = False
    cache: str = "none"  # prefix | dual: the holes are filled one after another, each a cached block
    cache_refresh: int | None = None  # also refresh the cache every k passes inside a hole
    mask_id: int | None = None
    eos_token_id: int | None = None
    eot_token_id: int | None = None
    pad_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        from illada.sampling.config import SamplingConfig

        if self.steps is not None and not (isinstance(self.steps, int) and not isinstance(self.steps, bool)
                                           and self.steps > 0):
            raise IlladaError(f"steps must be a positive integer, got {self.steps!r}")
        # the shared knobs are checked by the generation config itself (one set of rules and messages)
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("steps", "allow_shorter")}
        SamplingConfig(**shared)
        if self.cache == "committed":  # its blocks follow one another; the holes of a text need not
            raise IlladaError("cache 'committed' is for generation's blocks; infill takes none, prefix or dual")

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def knobs_of(cls, sampling) -> dict:
        """The decoding knobs of a `SamplingConfig` that apply to a canvas with holes: not its steps (counted per
        block there), seed or token ids (each caller sets its own)."""
        skip = {"steps", "seed", "mask_id", "eos_token_id", "eot_token_id", "pad_token_id"}
        return {name: getattr(sampling, name) for name in cls.option_names() - skip if hasattr(sampling, name)}

    @property
    def is_random(self) -> bool:
        return self.temperature > 0 or self.remasking == "random"

    def replace(self, **changes) -> "InfillConfig":
        unknown = sorted(set(changes) - self.option_names())
        if unknown:
            raise IlladaError(f"unknown infill option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


@dataclass
class InfillOutput:
    sequences: torch.Tensor  # (B, L): the canvas with every hole filled (nothing dropped)
    nfe: int  # forward passes (CFG counts 2 per pass)
    filled: int  # hole positions filled, over all rows
    row_nfe: torch.Tensor  # (B,) passes that had a hole left to fill in each row
    spans: list[list[Span]] = dataclasses.field(default_factory=list)  # per row: canvas columns of each hole
    span_tokens: list[list[list[int]]] = dataclasses.field(default_factory=list)  # per row, per hole (trimmed)
    attention_mask: torch.Tensor | None = None  # (B, L) as given: 0 for padding
    history: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per pass: (canvas, step_of)
    texts: list[str] | None = None  # set by DiffusionLM.infill/edit: the decoded result of each row
    fills: list[list[str]] | None = None  # set by DiffusionLM.infill/edit: each hole's decoded text

    def row_tokens(self, row: int) -> list[int]:
        """Row `row` as a token list: its real tokens with each hole replaced by its (trimmed) tokens."""
        seq = self.sequences[row].tolist()
        real = ([True] * len(seq) if self.attention_mask is None
                else self.attention_mask[row].bool().tolist())
        starts = {s: (e, toks) for (s, e), toks in zip(self.spans[row], self.span_tokens[row])}
        out, i = [], 0
        while i < len(seq):
            if i in starts:
                end, toks = starts[i]
                out += toks
                i = end
                continue
            if real[i]:
                out.append(seq[i])
            i += 1
        return out


def mask_runs(holes: Sequence[bool]) -> list[Span]:
    """Maximal runs of True as [start, end) spans."""
    spans, start = [], None
    for i, h in enumerate(list(holes) + [False]):
        if h and start is None:
            start = i
        elif not h and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _rounds(masked: torch.Tensor, row_spans: list[list[Span]], by_hole: bool):
    """(start, end, todo) of each round of passes: all holes together over the whole canvas; with a cache, hole h
    of every row in round h, the window spanning those holes (the cache's block: recomputed, the rest cached)."""
    if not by_hole:
        yield 0, masked.shape[1], masked.clone()
        return
    for h in range(max((len(spans) for spans in row_spans), default=0)):
        todo = torch.zeros_like(masked)
        for row, spans in enumerate(row_spans):
            if h < len(spans):
                todo[row, spans[h][0]:spans[h][1]] = True
        todo &= masked
        columns = todo.any(0).nonzero().flatten()
        if len(columns):
            yield int(columns[0]), int(columns[-1]) + 1, todo


def _round_steps(steps: int | None, counts: torch.Tensor, total: torch.Tensor, width: int) -> torch.Tensor:
    """Passes per row for a round filling `counts` (B,) positions: one per position, or `steps` (passes per row
    over all its holes) shared in proportion to the round's part of the row's `total` hole positions."""
    if steps is None:
        return counts.clamp(min=1)
    share = torch.ceil(counts.float() * min(steps, width) / total.clamp(min=1).float()).long()
    return torch.minimum(share.clamp(min=1), counts.clamp(min=1))


def _resolve_config(config: InfillConfig | None, options: dict) -> InfillConfig:
    base = config or InfillConfig()
    return base.replace(**options) if options else base


@torch.no_grad()
def infill_stream(model: nn.Module, canvas: torch.Tensor, *, spans: Sequence[Sequence[Span]] | None = None,
                  attention_mask: torch.Tensor | None = None, config: InfillConfig | None = None,
                  generator: torch.Generator | None = None, **options) -> Iterator[StepEvent]:
    """One `StepEvent` per pass over the canvas (block is always 0), then a final one with done=True whose
    `output` is the `InfillOutput`. `spans`: per row, the [start, end) columns of its holes (set to masks here,
    so the same call remasks and regenerates existing text); None: the runs of `mask_id` in the real tokens.
    Options are `InfillConfig` fields."""
    cfg = _resolve_config(config, options)
    x = torch.as_tensor(canvas)
    if x.dim() != 2 or x.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise IlladaError("canvas must be a (batch, length) integer tensor of token ids")
    device = next(model.parameters()).device
    x = x.long().clone().to(device)
    b, width = x.shape
    mask_id, eos_ids, _ = token_ids(cfg, model)
    model_config = getattr(model, "config", None)
    if getattr(model_config, "block_causal", False):
        raise IlladaError("infill needs attention both ways; this model is block-causal (its tokens never see "
                          "the text after them)")
    context_len = getattr(model_config, "max_seq_len", None)
    real = torch.ones_like(x, dtype=torch.bool)
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask).to(device)
        if attention_mask.shape != x.shape:
            raise IlladaError(f"attention_mask shape {tuple(attention_mask.shape)} != canvas shape {tuple(x.shape)}")
        real = attention_mask.bool()
        attention_mask = None if real.all() else real.long()
    if isinstance(context_len, int) and int(real.sum(-1).max()) > context_len:
        raise IlladaError(f"the canvas ({int(real.sum(-1).max())} tokens) exceeds the model context ({context_len})")

    if spans is None:
        holes = (x == mask_id) & real
        row_spans = [mask_runs(row) for row in holes.tolist()]
    else:
        if len(spans) != b:
            raise IlladaError(f"spans: one list per row expected ({b}), got {len(spans)}")
        holes = torch.zeros_like(real)
        row_spans = []
        for row, row_list in enumerate(spans):
            ordered = sorted((int(s), int(e)) for s, e in row_list)
            for i, (s, e) in enumerate(ordered):
                if not 0 <= s < e <= width or (i and s < ordered[i - 1][1]):
                    raise IlladaError(f"spans: row {row} has a bad or overlapping span ({s}, {e}) for width {width}")
                if not bool(real[row, s:e].all()):
                    raise IlladaError(f"spans: row {row} span ({s}, {e}) covers padding")
                holes[row, s:e] = True
            row_spans.append(ordered)
        x = torch.where(holes, torch.full_like(x, mask_id), x)
    context = real & ~holes  # never changed

    if generator is None and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    scheduled = cfg.threshold is None and cfg.factor is None
    masked = holes.clone()
    step_of = torch.full_like(x, -1)
    row_nfe = torch.zeros(b, dtype=torch.long, device=device)
    nfe, step, filled = 0, 0, int(masked.sum())
    user_bans = eos_ids if cfg.forbid_eos else []
    forward = BlockForward(model, cfg.cache, cfg.cache_refresh)
    uses_cfg = bool(cfg.cfg_scale)
    both_mask = None if attention_mask is None or not uses_cfg else torch.cat([attention_mask, attention_mask])

    for round_index, (start, end, todo) in enumerate(_rounds(masked, row_spans, cfg.cache != "none")):
        # todo: (B, L) the positions this round fills; the window [start, end) holds them in every row
        forward.reset()
        counts_per_row = todo.sum(-1)
        if scheduled:
            steps = _round_steps(cfg.steps, counts_per_row, holes.sum(-1), width)
            schedule = linear_schedule(counts_per_row, steps)
        limit = int(counts_per_row.max()) if b else 0
        i = 0
        while bool(todo.any()):
            if i > limit:  # every pass commits >= 1 position of every busy row
                raise RuntimeError("infill made no progress (bug)")
            row_nfe += todo.any(-1).long() * (2 if uses_cfg else 1)
            if uses_cfg:
                uncond = torch.where(context, torch.full_like(x, mask_id), x)
                cond, unc = forward(torch.cat([x, uncond]), both_mask, start, end, i).float().chunk(2)
                logits = unc + (cfg.cfg_scale + 1) * (cond - unc)
                nfe += 2
            else:
                logits = forward(x, attention_mask, start, end, i).float()
                nfe += 1
            candidates, confidence = propose(logits, mask_id, bans=user_bans, top_k=cfg.top_k, top_p=cfg.top_p,
                                             temperature=cfg.temperature, remasking=cfg.remasking,
                                             generator=generator,
                                             last_ids=eos_ids if cfg.eos_confidence == "neg_inf" else ())
            eligible = todo[:, start:end]
            counts = commit_counts(confidence, eligible, threshold=cfg.threshold, factor=cfg.factor,
                                   schedule=schedule if scheduled else None, step=i)
            commit = torch.zeros_like(todo)
            commit[:, start:end] = select_top(confidence, eligible, counts) & eligible
            x[:, start:end] = torch.where(commit[:, start:end], candidates, x[:, start:end])
            step_of.masked_fill_(commit, step)
            todo &= ~commit
            masked &= ~commit
            yield StepEvent(step, round_index, commit, x.clone(), step_of.clone(), ~masked.any(-1), nfe)
            step += 1
            i += 1

    drop = set(eos_ids) | ({cfg.pad_token_id} if cfg.pad_token_id is not None else set())
    drop.discard(mask_id)
    seq = x.tolist()
    span_tokens = []
    for row, row_list in enumerate(row_spans):
        tokens = []
        for s, e in row_list:
            piece = seq[row][s:e]
            while cfg.allow_shorter and piece and piece[-1] in drop:
                piece.pop()
            tokens.append(piece)
        span_tokens.append(tokens)
    output = InfillOutput(sequences=x, nfe=nfe, filled=filled, row_nfe=row_nfe, spans=row_spans,
                          span_tokens=span_tokens, attention_mask=attention_mask)
    yield StepEvent(step, 0, torch.zeros_like(holes), x, step_of, torch.ones(b, dtype=torch.bool, device=device),
                    nfe, done=True, output=output)  # type: ignore[arg-type]


def infill(model: nn.Module, canvas: torch.Tensor, *, spans: Sequence[Sequence[Span]] | None = None,
           attention_mask: torch.Tensor | None = None, config: InfillConfig | None = None,
           generator: torch.Generator | None = None, return_history: bool = False, **options) -> InfillOutput:
    """Fill the holes of `canvas` (see `infill_stream`); `return_history` keeps (canvas, step_of) per pass."""
    history, output = [], None
    for event in infill_stream(model, canvas, spans=spans, attention_mask=attention_mask, config=config,
                               generator=generator, **options):
        if event.done:
            output = event.output
        elif return_history:
            history.append((event.canvas, event.step_of))
    assert output is not None
    if return_history:
        output.history = history  # type: ignore[union-attr]
    return output  # type: ignore[return-value]


def fill_masks(model: nn.Module, canvas: torch.Tensor, mask_id: int, *, attention_mask: torch.Tensor | None = None,
               threshold: float | None = None) -> InfillOutput:
    """Fill every `mask_id` position of `canvas` (B, L) greedily, one position per pass (or, with `threshold`,
    every position above it, at least one); `attention_mask` marks padding keys (0) as in `generate`."""
    return infill(model, canvas, attention_mask=attention_mask, mask_id=mask_id, threshold=threshold)
