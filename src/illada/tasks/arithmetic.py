"""GSM8K-shaped arithmetic: "What is A + B * C?" with short working and a final `#### N` line.

Templates (operands 0-99, usual precedence): A + B, A - B (may be negative), A * B, A + B * C, (A + B) * C, and
word problems over the same operations. A product with two multi-digit factors is worked as
`37 * 48 = 37 * 40 + 37 * 8 = 1480 + 296 = 1776`, so every step is a one-digit product or a sum.
The `aligned` variant writes the same working with every number zero-padded to a fixed width per slot
(`07 + 48 = 055`, `37 * 48 = 37 * 40 + 37 * 08 = 1480 + 0296 = 1776`, `34 - 07 = +27`): each digit then sits at a
fixed offset from the digits it depends on, whatever the operands' lengths, which a model that fills positions in
any order (masked diffusion) learns far sooner; the final `#### N` line is the plain number.
The `choice` variant writes the multiple-choice form for `illada eval --task multiple_choice`: the working with
the right result and three wrong ones (off by 1, off by 10, and two digits swapped or +100).
Documents come in two surface forms, the `illada eval --task gsm8k` zero-shot prompt ("Question: ...\\nAnswer: ...")
and the bare question followed by its working, so `illada generate "What is 37 + 48 * 2?"` works too.
"""
from __future__ import annotations

import random

from illada.errors import IlladaError
from illada.tasks.base import Example, Task

NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia", "Omar",
         "Pia", "Raj", "Sam", "Tess", "Uma", "Vic", "Wen", "Yusuf", "Zoe")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards", "eggs", "beads")
BARE_SHARE = 0.25  # documents in the bare form (question, newline, working)


def product_steps(a: int, b: int, width: int | None = None) -> str:
    """`a * b = ...` worked so that each step is a product with a one-digit factor, or a sum. `width`: the aligned
    form, `a` zero-padded to `width` digits, `b` to 2, the partial products and the product to width + 2, and the
    split always written (a one-digit `b` is `00 + b`)."""
    if width is not None:
        tens, ones, w = b - b % 10, b % 10, width + 2
        return (f"{a:0{width}d} * {b:02d} = {a:0{width}d} * {tens:02d} + {a:0{width}d} * {ones:02d} = "
                f"{a * tens:0{w}d} + {a * ones:0{w}d} = {a * b:0{w}d}")
    if a < 10 or b < 10:
        return f"{a} * {b} = {a * b}"
    tens, ones = b - b % 10, b % 10
    if ones == 0:
        return f"{a} * {b} = {a * b}"
    return f"{a} * {b} = {a} * {tens} + {a} * {ones} = {a * tens} + {a * ones} = {a * b}"


class Working:
    """The working lines of each operation: plain (`7 + 48 = 55`) or aligned (fixed-width, zero-padded)."""

    def __init__(self, aligned: bool) -> None:
        self.aligned = aligned

    def add(self, a: int, b: int, width: int = 2) -> str:
        if not self.aligned:
            return f"{a} + {b} = {a + b}"
        return f"{a:0{width}d} + {b:0{width}d} = {a + b:0{width + 1}d}"

    def sub(self, a: int, b: int) -> str:
        if not self.aligned:
            return f"{a} - {b} = {a - b}"
        return f"{a:02d} - {b:02d} = {'-' if a < b else '+'}{abs(a - b):02d}"

    def mul(self, a: int, b: int, width: int = 2) -> str:
        return product_steps(a, b, width if self.aligned else None)

    def add_product(self, a: int, product: int) -> str:
        """`a + b * c` after the product: 4 digits suffice (99 + 99 * 99 = 9900)."""
        if not self.aligned:
            return f"{a} + {product} = {a + product}"
        return f"{a:04d} + {product:04d} = {a + product:04d}"


def _word_problem(rng: random.Random, a: int, b: int, c: int, work: Working) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                [work.add(a, b)], a + b)
    if kind == 1:
        return (f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
                [work.sub(a, b)], a - b)
    if kind == 2:
        return (f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that?",
                [work.mul(a, b)], a * b)
    return (f"{name} has {a} {item} and buys {b} bags with {c} {item} in each bag. How many {item} does "
            f"{name} have now?", [work.mul(b, c), work.add_product(a, b * c)], a + b * c)


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
    variants = ("default", "aligned", "choice")
    # expression templates are drawn this often each; the rest are word problems
    weights = {"add": 2, "sub": 2, "mul": 3, "add_mul": 3, "paren_mul": 3, "word": 1}

    def __init__(self, variant: str | None = None, templates: list[str] | None = None) -> None:
        """`templates`: only these kinds (keys of `weights`, e.g. ["add", "sub"]), in their usual proportions."""
        super().__init__(variant)
        if templates is not None:
            unknown = [t for t in templates if t not in self.weights]
            if unknown or not templates:
                raise IlladaError(f"task arithmetic: templates must be among {', '.join(self.weights)}, "
                                  f"got {','.join(templates) or 'none'}")
            self.weights = {k: w for k, w in self.weights.items() if k in templates}

    def example(self, rng: random.Random) -> Example:
        a, b, c = rng.randrange(100), rng.randrange(100), rng.randrange(100)
        kind = rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        work = Working(aligned=self.variant == "aligned")
        if kind == "add":
            question, steps, value = f"What is {a} + {b}?", [work.add(a, b)], a + b
        elif kind == "sub":
            question, steps, value = f"What is {a} - {b}?", [work.sub(a, b)], a - b
        elif kind == "mul":
            question, steps, value = f"What is {a} * {b}?", [work.mul(a, b)], a * b
        elif kind == "add_mul":
            question, steps, value = (f"What is {a} + {b} * {c}?", [work.mul(b, c), work.add_product(a, b * c)],
                                      a + b * c)
        elif kind == "paren_mul":
            question, steps, value = (f"What is ({a} + {b}) * {c}?", [work.add(a, b), work.mul(a + b, c, 3)],
                                      (a + b) * c)
        else:
            question, steps, value = _word_problem(rng, a, b, c, work)
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
