"""`illada info`: describe a checkpoint or a preset without loading its weights, or plan a job's peak memory."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from illada.errors import IlladaError

# the memory planner's flags (illada.memory.plan_memory's keywords) and their defaults; each needs --plan
PLAN_DEFAULTS = {"seq_len": 2048, "batch": 1, "dtype": "bf16", "lora_r": 0, "lora_targets": None, "quantize": None,
                 "device": "cuda", "cache": "none", "block_length": 32, "temperature": 0.0, "group_size": 8,
                 "estimator": "coupled", "grad_accum": 1, "prompt_len": 0, "fixed_length": False, "block_causal": None,
                 "gpu_memory": 24.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory, bundled model name, preset name (illada-8b, llada-8b, "
                        "small, tiny) or a config.json file (default: the bundled demo model)")
    source.add_argument("--preset", help="a named architecture preset, e.g. illada-8b, llada-8b, small, tiny")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    plan = parser.add_argument_group("memory plan", "estimate a job's peak memory from the shapes alone "
                                     "(no weights are read); the flags below need --plan")
    plan.add_argument("--plan", metavar="JOB", help="sft | rl | generate: print its estimated peak memory, itemised")
    plan.add_argument("--seq-len", type=int, help="tokens per row: sft's --seq-len; rl's prompt + completion; "
                      "generate's prompt + new tokens (default 2048)")
    plan.add_argument("--batch", type=int, help="rows: sft's --micro-batch-size, rl's --prompts-per-step, "
                      "generate's prompts (default 1)")
    plan.add_argument("--dtype", help="bf16 | fp32: sft computes under bf16 autocast with fp32 weights; rl and "
                      "generate hold the model in it (default bf16)")
    plan.add_argument("--lora-r", type=int, help="LoRA rank of sft/rl, 0: full fine-tuning (default 0)")
    plan.add_argument("--lora-targets", help="comma-separated Linear layers with adapters (default: all seven)")
    plan.add_argument("--quantize", help="int8 | int4: generate's torchao weights; with --lora-r a QLoRA base "
                      "(default: none)")
    plan.add_argument("--device", help="cuda | cpu: the optimizer's kernels and the CUDA context (default cuda)")
    plan.add_argument("--cache", help="none | prefix | dual | committed: generate's (and rl rollouts') KV cache "
                      "(default none)")
    plan.add_argument("--block-length", type=int, help="generate's block length (default 32)")
    plan.add_argument("--prompt-len", type=int, help="generate's prompt tokens within --seq-len: a longer prompt "
                      "shrinks a prefix cache's steps on a fixed canvas (default 0, the worst case)")
    plan.add_argument("--fixed-length", action="store_const", const=True, help="generate on LLaDA's fixed canvas "
                      "instead of appending blocks")
    plan.add_argument("--temperature", type=float, help="generate's temperature; > 0 adds the sampling "
                      "temporaries (default 0)")
    plan.add_argument("--block-causal", action="store_const", const=True, help="sft with --objective sft-blocks: "
                      "each row runs as its noisy and clean halves, 2 x --seq-len tokens (default: a block-causal "
                      "model's own; --block-length is not needed)")
    plan.add_argument("--group-size", type=int, help="rl's rollouts per prompt (default 8)")
    plan.add_argument("--estimator", help="rl's estimator: mean_field | coupled | elbo (default coupled)")
    plan.add_argument("--grad-accum", type=int, help="sft's micro-batches per step: > 1 keeps gradients alive "
                      "during the forward (default 1)")
    plan.add_argument("--gpu-memory", type=float, metavar="GIB", help="the card to compare with, in GiB "
                      "(default 24)")


def resolve_config(model: str | None = None, preset_name: str | None = None):
    """(ModelConfig, source text, checkpoint directory or None) of a preset, a checkpoint directory, a bundled
    model name, a preset name given as --model, or a config.json file; nothing but JSON is read."""
    from illada.api import bundled_models, DEFAULT_MODEL
    from illada.config import PRESETS, ModelConfig, preset
    from illada.files import read_json_object

    if preset_name is not None:
        return preset(preset_name), f"preset {preset_name}", None
    from illada.checkpoint.adapter import config_from_hf

    name = model or DEFAULT_MODEL
    bundled = bundled_models()
    if not Path(name).exists() and name not in bundled and name in PRESETS:
        return preset(name), f"preset {name}", None
    path = bundled.get(name, Path(name)) if not Path(name).exists() else Path(name)
    file = path if path.is_file() else path / "config.json"
    if not file.is_file():
        raise IlladaError(f"no checkpoint at {name!r} (config.json not found; presets: {', '.join(PRESETS)})")
    raw = read_json_object(file)
    try:  # ModelConfig's own fields (its to_dict), else a Hugging Face config.json in either layout
        own = raw and set(raw) <= set(ModelConfig.__dataclass_fields__)
        config = ModelConfig.from_dict(raw) if own else config_from_hf(raw)
    except IlladaError as error:
        raise IlladaError(f"{file if path.is_file() else path}: {error}") from None
    return config, str(path), (None if path.is_file() else path)


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
    config, source, path = resolve_config(model, preset_name)
    special: dict[str, int] = {}
    dtype, generation = None, {}
    if path is not None:
        from illada.sampling.generation_config import read_generation_config

        defaults = read_generation_config(path)  # what generate/chat/serve start from (its own file)
        generation = {**defaults.options, **({"prompt_template": defaults.prompt_template}
                                             if defaults.prompt_template is not None else {})}
        dtype = _checkpoint_dtype(path)
        if (path / "tokenizer.json").is_file():
            from illada.tokenizer import Tokenizer

            special = Tokenizer.from_dir(path).special_tokens
    return {
        "source": source,
        "layers": config.n_layers, "hidden": config.hidden_size, "heads": config.n_heads,
        "kv_heads": config.n_kv_heads, "head_dim": config.head_dim, "ffn": config.intermediate_size,
        "vocab": config.vocab_size, "context": config.max_seq_len, "rope_theta": config.rope_theta,
        "tied_embeddings": config.tie_word_embeddings, "attention": attention_kind(config),
        "params_total": config.num_parameters(), "params_non_embedding": config.num_parameters(non_embedding=True),
        "dtype": dtype, "mask_token_id": config.mask_token_id, "special_tokens": special,
        "generation_defaults": generation,
    }


def run(args: argparse.Namespace) -> int:
    if args.plan is not None:
        return run_plan(args)
    given = [name for name in PLAN_DEFAULTS if getattr(args, name) is not None]
    if given:
        raise IlladaError(f"--{given[0].replace('_', '-')} needs --plan sft|rl|generate")
    facts = describe(args.model, args.preset)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    from illada.memory import format_count

    table = Table(title=facts["source"], show_header=False)
    for key, value in facts.items():
        if key in ("source", "special_tokens", "generation_defaults"):
            continue
        if key.startswith("params_"):
            value = f"{format_count(value)} ({value:,})"
        if key == "dtype" and value is None:
            value = "- (a preset has no weights)"
        table.add_row(key.replace("_", " "), str(value))
    if facts["special_tokens"]:
        table.add_row("special tokens", ", ".join(f"{k}={v}" for k, v in facts["special_tokens"].items()))
    if facts["generation_defaults"]:
        table.add_row("generation defaults",
                      ", ".join(f"{k}={v!r}" for k, v in facts["generation_defaults"].items()))
    Console().print(table)
    return 0


def _fits_line(plan, gpu_gib: float) -> str:
    from illada.memory import GiB

    fits, fits_ck = plan.fits(gpu_gib * GiB)
    line = f"fits on a {gpu_gib:g} GiB card: {'yes' if fits else 'no'} ({plan.peak / GiB:.1f} GiB"
    if plan.peak_checkpointed is None:
        return line + ")"
    return (line + f"; with --activation-checkpointing: {'yes' if fits_ck else 'no'}, "
            f"{plan.peak_checkpointed / GiB:.1f} GiB)")


def run_plan(args: argparse.Namespace) -> int:
    from illada.memory import GiB, plan_memory

    options = {name: (PLAN_DEFAULTS[name] if getattr(args, name) is None else getattr(args, name))
               for name in PLAN_DEFAULTS}
    gpu = options.pop("gpu_memory")
    if not (math.isfinite(gpu) and gpu > 0):
        raise IlladaError(f"--gpu-memory must be a positive number of GiB, got {gpu}")
    if not math.isfinite(options["temperature"]) or options["temperature"] < 0:
        raise IlladaError(f"--temperature must be >= 0, got {options['temperature']}")
    config, source, _ = resolve_config(args.model, args.preset)
    plan = plan_memory(config, args.plan, **options)
    if args.json:
        fits, fits_ck = plan.fits(gpu * GiB)
        print(json.dumps({"source": source, **plan.to_dict(), "gpu_memory_gib": gpu, "fits": fits,
                          "fits_checkpointed": fits_ck}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    s = plan.settings
    what = [f"{s['batch']} x {s['seq_len']} tokens"]
    if plan.job == "rl":
        what.append(f"group {s['group_size']}, {s['estimator']}")
    if s.get("block_causal"):
        what.append("sft-blocks")
    what += [f"LoRA r{s['lora_r']}"] * bool(s["lora_r"]) + [s["quantize"]] * bool(s["quantize"])
    table = Table(title=f"{plan.job} on {source}: {', '.join(what + [s['dtype'], s['device']])}")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("note")
    for item in plan.items:
        table.add_row(item.label, f"{item.bytes / GiB:.2f}", item.note)
    table.add_section()
    label = "peak, no checkpointing" if plan.peak_checkpointed is not None else "peak"
    table.add_row(label, f"{plan.peak / GiB:.2f}", f"at: {plan.phase}")
    if plan.peak_checkpointed is not None:
        table.add_row("peak, activation checkpointing", f"{plan.peak_checkpointed / GiB:.2f}",
                      f"at: {plan.phase_checkpointed}")
    Console().print(table)
    print(_fits_line(plan, gpu))
    return 0


def attention_kind(config) -> str:
    """causal (the AR twin), block-causal (causal except inside the block being denoised) or bidirectional."""
    if config.causal:
        return "causal"
    return "block-causal" if config.block_causal else "bidirectional"
