"""Greedy left-to-right decoding with a growing KV cache, for causal models (`--objective ar` baselines).

The diffusion `KVCache` of `illada.model` splices keys/values over a fixed canvas and never writes them back, so
this module runs the same modules incrementally with its own preallocated cache: one prefill pass over the
prompt, then one pass per new token that computes only that token and its last-position logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from illada.errors import IlladaError
from illada.model import Transformer, apply_rope, rope_cos_sin
from illada.sampling.generate import GenerationOutput


class _GrowingCache:
    def __init__(self, model: Transformer, batch: int, length: int) -> None:
        cfg = model.config
        p = model.embed_tokens.weight
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        self.keys = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layers)]
        self.values = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layers)]


def _forward_new(model: Transformer, ids: torch.Tensor, start: int, cache: _GrowingCache,
                 positions: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Logits (B, V) of the last of tokens `ids` (B, n) placed in cache columns start..start+n-1 at rotary
    `positions` (B, n); their keys/values are written into the cache. Only the prefill (start 0) has n > 1.
    `key_valid` (B, start+n): False for left-padding columns, None when there is no padding."""
    cfg = model.config
    b, n = ids.shape
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    mask = None
    if key_valid is not None:  # causal over the columns, and never a padding key
        causal = torch.ones(n, start + n, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        itself = torch.zeros_like(causal)
        itself[torch.arange(n), start + torch.arange(n)] = True  # a padding query sees itself: finite, never NaN
        mask = (causal[None, None] & key_valid[:, None, None, :]) | itself
    x = model.embed_tokens(ids)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, n, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, n, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.keys[i][:, :, start:start + n] = k
        cache.values[i][:, :, start:start + n] = v
        keys, values = cache.keys[i][:, :, :start + n], cache.values[i][:, :, :start + n]
        # Prefill: causal over the prompt. A single new token attends to everything before it: no mask needed
        # unless the batch is padded.
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and n > 1,
                                           enable_gqa=cfg.n_kv_heads != cfg.n_heads)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(b, n, cfg.n_heads * cfg.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x[:, -1]))


@torch.no_grad()
def greedy_generate_ar(model: Transformer, prompt_ids: torch.Tensor, max_new_tokens: int,
                       eos_token_id: int | None = None, attention_mask: torch.Tensor | None = None) -> GenerationOutput:
    """Greedy continuation of prompts (B, P), left-padded with `attention_mask` (B, P) as in `generate`, by a
    causal model; stops when every row has emitted EOS or used its budget. Each row's budget is max_new_tokens
    capped by the context after its own prompt (`output.budgets`; a note when capped), so a padded row gives what
    it gives alone.

    `nfe` counts forward passes (prefill + one per further token)."""
    cfg = model.config
    if not cfg.causal:
        raise IlladaError("autoregressive decoding needs a causal model (trained with --objective ar)")
    if max_new_tokens < 1:
        raise IlladaError("max_new_tokens must be positive")
    device = model.embed_tokens.weight.device
    prompt_ids = torch.as_tensor(prompt_ids, device=device).long()
    b, p = prompt_ids.shape
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=device).bool()
        if attention_mask.shape != prompt_ids.shape:
            raise IlladaError("attention_mask must have the shape of prompt_ids")
    lens = attention_mask.sum(-1) if attention_mask is not None else torch.full((b,), p, device=device)
    if p < 1 or int(lens.min()) < 1:
        raise IlladaError("the prompt must not be empty")
    if int(lens.max()) >= cfg.max_seq_len:
        raise IlladaError(f"the prompt ({int(lens.max())} tokens) fills the model context ({cfg.max_seq_len} tokens)")
    budgets = (cfg.max_seq_len - lens).clamp(max=max_new_tokens)
    notes = [f"{f'row {r}: ' if b > 1 else ''}max_new_tokens {max_new_tokens} capped to {int(budgets[r])}: the "
             f"prompt ({int(lens[r])} tokens) leaves {int(budgets[r])} of the model context ({cfg.max_seq_len} "
             "tokens)" for r in range(b) if int(budgets[r]) < max_new_tokens]
    max_new_tokens = int(budgets.max())
    key_valid = None
    if attention_mask is not None and not bool(attention_mask.all()):
        key_valid = torch.cat([attention_mask, attention_mask.new_ones(b, max_new_tokens)], dim=1)
    if key_valid is None:
        positions = torch.arange(p, device=device).expand(b, p)
    else:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    next_position = positions[:, -1:] + 1
    cache = _GrowingCache(model, b, p + max_new_tokens)
    out = torch.empty(b, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    logits = _forward_new(model, prompt_ids, 0, cache, positions, None if key_valid is None else key_valid[:, :p])
    nfe, produced = 1, 0
    for t in range(max_new_tokens):
        token = logits.argmax(-1)
        out[:, t] = token
        produced = t + 1
        finished |= budgets <= produced
        if eos_token_id is not None:
            finished |= token == eos_token_id
        if bool(finished.all()):
            break
        if t + 1 < max_new_tokens:
            column = p + t
            logits = _forward_new(model, token[:, None], column, cache, next_position + t,
                                  None if key_valid is None else key_valid[:, :column + 1])
            nfe += 1
    gen = out[:, :produced]
    in_budget = torch.arange(produced, device=device)[None, :] < budgets[:, None]
    if eos_token_id is not None:
        is_eos = (gen == eos_token_id) & in_budget
        lengths = torch.where(is_eos.any(-1), is_eos.long().argmax(-1), budgets.clamp(max=produced))
    else:
        lengths = budgets.clamp(max=produced)
    # past a row's stop or budget: its EOS, then padding (the columns another row of the batch still used)
    pad = eos_token_id if eos_token_id is not None else 0
    gen = torch.where(torch.arange(produced, device=device)[None, :] < lengths[:, None] + (eos_token_id is not None),
                      gen, torch.full_like(gen, pad))
    # a row's own passes: one per token it generated, its EOS included (the prefill gives the first)
    ended = lengths < budgets.clamp(max=produced)  # stopped by EOS, which took one more pass
    row_nfe = torch.clamp(lengths + ended.long(), min=1, max=nfe)
    return GenerationOutput(sequences=torch.cat([prompt_ids, gen], dim=1), nfe=nfe, generated_lengths=lengths,
                            tokens_per_forward=produced / nfe, prompt_length=p, row_nfe=row_nfe, budgets=budgets,
                            notes=notes)
