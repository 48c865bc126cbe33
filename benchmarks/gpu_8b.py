"""The 8B shapes on one GPU (issue 15 item 5): a LoRA SFT step's peak memory and tokens/s in bf16 and in QLoRA
(NF4 base), and decoding tokens/s in bf16 and in torchao int4, each beside `plan_memory`'s estimate. Random
weights of the `illada-8b` preset (the timings and memory do not depend on the values). One table, one run:

    python benchmarks/gpu_8b.py                         # on a CUDA machine: ~16 GB bf16 weights, fits an 80 GB card
    python benchmarks/gpu_8b.py --device cpu --preset tiny --seq-len 128 --gen-length 64   # a smoke run of the code

An SFT step is the trainer's worst one: every token masked (t = 1), two packed segments, activation checkpointing,
bf16 autocast, backward, clipping, AdamW over the adapters (LoRA r16 on the seven projections). Decoding: a
`--prompt-len` prompt, `--gen-length` new tokens on LLaDA's fixed canvas in 32-token blocks, two tokens per pass
(a fixed number of passes: random weights give no confident tokens for a threshold to commit). Peaks are
`torch.cuda.max_memory_allocated` on CUDA and live tensor storage (`illada.memory.measure_peak`) on CPU.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from illada.config import preset
from illada.diffusion.objective import pretrain_loss
from illada.lora import TARGETS, wrap
from illada.memory import measure_peak, plan_memory
from illada.model import build_model
from illada.sampling import generate
from illada.training.parallelize import apply_activation_checkpointing

GiB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_of(fn, device: torch.device, *external) -> int:
    """The peak bytes of one call of `fn` (after a first call that allocates what stays)."""
    if device.type != "cuda":
        return measure_peak(fn, *external)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


def model_on(config, device: torch.device, qlora: bool):
    """A random bf16 model on `device`; with `qlora` its projections NF4 (bitsandbytes), built on the CPU first
    so the full-precision projections never reach the GPU together."""
    if not qlora:
        return build_model(config, device=device, dtype=torch.bfloat16, seed=0)
    from illada.qlora import quantize_base

    model = build_model(config, device="cpu", dtype=torch.bfloat16, seed=0)
    quantize_base(model, "nf4", device, torch.bfloat16)
    return model.to(device)


def sft_row(config, device: torch.device, *, qlora: bool, seq_len: int, batch: int, rank: int, steps: int) -> dict:
    model = model_on(config, device, qlora)
    if not qlora:
        model.requires_grad_(False)
    wrap(model, rank, 2 * rank, 0.0, ",".join(TARGETS), seed=0)
    apply_activation_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    segments = (torch.arange(seq_len, device=device)[None, :].expand(batch, -1) >= seq_len // 2).long()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = pretrain_loss(model, ids, config.mask_token_id, t=torch.ones(batch, device=device),
                                    segment_ids=segments)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    step()  # the optimizer's states exist from here on
    peak = peak_of(step, device, model, optimizer, ids)
    seconds = timed(step, device, steps)
    plan = plan_memory(config, "sft", seq_len=seq_len, batch=batch, dtype="bf16", lora_r=rank,
                       quantize="nf4" if qlora else None, device="cuda").peak
    del model, optimizer
    return {"peak": peak, "plan": plan, "tokens_per_s": batch * seq_len / seconds}


def decode_row(config, device: torch.device, *, quantize: str | None, prompt_len: int, gen_length: int,
               batch: int, repeats: int) -> dict:
    model = build_model(config, device=device, dtype=torch.bfloat16, seed=0).eval().requires_grad_(False)
    if quantize:
        from illada.quantize import quantize_model

        quantize_model(model, quantize, torch.bfloat16)
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)

    def run() -> None:
        with torch.inference_mode():
            generate(model, prompt, gen_length=gen_length, steps=gen_length // 2, block_length=32,
                     mask_id=config.mask_token_id, variable_length=False)

    run()
    peak = peak_of(run, device, model, prompt)
    seconds = timed(run, device, repeats)
    plan = plan_memory(config, "generate", seq_len=prompt_len + gen_length, batch=batch, dtype="bf16",
                       quantize=quantize, device="cuda", fixed_length=True, prompt_len=prompt_len).peak
    del model
    return {"peak": peak, "plan": plan, "tokens_per_s": batch * gen_length / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="illada-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq-len", type=int, default=2048, help="SFT tokens per row")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed SFT steps (median)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--only", choices=["sft", "decode"], default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    config = preset(args.preset, mask_token_id=3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.preset}: {config.num_parameters() / 1e9:.2f}B parameters on {name}, torch {torch.__version__}")
    print("| job | mode | peak GiB | plan GiB | tokens/s |\n|---|---|---:|---:|---:|")

    def row(job: str, mode: str, r: dict) -> None:
        print(f"| {job} | {mode} | {r['peak'] / GiB:.3f} | {r['plan'] / GiB:.3f} | {r['tokens_per_s']:,.1f} |",
              flush=True)

    if args.only in (None, "sft"):
        for qlora in (False, True):
            row(f"LoRA SFT step, {args.batch} x {args.seq_len}", "QLoRA (NF4 base)" if qlora else "bf16",
                sft_row(config, device, qlora=qlora, seq_len=args.seq_len, batch=args.batch, rank=args.rank,
                        steps=args.steps))
    if args.only in (None, "decode"):
        for quantize in (None, "int4"):
            row(f"decode {args.gen_length} tokens, 2 per pass", quantize or "bf16",
                decode_row(config, device, quantize=quantize, prompt_len=args.prompt_len,
                           gen_length=args.gen_length, batch=args.batch, repeats=2))


if __name__ == "__main__":
    main()
