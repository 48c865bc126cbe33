"""QLoRA vs LoRA on the CPU: weight bytes, the peak of one SFT step, seconds per step, and the memory planner.

One `sft`-style step (every token masked, two packed segments, backward, clipping, AdamW over the adapters) on a
randomly initialised model of the `small` preset (or `--preset`), as `illada.memory.measure_memory` runs it: LoRA
(the frozen base in fp32, as the trainer loads it) against QLoRA (`illada.qlora.quantize_base`: NF4 projections,
then the same PEFT adapters). Each in fp32 (the CPU default) and under bf16 autocast (the CUDA layout: QLoRA's
embedding, norms and head in bf16, 4-bit compute in bf16), the bf16 rows beside `plan_memory`'s estimate.
Peaks are live tensor storage (`illada.memory.measure_peak`, the 4-bit layers' absmax included), not RSS.

    OMP_NUM_THREADS=1 python benchmarks/qlora.py
    OMP_NUM_THREADS=1 python benchmarks/qlora.py --preset tiny --seq-len 64 --steps 5
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from illada.config import preset
from illada.diffusion.objective import pretrain_loss
from illada.lora import TARGETS, wrap
from illada.memory import measure_peak, plan_memory
from illada.model import build_model
from illada.qlora import quantize_base, quantized_layers, weight_bytes

MiB = 2**20


def run(config, *, qlora: bool, bf16: bool, seq_len: int, batch: int, rank: int, steps: int) -> dict:
    model = build_model(config, device="cpu", seed=0)
    if qlora:
        quantize_base(model, "nf4", "cpu", torch.bfloat16 if bf16 else torch.float32)
    wrap(model, rank, 2 * rank, 0.0, ",".join(TARGETS), seed=0)
    sizes = weight_bytes(model) if qlora else {"quantized": 0, "other": sum(p.numel() * p.element_size()
                                                                           for p in model.parameters())}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)
    segments = (torch.arange(seq_len)[None, :].expand(batch, -1) >= seq_len // 2).long()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss, _ = pretrain_loss(model, ids, config.mask_token_id, t=torch.ones(batch), segment_ids=segments)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    step()  # the optimizer's states exist from here on
    absmax = [layer.weight.quant_state.absmax for layer in quantized_layers(model)] if qlora else []
    peak = measure_peak(step, model, optimizer, ids, *absmax)
    seconds = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - began)
    plan = None
    if bf16:
        plan = plan_memory(config, "sft", seq_len=seq_len, batch=batch, dtype="bf16", lora_r=rank,
                           quantize="nf4" if qlora else None, device="cpu").peak
    return {"weights": sizes["quantized"] + sizes["other"], "peak": peak, "s_per_step": statistics.median(seconds),
            "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    args = parser.parse_args()
    config = preset(args.preset, mask_token_id=3)
    print(f"{args.preset}: {config.num_parameters():,} parameters, {args.batch} x {args.seq_len} tokens, "
          f"LoRA r{args.rank} on all seven projections, {torch.get_num_threads()} thread(s)")
    print(f"{'':24} {'weights MiB':>12} {'step peak MiB':>14} {'plan MiB':>9} {'s/step':>8}")
    for bf16 in (False, True):
        for qlora in (False, True):
            r = run(config, qlora=qlora, bf16=bf16, seq_len=args.seq_len, batch=args.batch, rank=args.rank,
                    steps=args.steps)
            label = f"{'QLoRA nf4' if qlora else 'LoRA'}, {'bf16 autocast' if bf16 else 'fp32'}"
            plan = f"{r['plan'] / MiB:9.1f}" if r["plan"] else f"{'-':>9}"
            print(f"{label:24} {r['weights'] / MiB:12.2f} {r['peak'] / MiB:14.1f} {plan} {r['s_per_step']:8.3f}")


if __name__ == "__main__":
    main()
