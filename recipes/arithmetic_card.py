"""Write the model card (README.md) of the bundled `illada-arithmetic` from its training run and the proof table's
results (benchmarks/proof.py), with samples generated on the spot by the exported weights.

    python recipes/arithmetic_card.py --run runs/arithmetic/mdm --model src/illada/assets/models/illada-arithmetic \
        --results docs/proof/results.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import illada
from illada.files import write_atomic

sys.path.insert(0, str(Path(__file__).parent))
from model_card import training_facts  # noqa: E402  (the Shakespeare card's reader of a run)

PROMPTS = ["What is 37 + 48 * 2?", "What is (12 + 7) * 45?", "What is 63 - 88?"]
MODES = {"one token per pass (variable length, block 32)": {}, "--threshold 0.9": dict(threshold=0.9),
         "--threshold 0.5 --cache dual": dict(threshold=0.5, cache="dual")}


def sample_lines(lm) -> list[str]:
    lines = []
    for title, options in MODES.items():
        for prompt in PROMPTS:
            began = time.perf_counter()
            text, out = lm.generate(prompt, return_output=True, max_new_tokens=96, **options)
            seconds = time.perf_counter() - began
            n = int(out.generated_lengths[0])
            lines.append(f"**{title}** · `{prompt}` — {n} tokens in {int(out.row_nfe[0])} passes "
                         f"({n / max(int(out.row_nfe[0]), 1):.2f} tokens/pass, {seconds:.2f} s)\n\n```text\n"
                         f"{prompt}{text}\n```\n")
    return lines


def accuracy_rows(results: dict, run: Path) -> list[str]:
    """The proof table's gsm8k cells of this run (the card's own model), each with its command."""
    rows = []
    for command, r in results.items():
        if f"--model {run} " not in command or "--task gsm8k" not in command:
            continue
        rows.append(f"| {100 * r['score']:.1f} | {r.get('tokens_per_forward', 0):.2f} | "
                    f"{r.get('tokens_per_second', 0):.0f} | `{command}` |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True, help="results.json of benchmarks/proof.py")
    args = p.parse_args()
    facts = training_facts(args.run)
    cfg, state, val = facts["config"], facts["state"], facts["val"]
    model_config = json.loads((args.model / "config.json").read_text())
    lm = illada.load(args.model)
    params = lm.model.num_parameters()
    weights_mb = sum(f.stat().st_size for f in args.model.glob("*.safetensors")) / 1e6
    results = json.loads(args.results.read_text())
    table = "\n".join(["| accuracy % | tokens/pass | tokens/s | command |", "|---:|---:|---:|---|",
                       *accuracy_rows(results, args.run)])
    card = f"""# illada-arithmetic

A {params / 1e6:.1f}M-parameter masked diffusion language model (iLLaDA architecture: bidirectional Transformer,
{model_config.get('num_hidden_layers')} layers, hidden {model_config.get('hidden_size')}, byte-level vocabulary of
{model_config.get('vocab_size')} tokens) trained from scratch by `illada train` on the `arithmetic` task of
`illada tasks`. It answers `What is A + B * C?`-style questions (operands 0-99, also A - B, A * B, (A + B) * C and
short word problems) with short working and a final `#### N` line, then stops with EOS. It is a base model (not
chat-tuned): score it with `illada eval --task gsm8k --num-fewshot 0` (no `--instruct`). {weights_mb:.1f} MB of
bf16 safetensors.

## Data and training

Documents `Question: <q>\\nAnswer: <working>` (75%) or `<q>\\n<working>` (25%), each followed by one EOS, packed into
rows of {cfg['seq_len']} tokens, every token maskable: the iLLaDA variable-length format, so the model learns to stop.
400,000 training problems from `illada tasks make arithmetic --n 400000` (seed 0); the held-out test problems
(`--split test`) never occur in training. Reproduce (data, both twins, export) with `bash recipes/arithmetic.sh`.

| | |
|---|---|
| objective | masked diffusion, iLLaDA random split with probability {cfg['split_prob']} |
| steps | {state['step']:,} of {cfg['micro_batch_size'] * cfg['grad_accum']} rows x {cfg['seq_len']} tokens ({state['tokens']:,} tokens) |
| optimizer | AdamW, lr {cfg['lr']} ({cfg['schedule']}: {cfg['warmup_steps']} warmup steps, linear decay over the last {cfg['decay_fraction']:.0%} to {cfg['min_lr']}), weight decay {cfg['weight_decay']} |
| hardware | 1 CPU thread (2-core machine shared with the AR twin and other runs), fp32 |
| wall time | {facts['step_seconds'] / 3600:.2f} h of training steps |
| validation ELBO | {val[-1]['val_loss']:.3f} nats/token at step {val[-1]['step']} |

The autoregressive twin (`recipes/arithmetic-ar.yaml`: same shape, data and steps, causal) is not bundled.

## Accuracy on held-out problems (from benchmarks/proof.py, cells of this run)

{table}

## Samples

Real outputs of the bundled weights (`illada generate PROMPT --model illada-arithmetic` with the options named;
greedy):

{chr(10).join(sample_lines(lm))}
"""
    write_atomic(args.model / "README.md", card)
    print(f"wrote {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
