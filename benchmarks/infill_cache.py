"""Infill with and without the approximate KV caches: tokens/s and agreement with the uncached fill, side by side.

    OMP_NUM_THREADS=1 python benchmarks/infill_cache.py [--model illada-shakespeare-tiny] [--hole 32] [--repeat 3]

A text of about `--context` tokens of the bundled model's own kind with one hole of `--hole` tokens in the middle;
every cache mode fills it in the same process, interleaved `--repeat` times (the median is reported), so the
ratios compare like with like.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import illada

TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief.\n\nJULIET:\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="illada-shakespeare-tiny")
    p.add_argument("--hole", type=int, default=32)
    p.add_argument("--context", type=int, default=400, help="tokens of text around the hole")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    lm = illada.load(args.model)
    ids = lm.tokenizer.encode(TEXT)
    ids = (ids * (args.context // len(ids) + 1))[:args.context]
    half = len(ids) // 2
    canvas = torch.tensor([ids[:half] + [lm.mask_token_id] * args.hole + ids[half:]])
    modes = [("none", None), ("prefix", None), ("dual", None), ("dual", 4)]
    seconds = {m: [] for m in modes}
    fills = {}
    for _ in range(args.repeat):
        for cache, refresh in modes:
            began = time.perf_counter()
            with torch.inference_mode():
                out = lm.fill_pieces([[lm.tokenizer.decode(ids[:half]), args.hole, lm.tokenizer.decode(ids[half:])]],
                                     cache=cache, cache_refresh=refresh)[1]
            seconds[(cache, refresh)].append(time.perf_counter() - began)
            fills[(cache, refresh)] = out.span_tokens[0][0]
    base = statistics.median(seconds[("none", None)])
    print(f"model {lm.name}, canvas {canvas.shape[1]} tokens, hole {args.hole}, {torch.get_num_threads()} thread(s)")
    print("| cache | refresh | tokens/s | speed-up | tokens equal to no cache |")
    print("|---|---:|---:|---:|---:|")
    for mode in modes:
        t = statistics.median(seconds[mode])
        same = sum(a == b for a, b in zip(fills[mode], fills[("none", None)]))
        print(f"| {mode[0]} | {mode[1] or '-'} | {args.hole / t:.1f} | {base / t:.2f}x | {same}/{args.hole} |")


if __name__ == "__main__":
    main()
