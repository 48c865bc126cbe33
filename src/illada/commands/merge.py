"""`illada merge BASE ADAPTER OUT`: fold a LoRA adapter (PEFT format) into its base model, as an iLLaDA checkpoint."""
from __future__ import annotations

import argparse
import sys

from illada.errors import IlladaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="the base model: checkpoint directory, run directory, bundled "
                                                     "model name or hub id")
    parser.add_argument("adapter", metavar="ADAPTER", help="a PEFT LoRA adapter directory or a LoRA training run "
                                                           "(its newest checkpoint)")
    parser.add_argument("out", metavar="OUT", help="the merged checkpoint's directory (iLLaDA layout, written "
                                                   "atomically)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="dtype of the merged weights (default: the base checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it already exists")


def run(args: argparse.Namespace) -> int:
    from illada.checkpoint import load_checkpoint, save_checkpoint
    from illada.files import check_output_dir
    from illada.lora import adapter_dir, apply_adapter
    from illada.sources import resolve_model_dir
    from illada.tokenizer import Tokenizer

    out = check_output_dir(args.out, "OUT")
    if out.exists() and not args.force:
        raise IlladaError(f"{out} already exists; pass --force to replace it")
    adapter = adapter_dir(args.adapter, "ADAPTER")
    base = resolve_model_dir(args.base, "BASE")
    model, config = load_checkpoint(base, device="cpu")  # in the stored dtype: one copy of the weights
    stored = next(model.parameters()).dtype
    model = apply_adapter(model, adapter, "ADAPTER")
    save_checkpoint(model, config, out, tokenizer=Tokenizer.from_dir(base), dtype=args.dtype or stored)
    print(f"merged {adapter} into {base} -> {out}: {config.n_layers} layers, hidden {config.hidden_size}, "
          f"{str(args.dtype or stored).removeprefix('torch.')}", file=sys.stdout)
    return 0
