"""Masked-operand arithmetic: the MDM fills a hidden operand from the result written after it; the AR twin cannot.

    OMP_NUM_THREADS=2 python benchmarks/arithmetic_infill.py [--mdm DIR] [--ar DIR] [--n 100]

Held-out problems (test-split keys of `illada tasks make arithmetic`, so no training row holds the question) with a
two-digit second operand, written in the aligned working the models were trained on, with the operand hidden in
the question and in the working, and the result left in place:

    Question: What is 37 + <|mask:2|>?\\nAnswer: 37 + <|mask:2|> = 085\\n#### 85

A case is right when the working's hole is filled with the one operand that gives the result; the question's hole
is reported apart (an sft-pairs model never had a prompt token masked in training, so it is untrained there) and
with both holes filled alike. Three ways, side by side:
- MDM infill: one `lm.infill` call per batch (the holes are filled from both sides), default sampler;
- AR twin, left to right: greedy continuation of `Question: What is 37 + `: it never sees the result;
- AR twin, rescoring: the exact log-likelihood of the answer given the question for each of the 90 operands 10-99, the best one
  (what an AR model must do to use a suffix: 90 forward passes of the full record per case).
"""
from __future__ import annotations

import argparse
import random
import time

import torch

import illada
from illada.tasks.arithmetic import Arithmetic, Working
from illada.tasks.base import Example

TASK, WORK = Arithmetic(variant="aligned"), Working(aligned=True)
OPERANDS = range(10, 100)


HOLE = "<|mask:2|>"


def record(op: str, a: int, b: int, operand: str) -> str:
    """The aligned record of `a op b` (the task's own working line) with `operand` (the hole, or any two digits)
    shown in place of `b`."""
    result = a + b if op == "+" else a - b
    line = WORK.add(a, b) if op == "+" else WORK.sub(a, b)
    working = line.replace(f"{op} {b:02d} =", f"{op} {operand} =", 1)
    return f"Question: What is {a} {op} {operand}?\nAnswer: {working}\n#### {result}"


def cases(n: int, seed: int) -> list[tuple[str, int, int]]:
    """`n` held-out (op, a, b) per operation, b two-digit, test-split questions only."""
    rng, out = random.Random(seed), []
    for op in ("+", "-"):
        found: set[tuple[int, int]] = set()
        while len(found) < n:
            a, b = rng.randrange(100), rng.choice(OPERANDS)
            question = f"What is {a} {op} {b}?"
            if TASK.split_of(Example(key=question, prompt="", response="", record={})) == "test":
                found.add((a, b))
        out += [(op, a, b) for a, b in sorted(found)]
    return out


def mdm_infill(lm, problems, batch: int):
    right = question = consistent = 0
    passes, start = 0, time.perf_counter()
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        texts = [record(op, a, b, HOLE) for op, a, b in chunk]
        _, output = lm.infill(texts, return_output=True)
        passes += output.nfe
        for (op, a, b), fills in zip(chunk, output.fills):
            right += fills[1] == f"{b:02d}"
            question += fills[0] == f"{b:02d}"
            consistent += fills[0] == fills[1] == f"{b:02d}"
    return right, question, consistent, passes, time.perf_counter() - start


@torch.no_grad()
def ar_rescore(lm, problems):
    right, start = 0, time.perf_counter()
    for op, a, b in problems:
        texts = [record(op, a, b, f"{c:02d}") for c in OPERANDS]
        ids = torch.tensor([lm.tokenizer.encode(t) for t in texts])  # same length: every operand has 2 digits
        answer_at = len(lm.tokenizer.encode(texts[0].split("\nAnswer:")[0] + "\nAnswer:"))
        logp = torch.log_softmax(lm.model(ids).float(), -1)
        # the response's log-likelihood given the question: the twin was trained on responses only (AR SFT)
        total = logp[:, answer_at - 1:-1].gather(-1, ids[:, answer_at:, None]).squeeze(-1).sum(-1)
        right += OPERANDS[int(total.argmax())] == b
    return right, time.perf_counter() - start


def ar_left_to_right(lm, problems, batch: int):
    right, start = 0, time.perf_counter()
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        outs = lm.generate([f"Question: What is {a} {op} " for op, a, _ in chunk], max_new_tokens=2)
        right += sum(out[:2] == f"{b:02d}" for out, (_, _, b) in zip(outs, chunk))
    return right, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mdm", default="runs/arithmetic/aligned-mdm-bd")
    p.add_argument("--ar", default="runs/arithmetic/aligned-ar")
    p.add_argument("--n", type=int, default=100, help="problems per operation (+ and -)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    problems = cases(args.n, args.seed)
    mdm, ar = illada.load(args.mdm), illada.load(args.ar)
    print(f"{len(problems)} held-out masked-operand problems ({args.n} each of A + <hole> and A - <hole>, "
          f"hole = 2 digits); {torch.get_num_threads()} thread(s)")
    print("| model · method | operand right | question hole right | both right | forward passes | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    n = len(problems)
    right, question, consistent, passes, seconds = mdm_infill(mdm, problems, args.batch)
    print(f"| MDM `{args.mdm}` · infill (both sides) | {right / n:.1%} | {question / n:.1%} | {consistent / n:.1%} | "
          f"{passes} ({-(-n // args.batch)} batches) | {seconds:.1f} |")
    right, seconds = ar_left_to_right(ar, problems, args.batch)
    print(f"| AR twin `{args.ar}` · greedy left to right (no suffix) | {right / n:.1%} | - | - | "
          f"2 per batch | {seconds:.1f} |")
    right, seconds = ar_rescore(ar, problems)
    print(f"| AR twin `{args.ar}` · rescoring all 90 operands | {right / n:.1%} | - | - | {n} x 90 rows | "
          f"{seconds:.1f} |")


if __name__ == "__main__":
    main()
