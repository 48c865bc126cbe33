"""Training losses: masked-diffusion pre-training (LLaDA/iLLaDA), LLaDA's SFT on pairs, and next-token prediction.

Reference §3: for a clean row x0 of length L, t ~ U(0, 1], p = (1 - eps) t + eps, every token masked with
probability p, and

    loss = sum over masked positions of -log p_theta(x0_i | x_t) / p,   divided by batch * L (all tokens).

Its expectation is an upper bound on the NLL per token (an ELBO), so exp(loss) bounds the perplexity.

- iLLaDA's variable-length SFT *is* `pretrain_loss` on the packed stream of `prompt + response + EOS` examples
  (every token maskable, same random split): use `DiffusionObjective` on such a dataset; nothing SFT-specific.
- LLaDA's SFT (`sft_pairs_loss`): prompt never masked, response EOS-padded (the padding counted as normal tokens),
  each row normalised by its answer length (padding included), then averaged over the batch. Optionally
  (`clean_prefix_prob`) a row also keeps a random response prefix clean, as block diffusion (BD3-LM) trains, and
  (`clean_prefix_block`) only a block after that prefix is noised, the rest of the response wholly masked: the
  canvas of semi-autoregressive decoding, with the loss on the block.
- `sft_blocks_loss`: SFT of a block-causal model (Fast-dLLM v2, SDAR): the response cut into blocks, each
  block noised at its own rate and denoised seeing the clean tokens before it, all blocks in one forward.
- `ar_loss`: the autoregressive baseline (`--objective ar`, the same backbone built with `causal=True`).

Every loss returns `(loss, stats)`; stats are detached tensors (no host sync), the trainer converts them.
An `Objective` maps `(model, batch, generator)` to that pair, so the trainer can swap them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from illada.diffusion.noise import forward_mask, mask_probability, sample_t
from illada.errors import IlladaError

Stats = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------- core losses
def diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p_mask: torch.Tensor,
    *,
    normaliser: float | torch.Tensor,
) -> torch.Tensor:
    """Sum over masked positions of CE(logits, target) / p, divided by `normaliser`. `p_mask`: (B,) one rate per
    row, or (B, L) one per token (block-causal SFT masks each block at its own rate).

    `normaliser`: a number (or 0-dim tensor) dividing the total, or a (B,) tensor dividing each row's sum before
    the rows are added. Cross-entropy is computed in float32 on the masked positions only: gathering them first
    keeps the float32 copy of the (B, L, V) logits down to the masked rows.
    """
    rows, cols = masked.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows, cols].float(), targets[rows, cols], reduction="none")
    weight = 1.0 / (p_mask.float()[rows] if p_mask.ndim == 1 else p_mask.float()[rows, cols])
    if torch.is_tensor(normaliser) and normaliser.ndim == 1:
        return (ce * weight / normaliser.float()[rows]).sum()
    return (ce * weight).sum() / normaliser


def _mask_stats(masked: torch.Tensor, p_mask: torch.Tensor, eps: float) -> Stats:
    return {
        "masked_tokens": masked.sum().detach(),
        "mask_rate": masked.float().mean().detach(),
        "t_mean": ((p_mask - eps) / (1.0 - eps)).mean().detach(),
    }


def pretrain_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    mask_id: int,
    *,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    segment_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """The pre-training loss of reference §3 on clean rows (B, L): masked CE / p summed, divided by B * L.

    `segment_ids` (B, L): block-diagonal attention (the iLLaDA split). `attention_mask` (B, L): padding is never
    masked and not counted in the normaliser (the real-token count, = B * L without padding). `t` (B,) fixes t.
    """
    maskable = attention_mask.bool() if attention_mask is not None else None
    noisy, masked, p_mask = forward_mask(input_ids, mask_id, eps=eps, t=t, generator=generator, maskable=maskable)
    logits = model(noisy, attention_mask=attention_mask, segment_ids=segment_ids)
    normaliser = input_ids.numel() if attention_mask is None else attention_mask.sum().clamp(min=1)
    loss = diffusion_loss(logits, input_ids, masked, p_mask, normaliser=normaliser)
    return loss, _mask_stats(masked, p_mask, eps)


def sft_pairs_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    mask_id: int,
    *,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    clean_prefix: torch.Tensor | None = None,
    block: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """LLaDA SFT on rows `prompt + response + EOS padding` (B, L) with `prompt_lengths` (B,).

    Prompt tokens are never masked; the EOS padding is an ordinary target. Each row's sum of CE / p over its masked
    response tokens is divided by its maskable length (L - prompt_length, padding included); rows are averaged.
    `clean_prefix` (B,): that many leading response tokens of each row are also kept clean (see
    `random_clean_prefix`), and the row is normalised by what remains maskable.
    `block` (B,): only that many tokens after the clean part are noised (at rate t) and scored; every later token
    is masked outright and carries no loss, and the row is normalised by its block's length.
    """
    b, length = input_ids.shape
    device = input_ids.device
    visible = prompt_lengths.to(device)
    if clean_prefix is not None:
        visible = visible + clean_prefix.to(device)
    positions = torch.arange(length, device=device)[None, :]
    maskable = positions >= visible[:, None]
    future = torch.zeros_like(maskable)
    if block is not None:
        future = positions >= (visible + block.to(device))[:, None]
        maskable = maskable & ~future
    noisy, masked, p_mask = forward_mask(input_ids, mask_id, eps=eps, t=t, generator=generator, maskable=maskable)
    if block is not None:
        noisy = noisy.masked_fill(future, mask_id)
    logits = model(noisy)
    answer_lengths = maskable.sum(dim=1).clamp(min=1).float()
    loss = diffusion_loss(logits, input_ids, masked, p_mask, normaliser=answer_lengths * b)
    stats = _mask_stats(masked, p_mask, eps)
    stats["answer_tokens"] = maskable.sum().detach()
    return loss, stats


def sft_blocks_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    mask_id: int,
    block_length: int,
    *,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """SFT of a block-causal model on rows `prompt + response + EOS padding` (B, L) with `prompt_lengths` (B,).

    The response is cut into blocks of `block_length` from its start (where the sampler's blocks start); block k
    of a row is masked at its own rate p = (1 - eps) t + eps (`t` (B, n_blocks) overrides the draw). The model sees
    the noisy row and the clean row side by side (2L tokens, both with positions 0..L-1): a noisy block attends to
    itself both ways and to the clean tokens before it, clean tokens attend causally, exactly the attention of
    `block_causal_pattern` when that block is decoded, so every block of every row is trained in one forward.
    With the model's shift (logits at i predict token i + 1) a block's first token is predicted from the clean
    token before it, as the sampler does. Loss: CE / p over masked response tokens, each row divided by its
    response length (padding included), rows averaged, as `sft_pairs_loss`.
    """
    b, length = input_ids.shape
    device = input_ids.device
    prompt = prompt_lengths.to(device)[:, None]
    pos = torch.arange(length, device=device)[None, :]
    response = pos >= prompt
    offset = (pos - prompt).clamp(min=0)
    block_id = torch.where(response, offset // block_length, torch.full_like(offset, -1))  # (B, L)
    n_blocks = (length - int(prompt.min()) + block_length - 1) // block_length
    if t is None:
        t = sample_t(b * n_blocks, generator=generator, device=device).view(b, n_blocks)
    p_block = mask_probability(t.to(device=device, dtype=torch.float32), eps)
    p_token = p_block.gather(1, block_id.clamp(min=0))
    masked = (torch.rand(b, length, generator=generator, device=device) < p_token) & response
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)

    # noisy queries: their own block, and clean keys before the block (prompt queries: clean keys up to themselves)
    block_start = torch.where(response, prompt + block_id * block_length, pos + 1)
    same_block = response[:, :, None] & (block_id[:, :, None] == block_id[:, None, :])
    sees_clean = pos[:, None, :] < block_start[:, :, None]
    causal = (pos[0][None, :] <= pos[0][:, None]).expand(b, length, length)
    pattern = torch.cat([torch.cat([same_block, sees_clean], dim=2),
                         torch.cat([torch.zeros_like(causal), causal], dim=2)], dim=1)[:, None]
    logits = model(torch.cat([noisy, input_ids], dim=1), position_ids=pos.repeat(1, 2).expand(b, 2 * length),
                   attention_pattern=pattern)
    aligned = logits[:, :length]  # the noisy row's logits predict its tokens
    if getattr(getattr(model, "config", None), "shift_logits", False):
        first = response & (offset % block_length == 0)  # predicted by the clean token before the block
        aligned = torch.where(first[:, :, None], logits[:, length:], aligned)
    answer_lengths = response.sum(dim=1).clamp(min=1).float()
    loss = diffusion_loss(aligned, input_ids, masked, p_token, normaliser=answer_lengths * b)
    stats = _mask_stats(masked, p_block, eps)
    stats["answer_tokens"] = response.sum().detach()
    return loss, stats


def random_clean_prefix(prompt_lengths: torch.Tensor, length: int, prob: float, *,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Block-diffusion-style SFT rows: with probability `prob` a row keeps U{0..A-1} leading response tokens
    clean (A = its response length with padding), else 0. Such a row is the canvas of semi-autoregressive decoding
    after its earlier blocks were committed, the state iLLaDA's block-by-block sampler actually meets; plain SFT
    masks the whole response and meets it rarely."""
    return _draw_clean_prefix(prompt_lengths, length, prob, generator)[0]


def _draw_clean_prefix(prompt_lengths, length, prob, generator):
    """(prefix lengths, chosen rows) of `random_clean_prefix`."""
    device = prompt_lengths.device
    b = prompt_lengths.shape[0]
    answer = (length - prompt_lengths).clamp(min=1)
    chosen = torch.rand(b, generator=generator, device=device) < prob
    u = torch.rand(b, generator=generator, device=device)
    return torch.where(chosen, (u * answer).long().clamp(max=answer - 1), torch.zeros_like(answer)), chosen


def random_block(batch: int, max_block: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Block lengths U{1..max_block} per row: one draw covers every block length a sampler may decode with."""
    u = torch.rand(batch, generator=generator, device=device)
    return (u * max_block).long().clamp(max=max_block - 1) + 1


def ar_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """Next-token cross-entropy (model built with `causal=True`), mean over the predicted tokens.

    With `segment_ids`, the first token of a segment is not predicted from the end of the previous one.
    """
    logits = model(input_ids, segment_ids=segment_ids)
    if segment_ids is None:
        valid = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    else:
        valid = segment_ids[:, 1:] == segment_ids[:, :-1]
    rows, cols = valid.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows, cols].float(), input_ids[rows, cols + 1], reduction="none")
    return ce.mean(), {"predicted_tokens": valid.sum().detach()}


def ar_pairs_loss(model: nn.Module, input_ids: torch.Tensor,
                  prompt_lengths: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """AR SFT on `prompt + response + EOS padding` rows (B, L): next-token cross-entropy on the response and its
    padding only (the tokens an sft-pairs MDM is trained to fill), mean over them."""
    logits = model(input_ids)
    targets = torch.arange(1, input_ids.shape[1], device=input_ids.device)[None, :]
    valid = targets >= prompt_lengths.to(input_ids.device)[:, None]
    rows, cols = valid.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows, cols].float(), input_ids[rows, cols + 1], reduction="none")
    return ce.mean(), {"predicted_tokens": valid.sum().detach()}


# ---------------------------------------------------------------------------------------- batch augmentations
def random_split_segments(input_ids: torch.Tensor, prob: float = 0.3, *,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """iLLaDA's split: segment ids (B, L) long; with probability `prob` a row is cut at a point U{1..L-1} into
    segments 0 and 1 (tokens before / from the point), else all 0. Rows of length 1 are never split."""
    b, length = input_ids.shape
    device = input_ids.device
    split = torch.rand(b, generator=generator, device=device) < prob
    point = torch.randint(1, max(length, 2), (b,), generator=generator, device=device)
    second = torch.arange(length, device=device)[None, :] >= point[:, None]
    return (second & split[:, None]).long()


def random_truncate(input_ids: torch.Tensor, prob: float = 0.01, *,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """LLaDA's variable length: with probability `prob` the whole batch is cut to a length U{1..L}."""
    length = input_ids.shape[1]
    if torch.rand(1, generator=generator, device=input_ids.device).item() < prob:
        keep = int(torch.randint(1, length + 1, (1,), generator=generator, device=input_ids.device).item())
        return input_ids[:, :keep]
    return input_ids


# -------------------------------------------------------------------------------------------------- objectives
class Objective(Protocol):
    """What the trainer calls: `objective(model, batch, generator) -> (loss, stats)`.

    A batch is a dict with `input_ids` (B, L) long and, for pairs, `prompt_lengths` (B,) long.
    """

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, Stats]: ...


def _check_probability(name: str, value: float, low_open: bool = False) -> None:
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise IlladaError(f"objective: {name} must be in {'(0, 1)' if low_open else '[0, 1]'}, got {value!r}")


@dataclass(frozen=True)
class DiffusionObjective:
    """Masked-diffusion pre-training, and iLLaDA's variable-length SFT on a packed prompt+response+EOS stream."""

    mask_id: int
    eps: float = 1e-3
    split_prob: float = 0.3       # iLLaDA: rows split into two independent segments
    truncate_prob: float = 0.0    # LLaDA: 0.01 of batches cut to a random length

    def __post_init__(self) -> None:
        _check_probability("eps", self.eps, low_open=True)
        _check_probability("split_prob", self.split_prob)
        _check_probability("truncate_prob", self.truncate_prob)

    def __call__(self, model, batch, generator=None):
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        if self.truncate_prob > 0:
            input_ids = random_truncate(input_ids, self.truncate_prob, generator=generator)
            if attention_mask is not None:
                attention_mask = attention_mask[:, : input_ids.shape[1]]
        segment_ids = None
        if self.split_prob > 0:
            segments = random_split_segments(input_ids, self.split_prob, generator=generator)
            split_rows = segments.any(dim=1).sum()
            # Without any split row, pass no segment ids: the unmasked (fused) attention path stays available.
            if split_rows.item() > 0:
                segment_ids = segments
        loss, stats = pretrain_loss(model, input_ids, self.mask_id, eps=self.eps, generator=generator,
                                    segment_ids=segment_ids, attention_mask=attention_mask)
        if self.split_prob > 0:
            stats["split_rows"] = split_rows.detach()
        stats["seq_len"] = torch.tensor(input_ids.shape[1])
        return loss, stats


@dataclass(frozen=True)
class SFTPairsObjective:
    """LLaDA SFT on EOS-padded prompt/response rows; the batch must hold `prompt_lengths`."""

    mask_id: int
    eps: float = 1e-3
    clean_prefix_prob: float = 0.0  # rows given a clean response prefix (random_clean_prefix)
    clean_prefix_block: int = 0  # > 0: those rows noise only a block of U{1..this} tokens after it (random_block)

    def __post_init__(self) -> None:
        _check_probability("eps", self.eps, low_open=True)
        _check_probability("clean_prefix_prob", self.clean_prefix_prob)
        if self.clean_prefix_block < 0 or (self.clean_prefix_block and not self.clean_prefix_prob):
            raise IlladaError("clean_prefix_block must be >= 0 and needs clean_prefix_prob > 0")

    def __call__(self, model, batch, generator=None):
        if "prompt_lengths" not in batch:
            raise IlladaError("objective sft-pairs needs prompt_lengths in the batch (a 'pairs' dataset)")
        input_ids, prompt_lengths = batch["input_ids"], batch["prompt_lengths"].to(batch["input_ids"].device)
        clean_prefix = block = None
        if self.clean_prefix_prob > 0:
            length = input_ids.shape[1]
            clean_prefix, chosen = _draw_clean_prefix(prompt_lengths, length, self.clean_prefix_prob, generator)
            if self.clean_prefix_block:  # the other rows stay plain SFT rows: their block is the whole response
                drawn = random_block(len(chosen), self.clean_prefix_block, generator=generator, device=chosen.device)
                block = torch.where(chosen, drawn, torch.full_like(drawn, length))
        loss, stats = sft_pairs_loss(model, input_ids, prompt_lengths, self.mask_id, eps=self.eps,
                                     generator=generator, clean_prefix=clean_prefix, block=block)
        if clean_prefix is not None:
            stats["clean_prefix_tokens"] = clean_prefix.sum().detach()
        return loss, stats


@dataclass(frozen=True)
class BlockCausalSFTObjective:
    """SFT of a block-causal model (`sft_blocks_loss`); the batch must hold `prompt_lengths`."""

    mask_id: int
    block_length: int = 8
    eps: float = 1e-3

    def __post_init__(self) -> None:
        _check_probability("eps", self.eps, low_open=True)
        if self.block_length < 1:
            raise IlladaError(f"sft-blocks: block_length must be >= 1, got {self.block_length}")

    def __call__(self, model, batch, generator=None):
        if "prompt_lengths" not in batch:
            raise IlladaError("objective sft-blocks needs prompt_lengths in the batch (a 'pairs' dataset)")
        return sft_blocks_loss(model, batch["input_ids"], batch["prompt_lengths"], self.mask_id, self.block_length,
                               eps=self.eps, generator=generator)


@dataclass(frozen=True)
class AutoregressiveObjective:
    """Next-token prediction for the AR baseline; `split_prob` applies the same random split as the diffusion
    objective so both see the same attention structure. On a pairs dataset: AR SFT (`ar_pairs_loss`)."""

    split_prob: float = 0.0

    def __post_init__(self) -> None:
        _check_probability("split_prob", self.split_prob)

    def __call__(self, model, batch, generator=None):
        input_ids = batch["input_ids"]
        if "prompt_lengths" in batch:  # a pairs dataset: AR SFT, the loss on the responses
            return ar_pairs_loss(model, input_ids, batch["prompt_lengths"])
        segment_ids = None
        if self.split_prob > 0:
            segments = random_split_segments(input_ids, self.split_prob, generator=generator)
            if segments.any().item():
                segment_ids = segments
        return ar_loss(model, input_ids, segment_ids)


# -------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def elbo_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    mask_id: int,
    *,
    num_samples: int = 16,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Monte Carlo estimate of the diffusion ELBO in nats/token (0-dim float32); exp() of it bounds the perplexity.

    The mean of `num_samples` pre-training losses with t stratified per row (sample k draws t in (k/K, (k+1)/K]):
    unbiased for the expectation over t ~ U(0, 1] and of lower variance than independent draws.
    """
    if num_samples < 1:
        raise IlladaError(f"elbo: num_samples must be at least 1, got {num_samples}")
    b = input_ids.shape[0]
    u = torch.rand(num_samples, b, generator=generator, device=input_ids.device)
    total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
    for k in range(num_samples):
        t = (k + 1.0 - u[k]) / num_samples
        loss, _ = pretrain_loss(model, input_ids, mask_id, eps=eps, generator=generator, t=t,
                                attention_mask=attention_mask)
        total += loss.float()
    return total / num_samples
