"""Likelihood of a continuation under a masked diffusion LM (reference §6.1), and the corpus-level ELBO.

For a continuation r (length L) after a context p, with the context never masked:

    log p(r | p) >= E_{l ~ U{1..L}} [ (L / l) * sum_{i masked} log p_theta(r_i | p, r_l) ]

where r_l has exactly l of its L tokens masked, chosen uniformly without replacement. `mc_loglikelihood` averages
`mc_num` samples of that bound with the masked counts stratified: sample j of n = mc_num draws
l = floor((j + u) / n * L) + 1 with one u ~ U[0, 1), which is unbiased for the expectation over l and has lower
variance than independent draws. For L = 1 every sample is the same exact value, so one pass is made.

Determinism: each (context, continuation) pair draws its masks from its own generator seeded with `seed`, so a
pair's value does not depend on which other pairs share its batch (and candidates of equal length share masking
patterns: common random numbers, which lowers the variance of their differences).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from illada.errors import IlladaError

Tokens = Sequence[int]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def config_value(model: nn.Module, name: str) -> int | None:
    return getattr(getattr(model, "config", None), name, None)


def resolve_mask_id(model: nn.Module, mask_id: int | None) -> int:
    mask_id = mask_id if mask_id is not None else config_value(model, "mask_token_id")
    if mask_id is None:
        raise IlladaError("scoring needs mask_id (the model config has no mask_token_id)")
    return int(mask_id)


def as_pairs(context_ids: Tokens | Sequence[Tokens],
             continuation_ids: Tokens | Sequence[Tokens]) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """Normalise the accepted argument forms to a list of (context, continuation) pairs.

    One continuation (a list of ints) gives one pair (`single` = True); a list of continuations gives one pair each,
    sharing the context if `context_ids` is one list of ints, else zipped with a list of contexts.
    """
    def is_tokens(x) -> bool:
        if isinstance(x, torch.Tensor):
            return x.dim() == 1
        return isinstance(x, Sequence) and not isinstance(x, str) and all(isinstance(t, int) for t in x)

    def as_list(x) -> list[int]:
        return [int(t) for t in (x.tolist() if isinstance(x, torch.Tensor) else x)]

    single = is_tokens(continuation_ids)
    continuations = [as_list(continuation_ids)] if single else [as_list(c) for c in continuation_ids]
    if is_tokens(context_ids):
        contexts = [as_list(context_ids)] * len(continuations)
    else:
        contexts = [as_list(c) for c in context_ids]
        if len(contexts) != len(continuations):
            raise IlladaError(f"{len(contexts)} contexts for {len(continuations)} continuations")
    for cont in continuations:
        if not cont:
            raise IlladaError("empty continuation: nothing to score")
    return list(zip(contexts, continuations)), single


def check_fits(model: nn.Module, pairs: list[tuple[list[int], list[int]]], extra: int = 0) -> None:
    limit = config_value(model, "max_seq_len")
    if limit is None:
        return
    for ctx, cont in pairs:
        if len(ctx) + len(cont) + extra > limit:
            raise IlladaError(f"context ({len(ctx)} tokens) + continuation ({len(cont)}) exceed the model's "
                              f"context of {limit}")


def left_pad_rows(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, attention_mask) with left padding; the mask is None when all rows have the same length. Positions are
    counted over real tokens, so a padded row gives the logits it gives alone."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


def guided_logits(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  context_cols: torch.Tensor, mask_id: int, cfg_scale: float) -> torch.Tensor:
    """Float32 logits (B, L, V); with cfg_scale w > 0, unsupervised CFG: uncond + (w + 1)(cond - uncond), the
    unconditional input having the context tokens (`context_cols`, (B, L) bool) replaced by masks."""
    if cfg_scale == 0:
        return model(ids, attention_mask=attention_mask).float()
    uncond = torch.where(context_cols, torch.full_like(ids, mask_id), ids)
    both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    cond, unc = model(torch.cat([ids, uncond]), attention_mask=both_mask).float().chunk(2)
    return unc + (cfg_scale + 1) * (cond - unc)


def _sample_masks(length: int, count: int, generator: torch.Generator) -> list[list[int]]:
    """`count` masked-position sets for a continuation of `length`, with l stratified over the `count` samples."""
    u = torch.rand((), generator=generator).item()
    sets = []
    for j in range(count):
        l = min(int((j + u) / count * length) + 1, length)
        sets.append(torch.randperm(length, generator=generator)[:l].tolist())
    return sets


@torch.no_grad()
def mc_loglikelihood(
    model: nn.Module,
    context_ids: Tokens | Sequence[Tokens],
    continuation_ids: Tokens | Sequence[Tokens],
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    suffix_ids: Tokens | Sequence[Tokens] | None = None,
) -> float | list[float]:
    """Monte Carlo lower bound on log p(continuation | context) in nats (reference §6.1).

    `continuation_ids` is one token list (returns a float) or a list of them (returns a list; `context_ids` is then
    one shared context or one per continuation). `batch_size` rows per forward pass (the values do not depend on
    it); a continuation of length 1 costs one row (exact), any other `mc_num` rows. Deterministic given `seed`.
    With `eos_id`, one EOS follows the continuation (context + continuation + EOS, the published iLLaDA input).
    `suffix_ids` (one token list, or one per continuation): visible text after the continuation, so the value is
    the infill likelihood log p(gap | prefix, suffix) (before the EOS, if any; context for CFG too).
    """
    if mc_num < 1 or batch_size < 1:
        raise IlladaError(f"mc_num and batch_size must be >= 1, got {mc_num} and {batch_size}")
    if cfg_scale < 0:
        raise IlladaError(f"cfg_scale must be >= 0, got {cfg_scale}")
    mask_id = resolve_mask_id(model, mask_id)
    pairs, single = as_pairs(context_ids, continuation_ids)
    eos_tail = [] if eos_id is None else [int(eos_id)]
    if isinstance(suffix_ids, torch.Tensor):
        suffix_ids = suffix_ids.tolist()
    if suffix_ids is None:
        suffixes = [[] for _ in pairs]
    elif len(suffix_ids) and isinstance(suffix_ids[0], (list, tuple)):
        suffixes = [[int(t) for t in s] for s in suffix_ids]
        if len(suffixes) != len(pairs):
            raise IlladaError(f"suffix_ids: one per continuation expected ({len(pairs)}), got {len(suffixes)}")
    else:
        suffixes = [[int(t) for t in suffix_ids]] * len(pairs)
    tails = [suffix + eos_tail for suffix in suffixes]  # visible tokens after each continuation
    check_fits(model, pairs, extra=max(len(t) for t in tails))
    device = model_device(model)

    # Every row: (pair index, masked positions of the continuation, weight L / l).
    rows: list[tuple[int, list[int], float]] = []
    for index, (_, cont) in enumerate(pairs):
        generator = torch.Generator().manual_seed(seed)
        count = 1 if len(cont) == 1 else mc_num
        for masked in _sample_masks(len(cont), count, generator):
            rows.append((index, masked, len(cont) / len(masked)))

    totals = [0.0] * len(pairs)
    counts = [0] * len(pairs)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        token_rows, targets = [], []
        for index, masked, _ in chunk:
            ctx, cont = pairs[index]
            noisy = list(cont)
            for i in masked:
                noisy[i] = mask_id
            token_rows.append(ctx + noisy + tails[index])
            targets.append((len(ctx), cont, masked, tails[index]))
        ids, attention_mask = left_pad_rows(token_rows, mask_id, device)
        width = ids.shape[1]
        context_cols = torch.zeros_like(ids, dtype=torch.bool)
        for r, (n_ctx, cont, _, tail) in enumerate(targets):
            first = width - len(tail) - len(cont) - n_ctx
            context_cols[r, first:first + n_ctx] = True
            context_cols[r, width - len(tail):width - len(eos_tail)] = True  # the suffix is context too
        logp = torch.log_softmax(guided_logits(model, ids, attention_mask, context_cols, mask_id, cfg_scale), -1)
        for r, ((index, _, weight), (n_ctx, cont, masked, tail)) in enumerate(zip(chunk, targets)):
            first = width - len(tail) - len(cont)
            cols = torch.tensor([first + i for i in masked], device=device)
            gold = torch.tensor([cont[i] for i in masked], device=device)
            totals[index] += weight * logp[r, cols, gold].sum().item()
            counts[index] += 1
    values = [t / c for t, c in zip(totals, counts)]
    return values[0] if single else values


@torch.no_grad()
def check_one_token(continuations: Sequence[Sequence[int]]) -> None:
    for cont in continuations:
        if len(cont) != 1:
            raise IlladaError(f"exact scoring needs one-token continuations, got {len(cont)} tokens; "
                              "use method 'mc' or 'confidence'")


@torch.no_grad()
def next_token_logprobs(model: nn.Module, contexts: Sequence[Sequence[int]], *, batch_size: int = 32,
                        mask_id: int | None = None, eos_id: int | None = None) -> dict[tuple[int, ...], torch.Tensor]:
    """log p(. | context) at one masked position after each distinct context: (V,) float32 per context, one
    forward row per distinct context however many candidates share it. With `eos_id` the row is
    context + [MASK] + EOS (the published iLLaDA MMLU input, mc_num 1), else context + [MASK]."""
    mask_id = resolve_mask_id(model, mask_id)
    tail = [] if eos_id is None else [int(eos_id)]
    unique = list(dict.fromkeys(tuple(int(t) for t in c) for c in contexts))
    check_fits(model, [(list(c), [mask_id]) for c in unique], extra=len(tail))
    device = model_device(model)
    out: dict[tuple[int, ...], torch.Tensor] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start:start + batch_size]
        ids, attention_mask = left_pad_rows([list(c) + [mask_id] + tail for c in chunk], mask_id, device)
        at = -1 - len(tail)  # the masked position
        logprobs = torch.log_softmax(model(ids, attention_mask=attention_mask)[:, at].float(), dim=-1).cpu()
        out.update(zip(chunk, logprobs))
    return out


def token_loglikelihood(
    model: nn.Module,
    context_ids: Tokens | Sequence[Tokens],
    continuation_ids: Tokens | Sequence[Tokens],
    *,
    batch_size: int = 32,
    mask_id: int | None = None,
    eos_id: int | None = None,
) -> float | list[float]:
    """Exact log p(token | context) for one-token continuations: one pass with the token masked (MMLU-style
    letter answers, reference §6.3 "single-token MC, mc_num 1"); candidates sharing a context share its pass.
    `eos_id`: an EOS after the mask (context + [MASK] + EOS, as the published iLLaDA eval)."""
    pairs, single = as_pairs(context_ids, continuation_ids)
    check_one_token([r for _, r in pairs])
    table = next_token_logprobs(model, [c for c, _ in pairs], batch_size=batch_size, mask_id=mask_id, eos_id=eos_id)
    values = [float(table[tuple(c)][r[0]]) for c, r in pairs]
    return values[0] if single else values


@dataclass
class CorpusElbo:
    """Diffusion ELBO of a token stream: `nll` nats/token (upper bound on the NLL), `perplexity_bound` = exp(nll),
    `stderr` across batches of rows (Monte Carlo + data variation; nan for one batch), `tokens` scored, `rows` of
    at most seq_len."""

    nll: float
    perplexity_bound: float
    stderr: float
    tokens: int
    rows: int

    def to_dict(self) -> dict:
        return dict(nll=self.nll, perplexity_bound=self.perplexity_bound, stderr=self.stderr, tokens=self.tokens,
                    rows=self.rows)


@torch.no_grad()
def corpus_elbo(
    model: nn.Module,
    token_ids: Tokens | torch.Tensor,
    *,
    seq_len: int | None = None,
    num_samples: int = 16,
    batch_size: int = 8,
    mask_id: int | None = None,
    seed: int = 0,
    eps: float = 1e-3,
) -> CorpusElbo:
    """The pre-training ELBO (reference §3) of a token stream cut into rows of `seq_len` (default: the model's
    context), each row scored with `num_samples` stratified masking levels; the last, shorter row is scored at its
    own length. Rows are weighted by their token counts."""
    from illada.diffusion import elbo_nll

    mask_id = resolve_mask_id(model, mask_id)
    stream = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if stream.numel() == 0:
        raise IlladaError("corpus ELBO of an empty token stream")
    seq_len = seq_len or config_value(model, "max_seq_len") or 256
    limit = config_value(model, "max_seq_len")
    if limit is not None and seq_len > limit:
        raise IlladaError(f"seq_len {seq_len} exceeds the model's context of {limit}")
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    full = stream.numel() // seq_len
    # One value per batch of rows (nats/token, tokens): the standard error is taken across batches.
    per_batch: list[tuple[float, int]] = []
    body = stream[: full * seq_len].view(full, seq_len).to(device)
    for start in range(0, full, batch_size):
        chunk = body[start:start + batch_size]
        value = elbo_nll(model, chunk, mask_id, num_samples=num_samples, generator=generator, eps=eps)
        per_batch.append((value.item(), chunk.numel()))
    tail = stream[full * seq_len:]
    if tail.numel():
        value = elbo_nll(model, tail[None].to(device), mask_id, num_samples=num_samples, generator=generator, eps=eps)
        per_batch.append((value.item(), tail.numel()))
    tokens = sum(n for _, n in per_batch)
    nll = sum(v * n for v, n in per_batch) / tokens
    if len(per_batch) > 1:
        var = sum(n * (v - nll) ** 2 for v, n in per_batch) / tokens
        stderr = math.sqrt(var / (len(per_batch) - 1))
    else:
        stderr = float("nan")
    return CorpusElbo(nll=nll, perplexity_bound=math.exp(nll), stderr=stderr, tokens=tokens,
                      rows=full + (1 if tail.numel() else 0))
