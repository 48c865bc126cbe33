"""The network against an independent naive implementation and the attention-mask contracts."""
import math

import pytest
import torch

from illada.config import ModelConfig, preset
from illada.errors import IlladaError
from illada.model import KVCache, build_model


def naive_forward(model, ids: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Single-sequence reference: explicit softmax attention, complex-number RoPE, repeated kv heads."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    length, hd = ids.shape[0], cfg.head_dim
    x = sd["embed_tokens.weight"][ids]

    def norm(v, w):
        return w * v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rope(t):  # t: (heads, L, hd); pairs (j, j + hd/2) rotate as complex numbers
        half = hd // 2
        freqs = torch.tensor([cfg.rope_theta ** (-2 * j / hd) for j in range(half)], dtype=torch.float64)
        angle = torch.arange(length, dtype=torch.float64)[:, None] * freqs
        z = torch.complex(t[..., :half], t[..., half:]) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], -1)

    rep = cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(length, cfg.n_heads, hd).transpose(0, 1)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(length, cfg.n_kv_heads, hd).transpose(0, 1)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(length, cfg.n_kv_heads, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scores = q @ k.transpose(1, 2) / math.sqrt(hd)
        if causal:
            scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
        att = scores.softmax(-1) @ v
        x = x + att.transpose(0, 1).reshape(length, -1) @ sd[p + "self_attn.o_proj.weight"].T
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["embed_tokens.weight"]
    return norm(x, sd["norm.weight"]) @ head.T


@pytest.mark.parametrize("tied,kv_heads,causal", [(True, 2, False), (False, 4, False), (True, 1, True)])
def test_matches_naive_reference(tied, kv_heads, causal):
    cfg = preset("tiny", tie_word_embeddings=tied, n_kv_heads=kv_heads, causal=causal, rope_theta=500.0)
    model = build_model(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    for row in range(2):
        expected = naive_forward(model, ids[row], causal=causal)
        torch.testing.assert_close(logits[row].double(), expected, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = build_model(preset("tiny", n_heads=4, n_kv_heads=2), seed=2)
    mha = build_model(preset("tiny", n_heads=4, n_kv_heads=4), seed=3)
    state = gqa.state_dict()
    hd = gqa.config.head_dim
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            heads = value.view(2, hd, -1)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    ids = torch.randint(0, 128, (3, 9))
    torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)


def test_bidirectional_sees_the_future_and_causal_does_not():
    for causal, should_change in ((False, True), (True, False)):
        model = build_model(preset("tiny", causal=causal), seed=4)
        ids = torch.randint(0, 128, (1, 8))
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % 128
        diff = (model(ids)[0, 0] - model(changed)[0, 0]).abs().max().item()
        assert (diff > 1e-4) == should_change, (causal, diff)


@pytest.mark.parametrize("causal", [False, True])
def test_left_padded_batch_equals_each_row_alone(causal):
    model = build_model(preset("tiny", causal=causal), seed=5)
    rows = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    batched = model(ids, attention_mask=mask)
    assert torch.isfinite(batched).all()
    for i, r in enumerate(rows):
        alone = model(r[None])[0]
        torch.testing.assert_close(batched[i, width - len(r):], alone, atol=1e-5, rtol=1e-5)


def test_segment_ids_isolate_packed_segments_exactly():
    model = build_model(preset("tiny"), seed=6)
    a, b = torch.randint(0, 128, (1, 5)), torch.randint(0, 128, (1, 7))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    logits = model(packed, segment_ids=segments)
    torch.testing.assert_close(logits[:, :5], model(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 5:], model(b), atol=1e-5, rtol=1e-5)


def test_cached_query_block_equals_full_forward():
    model = build_model(preset("tiny"), seed=7)
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    full = model(ids, attention_mask=mask)
    cache = KVCache()
    torch.testing.assert_close(model(ids, attention_mask=mask, kv_cache=cache), full)
    assert len(cache) == 12 and len(cache.keys) == model.config.n_layers
    block = model(ids[:, 6:9], attention_mask=mask, kv_cache=cache, cache_start=6)
    torch.testing.assert_close(block, full[:, 6:9], atol=1e-5, rtol=1e-5)


def test_rmsnorm_computes_in_float32_for_bf16_inputs():
    model = build_model(preset("tiny"), seed=8)
    x = (torch.randn(2, 3, 32) * 50).bfloat16()
    norm = model.norm.bfloat16()
    x32 = x.float()
    expected = (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16() * norm.weight
    assert torch.equal(norm(x), expected)


@pytest.mark.parametrize("name,total,non_embedding", [
    ("illada-8b", 7.62e9, 6.98e9), ("llada-8b", 8.02e9, 6.98e9)])
def test_8b_presets_parameter_counts(name, total, non_embedding):
    model = build_model(preset(name), device="meta")
    assert round(model.num_parameters() / 1e9, 2) == total / 1e9
    assert round(model.num_parameters(non_embedding=True) / 1e9, 2) == non_embedding / 1e9
    assert next(model.parameters()).device.type == "meta"


def test_init_follows_reference_scales():
    cfg = preset("small", vocab_size=4096, n_layers=4)
    model = build_model(cfg, seed=0)
    assert abs(model.embed_tokens.weight.std().item() - math.sqrt(1 / (2 * cfg.hidden_size))) < 2e-3
    assert abs(model.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 1e-3
    assert abs(model.layers[0].mlp.down_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 1e-3


@pytest.mark.parametrize("bad", [dict(n_kv_heads=3), dict(hidden_size=30), dict(n_layers=0), dict(mask_token_id=999)])
def test_invalid_configs_raise(bad):
    with pytest.raises(IlladaError):
        preset("tiny", **bad)


def test_config_round_trips_through_dict():
    cfg = preset("llada-8b")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(IlladaError, match="bogus"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_shift_logits_moves_each_prediction_one_position_right():
    base = build_model(preset("tiny"), seed=3).eval()
    shifted = build_model(preset("tiny", shift_logits=True), seed=3).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        plain, moved = base(ids), shifted(ids)
    torch.testing.assert_close(moved[:, 1:], plain[:, :-1])  # position i scores token i from position i - 1
    torch.testing.assert_close(moved[:, 0], plain[:, 0])
    with pytest.raises(IlladaError, match="shift_logits"):
        preset("tiny", causal=True, shift_logits=True)
