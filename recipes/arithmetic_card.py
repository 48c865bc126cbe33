"""Write the model card (README.md) and the generation defaults (generation_config.json: its prompt format and
canvas) of the bundled `illada-arithmetic` from its training runs (the AR twin it was adapted from, then each
diffusion stage) and the proof table's results (benchmarks/proof.py), with samples generated on the spot by the
exported weights.

    python recipes/arithmetic_card.py --stages runs/arithmetic/aligned-ar runs/arithmetic/adapted-mdm \
        runs/arithmetic/adapted-mdm-cont runs/arithmetic/blocks-mdm runs/arithmetic/blocks-mdm-long \
        --model src/illada/assets/models/illada-arithmetic --results docs/proof/results.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import illada
from illada.files import write_atomic

sys.path.insert(0, str(Path(__file__).parent))
from model_card import training_facts  # noqa: E402  (the Shakespeare card's reader of a run)

QUESTIONS = ["What is 37 + 48 * 2?", "What is (12 + 7) * 45?", "What is 63 - 88?"]
# what `illada generate QUESTION` then uses: the gsm8k preset's zero-shot prompt, the canvas it was trained on and
# the committed KV cache (as accurate as none here, and the fastest: README, "KV caches")
GENERATION_CONFIG = {"prompt_template": "Question: {prompt}\nAnswer:", "max_new_tokens": 96, "variable_length": False,
                     "block_length": 8, "cache": "committed"}
MODES = {"one token per pass": {}, "--threshold 0.9": dict(threshold=0.9),
         "--threshold 0.7 --cache dual": dict(threshold=0.7, cache="dual")}


def sample_lines(lm) -> list[str]:
    lines = []
    for title, options in MODES.items():
        for question in QUESTIONS:
            began = time.perf_counter()
            prompt = lm.generation.format_prompt(question)
            text, out = lm.generate(prompt, return_output=True, **options)  # the canvas of generation_config.json
            seconds = time.perf_counter() - began
            n = int(out.generated_lengths[0])
            lines.append(f"**{title}** · `{question}` — {n} tokens in {int(out.row_nfe[0])} passes "
                         f"({n / max(int(out.row_nfe[0]), 1):.2f} tokens/pass, {seconds:.2f} s)\n\n```text\n"
                         f"{prompt}{text}\n```\n")
    return lines


def accuracy_rows(results: dict, run: Path) -> list[str]:
    """The proof table's gsm8k cells of this run (the card's own model), each with its command."""
    rows, seen = [], set()
    for key, r in results.items():
        command = key[key.index("illada eval"):] if "illada eval" in key else key  # a grid's key: "grid: command"
        if f"--model {run} " not in command or "--task gsm8k" not in command or command in seen:
            continue
        seen.add(command)
        rows.append(f"| {100 * r['score']:.1f} | {r['n']} | {r.get('tokens_per_forward', 0):.2f} | "
                    f"{r.get('tokens_per_second', 0):.0f} | `{command}` |")
    return rows


def stage_row(run: Path, old_card: str) -> str:
    """The card's row of one training run; a run not on this machine keeps its row from the current card."""
    if not (run / "metrics.jsonl").is_file():
        kept = [line for line in old_card.splitlines() if line.startswith(f"| `{run}` |")]
        if not kept:
            raise SystemExit(f"{run}: no run here and no row for it in the current card")
        return kept[0]
    facts = training_facts(run)
    cfg, state, val = facts["config"], facts["state"], facts["val"]
    objective = {"ar": "AR SFT (next token, causal)",
                 "sft-blocks": f"block-causal SFT (`sft-blocks`, blocks of {cfg.get('block_length')}: each block "
                               "noised at its own rate, denoised from the clean tokens before it)"}.get(
        cfg["objective"], "masked diffusion SFT pairs, semi-autoregressive rows (clean prefix, a block of at most "
                          f"{cfg.get('clean_prefix_block')} tokens noised, the rest masked)")
    start = "from scratch" if not cfg.get("init_from") else \
        f"from `{cfg['init_from']}`" + (" (attention opened both ways, shifted logits)" if cfg.get("adapt_causal") else "")
    return (f"| `{run}` | {objective} | {start} | {state['step']:,} x {cfg['micro_batch_size']} rows | "
            f"{cfg['lr']} ({cfg['schedule']}) | {facts['step_seconds'] / 60:.0f} min | {val[-1]['val_loss']:.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=Path, nargs="+", required=True, help="training runs, first to last")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True, help="results.json of benchmarks/proof.py")
    args = p.parse_args()
    final = args.stages[-1]
    model_config = json.loads((args.model / "config.json").read_text())
    write_atomic(args.model / "generation_config.json", json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    lm = illada.load(args.model)
    params = lm.model.num_parameters()
    weights_mb = sum(f.stat().st_size for f in args.model.glob("*.safetensors")) / 1e6
    results = json.loads(args.results.read_text())
    table = "\n".join(["| accuracy % | n | tokens/pass | tokens/s | command |", "|---:|---:|---:|---:|---|",
                       *accuracy_rows(results, final)])
    old_card = (args.model / "README.md").read_text() if (args.model / "README.md").is_file() else ""
    stages = "\n".join(["| run | objective | start | steps | lr | wall time | last validation loss |",
                        "|---|---|---|---|---|---:|---:|", *(stage_row(run, old_card) for run in args.stages)])
    card = f"""# illada-arithmetic

A {params / 1e6:.1f}M-parameter **block-causal** masked diffusion language model ({model_config.get('num_hidden_layers')}
layers, hidden {model_config.get('hidden_size')}, byte-level vocabulary of {model_config.get('vocab_size')} tokens,
Dream-style shifted logits) for the `arithmetic` task of `illada tasks` (the `aligned` working). Attention is causal
except inside the block being denoised, whose 8 tokens see each other both ways (Fast-dLLM v2 / SDAR; `block_causal`
in config.json). It answers `What is A + B * C?`-style questions (operands 0-99, also A - B, A * B, (A + B) * C and
short word problems) with zero-padded working and a final `#### N` line, then EOS padding.
{weights_mb:.1f} MB of bf16 safetensors.

It is a base model, not chat-tuned. Its prompt is `Question: <q>\\nAnswer:`, which `illada eval --task gsm8k
--num-fewshot 0` writes (no `--instruct`). It was trained on blocks of 8 tokens counted from the answer's start, so it
is decoded in blocks of 8. Its `generation_config.json` records both (`prompt_template`, and a fixed canvas of 96
tokens in blocks of 8, with the committed KV cache, which is exact for a block-causal model), so `illada generate`
frames a bare question and decodes it that way; flags override it, and `--raw` sends the prompt as given.
`illada eval` takes its settings from the task preset instead, so the canvas is given there:

```console
$ illada generate "What is 37 + 48 * 2?" --model illada-arithmetic --threshold 0.9
$ illada eval --model illada-arithmetic --task gsm8k --data test.jsonl --num-fewshot 0 \\
    --fixed-length --max-new-tokens 96 --block-length 8 --steps 96 --cache committed
```

Infilling, likelihood scoring and `illada rl` refuse it: its tokens never see the text after their block.

## How it was trained

It did not learn arithmetic as a diffusion model from scratch. Every masked diffusion model trained from scratch on
this task scored 0-4%, at equal compute and beyond. Its weights come from the autoregressive twin
(`recipes/arithmetic-aligned-ar.yaml`, 93.0% held-out). Attention was opened both ways, and the logits were shifted
so that position i predicts token i + 1 (Dream's recipe for adapting AR models). Then came masked diffusion SFT on
semi-autoregressive rows (`--clean-prefix-block`, `recipes/arithmetic-adapted.sh`): 77.0% (80.5% with the committed cache), the model bundled before
this one. Last, that model was made block-causal and trained with `--objective sft-blocks`
(`recipes/arithmetic-blocks.sh`): the answer cut into blocks of 8, each block masked at its own rate and denoised
from the clean tokens before it, every block of a row in one forward (the noisy row beside the clean one), 600
steps (`blocks-mdm`, 89.5%, bundled before this one), then 1,200 more at the same learning rate on a new data order
(`blocks-mdm-long`: this model).
Reproduce all of it with `bash recipes/arithmetic-aligned.sh && bash recipes/arithmetic-adapted.sh && bash
recipes/arithmetic-blocks.sh`. Training used one CPU thread on a 2-core machine shared with another run, in fp32
(each of the last three stages started from the bf16 export of the one before, the weights bundled then). The data is
300,000 problems from `illada tasks make arithmetic --variant aligned --format completion --n 300000 --seed 7`. The
held-out problems (`--split test`) never occur in training. Rows of runs that are no longer on the machine that wrote
this card are kept from the earlier card.

{stages}

## Accuracy on held-out problems (from benchmarks/proof.py, cells of the final run)

{table}

## Samples

Real outputs of the bundled weights (greedy), on the canvas of its generation_config.json with the options named:

{chr(10).join(sample_lines(lm))}
"""
    write_atomic(args.model / "README.md", card)
    print(f"wrote {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
