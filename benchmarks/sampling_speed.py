"""Sampling speed of every decoding mode on one model, against a same-size autoregressive decoder.

Metric (one definition for every mode): generated tokens up to and excluding the first EOS, summed over the batch,
divided by the wall seconds of the whole call (the prompt's first pass included). Also reported: NFE (forward
passes) and tokens committed per forward.

    python benchmarks/sampling_speed.py                       # random `small` preset model on CPU
    python benchmarks/sampling_speed.py --preset illada-8b --device cuda --dtype bfloat16 --gen-length 256
    python benchmarks/sampling_speed.py --model PATH_OR_NAME  # a checkpoint (real confidences: threshold rule)

Random weights are never confident, so for a random model the "parallel" modes commit a fixed number of tokens
per pass (--tokens-per-step) instead of applying the confidence threshold; the cache and canvas costs are the same.
The autoregressive baseline is a causal random model of the same shape (greedy, KV cache, no EOS).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from illada.config import preset
from illada.model import build_model
from illada.sampling import generate
from illada.sampling.autoregressive import greedy_generate_ar

MODES = ("fixed", "variable",
         "fixed+parallel", "fixed+parallel+prefix", "fixed+parallel+dual",
         "variable+parallel", "variable+parallel+prefix", "variable+parallel+dual",
         "ar")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random", help="checkpoint directory or bundled name; 'random' (default) "
                   "builds a random model from --preset")
    p.add_argument("--preset", default="small", help="shape of the random model (default: small)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-length", type=int, default=64, help="random prompt length (random model)")
    p.add_argument("--prompt", default="Once upon a time", help="prompt text (checkpoint)")
    p.add_argument("--gen-length", type=int, default=128)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9, help="confidence threshold (checkpoint)")
    p.add_argument("--tokens-per-step", type=int, default=4, help="tokens per pass of the parallel modes (random)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per mode (median reported)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"unknown modes: {', '.join(unknown)}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    if args.model == "random":
        config = preset(args.preset)
        mask_id = config.mask_token_id if config.mask_token_id is not None else config.vocab_size - 1
        config = config.replace(mask_token_id=mask_id)
        model = build_model(config, device=device, dtype=dtype, seed=0).eval()
        prompt = torch.randint(0, mask_id, (args.batch_size, args.prompt_length), device=device)
        eos = None  # random weights: no meaningful EOS, every mode generates the full budget
        random_weights = True
    else:
        import illada

        handle = illada.load(args.model, device=device, dtype=dtype)
        model, config, mask_id = handle.model.eval(), handle.config, handle.mask_token_id
        ids = handle.tokenizer.encode(args.prompt)
        prompt = torch.tensor([ids] * args.batch_size, device=device)
        eos = handle.tokenizer.eos_token_id
        random_weights = handle.is_random

    g, bl = args.gen_length, args.block_length
    parallel = (dict(steps=max(bl // args.tokens_per_step, 1) * (g // bl)) if random_weights
                else dict(threshold=args.threshold))
    base = dict(mask_id=mask_id, gen_length=g, block_length=bl, eos_token_id=eos)

    def options(mode: str) -> dict:
        variable = mode.startswith("variable")
        opts = dict(base, variable_length=variable, steps=bl if variable else g, early_stop=False)
        if "parallel" in mode:
            opts.update(parallel)
            if variable and "steps" in parallel:
                opts["steps"] = max(bl // args.tokens_per_step, 1)  # per block
        for cache in ("prefix", "dual"):
            if mode.endswith(cache):
                opts["cache"] = cache
        return opts

    ar_model = None
    if "ar" in modes:
        ar_model = build_model(config.replace(causal=True), device=device, dtype=dtype, seed=1).eval()

    def run(mode: str):
        if mode == "ar":
            return greedy_generate_ar(ar_model, prompt, g, eos_token_id=eos)
        with torch.inference_mode():
            return generate(model, prompt, **options(mode))

    with torch.inference_mode():  # short warm-up (allocator, kernels)
        generate(model, prompt, mask_id=mask_id, gen_length=bl, block_length=bl, steps=2)
    if ar_model is not None:
        greedy_generate_ar(ar_model, prompt, 2)
    results = []
    for mode in modes:
        times, out = [], None
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            out = run(mode)
            sync(device)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        tokens = int(out.generated_lengths.sum().item())
        results.append(dict(mode=mode, tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds, nfe=out.nfe,
                            tokens_per_forward=out.tokens_per_forward))
        print(f"{mode:26s} {tokens:6d} tok {seconds:8.3f} s {tokens / seconds:9.1f} tok/s  nfe {out.nfe:5d}  "
              f"tok/fwd {out.tokens_per_forward:5.2f}", file=sys.stderr)

    ref = {r["mode"]: r["tokens_per_s"] for r in results}
    what = ("random weights: parallel = %d tokens/pass" % args.tokens_per_step if random_weights
            else f"parallel = threshold {args.threshold}")
    print(f"\nmodel {args.model if args.model != 'random' else 'random ' + args.preset}, {args.device} {args.dtype}, "
          f"batch {args.batch_size}, prompt {prompt.shape[1]}, gen {g}, block {bl}; {what}\n")
    print("| mode | tokens | seconds | tokens/s | NFE | tokens/forward | vs fixed | vs AR |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        vs_fixed = f"{r['tokens_per_s'] / ref['fixed']:.2f}x" if "fixed" in ref else "-"
        vs_ar = f"{r['tokens_per_s'] / ref['ar']:.2f}x" if "ar" in ref else "-"
        print(f"| {r['mode']} | {r['tokens']} | {r['seconds']:.3f} | {r['tokens_per_s']:.1f} | {r['nfe']} | "
              f"{r['tokens_per_forward']:.2f} | {vs_fixed} | {vs_ar} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
