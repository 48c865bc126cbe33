"""Infill likelihood on held-out Shakespeare: the bidirectional MDM scoring a gap with the text on both sides vs the
AR twin scoring the same gap left to right (it cannot see the suffix), and the MDM given the prefix alone.

    OMP_NUM_THREADS=2 python benchmarks/infill_likelihood.py [--windows 64] [--gap 8] [--side 40] [--mc 32]

Windows come from the rows the bundled model's training run held out (the last `val_rows` rows of
runs/shakespeare/data, as benchmarks/proof.py's likelihood section); each is `side` tokens of prefix, a `gap` of
`gap` tokens and `side` tokens of suffix. MDM values are Monte Carlo ELBO bounds (`mc` samples per gap; lower bounds
on log p); the AR value is exact. Printed as nats per gap token (lower is better), with standard errors over the
windows. Needs `bash recipes/shakespeare-tiny.sh` (data) and `illada train recipes/shakespeare-tiny-ar.yaml`.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

import illada
from illada.api import bundled_models
from illada.data.shards import PackedTokens
from illada.scoring import mc_loglikelihood
from illada.training.batches import PackedRows

DATA, MDM, AR = Path("runs/shakespeare/data"), "illada-shakespeare-tiny", Path("runs/shakespeare/ar")


def windows(count: int, side: int, gap: int) -> list[tuple[list[int], list[int], list[int]]]:
    config = json.loads((bundled_models()[MDM] / "train_config.json").read_text())
    held_out = PackedRows(PackedTokens(DATA), config["seq_len"], holdout=config["val_rows"])
    rows = held_out.batch(held_out.validation_rows())["input_ids"].tolist()
    width = 2 * side + gap
    out = [(row[s:s + side], row[s + side:s + side + gap], row[s + side + gap:s + width])
           for row in rows for s in range(0, len(row) - width + 1, width)]
    return out[:count]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--gap", type=int, default=8)
    p.add_argument("--side", type=int, default=40)
    p.add_argument("--mc", type=int, default=32)
    args = p.parse_args()
    cases = windows(args.windows, args.side, args.gap)
    mdm, ar = illada.load(MDM), illada.load(str(AR))
    prefixes, gaps, suffixes = zip(*cases)
    both = mc_loglikelihood(mdm.model, list(prefixes), list(gaps), suffix_ids=list(suffixes), mc_num=args.mc,
                            mask_id=mdm.mask_token_id, seed=0)
    left = mc_loglikelihood(mdm.model, list(prefixes), list(gaps), mc_num=args.mc, mask_id=mdm.mask_token_id, seed=0)
    exact = []
    with torch.no_grad():
        for prefix, g, _ in cases:
            logp = torch.log_softmax(ar.model(torch.tensor([prefix + g])).float()[0], -1)
            exact.append(sum(float(logp[len(prefix) - 1 + i, t]) for i, t in enumerate(g)))
    print(f"{len(cases)} held-out windows: {args.side} tokens | gap {args.gap} | {args.side} tokens; "
          f"MDM mc {args.mc}; {torch.get_num_threads()} thread(s)")
    print("| model · what it sees | nats per gap token | ± | perplexity |")
    print("|---|---:|---:|---:|")
    for name, values, kind in ((f"MDM `{MDM}` · prefix and suffix (infill ELBO)", both, "bound"),
                               (f"MDM `{MDM}` · prefix only (ELBO)", left, "bound"),
                               (f"AR twin `{AR}` · prefix only (exact)", exact, "")):
        nats = -np.array(values) / args.gap
        print(f"| {name} | {nats.mean():.3f} | {nats.std(ddof=1) / math.sqrt(len(nats)):.3f} | "
              f"{math.exp(nats.mean()):.1f}{' (bound)' if kind else ''} |")


if __name__ == "__main__":
    main()
