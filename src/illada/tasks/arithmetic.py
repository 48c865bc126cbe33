"""GSM8K-shaped arithmetic: "What is A + B * C?" with short working and a final `#### N` line.

Templates (operands 0-99, usual precedence): A + B, A - B (may be negative), A * B, A + B * C, (A + B) * C, and
word problems over the same operations. A product with two multi-digit factors is worked as
`37 * 48 = 37 * 40 + 37 * 8 = 1480 + 296 = 1776`, so every step is a one-digit product or a sum.
The `choice` variant writes the multiple-choice form for `illada eval --task multiple_choice`: the working with
the right result and three wrong ones (off by 1, off by 10, and two digits swapped or +100).
Documents come in two surface forms, the `illada eval --task gsm8k` zero-shot prompt ("Question: ...\\nAnswer: ...")
and the bare question followed by its working, so `illada generate "What is 37 + 48 * 2?"` works too.
"""
from __future__ import annotations

import random

from illada.tasks.base import Example, Task

NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia", "Omar",
         "Pia", "Raj", "Sam", "Tess", "Uma", "Vic", "Wen", "Yusuf", "Zoe")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards", "eggs", "beads")
BARE_SHARE = 0.25  # documents in the bare form (question, newline, working)


def product_steps(a: int, b: int) -> str:
    """`a * b = ...` worked so that each step is a product with a one-digit factor, or a sum."""
    if a < 10 or b < 10:
        return f"{a} * {b} = {a * b}"
    tens, ones = b - b % 10, b % 10
    if ones == 0:
        return f"{a} * {b} = {a * b}"
    return f"{a} * {b} = {a} * {tens} + {a} * {ones} = {a * tens} + {a * ones} = {a * b}"


def _word_problem(rng: random.Random, a: int, b: int, c: int) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                [f"{a} + {b} = {a + b}"], a + b)
    if kind == 1:
        return (f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
                [f"{a} - {b} = {a - b}"], a - b)
    if kind == 2:
        return (f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that?",
                [product_steps(a, b)], a * b)
    return (f"{name} has {a} {item} and buys {b} bags with {c} {item} in each bag. How many {item} does "
            f"{name} have now?", [product_steps(b, c), f"{a} + {b * c} = {a + b * c}"], a + b * c)


def distractors(value: int) -> list[int]:
    """Three wrong results near `value`: off by one, off by ten, and its last two digits swapped (else +100)."""
    text = str(abs(value))
    swapped = int(text[:-2] + text[-1] + text[-2]) * (1 if value >= 0 else -1) if len(text) >= 2 else value
    third = swapped if swapped not in (value, value + 1, value + 10) else value + 100
    return [value + 1, value + 10, third]


def with_result(working: list[str], value: int, wrong: int) -> str:
    """The working with its last result (last line and the #### line) replaced by `wrong`."""
    last = working[-1].rsplit(" = ", 1)[0] + f" = {wrong}"
    return "\n".join(working[:-1] + [last]) + f"\n#### {wrong}"


class Arithmetic(Task):
    name = "arithmetic"
    eval_kind = "gsm8k"
    variants = ("default", "choice")
    # expression templates are drawn this often each; the rest are word problems
    weights = {"add": 2, "sub": 2, "mul": 3, "add_mul": 3, "paren_mul": 3, "word": 1}

    def example(self, rng: random.Random) -> Example:
        a, b, c = rng.randrange(100), rng.randrange(100), rng.randrange(100)
        kind = rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        if kind == "add":
            question, steps, value = f"What is {a} + {b}?", [f"{a} + {b} = {a + b}"], a + b
        elif kind == "sub":
            question, steps, value = f"What is {a} - {b}?", [f"{a} - {b} = {a - b}"], a - b
        elif kind == "mul":
            question, steps, value = f"What is {a} * {b}?", [product_steps(a, b)], a * b
        elif kind == "add_mul":
            question, steps, value = (f"What is {a} + {b} * {c}?",
                                      [product_steps(b, c), f"{a} + {b * c} = {a + b * c}"], a + b * c)
        elif kind == "paren_mul":
            question, steps, value = (f"What is ({a} + {b}) * {c}?",
                                      [f"{a} + {b} = {a + b}", product_steps(a + b, c)], (a + b) * c)
        else:
            question, steps, value = _word_problem(rng, a, b, c)
        working = "\n".join(steps) + f"\n#### {value}"
        bare = rng.random() < BARE_SHARE
        record = {"question": question, "answer": working}
        if self.variant == "choice":
            options = [working] + [with_result(steps, value, wrong) for wrong in distractors(value)]
            order = rng.sample(range(4), 4)
            record = {"question": f"Question: {question}\nAnswer:", "choices": [options[i] for i in order],
                      "answer": order.index(0)}
        return Example(key=question, prompt=f"Question: {question}\nAnswer:", response=f" {working}",
                       record=record, document=f"{question}\n{working}" if bare else None)
