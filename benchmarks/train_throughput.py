"""Training throughput of the masked-diffusion step against the autoregressive step: same model shape, same batch.

Both steps run forward + backward + AdamW on the same (batch, seq_len) tokens, so their FLOPs are equal (the
diffusion step only adds the cheap masking), and the tokens/s ratio should be near 1.0. The steps are measured
interleaved (diffusion, AR, diffusion, AR, ...) so drift in machine speed hits both alike; medians are reported.

    python benchmarks/train_throughput.py                                   # `small` preset, fp32, this CPU
    python benchmarks/train_throughput.py --preset illada-8b --n-layers 4 --device cuda --dtype bf16 \\
        --batch 4 --seq-len 4096                                            # 8B layer shapes on a GPU

MFU = model FLOPs per token (illada.training.metrics.flops_per_token) x tokens/s / peak FLOP/s (--peak-tflops;
default 0.16 on CPU = 2-core fp32 matmul measured on these machines, 989 for H100 dense bf16).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from illada.config import preset
from illada.diffusion import AutoregressiveObjective, DiffusionObjective
from illada.model import build_model
from illada.training.metrics import default_peak_flops, flops_per_token


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--n-layers", type=int, default=None, help="override the preset's depth (8B shapes on one GPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="measured steps per objective")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per objective first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def model_config(args, causal: bool = False):
    overrides = {"causal": causal}
    if args.n_layers:
        overrides["n_layers"] = args.n_layers
    config = preset(args.preset, **overrides)
    if config.mask_token_id is None:  # presets without a tokenizer: the last id plays the mask
        config = config.replace(mask_token_id=config.vocab_size - 1)
    return config


def make_step(objective, causal: bool, args, device: torch.device):
    config = model_config(args, causal)
    model = build_model(config, device=device, seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=generator, device=device)
    # the mask id must never appear as data
    tokens[tokens == config.mask_token_id] = (config.mask_token_id + 1) % config.vocab_size
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    def step() -> float:
        with autocast:
            loss, _ = objective(model, {"input_ids": tokens}, generator=generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return config, step


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = model_config(args)
    # split_prob=0 on both: the random split adds segment masks, which changes the attention kernel, not FLOPs
    steps = {
        "diffusion": make_step(DiffusionObjective(mask_id=config.mask_token_id, split_prob=0.0), False, args, device)[1],
        "autoregressive": make_step(AutoregressiveObjective(split_prob=0.0), True, args, device)[1],
    }
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            began = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - began)

    tokens = args.batch * args.seq_len
    flops = flops_per_token(config, args.seq_len)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else default_peak_flops(device.type)
    params = sum(p.numel() for p in build_model(config, device="meta").parameters())
    print(f"preset {args.preset}{f' ({args.n_layers} layers)' if args.n_layers else ''} · {params / 1e6:.1f}M params · "
          f"batch {args.batch} x {args.seq_len} · {args.dtype} on {device} · {args.steps} steps each (median)")
    print(f"{'objective':<16}{'s/step':>10}{'tokens/s':>12}{'MFU':>9}{'vs AR':>8}")
    ar_rate = tokens / statistics.median(times["autoregressive"])
    for name, measured in times.items():
        seconds = statistics.median(measured)
        rate = tokens / seconds
        print(f"{name:<16}{seconds:>10.3f}{rate:>12.0f}{rate * flops / peak:>8.1%}{rate / ar_rate:>8.2f}")


if __name__ == "__main__":
    main()
