"""`illada info`: describe a checkpoint or a preset without loading its weights."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from illada.errors import IlladaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory or bundled model name (default: the bundled demo model)")
    source.add_argument("--preset", help="a named architecture preset, e.g. illada-8b, llada-8b, small, tiny")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _checkpoint_dtype(path: Path) -> str | None:
    """The dtypes of the first weight file, read from its safetensors header only (checked like a load does)."""
    from illada.checkpoint.io import _SAFETENSORS_DTYPES, _read_header

    codes = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    dtypes = {codes.get(dtype, str(dtype)) for _, _, dtype in _read_header(files[0])}
    return ",".join(sorted(dtypes)) or None


def describe(model: str | None = None, preset_name: str | None = None) -> dict:
    """Architecture facts of a preset or checkpoint (the weights are never read: a meta-device model is built)."""
    from illada.api import bundled_models, DEFAULT_MODEL
    from illada.config import preset
    from illada.files import read_json_object

    special: dict[str, int] = {}
    dtype = None
    if preset_name is not None:
        config = preset(preset_name)
        source = f"preset {preset_name}"
    else:
        from illada.checkpoint.adapter import config_from_hf

        name = model or DEFAULT_MODEL
        path = bundled_models().get(name, Path(name)) if not Path(name).exists() else Path(name)
        if not (path / "config.json").is_file():
            raise IlladaError(f"no checkpoint at {name!r} (config.json not found)")
        raw = read_json_object(path / "config.json")
        try:
            config = config_from_hf(raw)
        except IlladaError as error:
            raise IlladaError(f"{path}: {error}") from None
        dtype = _checkpoint_dtype(path)
        source = str(path)
        if (path / "tokenizer.json").is_file():
            from illada.tokenizer import Tokenizer

            special = Tokenizer.from_dir(path).special_tokens
    return {
        "source": source,
        "layers": config.n_layers, "hidden": config.hidden_size, "heads": config.n_heads,
        "kv_heads": config.n_kv_heads, "head_dim": config.head_dim, "ffn": config.intermediate_size,
        "vocab": config.vocab_size, "context": config.max_seq_len, "rope_theta": config.rope_theta,
        "tied_embeddings": config.tie_word_embeddings, "attention": "causal" if config.causal else "bidirectional",
        "params_total": config.num_parameters(), "params_non_embedding": config.num_parameters(non_embedding=True),
        "dtype": dtype, "mask_token_id": config.mask_token_id, "special_tokens": special,
    }


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def run(args: argparse.Namespace) -> int:
    facts = describe(args.model, args.preset)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=facts["source"], show_header=False)
    for key, value in facts.items():
        if key in ("source", "special_tokens"):
            continue
        if key.startswith("params_"):
            value = f"{_count(value)} ({value:,})"
        if key == "dtype" and value is None:
            value = "- (a preset has no weights)"
        table.add_row(key.replace("_", " "), str(value))
    if facts["special_tokens"]:
        table.add_row("special tokens", ", ".join(f"{k}={v}" for k, v in facts["special_tokens"].items()))
    Console().print(table)
    return 0
