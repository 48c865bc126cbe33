"""Checkpoints: save/load round trips, both published layouts, validation errors, atomic writes, `illada convert`.

The LLaDA-layout fixtures are written here with our own name table and checked against a naive LLaDA forward
pass written from the reference (section 2), not against illada's adapter.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from illada.checkpoint import config_from_hf, config_to_hf, convert_checkpoint, load_checkpoint, save_checkpoint
from illada.checkpoint import io as ckpt_io
from illada.config import preset
from illada.errors import IlladaError
from illada.model import build_model

# ------------------------------------------------------------------------------------------------ fixtures

# Our parameter name -> LLaDA (OLMo) name, per layer and global: an independent copy of the reference table.
LLADA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "attn_out.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}
LLADA_GLOBAL = {
    "embed_tokens.weight": "model.transformer.wte.weight",
    "norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
}


def llada_name(name: str) -> str:
    if name in LLADA_GLOBAL:
        return LLADA_GLOBAL[name]
    _, index, rest = name.split(".", 2)
    return f"model.transformer.blocks.{index}.{LLADA_LAYER[rest]}"


def illada_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def own_state(model, tied: bool) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight")
    return state


def olmo_config(config, embedding_size: int | None = None, vocab_size: int | None = None) -> dict:
    """A config.json as LLaDA ships it (OLMo names, including the fields we only check)."""
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "alibi": False,
        "block_type": "llama", "include_bias": False, "include_qkv_bias": False, "layer_norm_type": "rms",
        "rope": True, "rope_full_precision": True, "attention_layer_norm": False, "weight_tying": False,
        "d_model": config.hidden_size, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
        "n_layers": config.n_layers, "mlp_hidden_size": config.intermediate_size, "mlp_ratio": 4,
        "vocab_size": vocab_size or config.vocab_size, "embedding_size": embedding_size or config.vocab_size,
        "max_sequence_length": config.max_seq_len, "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps, "mask_token_id": config.mask_token_id, "eos_token_id": 2,
        "pad_token_id": 2, "precision": "amp_bf16", "use_cache": False,
    }


def llama_config(config) -> dict:
    return {
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len, "rope_theta": config.rope_theta, "rope_scaling": None,
        "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "mask_token_id": config.mask_token_id,
    }


def write_dir(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_llada(path: Path, model, config, **config_kw) -> Path:
    return write_dir(path, {llada_name(k): v for k, v in own_state(model, False).items()}, olmo_config(config, **config_kw))


def write_illada(path: Path, model, config) -> Path:
    tensors = {illada_name(k): v for k, v in own_state(model, config.tie_word_embeddings).items()}
    return write_dir(path, tensors, llama_config(config))


def untied_config(**kw):
    return preset("tiny", tie_word_embeddings=False, **kw)


@pytest.fixture
def ids():
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def file_keys(path: Path) -> set[str]:
    keys = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys.update(handle.keys())
    return keys


# ------------------------------------------------------------------------------- naive LLaDA forward pass


def naive_llada_logits(state: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's llama block from OLMo-named weights, float64, bidirectional, no masks (reference §2)."""
    w = {k: v.double() for k, v in state.items()}
    t = "model.transformer."
    heads, kv_heads, d = cfg["n_heads"], cfg["n_kv_heads"], cfg["d_model"]
    hd, eps = d // heads, cfg["rms_norm_eps"]

    def rms(x, weight):
        return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    length = ids.shape[1]
    freqs = cfg["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # (B, H, L, hd), rotate-half
        rotated = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rotated * sin

    x = w[t + "wte.weight"][ids]
    b = ids.shape[0]
    for i in range(cfg["n_layers"]):
        p = f"{t}blocks.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = (h @ w[p + "q_proj.weight"].T).view(b, length, heads, hd).transpose(1, 2)
        k = (h @ w[p + "k_proj.weight"].T).view(b, length, kv_heads, hd).transpose(1, 2)
        v = (h @ w[p + "v_proj.weight"].T).view(b, length, kv_heads, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        x = x + attn.transpose(1, 2).reshape(b, length, d) @ w[p + "attn_out.weight"].T
        h = rms(x, w[p + "ff_norm.weight"])
        gate, up = h @ w[p + "ff_proj.weight"].T, h @ w[p + "up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "ff_out.weight"].T
    return rms(x, w[t + "ln_f.weight"]) @ w[t + "ff_out.weight"].T


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_same_logits(tmp_path, ids, tied):
    config = preset("tiny", tie_word_embeddings=tied)
    model = build_model(config, seed=1)
    save_checkpoint(model, config, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert file_keys(tmp_path / "ckpt") == {illada_name(k) for k in own_state(model, tied)}
    loaded, loaded_config = load_checkpoint(tmp_path / "ckpt")
    assert loaded_config == config
    assert max_diff(logits(model, ids), logits(loaded, ids)) <= 1e-5
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied


def test_saved_files_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        save_checkpoint(build_model(preset("tiny"), seed=1), preset("tiny"), tmp_path / "ckpt")
    finally:
        os.umask(old)
    for file in (tmp_path / "ckpt").iterdir():
        assert file.stat().st_mode & 0o777 == 0o644, file.name  # readable by others, like any file written


def test_sharded_save_loads_identically(tmp_path, ids):
    config = untied_config()
    model = build_model(config, seed=2)
    limit = 12_000  # bytes: several tensors per shard, and the 16 KiB embedding alone in one
    save_checkpoint(model, config, tmp_path / "ckpt", max_shard_bytes=limit)
    shards = sorted((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (tmp_path / "ckpt" / "model.safetensors").exists()
    assert all(f.name.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            sizes = [handle.get_tensor(k).numel() * 4 for k in handle.keys()]
            assert all(index["weight_map"][k] == shard.name for k in handle.keys())
        assert sum(sizes) <= limit or len(sizes) == 1
    assert set(index["weight_map"]) == {illada_name(k) for k in own_state(model, False)}
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert max_diff(logits(model, ids), logits(loaded, ids)) <= 1e-5


def test_llada_and_illada_layouts_give_same_logits(tmp_path, ids):
    config = untied_config()
    model = build_model(config, seed=3)
    llada_dir = write_llada(tmp_path / "llada", model, config)
    illada_dir = write_illada(tmp_path / "illada", model, config)
    from_llada, llada_cfg = load_checkpoint(llada_dir)
    from_illada, _ = load_checkpoint(illada_dir)
    assert not llada_cfg.tie_word_embeddings and llada_cfg.eos_token_id == 2 and llada_cfg.mask_token_id == 3
    reference = logits(model, ids)
    assert max_diff(reference, logits(from_llada, ids)) <= 1e-5
    assert max_diff(reference, logits(from_illada, ids)) <= 1e-5
    # Independent check of the LLaDA semantics (ff_proj is the gate): a naive forward on the raw file.
    with safe_open(str(llada_dir / "model.safetensors"), "pt") as handle:
        raw = {k: handle.get_tensor(k) for k in handle.keys()}
    naive = naive_llada_logits(raw, olmo_config(config), ids)
    assert max_diff(naive.float(), logits(from_llada, ids)) <= 1e-4


def test_llada_padded_embedding(tmp_path, ids):
    """embedding_size > vocab_size: the model's vocabulary is the padded embedding."""
    config = untied_config()  # 128 rows, as embedding_size
    model = build_model(config, seed=4)
    path = write_llada(tmp_path / "llada", model, config, embedding_size=128, vocab_size=120)
    loaded, loaded_config = load_checkpoint(path)
    assert loaded_config.vocab_size == 128
    assert max_diff(logits(model, ids), logits(loaded, ids)) <= 1e-5


def test_tied_config_ignores_stored_head(tmp_path, ids):
    config = preset("tiny")
    model = build_model(config, seed=5)
    tensors = {illada_name(k): v for k, v in own_state(model, True).items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    loaded, _ = load_checkpoint(write_dir(tmp_path / "c", tensors, llama_config(config)))
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert max_diff(logits(model, ids), logits(loaded, ids)) <= 1e-5


def test_absent_tie_flag_follows_weights(tmp_path, ids):
    config = preset("tiny")
    model = build_model(config, seed=6)
    cfg = llama_config(config)
    del cfg["tie_word_embeddings"]
    loaded, loaded_config = load_checkpoint(write_dir(tmp_path / "c", {illada_name(k): v for k, v in
                                                                     own_state(model, True).items()}, cfg))
    assert loaded_config.tie_word_embeddings
    assert max_diff(logits(model, ids), logits(loaded, ids)) <= 1e-5


def test_dtype_option(tmp_path, ids):
    config = preset("tiny")
    model = build_model(config, seed=7)
    save_checkpoint(model, config, tmp_path / "fp32")
    loaded, _ = load_checkpoint(tmp_path / "fp32", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    loaded, _ = load_checkpoint(tmp_path / "fp32", dtype="fp16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    # Saving in bf16 stores bf16; loading without a dtype keeps the stored dtype.
    save_checkpoint(model, config, tmp_path / "bf16", dtype="bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = load_checkpoint(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    expected = {k: v.to(torch.bfloat16) for k, v in own_state(model, True).items()}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_loaded_parameters_are_trainable_and_writable(tmp_path, ids):
    """CPU parameters may be memory maps of the file: they must still take in-place updates (copy-on-write)."""
    config = preset("tiny")
    model = build_model(config, seed=8)
    save_checkpoint(model, config, tmp_path / "c")
    loaded, _ = load_checkpoint(tmp_path / "c")
    assert all(p.requires_grad for p in loaded.parameters())
    logits(loaded, ids).sum()
    with torch.no_grad():
        loaded.norm.weight.add_(1.0)
    again, _ = load_checkpoint(tmp_path / "c")
    assert torch.equal(again.norm.weight, model.norm.weight)  # the file is untouched


def test_pytorch_bin_fallback(tmp_path, ids):
    config = untied_config()
    model = build_model(config, seed=9)
    path = tmp_path / "bin"
    path.mkdir()
    torch.save({illada_name(k): v for k, v in own_state(model, False).items()}, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(llama_config(config)))
    loaded, _ = load_checkpoint(path)
    assert max_diff(logits(model, ids), logits(loaded, ids)) <= 1e-5


UNPICKLED: list[str] = []


def _record_unpickle(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Payload:
    """Unpickling this object would call _record_unpickle: a stand-in for arbitrary code in a pickle."""

    def __reduce__(self):
        return (_record_unpickle, ("ran",))


def test_pytorch_bin_never_unpickles_objects(tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": _Payload()}, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(llama_config(preset("tiny"))))
    with pytest.raises(IlladaError, match="pytorch_model.bin: cannot load as a tensor-only state dict"):
        load_checkpoint(path)
    assert UNPICKLED == []


# -------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def llada_tensors():
    config = untied_config()
    model = build_model(config, seed=10)
    return config, {llada_name(k): v for k, v in own_state(model, False).items()}


def test_missing_tensor(tmp_path, llada_tensors):
    config, tensors = llada_tensors
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    path = write_dir(tmp_path / "c", tensors, olmo_config(config))
    with pytest.raises(IlladaError, match=r"missing tensors \(1\): model\.transformer\.blocks\.1\.up_proj\.weight"):
        load_checkpoint(path)


def test_wrong_shape(tmp_path, llada_tensors):
    config, tensors = llada_tensors
    tensors["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(16, 32)
    path = write_dir(tmp_path / "c", tensors, olmo_config(config))
    with pytest.raises(IlladaError, match=r"wrong shapes \(1\): model\.transformer\.blocks\.0\.q_proj\.weight 16x32 "
                                          r"\(expected 32x32\)"):
        load_checkpoint(path)


def test_unknown_tensor(tmp_path, llada_tensors):
    config, tensors = llada_tensors
    tensors["model.transformer.blocks.0.q_norm.weight"] = torch.ones(32)
    tensors["model.transformer.blocks.7.q_proj.weight"] = torch.ones(32, 32)  # layer beyond n_layers
    path = write_dir(tmp_path / "c", tensors, olmo_config(config))
    with pytest.raises(IlladaError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "unexpected tensors (2)" in message
    assert "model.transformer.blocks.0.q_norm.weight" in message and "blocks.7.q_proj.weight" in message


def test_all_problems_in_one_message(tmp_path, llada_tensors):
    config, tensors = llada_tensors
    for i in range(2):
        del tensors[f"model.transformer.blocks.{i}.ff_proj.weight"]
        del tensors[f"model.transformer.blocks.{i}.ff_out.weight"]
        del tensors[f"model.transformer.blocks.{i}.up_proj.weight"]
    tensors["extra.weight"] = torch.ones(3)
    path = write_dir(tmp_path / "c", tensors, olmo_config(config))
    with pytest.raises(IlladaError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "missing tensors (6)" in message and "(+1 more)" in message and "extra.weight" in message
    assert "\n" not in message


def test_missing_config_weights_and_path(tmp_path, llada_tensors):
    config, tensors = llada_tensors
    with pytest.raises(IlladaError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    save_file(tensors, str(no_config / "model.safetensors"))
    with pytest.raises(IlladaError, match="config.json not found"):
        load_checkpoint(no_config)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(olmo_config(config)))
    with pytest.raises(IlladaError, match="no weights found"):
        load_checkpoint(no_weights)
    (no_weights / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(IlladaError, match="missing: model-1.safetensors"):
        load_checkpoint(no_weights)


def test_corrupt_files(tmp_path, llada_tensors):
    config, tensors = llada_tensors
    path = write_dir(tmp_path / "c", tensors, olmo_config(config))
    (path / "config.json").write_text("{not json")
    with pytest.raises(IlladaError, match="cannot read JSON"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps(olmo_config(config)))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])  # truncated: the last tensor's bytes are cut
    with pytest.raises(IlladaError, match="not a readable safetensors file"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(IlladaError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_config_rejections():
    base = llama_config(preset("tiny"))
    with pytest.raises(IlladaError, match="rope_scaling"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(IlladaError, match="rope_scaling"):
        config_from_hf({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert config_from_hf({**base, "rope_scaling": {"rope_type": "default"}}).rope_theta == base["rope_theta"]
    with pytest.raises(IlladaError, match="hidden_act 'gelu'"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(IlladaError, match="attention_bias"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(IlladaError, match="lacks required fields: hidden_size, rope_theta"):
        config_from_hf({k: v for k, v in base.items() if k not in ("hidden_size", "rope_theta")})
    olmo = olmo_config(untied_config())
    with pytest.raises(IlladaError, match="alibi true"):
        config_from_hf({**olmo, "alibi": True})
    with pytest.raises(IlladaError, match="include_bias true"):
        config_from_hf({**olmo, "include_bias": True})
    with pytest.raises(IlladaError, match="block_type 'sequential'"):
        config_from_hf({**olmo, "block_type": "sequential"})
    with pytest.raises(IlladaError, match="lacks required fields: d_model"):
        config_from_hf({k: v for k, v in olmo.items() if k != "d_model"})
    with pytest.raises(IlladaError, match="num_hidden_layers must be an integer"):
        config_from_hf({**base, "num_hidden_layers": "two"})


def test_bad_rope_scaling_checkpoint(tmp_path):
    config = preset("tiny")
    model = build_model(config, seed=11)
    save_checkpoint(model, config, tmp_path / "c")
    data = json.loads((tmp_path / "c" / "config.json").read_text())
    data["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "c" / "config.json").write_text(json.dumps(data))
    with pytest.raises(IlladaError, match="rope_scaling.*yarn"):
        load_checkpoint(tmp_path / "c")


def test_real_llada_8b_config():
    """LLaDA-8B's published config.json fields map to the reference architecture (section 2)."""
    data = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
        "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
        "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "use_cache": False, "vocab_size": 126464,
        "weight_tying": False,
    }
    config = config_from_hf(data)
    assert (config.hidden_size, config.n_layers, config.n_heads, config.n_kv_heads) == (4096, 32, 32, 32)
    assert (config.intermediate_size, config.vocab_size, config.max_seq_len) == (12288, 126464, 4096)
    assert config.rope_theta == 500000.0 and config.rms_norm_eps == 1e-5 and not config.tie_word_embeddings
    assert (config.mask_token_id, config.eos_token_id, config.pad_token_id) == (126336, 126081, 126081)


def test_config_to_hf_round_trip():
    config = preset("illada-8b", causal=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    data = config_to_hf(config, torch.bfloat16)
    assert data["torch_dtype"] == "bfloat16" and data["model_type"] == "illada"
    assert (data["hidden_size"], data["num_key_value_heads"], data["intermediate_size"]) == (4096, 8, 14336)
    assert config_from_hf(json.loads(json.dumps(data))) == config
    causal = preset("tiny", causal=True).replace(name="ar")
    assert config_from_hf(config_to_hf(causal)) == causal
    shifted = preset("tiny", shift_logits=True).replace(name="adapted")
    assert config_from_hf(config_to_hf(shifted)) == shifted and config_from_hf(config_to_hf(config)) == config


# -------------------------------------------------------------------------------------------- atomic save


def _failing_save_file(monkeypatch, fail_on_call: int):
    real = ckpt_io.save_file
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_io, "save_file", flaky)


def test_save_is_atomic_new_dir(tmp_path, monkeypatch):
    config = preset("tiny")
    model = build_model(config, seed=12)
    _failing_save_file(monkeypatch, fail_on_call=2)
    with pytest.raises(IlladaError, match="disk full"):
        save_checkpoint(model, config, tmp_path / "out" / "ckpt", max_shard_bytes=20_000)
    assert not (tmp_path / "out" / "ckpt").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no staging directory left behind


def test_save_is_atomic_over_existing(tmp_path, monkeypatch, ids):
    config = preset("tiny")
    old = build_model(config, seed=13)
    save_checkpoint(old, config, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    new = build_model(config, seed=14)
    _failing_save_file(monkeypatch, fail_on_call=1)
    with pytest.raises(IlladaError):
        save_checkpoint(new, config, tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    monkeypatch.undo()
    save_checkpoint(new, config, tmp_path / "ckpt")  # a successful save replaces the old one
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert max_diff(logits(new, ids), logits(loaded, ids)) <= 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_with_tokenizer(tmp_path):
    class FakeTokenizer:
        def save(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{}")

    config = preset("tiny")
    save_checkpoint(build_model(config, seed=15), config, tmp_path / "c", tokenizer=FakeTokenizer())
    assert (tmp_path / "c" / "tokenizer.json").read_text() == "{}"


def test_save_rejects_mismatched_config(tmp_path):
    model = build_model(preset("tiny"), seed=16)
    with pytest.raises(IlladaError, match="wrong shapes"):
        save_checkpoint(model, preset("tiny", intermediate_size=64), tmp_path / "c")
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------ convert


TOKENIZER_FIXTURES = {
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": '{"chat_template": "{{ messages }}"}',
    "special_tokens_map.json": '{"eos_token": "<|endoftext|>"}',
    "generation_config.json": '{"eos_token_id": 2}',
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
}


def test_convert_command_round_trip(tmp_path, ids):
    from illada.__main__ import main

    config = untied_config()
    model = build_model(config, seed=17)
    src = write_llada(tmp_path / "llada", model, config)
    for name, text in TOKENIZER_FIXTURES.items():
        (src / name).write_text(text)
    (src / "modeling_llada.py").write_text("# remote code is not copied")
    dst = tmp_path / "illada"
    assert main(["convert", str(src), str(dst)]) == 0
    assert file_keys(dst) == {illada_name(k) for k in own_state(model, False)}
    for name, text in TOKENIZER_FIXTURES.items():
        assert (dst / name).read_text() == text
    assert not (dst / "modeling_llada.py").exists()
    data = json.loads((dst / "config.json").read_text())
    assert data["hidden_size"] == 32 and data["tie_word_embeddings"] is False and "d_model" not in data
    loaded, _ = load_checkpoint(dst)
    assert max_diff(logits(model, ids), logits(loaded, ids)) <= 1e-5

    # An existing destination needs --force; --dtype casts.
    assert main(["convert", str(src), str(dst), "--dtype", "bf16"]) == 2
    assert main(["convert", str(src), str(dst), "--dtype", "bf16", "--force"]) == 0
    with safe_open(str(dst / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_convert_sharded_source_to_sharded_output(tmp_path, ids):
    config = untied_config()
    model = build_model(config, seed=18)
    save_checkpoint(model, config, tmp_path / "a", max_shard_bytes=10_000)
    seen = []
    report = convert_checkpoint(tmp_path / "a", tmp_path / "b", max_shard_bytes=30_000,
                                progress=lambda done, total: seen.append((done, total)))
    assert report.source_layout == "illada" and len(report.files) > 1
    assert seen[-1][0] == seen[-1][1] == report.total_bytes
    loaded, _ = load_checkpoint(tmp_path / "b")
    assert max_diff(logits(model, ids), logits(loaded, ids)) <= 1e-5
    with pytest.raises(IlladaError, match="same directory"):
        convert_checkpoint(tmp_path / "a", tmp_path / "a")
