"""What every task shares: the example record, the stable train/test split and the JSONL writers."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from illada.errors import IlladaError
from illada.files import write_atomic

SPLITS = ("train", "test")
# text: pre-training documents {"text"}; sft: chats {"messages"}; completion: {"prompt", "completion"} strings that
# SFT trains on as they are (no chat template, loss on the completion), so a plain eval prompt matches training;
# eval: the records `illada eval` reads
FORMATS = ("text", "sft", "completion", "eval")


@dataclass(frozen=True)
class Example:
    """One problem. `key` decides the split (identity of the problem: same key, same split); `prompt` and
    `response` are the two halves of its text; `record` is its eval record."""

    key: str
    prompt: str
    response: str
    record: dict = field(default_factory=dict)
    document: str | None = None  # the pre-training text, when it is not prompt + response


class Task:
    """A seeded problem generator. Subclasses set `name`, `eval_kind` and implement `example` (one problem, split
    by `split_of`), or override `examples` when the splits are not a partition of independent problems (reversal)."""

    name: str = ""
    eval_kind: str = ""          # the `illada eval` task kind its eval records are for
    test_fraction: float = 0.1   # share of problem keys that belong to the test split
    variants: tuple[str, ...] = ("default",)  # kinds of eval records the task can write; the first is the default

    def __init__(self, variant: str | None = None) -> None:
        variant = variant or self.variants[0]
        if variant not in self.variants:
            raise IlladaError(f"task {self.name}: variant must be one of {', '.join(self.variants)}, got {variant!r}")
        self.variant = variant

    def example(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def split_of(self, example: Example) -> str:
        digest = hashlib.blake2b(f"{self.name}:{example.key}".encode(), digest_size=8).digest()
        return "test" if int.from_bytes(digest, "big") / 2 ** 64 < self.test_fraction else "train"

    def text(self, example: Example) -> str:
        """The pre-training document of an example (one EOS follows it in `illada prepare`)."""
        return example.document if example.document is not None else example.prompt + example.response

    def examples(self, split: str, seed: int) -> Iterator[Example]:
        """Endless examples of `split`, the same sequence for the same seed."""
        rng = random.Random(f"{self.name}:{split}:{seed}")
        while True:
            example = self.example(rng)
            if self.split_of(example) == split:
                yield example


def make_records(task: Task, split: str, n: int, fmt: str, seed: int = 0, unique: bool = False) -> list[dict]:
    """`n` records of `task` in format `fmt` (text | sft | completion | eval); `unique`: no problem twice."""
    if split not in SPLITS:
        raise IlladaError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if fmt not in FORMATS:
        raise IlladaError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise IlladaError(f"n must be a positive integer, got {n!r}")
    records, seen, misses = [], set(), 0
    for example in task.examples(split, seed):
        if unique:
            if example.key in seen:
                misses += 1
                if misses > 100 * n + 10_000:
                    raise IlladaError(f"{task.name}: the {split} split has fewer than {n} distinct problems "
                                      f"(found {len(records)})")
                continue
            seen.add(example.key)
        if fmt == "text":
            records.append({"text": task.text(example)})
        elif fmt == "sft":
            records.append({"messages": [{"role": "user", "content": example.prompt.strip()},
                                         {"role": "assistant", "content": example.response.strip()}]})
        elif fmt == "completion":
            records.append({"prompt": example.prompt, "completion": example.response})
        else:
            records.append(dict(example.record))
        if len(records) == n:
            return records
    raise AssertionError("unreachable")  # examples() is endless


def write_records(records: list[dict], out: str | Path) -> Path:
    """JSONL, written atomically (a reader never sees half a file)."""
    out = Path(out)
    if out.exists() and out.is_dir():
        raise IlladaError(f"--out {out} is a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    except OSError as error:
        raise IlladaError(f"cannot write {out}: {error.strerror or error}") from None
    return out
