"""Task data (local JSONL files) and prompts.

Formats, one JSON object per line:
- choice tasks (`multiple_choice`, `mmlu`): `question`, `choices` (list of strings), `answer` (index, or letter
  "A".."Z"); optional `subject` (MMLU header). `mmlu` also takes the options inside the question instead of
  `choices` ("...\nA. ..\nB. ..\nAnswer:", the format of MMLU exports such as OpenAI's evals);
- `gsm8k`: `question`, `answer` (text ending in `#### <number>`, or just the number);
- `humaneval`: `task_id`, `prompt` (signature + docstring), `test` (defines `check(candidate)`), `entry_point`;
- `exact`: `prompt`, `answer` (the exact expected text), optional `suffix`: then the answer is the gap between
  prompt and suffix, filled by a bidirectional model with as many tokens as the answer has.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from illada.errors import IlladaError
from illada.evaluation.answers import extract_gold
from illada.evaluation.presets import TaskPreset
from illada.files import loads_strict

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_OPTION_START = re.compile(r"\n(?=[A-Z]\. )")
GSM8K_INSTRUCTION = ("Solve the following math problem step by step. Write the final answer on the last line "
                     "as '#### <number>'.\n\n")
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function (and the imports "
                         "it needs) in one ```python code block.\n\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise IlladaError(f"no data file at {path}")
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise IlladaError(f"{path}:{number}: not UTF-8 text (byte {error.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = loads_strict(line)
            except ValueError as error:  # JSONDecodeError, NaN/Infinity
                raise IlladaError(f"{path}:{number}: not valid JSON ({getattr(error, 'msg', error)})") from None
            except RecursionError:
                raise IlladaError(f"{path}:{number}: JSON nested too deeply") from None
            if not isinstance(record, dict):
                raise IlladaError(f"{path}:{number}: expected a JSON object per line")
            records.append(record)
    if not records:
        raise IlladaError(f"{path}: no records")
    return records


def _need(record: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise IlladaError(f"{where}: missing field(s) {', '.join(missing)}")


def _answer_index(answer, choices: list, where: str) -> int:
    if isinstance(answer, bool):
        raise IlladaError(f"{where}: answer must be an index or a letter, got {answer!r}")
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and answer.strip().upper() in LETTERS[:len(choices)] and len(answer.strip()) == 1:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer.strip())
    else:
        raise IlladaError(f"{where}: answer must be an index or a letter, got {answer!r}")
    if not 0 <= index < len(choices):
        raise IlladaError(f"{where}: answer {answer!r} out of range for {len(choices)} choices")
    return index


def normalize_sample(record: dict, kind: str, where: str = "sample") -> dict:
    """A validated copy of one record: choice tasks get `answer` as an index, gsm8k a numeric `target`."""
    if not isinstance(record, dict):
        raise IlladaError(f"{where}: expected a JSON object")
    if kind == "mmlu" and "choices" not in record and isinstance(record.get("question"), str):
        record = _split_lettered(record)
    if kind in ("multiple_choice", "mmlu"):
        _need(record, ("question", "choices", "answer"), where)
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise IlladaError(f"{where}: choices must be a list of at least two strings")
        if kind == "mmlu" and len(choices) > len(LETTERS):
            raise IlladaError(f"{where}: too many choices for letters")
        return dict(record, answer=_answer_index(record["answer"], choices, where))
    if kind == "gsm8k":
        _need(record, ("question", "answer"), where)
        target = extract_gold(record["answer"])
        if target is None:
            raise IlladaError(f"{where}: no number in the answer field")
        return dict(record, target=target)
    if kind == "humaneval":
        _need(record, ("task_id", "prompt", "test", "entry_point"), where)
        return dict(record)
    if kind == "exact":
        _need(record, ("prompt", "answer"), where)
        for key in ("prompt", "answer", "suffix"):
            if key in record and not isinstance(record[key], str):
                raise IlladaError(f"{where}: {key} must be a string")
        if not record["answer"].strip():
            raise IlladaError(f"{where}: empty answer")
        return dict(record)
    raise IlladaError(f"unknown task kind {kind!r}")


def load_samples(path: str | Path, kind: str) -> list[dict]:
    """Validated, normalised records of a task file (see `normalize_sample`)."""
    return [normalize_sample(record, kind, f"{path}: record {number}")
            for number, record in enumerate(read_jsonl(path), 1)]


def fewshot_examples(index: int, pool: list[dict], k: int, same_data: bool, seed: int) -> list[dict]:
    """k examples from `pool` in one fixed (seeded) order, skipping the sample itself when the pool is the
    evaluated data."""
    if k == 0:
        return []
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    chosen = [pool[j] for j in order if not (same_data and j == index)][:k]
    if len(chosen) < k:
        raise IlladaError(f"{k}-shot prompts need {k} examples besides the sample; the few-shot pool has "
                          f"{len(pool) - (1 if same_data else 0)}")
    return chosen


# ------------------------------------------------------------------------------------------------------ prompts
def _render(template: str, record: dict, where: str = "template") -> str:
    try:
        return template.format(**record)
    except (KeyError, IndexError) as error:
        raise IlladaError(f"{where} {template!r} needs field {error} that the record lacks") from None


def choice_request(preset: TaskPreset, sample: dict, shots: list[dict]) -> tuple[str, list[str]]:
    """(context, continuations) for a free-form choice task."""
    demo = "".join(_render(preset.context_template, s)
                   + _render(preset.choice_template, dict(s, choice=s["choices"][s["answer"]])) + "\n\n"
                   for s in shots)
    context = demo + _render(preset.context_template, sample)
    return context, [_render(preset.choice_template, dict(sample, choice=c)) for c in sample["choices"]]


def _split_lettered(record: dict) -> dict:
    """Move the "A. ..", "B. .." options (each may span lines) and a trailing "Answer:" out of the question into
    `choices`."""
    text = record["question"].rstrip()
    if text.endswith("Answer:"):
        text = text[: -len("Answer:")].rstrip()
    parts = _OPTION_START.split(text)
    # the options are the last run of parts lettered A, B, C, ... up to the end
    for first in range(len(parts) - 1, 0, -1):
        tail = parts[first:]
        if all(part.startswith(f"{LETTERS[k]}. ") for k, part in enumerate(tail)) and len(tail) >= 2:
            return dict(record, question="\n".join(parts[:first]).strip(),
                        choices=[part[3:].strip() for part in tail])
    return record  # not lettered: validation reports the missing `choices`


def _mmlu_question(sample: dict) -> str:
    lines = [sample["question"].strip()]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(sample["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_request(sample: dict, shots: list[dict]) -> tuple[str, list[str]]:
    """(context, [" A", " B", ...]) in the MMLU format: header, shots with their letters, the question."""
    subject = str(sample.get("subject", "")).replace("_", " ").strip()
    header = f"The following are multiple choice questions (with answers){' about ' + subject if subject else ''}.\n\n"
    demo = "".join(f"{_mmlu_question(s)} {LETTERS[s['answer']]}\n\n" for s in shots)
    return header + demo + _mmlu_question(sample), [f" {LETTERS[i]}" for i in range(len(sample["choices"]))]


def mmlu_messages(sample: dict, shots: list[dict]) -> list[dict]:
    """MMLU for instruct models: each shot a user/assistant turn pair, then the question."""
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": _mmlu_question(s)},
                     {"role": "assistant", "content": LETTERS[s["answer"]]}]
    return messages + [{"role": "user", "content": _mmlu_question(sample)}]


def gsm8k_prompt(sample: dict, shots: list[dict]) -> str:
    demo = "".join(f"Question: {s['question'].strip()}\nAnswer: {str(s['answer']).strip()}\n\n" for s in shots)
    return demo + f"Question: {sample['question'].strip()}\nAnswer:"


def gsm8k_messages(sample: dict, shots: list[dict]) -> list[dict]:
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": GSM8K_INSTRUCTION + s["question"].strip()},
                     {"role": "assistant", "content": str(s["answer"]).strip()}]
    return messages + [{"role": "user", "content": GSM8K_INSTRUCTION + sample["question"].strip()}]


def exact_normal(text: str) -> str:
    """The form compared by the `exact` metric: surrounding whitespace and one final period removed."""
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def humaneval_messages(sample: dict) -> list[dict]:
    return [{"role": "user", "content": f"{HUMANEVAL_INSTRUCTION}```python\n{sample['prompt']}```"}]


def humaneval_program(sample: dict, completion: str, chat: bool) -> str:
    """The program whose exit status decides pass@1: solution, the task's tests, then check(entry_point).

    Base models continue the prompt (prompt + completion). An instruct model's reply is searched for a python code
    block; when it defines the entry point it replaces the prompt (whose import lines are kept), else it is
    appended to the prompt."""
    if chat:
        code = extract_code(completion)
        if f"def {sample['entry_point']}" in code:
            imports = "\n".join(line for line in sample["prompt"].splitlines()
                                if line.startswith(("import ", "from ")))
            solution = imports + "\n" + code
        else:
            solution = sample["prompt"] + code
    else:
        solution = sample["prompt"] + completion
    return f"{solution}\n\n{sample['test']}\n\ncheck({sample['entry_point']})\n"


def extract_code(text: str) -> str:
    """The first fenced code block (```python ... ``` or ``` ... ```) after any reasoning, else the text."""
    from illada.evaluation.answers import strip_reasoning

    text = strip_reasoning(text)
    start = text.find("```")
    if start < 0:
        return text
    body = text[start + 3:]
    newline = body.find("\n")
    if newline >= 0 and body[:newline].strip().isidentifier():  # language tag
        body = body[newline + 1:]
    end = body.find("```")
    return body if end < 0 else body[:end]
