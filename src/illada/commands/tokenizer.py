"""`illada tokenizer train FILES... --vocab-size N --out DIR`: byte-level BPE with illada's special tokens."""
from __future__ import annotations

import argparse

from illada.errors import IlladaError

SAMPLE = "Hello, world! Masked diffusion models unmask tokens in parallel. 🙂"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE tokenizer on UTF-8 text files",
                           description="Train a byte-level BPE tokenizer (any text round-trips) with illada's special "
                                       "tokens at ids 0-8 and a LLaDA-style chat template.")
    train.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files to learn the merges from")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="vocabulary size, special tokens and the 256 bytes included (at least 265)")
    train.add_argument("--out", required=True, help="output directory (tokenizer.json, tokenizer_config.json)")
    train.add_argument("--min-frequency", type=int, default=2,
                       help="merge only pairs seen at least this often (default: 2)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.tokenizer_command != "train":
        raise IlladaError(f"unknown tokenizer action {args.tokenizer_command!r}")
    from illada.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(args.files, args.vocab_size, args.out, min_frequency=args.min_frequency,
                                show_progress=not args.quiet)
    ids = tokenizer.encode(SAMPLE)
    pieces = " ".join(repr(tokenizer.decode([i])) for i in ids)
    specials = ", ".join(f"{tokenizer.id_to_token(i)}={i}" for i in sorted(set(tokenizer.special_tokens.values())))
    print(f"{args.out}: vocabulary of {tokenizer.vocab_size:,} tokens (asked for {args.vocab_size:,})")
    print(f"special tokens: {specials}")
    print(f"sample: {len(SAMPLE)} characters -> {len(ids)} tokens: {pieces}")
    return 0
