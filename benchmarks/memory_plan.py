"""The memory planner (`illada info --plan`, `illada.memory.plan_memory`) against measured peaks, and its 8B plans.

Measured: one step of each job on a randomly initialised CPU model of a small shape, run as illada runs it
(`illada.memory.measure_memory`: an sft step with every token masked and two packed segments, backward, clipping
and AdamW; a generate; an rl step with rollouts, scoring, a reference copy and two updates), and its peak of live
tensor storage followed by a TorchDispatchMode (`illada.memory.measure_peak`): every storage an operator returns
is counted until a weak reference reports it freed. These are the bytes a GPU allocator would hand out for the
same tensors (`torch.cuda.max_memory_allocated`), not the process's RSS. The estimate is `plan_memory` with the
same settings and `device="cpu"` (no CUDA context; the CPU's for-loop AdamW).

Then the 8B plans (illada-8b and llada-8b, 2048 tokens, batch 1, bf16, CUDA) against a 24 GiB card.

    OMP_NUM_THREADS=1 python benchmarks/memory_plan.py
    python benchmarks/memory_plan.py --gpu-memory 80 --seq-len 4096
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from illada.config import ModelConfig, preset
from illada.memory import GiB, measure_memory, plan_memory

SMALL = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=256, mask_token_id=3, name="small-512")
WIDE_VOCAB = SMALL.replace(vocab_size=4096, name="vocab-4096")
DEEP = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=352, n_layers=4, n_heads=4, n_kv_heads=2,
                   max_seq_len=256, mask_token_id=3, name="deep-256")
BLOCKS = DEEP.replace(block_causal=True, shift_logits=True, name="deep-256-blocks")

# (label, shape, job, options): options are plan_memory's (and measure_memory's) keywords
CASES = [
    ("sft full", SMALL, "sft", {"seq_len": 64, "batch": 2}),
    ("sft full", WIDE_VOCAB, "sft", {"seq_len": 64, "batch": 2}),
    ("sft full", DEEP, "sft", {"seq_len": 128, "batch": 2}),
    ("sft full, checkpointed", DEEP, "sft", {"seq_len": 128, "batch": 2, "activation_checkpointing": True}),
    ("sft full, bf16 autocast", DEEP, "sft", {"seq_len": 128, "batch": 2, "dtype": "bf16"}),
    ("sft LoRA r8", DEEP, "sft", {"seq_len": 128, "batch": 2, "lora_r": 8}),
    ("sft LoRA r8, checkpointed", DEEP, "sft", {"seq_len": 128, "batch": 2, "lora_r": 8,
                                                "activation_checkpointing": True}),
    ("sft LoRA r8, bf16 autocast", DEEP, "sft", {"seq_len": 128, "batch": 2, "lora_r": 8, "dtype": "bf16"}),
    ("sft-blocks full (block-causal, shift)", BLOCKS, "sft", {"seq_len": 128, "batch": 2, "block_length": 8}),
    ("sft-blocks full, bf16 autocast", BLOCKS, "sft", {"seq_len": 128, "batch": 2, "block_length": 8,
                                                       "dtype": "bf16"}),
    ("sft-blocks LoRA r8, checkpointed", BLOCKS, "sft", {"seq_len": 128, "batch": 2, "block_length": 8,
                                                         "lora_r": 8, "activation_checkpointing": True}),
    ("generate, no cache", SMALL, "generate", {"seq_len": 96, "batch": 2, "block_length": 16, "prompt_len": 16}),
    ("generate, prefix cache", SMALL, "generate", {"seq_len": 96, "batch": 2, "block_length": 16,
                                                   "prompt_len": 16, "cache": "prefix"}),
    ("generate, prefix cache, fixed canvas", SMALL, "generate", {"seq_len": 96, "batch": 2, "block_length": 16,
                                                                 "prompt_len": 16, "cache": "prefix",
                                                                 "fixed_length": True}),
    ("generate, dual cache", SMALL, "generate", {"seq_len": 96, "batch": 2, "block_length": 16, "prompt_len": 16,
                                                 "cache": "dual"}),
    ("generate, dual cache", DEEP, "generate", {"seq_len": 128, "batch": 4, "block_length": 32, "prompt_len": 32,
                                                "cache": "dual"}),
    ("generate, sampled (T=1)", WIDE_VOCAB, "generate", {"seq_len": 64, "batch": 2, "block_length": 16,
                                                         "prompt_len": 16, "temperature": 1.0}),
    ("generate int8, prefix cache", DEEP, "generate", {"seq_len": 96, "batch": 2, "block_length": 32,
                                                       "prompt_len": 32, "cache": "prefix", "quantize": "int8"}),
    ("rl, coupled", SMALL, "rl", {"seq_len": 48, "batch": 2, "group_size": 4, "prompt_len": 16}),
    ("rl, mean_field", SMALL, "rl", {"seq_len": 48, "batch": 2, "group_size": 4, "prompt_len": 16,
                                     "estimator": "mean_field"}),
]

PLANS_8B = [
    ("sft, full (bf16 autocast)", "sft", {}),
    ("sft, LoRA r16", "sft", {"lora_r": 16}),
    ("sft, QLoRA int4 + LoRA r16", "sft", {"lora_r": 16, "quantize": "int4"}),
    ("generate bf16", "generate", {}),
    ("generate int4", "generate", {"quantize": "int4"}),
    ("generate int4, dual cache", "generate", {"quantize": "int4", "cache": "dual"}),
]


def shape(config: ModelConfig) -> str:
    return (f"{config.name}: {config.n_layers}x{config.hidden_size}, ffn {config.intermediate_size}, "
            f"vocab {config.vocab_size}")


def measured_table() -> list[str]:
    lines = ["| case | shape | tokens | estimate | measured | estimate / measured | estimated peak at |",
             "|---|---|---|---|---|---|---|"]
    worst = 0.0
    for label, config, job, options in CASES:
        if options.get("quantize"):
            try:
                import torchao  # noqa: F401
            except ImportError:
                continue
        began = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            measured = measure_memory(config, job, **options)
        plan_options = {k: v for k, v in options.items() if k != "activation_checkpointing"}
        if job == "sft":
            plan_options.pop("prompt_len", None)
        plan = plan_memory(config, job, device="cpu", **{"dtype": "fp32", **plan_options})
        checkpointed = options.get("activation_checkpointing", False)
        estimate = plan.peak_checkpointed if checkpointed else plan.peak
        phase = plan.phase_checkpointed if checkpointed else plan.phase
        ratio = estimate / measured
        worst = max(worst, abs(ratio - 1))
        rows = options["batch"] * options.get("group_size", 1)
        lines.append(f"| {label} | {shape(config)} | {rows} x {options['seq_len']} | {estimate / 2**20:.2f} MiB | "
                     f"{measured / 2**20:.2f} MiB | {ratio:.3f} | {phase} |")
        print(f"  {label} ({config.name}): {time.perf_counter() - began:.1f}s", flush=True)
    lines.append(f"\nlargest deviation: {100 * worst:.1f}% (target: within 15%)")
    return lines


def plans_8b(seq_len: int, gpu: float) -> list[str]:
    lines = [f"| model | job | weights | grads + AdamW | activations (ckpt) | KV cache | peak | peak, checkpointed "
             f"| fits {gpu:g} GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("illada-8b", "llada-8b"):
        config = preset(name)
        for label, job, options in PLANS_8B:
            plan = plan_memory(config, job, seq_len=seq_len, batch=1, **options)

            def gib(key: str) -> str:
                return f"{plan.item(key) / GiB:.2f}"

            acts = (f"{(plan.item('activations') + plan.item('weight_copies')) / GiB:.2f} "
                    f"({plan.item('activations_checkpointed') / GiB:.2f})" if job == "sft"
                    else f"{plan.item('activations') / GiB:.2f}")
            ck = f"{plan.peak_checkpointed / GiB:.1f} GiB" if plan.peak_checkpointed is not None else "-"
            fits, fits_ck = plan.fits(gpu * GiB)
            verdict = ("yes" if fits else "no") + ("" if fits_ck is None else f" / {'yes' if fits_ck else 'no'}")
            optim = (plan.item("gradients") + plan.item("optimizer")) / GiB
            lines.append(f"| {name} | {label} | {gib('weights')} | {optim:.2f} | {acts} | {gib('kv_cache')} | "
                         f"{plan.peak / GiB:.1f} GiB | {ck} | {verdict} |")
    lines.append("\n(GiB; activations include sft's bf16 weight copies; fits: no checkpointing / checkpointed; "
                 "the peaks include a 0.5 GiB CUDA context)")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=2048, help="tokens of the 8B plans")
    p.add_argument("--gpu-memory", type=float, default=24.0, help="the card of the 8B plans, GiB")
    p.add_argument("--skip-measured", action="store_true", help="only the 8B plans")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = []
    if not args.skip_measured:
        print("measuring (CPU, fp32 unless noted):", flush=True)
        out += ["### Estimate vs measured peak (CPU, fp32 unless noted)", "", *measured_table(), ""]
    out += [f"### 8B plans ({args.seq_len} tokens, batch 1, bf16, CUDA)", "", *plans_8b(args.seq_len, args.gpu_memory)]
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
