"""`illada convert SRC DST`: rewrite a LLaDA-layout (or iLLaDA-layout) checkpoint in the iLLaDA layout."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from illada.errors import IlladaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="source checkpoint directory (LLaDA or iLLaDA layout)")
    parser.add_argument("dst", metavar="DST", help="destination directory (written atomically)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="cast the weights (default: keep the checkpoint's dtype)")
    parser.add_argument("--max-shard-gb", type=float, default=1.0, help="largest shard file in GiB (default 1)")
    parser.add_argument("--force", action="store_true", help="replace DST if it already exists")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from illada.checkpoint import convert_checkpoint

    dst = Path(args.dst).expanduser()
    if dst.exists() and not args.force:
        raise IlladaError(f"{dst} already exists; pass --force to replace it")
    if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
        raise IlladaError(f"--max-shard-gb must be a positive number, got {args.max_shard_gb}")
    console = Console(stderr=True)
    with Progress(TextColumn("converting"), BarColumn(), DownloadColumn(), console=console, transient=True) as bar:
        task = bar.add_task("convert", total=None)
        report = convert_checkpoint(args.src, dst, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
    config = report.config
    print(f"converted {args.src} ({report.source_layout} layout) -> {dst} (illada layout): "
          f"{config.n_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, "
          f"{str(report.dtype).removeprefix('torch.')}, {report.total_bytes / 2**30:.2f} GiB in {len(report.files)} "
          f"file{'s' if len(report.files) > 1 else ''}", file=sys.stdout)
    return 0
