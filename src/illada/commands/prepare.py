"""`illada prepare`: tokenise text / chat corpora into training shards."""
from __future__ import annotations

import argparse

from illada.data.prepare import DEFAULT_SHARD_TOKENS, prepare_pretrain, prepare_sft
from illada.errors import IlladaError
from illada.files import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="text files, JSONL files or directories of them (a plain-text file is one document)")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer or checkpoint directory, run directory, bundled model name, Hugging Face hub "
                             "id (owner/name), or 'bytes' for the built-in byte-level tokenizer")
    parser.add_argument("--out", required=True, help="output dataset directory (new, or an unfinished run to resume)")
    parser.add_argument("--kind", choices=("pretrain", "sft"), default="pretrain",
                        help="pretrain: text / JSONL documents; sft: chat JSONL (default: pretrain)")
    parser.add_argument("--sft-format", choices=("variable", "pairs"), default="variable",
                        help="variable: iLLaDA packed prompt+response+EOS stream; pairs: LLaDA (prompt, response)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--text-field", default="text", help="JSONL field holding a document (pretrain; default: text)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over instead of continuing an unfinished run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.shard_tokens < 1:
        raise IlladaError(f"--shard-tokens must be positive, got {args.shard_tokens}")
    check_output_dir(args.out, "--out")
    common = dict(shard_tokens=args.shard_tokens, resume=not args.no_resume, progress=not args.quiet)
    if args.kind == "pretrain":
        manifest = prepare_pretrain(args.inputs, args.out, args.tokenizer, text_field=args.text_field, **common)
    else:
        manifest = prepare_sft(args.inputs, args.out, args.tokenizer, format=args.sft_format, **common)
    what = "documents" if manifest["kind"] == "pretrain" else "examples"
    print(f"{args.out}: {manifest['num_tokens']:,} tokens, {manifest['num_examples']:,} {what}, "
          f"{len(manifest['shards'])} shards ({manifest['format']}, {manifest['dtype']}), "
          f"{manifest['skipped']:,} bad records skipped")
    return 0
