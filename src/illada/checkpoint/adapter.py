"""Names and configs of the published checkpoint layouts, mapped to and from ours (no file I/O here).

Our parameter names are the iLLaDA/Llama names without the `model.` prefix (`embed_tokens.weight`,
`layers.{i}.self_attn.q_proj.weight`, ..., `norm.weight`, `lm_head.weight`). Two layouts exist on disk
(reference §2):

- "illada": Llama-style, `model.` + our name, except `lm_head.weight` (absent when tied).
- "llada":  OLMo-style, `model.transformer.{wte, blocks.{i}.*, ln_f, ff_out}`; `ff_proj` is the SwiGLU gate.

A `StateDictAdapter` maps names both ways with one table of patterns, where `{}` stands for a layer index
(in the manner of torchtitan's state-dict adapters). `config_from_hf` reads either config.json naming.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

import torch

from illada.config import ModelConfig
from illada.errors import IlladaError

_LAYER = re.compile(r"\.(\d+)\.")
# Non-parameter entries some Llama exports carry; our rotary tables are computed on the fly.
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")


class StateDictAdapter:
    """Maps one on-disk naming to ours and back. `from_hf_map`: on-disk pattern -> our pattern."""

    layout: str = ""
    from_hf_map: dict[str, str] = {}

    def __init__(self) -> None:
        self.to_hf_map = {ours: disk for disk, ours in self.from_hf_map.items()}

    @staticmethod
    def _translate(name: str, table: Mapping[str, str]) -> str | None:
        match = _LAYER.search(name)
        if match is None:
            return table.get(name)
        abstract = name[:match.start()] + ".{}." + name[match.end():]
        target = table.get(abstract)
        return None if target is None else target.format(match.group(1))

    def from_hf_name(self, name: str) -> str | None:
        """Our name for an on-disk tensor name, or None when the name is not part of this layout."""
        return self._translate(name, self.from_hf_map)

    def to_hf_name(self, name: str) -> str:
        """The on-disk name of one of our parameters."""
        disk = self._translate(name, self.to_hf_map)
        if disk is None:
            raise KeyError(f"{name!r} is not a parameter name of the {self.layout} layout")
        return disk

    def is_ignored(self, name: str) -> bool:
        """Entries that are safe to skip (buffers that we recompute)."""
        return bool(_IGNORED.search(name))


class IlladaAdapter(StateDictAdapter):
    layout = "illada"
    from_hf_map = {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
        "model.layers.{}.self_attn.q_proj.weight": "layers.{}.self_attn.q_proj.weight",
        "model.layers.{}.self_attn.k_proj.weight": "layers.{}.self_attn.k_proj.weight",
        "model.layers.{}.self_attn.v_proj.weight": "layers.{}.self_attn.v_proj.weight",
        "model.layers.{}.self_attn.o_proj.weight": "layers.{}.self_attn.o_proj.weight",
        "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
        "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
        "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
        "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
    }


class LladaAdapter(StateDictAdapter):
    layout = "llada"
    from_hf_map = {
        "model.transformer.wte.weight": "embed_tokens.weight",
        "model.transformer.blocks.{}.attn_norm.weight": "layers.{}.input_layernorm.weight",
        "model.transformer.blocks.{}.q_proj.weight": "layers.{}.self_attn.q_proj.weight",
        "model.transformer.blocks.{}.k_proj.weight": "layers.{}.self_attn.k_proj.weight",
        "model.transformer.blocks.{}.v_proj.weight": "layers.{}.self_attn.v_proj.weight",
        "model.transformer.blocks.{}.attn_out.weight": "layers.{}.self_attn.o_proj.weight",
        "model.transformer.blocks.{}.ff_norm.weight": "layers.{}.post_attention_layernorm.weight",
        # LLaDA's llama block computes ff_out(silu(ff_proj(x)) * up_proj(x)): ff_proj is the gate.
        "model.transformer.blocks.{}.ff_proj.weight": "layers.{}.mlp.gate_proj.weight",
        "model.transformer.blocks.{}.up_proj.weight": "layers.{}.mlp.up_proj.weight",
        "model.transformer.blocks.{}.ff_out.weight": "layers.{}.mlp.down_proj.weight",
        "model.transformer.ln_f.weight": "norm.weight",
        "model.transformer.ff_out.weight": "lm_head.weight",
    }


ADAPTERS: dict[str, StateDictAdapter] = {"illada": IlladaAdapter(), "llada": LladaAdapter()}


def detect_layout(names: Iterable[str]) -> str:
    """'illada' or 'llada' from the tensor names of a checkpoint."""
    names = list(names)
    if any(n.startswith("model.transformer.") for n in names):
        return "llada"
    if any(n.startswith(("model.layers.", "model.embed_tokens.")) for n in names):
        return "illada"
    raise IlladaError(f"unrecognised checkpoint layout: tensor names {name_list(sorted(names))} are neither "
                      "iLLaDA (model.layers.*) nor LLaDA (model.transformer.blocks.*)")


def name_list(names: list[str], limit: int = 5) -> str:
    """'a, b, c (+7 more)': a short list for one-line error messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------------- configs

