"""The iLLaDA/LLaDA network: a pre-norm Transformer with bidirectional attention.

Read top to bottom: RMSNorm, rotary embedding, attention, SwiGLU MLP, block, model. No sampling, no I/O and no
parallelism live here (see `illada.checkpoint` for formats, `illada.sampling` for decoding).

Attention masks are combined into one boolean (B, 1, Lq, Lk) mask for `scaled_dot_product_attention`:
key padding (`attention_mask`), block-diagonal packing (`segment_ids`), optional causality and an explicit
`attention_pattern` over the canvas (a block-causal model's: `block_causal_pattern`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from illada.config import ModelConfig
from illada.errors import IlladaError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 for bf16 stability, cast back before the weight multiply (as the checkpoints do).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, L, head_dim) in float32 for integer positions (B, L)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (B, L, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float()[:, None], angles.sin().float()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (Llama/NeoX) rotary embedding on (B, H, L, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@dataclass
class KVCache:
    """Per-layer keys/values (B, n_kv_heads, L, head_dim) of a whole canvas, for approximate diffusion caching.

    A forward with `kv_cache` and `cache_start=None` computes the full sequence and stores its keys/values.
    A forward with `cache_start=s` takes only tokens s..s+Lq as input: their keys/values are computed fresh and
    spliced over the cached ones, and their queries attend over the whole canvas (cached positions, then the new
    ones: the canvas may have grown past the cache). Only positions before `write_before` are written back.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    write_before: int = 0  # with cache_start: store the fresh keys/values of positions < write_before

    def __len__(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[2]


def _spliced(cached: torch.Tensor, fresh: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """`cached` (B, H, L, D) with positions start..end replaced by `fresh` (the sequence axis may change length)."""
    return torch.cat([cached[:, :, :start], fresh, cached[:, :, end:]], dim=2)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
        cache_start: int | None = None,
    ) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            if cache_start is None:
                if len(kv_cache.keys) == self.layer_idx:
                    kv_cache.keys.append(k)
                    kv_cache.values.append(v)
                else:
                    kv_cache.keys[self.layer_idx], kv_cache.values[self.layer_idx] = k, v
            else:
                ck, cv = kv_cache.keys[self.layer_idx], kv_cache.values[self.layer_idx]
                kept = kv_cache.write_before - cache_start
                if kept > 0:  # the cache may end before these positions (a canvas that grew): rebuilt, not written
                    w = kv_cache.write_before
                    kv_cache.keys[self.layer_idx] = _spliced(ck, k[:, :, :kept], cache_start, w)
                    kv_cache.values[self.layer_idx] = _spliced(cv, v[:, :, :kept], cache_start, w)
                end = cache_start + length
                k, v = _spliced(ck, k, cache_start, end), _spliced(cv, v, cache_start, end)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, length, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, is_causal, kv_cache=None, cache_start=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv_cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


def positions_from_masks(
    attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None, shape: tuple[int, int], device
) -> torch.Tensor:
    """Position ids (B, L): counted over real tokens only (left padding does not shift them), restarting at 0 at
    the start of every segment."""
    b, length = shape
    index = torch.arange(length, device=device).expand(b, length)
    if attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = index
    if segment_ids is not None:
        is_start = torch.ones_like(segment_ids, dtype=torch.bool)
        is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        start = torch.where(is_start, positions, torch.zeros_like(positions)).cummax(dim=-1).values
        positions = positions - start
    return positions


def block_causal_pattern(length: int, start: int, end: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, L, L) boolean: causal attention, except that positions start..end-1 (the block being denoised) also
    see each other. Committed tokens before the block never see it, so their keys/values are final."""
    index = torch.arange(length, device=device)
    in_block = (index >= start) & (index < end)
    allowed = (index[None, :] <= index[:, None]) | (in_block[:, None] & in_block[None, :])
    return allowed[None, None]


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    causal: bool,
    q_len: int,
    k_len: int,
    q_offset: int = 0,
    device: torch.device | str | None = None,
    pattern: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean (B, 1, Lq, Lk) mask, True where attention is allowed; None when nothing is masked. `pattern`
    (B or 1, 1, >= q_offset + Lq, Lk) spans the canvas: its rows for these queries are applied."""
    if attention_mask is None and segment_ids is None and not causal and pattern is None:
        return None
    q_index = torch.arange(q_offset, q_offset + q_len, device=device)
    k_index = torch.arange(k_len, device=device)
    allowed = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if pattern is not None:
        allowed = allowed & pattern[:, :, q_offset:q_offset + q_len, :k_len].to(device)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        q_seg = segment_ids[:, q_offset:q_offset + q_len]
        allowed = allowed & (q_seg[:, None, :, None] == segment_ids[:, None, None, :])
    if causal:
        allowed = allowed & (k_index[None, :] <= q_index[:, None])
    # Every query may see itself, so padding queries never have an empty row (which would give NaN); real queries
    # already see themselves, so their outputs are unchanged.
    return allowed | (k_index[None, :] == q_index[:, None])


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_start: int | None = None,
        attention_pattern: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, L, V) for token ids (B, L).

        attention_mask: (B, Lk) 1 for real tokens, 0 for padding keys. segment_ids: (B, L) ints; tokens attend
        only within their segment. attention_pattern: (B or 1, 1, Lk, Lk) boolean, True where a query may see a
        key (required by a block-causal model). With `cache_start`, `input_ids` are the tokens at positions
        cache_start..cache_start+L of a canvas whose keys/values `kv_cache` holds, and the masks span the canvas.
        """
        if self.config.block_causal and attention_pattern is None:
            raise IlladaError(f"{self.config.name} is block-causal: it runs only under the block sampler "
                              "(generate/chat/eval generation/serve), which tells it the block being decoded")
        b, length = input_ids.shape
        k_len = (max(len(kv_cache), cache_start + length) if (kv_cache is not None and cache_start is not None)
                 else length)
        q_offset = cache_start or 0
        if position_ids is None:
            full = positions_from_masks(attention_mask, segment_ids, (b, k_len), input_ids.device)
            position_ids = full[:, q_offset:q_offset + length]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        plain_causal = (self.config.causal and attention_mask is None and segment_ids is None
                        and attention_pattern is None and q_offset == 0 and k_len == length)
        if plain_causal:  # let SDPA pick its fused causal kernel
            mask = None
        else:
            mask = build_attention_mask(attention_mask, segment_ids, self.config.causal, length, k_len, q_offset,
                                        input_ids.device, attention_pattern)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, plain_causal, kv_cache, cache_start)
        logits = self.lm_head(self.norm(x))
        if self.config.shift_logits:  # position i's prediction comes from position i - 1 (the first repeats its own)
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Reference init: embeddings N(0, 1/(2*hidden)), linears N(0, initializer_range), output projections
        scaled by 1/sqrt(2*n_layers), norms 1."""
        cfg = self.config
        nn.init.normal_(self.embed_tokens.weight, std=math.sqrt(1.0 / (2 * cfg.hidden_size)), generator=generator)
        out_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                std = out_std if name.endswith(("o_proj", "down_proj")) else cfg.initializer_range
                nn.init.normal_(module.weight, std=std, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if not cfg.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.initializer_range, generator=generator)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a tied head counts once); non_embedding drops the embedding and the head."""
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            params.pop(id(self.embed_tokens.weight), None)
            params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(config: ModelConfig, device: str | torch.device | None) -> None:
    """Refuse, before allocating, a fresh CPU model whose float32 weights alone exceed the machine's RAM (they are
    all written by the initialisation, so it could only end in swapping or the OOM killer)."""
    if torch.device(device or "cpu").type != "cpu":
        return
    ram, need = physical_memory(), 4 * config.num_parameters()
    if ram is not None and need > ram:
        from illada.config import format_bytes

        raise IlladaError(f"a fresh {config.num_parameters():,}-parameter model needs {format_bytes(need)} for its "
                          f"float32 weights on cpu, more than this machine's {format_bytes(ram)} of memory")


def build_model(config: ModelConfig, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                seed: int | None = None) -> Transformer:
    """A freshly initialised model; `device='meta'` allocates nothing (for shapes and parameter counts)."""
    if str(device) != "meta":
        check_fits_in_memory(config, device)
    with torch.device(device or "cpu"):
        model = Transformer(config)
    if str(device) != "meta":
        generator = torch.Generator(device=model.embed_tokens.weight.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        model.init_weights(generator)
    if dtype is not None:
        model.to(dtype)
    return model
