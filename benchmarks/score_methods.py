"""Confidence scoring (iLLaDA §6.2) vs Monte Carlo likelihood (LLaDA §6.1) on an offline multiple-choice set.

The set: held-out Shakespeare (the end of *The Winter's Tale*, which the demo model's training run keeps for
validation). Each question shows --context-lines lines of verse and asks for the true next line among
--choices lines (the others are distractor lines drawn from the same held-out passage). Reported per method:
accuracy ± standard error, the same with the score divided by the candidate's token count, forward passes (model
rows) per question, and seconds.

    python benchmarks/score_methods.py                       # the bundled demo model (default)
    python benchmarks/score_methods.py --model PATH --questions 300 --mc-num 8,32,128 --out results.json
    python benchmarks/score_methods.py --model random        # a random tiny model: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "data" / "shakespeare" / "winters_tale_gut.txt"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory or bundled name (default: the demo model); "
                   "'random' builds a random tiny model with the byte tokenizer")
    p.add_argument("--device", default="auto")
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--context-lines", type=int, default=3)
    p.add_argument("--heldout-chars", type=int, default=40_000,
                   help="the last N characters of the held-out play (the demo run holds out ~16k tokens of it)")
    p.add_argument("--mc-num", default="8,32", help="comma-separated Monte Carlo sample counts to compare")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def verse_lines(text: str) -> list[str]:
    """Lines of dialogue: stripped, at least three words, no speaker names (CAPITALS.) or stage directions."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if len(line.split()) < 3 or line.startswith("[") or re.fullmatch(r"[A-Z][A-Z .'-]+\.", line):
            continue
        lines.append(line)
    return lines


def build_questions(lines: list[str], n: int, choices: int, context_lines: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    starts = list(range(context_lines, len(lines)))
    rng.shuffle(starts)
    questions = []
    for i in starts[:n]:
        true = lines[i]
        pool = [j for j in range(len(lines)) if abs(j - i) > context_lines and lines[j] != true]
        options = [true] + [lines[j] for j in rng.sample(pool, choices - 1)]
        rng.shuffle(options)
        questions.append({"context": "\n".join(lines[i - context_lines:i]) + "\n", "choices": options,
                          "answer": options.index(true)})
    return questions


def load_model(name: str | None, device: str):
    import illada

    if name != "random":
        return illada.load(name, device=device)
    from illada.api import DiffusionLM
    from illada.config import preset
    from illada.model import build_model
    from illada.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512, mask_token_id=tok.mask_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return DiffusionLM(model=build_model(config, seed=0).eval(), tokenizer=tok, config=config, name="random-tiny",
                       is_random=True)


def run_method(lm, questions: list[dict], method: str, mc_num: int, batch_size: int, seed: int) -> dict:
    from illada.evaluation.runner import count_passes
    from illada.scoring import encode_pair, score_pairs

    correct = correct_norm = 0
    began = time.perf_counter()
    with count_passes(lm.model) as counts, torch.inference_mode():
        for q in questions:
            pairs = [(q["context"], c) for c in q["choices"]]
            scores, _ = score_pairs(lm, pairs, method=method, mc_num=mc_num, batch_size=batch_size, seed=seed)
            lengths = [len(encode_pair(lm.tokenizer, *pair)[1]) for pair in pairs]
            normed = [s / n for s, n in zip(scores, lengths)]
            correct += max(range(len(scores)), key=scores.__getitem__) == q["answer"]
            correct_norm += max(range(len(normed)), key=normed.__getitem__) == q["answer"]
    n = len(questions)

    def with_err(k: int) -> tuple[float, float]:
        p = k / n
        return p, math.sqrt(p * (1 - p) / max(n - 1, 1))

    acc, err = with_err(correct)
    acc_norm, err_norm = with_err(correct_norm)
    return {"method": method if method != "mc" else f"mc (mc_num={mc_num})", "accuracy": acc, "stderr": err,
            "accuracy_length_normalised": acc_norm, "stderr_length_normalised": err_norm,
            "passes_per_question": counts["rows"] / n, "calls_per_question": counts["calls"] / n,
            "seconds": time.perf_counter() - began}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    text = HELDOUT.read_text(encoding="utf-8")[-args.heldout_chars:]
    lines = verse_lines(text)
    questions = build_questions(lines, args.questions, args.choices, args.context_lines, args.seed)
    lm = load_model(args.model, args.device)
    print(f"model {lm.name}{' (random weights)' if lm.is_random else ''}: {len(questions)} questions, "
          f"{args.choices} choices, chance {1 / args.choices:.3f}", file=sys.stderr)
    results = [run_method(lm, questions, "confidence", 1, args.batch_size, args.seed)]
    for mc_num in (int(x) for x in args.mc_num.split(",") if x):
        results.append(run_method(lm, questions, "mc", mc_num, args.batch_size, args.seed))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"next-line choice on held-out Shakespeare ({lm.name}, n={len(questions)})")
    for column in ("method", "accuracy", "acc (length-norm.)", "passes/question", "seconds"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in results:
        table.add_row(r["method"], f"{r['accuracy']:.3f} ± {r['stderr']:.3f}",
                      f"{r['accuracy_length_normalised']:.3f} ± {r['stderr_length_normalised']:.3f}",
                      f"{r['passes_per_question']:.1f}", f"{r['seconds']:.1f}")
    Console().print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": lm.name, "questions": len(questions), "choices": args.choices,
                                              "context_lines": args.context_lines, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