_MISSING = object()


def _require(data: Mapping[str, Any], keys: tuple[str, ...], naming: str, also_missing: tuple[str, ...] = ()) -> None:
    missing = [k for k in keys if data.get(k) is None] + list(also_missing)
    if missing:
        raise IlladaError(f"config.json ({naming} naming) lacks required fields: {', '.join(missing)}")


def _number(data: Mapping[str, Any], key: str, kind: type, default: Any = _MISSING) -> Any:
    value = data.get(key)
    if value is None:
        if default is _MISSING:
            raise IlladaError(f"config.json: required field {key} is missing")
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (kind is int and value != int(value))):
        raise IlladaError(f"config.json: {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _flag(data: Mapping[str, Any], key: str, default: bool | None) -> bool | None:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise IlladaError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def _token_id(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if isinstance(value, list):  # HF allows several EOS ids; the first is the canonical one
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IlladaError(f"config.json: {key} must be a non-negative integer, got {value!r}")
    return value


def _reject(problems: list[str]) -> None:
    if problems:
        raise IlladaError(f"config.json describes a model illada cannot run: {'; '.join(problems)}")


def _rope_theta(data: Mapping[str, Any]) -> float:
    # Read from the checkpoint, never assumed (reference §2). Newer transformers nest it in rope_parameters.
    params = data.get("rope_parameters")
    if data.get("rope_theta") is None and isinstance(params, dict) and params.get("rope_theta") is not None:
        return _number(params, "rope_theta", float)
    return _number(data, "rope_theta", float)


def _check_rope_scaling(data: Mapping[str, Any]) -> None:
    for key in ("rope_scaling", "rope_parameters"):
        scaling = data.get(key)
        if scaling is None:
            continue
        kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else scaling
        if kind not in (None, "default"):
            raise IlladaError(f"config.json: {key} {scaling!r} is not supported (only plain rotary embeddings, "
                              "rope_scaling null or 'default')")


def is_llada_config(data: Mapping[str, Any]) -> bool:
    """True for OLMo/LLaDA field names (d_model, n_layers, ...), False for Llama names."""
    return "d_model" in data or "n_layers" in data


def config_from_hf(data: Mapping[str, Any], has_lm_head: bool | None = None) -> ModelConfig:
    """A ModelConfig from a config.json dict in either naming (Llama/iLLaDA or OLMo/LLaDA).

    Fields describing something our network cannot compute (biases, other activations, rope scaling, ALiBi,
    qk-norm, ...) raise IlladaError. When the tie flag is absent, `has_lm_head` (whether the weights include a
    separate output matrix) decides; without it the naming's own default applies (Llama untied, OLMo tied).
    """
    if not isinstance(data, Mapping):
        raise IlladaError("config.json must hold a JSON object")
    llada = is_llada_config(data)
    if llada:
        fields = _llada_fields(data)
        tie_key, tie_default = "weight_tying", True
    else:
        fields = _llama_fields(data)
        tie_key, tie_default = "tie_word_embeddings", False
    tied = _flag(data, tie_key, None)
    if tied is None:
        tied = (not has_lm_head) if has_lm_head is not None else tie_default
    fields.update(
        rope_theta=_rope_theta(data),
        tie_word_embeddings=tied,
        causal=bool(_flag(data, "causal", False)),
        shift_logits=bool(_flag(data, "shift_logits", False)),
        block_causal=bool(_flag(data, "block_causal", False)),
        mask_token_id=_token_id(data, "mask_token_id"),
        bos_token_id=_token_id(data, "bos_token_id"),
        eos_token_id=_token_id(data, "eos_token_id"),
        pad_token_id=_token_id(data, "pad_token_id"),
        name=str(data.get("name") or data.get("model_type") or "checkpoint"),
    )
    return ModelConfig(**fields)


def _llama_fields(data: Mapping[str, Any]) -> dict:
    nested = data.get("rope_parameters")
    no_theta = data.get("rope_theta") is None and not (isinstance(nested, dict) and nested.get("rope_theta") is not None)
    _require(data, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                    "max_position_embeddings", "rms_norm_eps"), "Llama/iLLaDA", ("rope_theta",) if no_theta else ())
    _check_rope_scaling(data)
    problems = []
    if data.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {data['hidden_act']!r} (only silu)")
    for key in ("attention_bias", "mlp_bias"):
        if data.get(key):
            problems.append(f"{key} true (no biases)")
    heads = _number(data, "num_attention_heads", int)
    hidden = _number(data, "hidden_size", int)
    if data.get("head_dim") is not None and heads and data["head_dim"] * heads != hidden:
        problems.append(f"head_dim {data['head_dim']} != hidden_size / num_attention_heads")
    _reject(problems)
    return dict(
        vocab_size=_number(data, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_number(data, "intermediate_size", int),
        n_layers=_number(data, "num_hidden_layers", int),
        n_heads=heads,
        n_kv_heads=_number(data, "num_key_value_heads", int, heads),
        max_seq_len=_number(data, "max_position_embeddings", int),
        rms_norm_eps=_number(data, "rms_norm_eps", float),
        initializer_range=_number(data, "initializer_range", float, 0.02),
    )


def _llada_fields(data: Mapping[str, Any]) -> dict:
    no_mlp = data.get("mlp_hidden_size") is None and data.get("mlp_ratio") is None
    _require(data, ("d_model", "n_heads", "n_layers", "vocab_size", "max_sequence_length", "rope_theta"),
             "OLMo/LLaDA", ("mlp_hidden_size",) if no_mlp else ())
    problems = []
    checks = {  # field: (value we can run, what it means otherwise); absent fields take OLMo's defaults
        "block_type": ("llama", "only the llama block (separate q/k/v, ff_proj gate + up_proj)"),
        "activation_type": ("silu", "only silu"),
        "layer_norm_type": ("rms", "only RMSNorm"),
        "rope": (True, "rotary embeddings are required"),
    }
    for key, (wanted, why) in checks.items():
        if key in data and data[key] != wanted:
            problems.append(f"{key} {data[key]!r} ({why})")
    for key in ("alibi", "include_bias", "include_qkv_bias", "bias_for_layer_norm", "attention_layer_norm",
                "input_emb_norm", "scale_logits"):
        if data.get(key):
            problems.append(f"{key} true")
    if data.get("layer_norm_with_affine") is False:
        problems.append("layer_norm_with_affine false (norms need weights)")
    if data.get("clip_qkv") is not None:
        problems.append("clip_qkv set")
    _reject(problems)
    _check_rope_scaling(data)
    d_model = _number(data, "d_model", int)
    heads = _number(data, "n_heads", int)
    if data.get("n_kv_heads") is not None:
        kv_heads = _number(data, "n_kv_heads", int)
    else:  # OLMo: multi-query attention means one key/value head
        kv_heads = 1 if data.get("multi_query_attention") else heads
    if data.get("mlp_hidden_size") is not None:
        intermediate = _number(data, "mlp_hidden_size", int)
    else:
        intermediate = _number(data, "mlp_ratio", int) * d_model
    vocab = _number(data, "vocab_size", int)
    embedding_size = _number(data, "embedding_size", int, vocab)
    if embedding_size < vocab:
        raise IlladaError(f"config.json: embedding_size {embedding_size} is smaller than vocab_size {vocab}")
    return dict(
        # The embedding (and head) matrices have embedding_size rows; the extra rows are padding ids.
        vocab_size=embedding_size,
        hidden_size=d_model,
        intermediate_size=intermediate,
        n_layers=_number(data, "n_layers", int),
        n_heads=heads,
        n_kv_heads=kv_heads,
        max_seq_len=_number(data, "max_sequence_length", int),
        rms_norm_eps=_number(data, "rms_norm_eps", float, 1e-5),
        initializer_range=_number(data, "init_std", float, 0.02),
    )


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the spelling of config.json's torch_dtype)."""
    return str(dtype).removeprefix("torch.")


def config_to_hf(config: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """config.json contents in the iLLaDA/Llama naming."""
    data = {
        "architectures": ["IlladaModelLM"],
        "model_type": "illada",
        "name": config.name,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": config.initializer_range,
        # illada's own field: true only for the autoregressive baseline (causal attention).
        "causal": config.causal,
        # illada's own field: true for a Dream-style model whose logits at i predict token i + 1.
        "shift_logits": config.shift_logits,
        # illada's own field: true for a block-causal model (causal outside the block being denoised).
        "block_causal": config.block_causal,
        "mask_token_id": config.mask_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    if dtype is not None:
        data["torch_dtype"] = dtype_name(dtype)
    return data
