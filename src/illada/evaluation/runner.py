"""Run a task on a loaded model: batches of samples -> per-sample records (a JSONL log, written as they finish)
-> the metric with its standard error, a JSON results file and a printed table."""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from illada.evaluation import tasks
from illada.evaluation.answers import extract_answer, extract_letter, numbers_equal
from illada.evaluation.presets import TaskPreset
from illada.evaluation.sandbox import require_isolation, run_python
from illada.errors import IlladaError


@dataclass
class EvalResult:
    task: str
    model: str
    metric: str  # "accuracy" or "pass@1"
    score: float
    stderr: float
    n: int
    seconds: float
    forward_passes: int  # model calls
    sequence_passes: int  # rows through the model (a call on a batch of B rows counts B)
    generated_tokens: int = 0  # generation tasks: tokens generated (up to each row's stop), all samples
    row_passes: int = 0  # generation tasks: forward passes that worked on each sample, summed (batch-independent)
    settings: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("records")
        data["sequence_passes_per_sample"] = self.sequence_passes / self.n if self.n else 0.0
        if self.generated_tokens:
            # tokens per forward of each sequence (as at batch size 1): generated tokens / the passes that worked
            # on it; rows that finished early and ride along in their batch are not counted
            data["tokens_per_forward"] = self.generated_tokens / max(self.row_passes, 1)
            data["tokens_per_second"] = self.generated_tokens / self.seconds if self.seconds else 0.0
        return data


@contextmanager
def count_passes(model) -> Iterator[dict]:
    """Counts forward calls and rows through `model` while the block runs."""
    counts = {"calls": 0, "rows": 0}

    def hook(module, args, kwargs, output):
        counts["calls"] += 1
        ids = args[0] if args else kwargs.get("input_ids")
        counts["rows"] += int(ids.shape[0]) if ids is not None else 0

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


class _Progress:
    """A rich progress bar with ETA and the running metric on stderr (a no-op when disabled)."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                TextColumn("{task.fields[metric]}"), console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task(label, total=total, metric="")
            self.bar.start()

    def advance(self, n: int, metric: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n, metric=metric)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _chunks(items: list, size: int) -> Iterator[tuple[int, list]]:
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def evaluate(lm, preset: TaskPreset, samples: list[dict], *, fewshot_pool: list[dict] | None = None,
             limit: int | None = None, batch_size: int = 8, seed: int = 0, timeout: float = 10.0,
             allow_unsandboxed: bool = False, log_path: str | Path | None = None,
             progress: bool = True) -> EvalResult:
    """Evaluate `lm` (a `DiffusionLM`) on `samples` (records in the task kind's format) with `preset`.

    Few-shot examples come from `fewshot_pool`, or else from the other samples. `limit`: only the first N samples.
    The per-sample log (prompt, output or scores, extracted answer, target, correct) is appended to `log_path`.
    HumanEval programs run in the bubblewrap sandbox; without one this raises before generating anything, unless
    `allow_unsandboxed` (then they run with only limits and a timeout).
    """
    preset.validate()
    if preset.kind == "humaneval":
        require_isolation(allow_unsandboxed)
    samples = [tasks.normalize_sample(s, preset.kind, f"sample {i + 1}") for i, s in enumerate(samples)]
    if fewshot_pool is not None:
        fewshot_pool = [tasks.normalize_sample(s, preset.kind, f"few-shot example {i + 1}")
                        for i, s in enumerate(fewshot_pool)]
    same_data = fewshot_pool is None
    pool = samples if fewshot_pool is None else fewshot_pool  # the whole file, also under --limit
    if limit is not None:
        if limit < 1:
            raise IlladaError(f"--limit must be >= 1, got {limit}")
        samples = samples[:limit]
    if batch_size < 1:
        raise IlladaError(f"batch size must be >= 1, got {batch_size}")
    log = open(log_path, "w", encoding="utf-8") if log_path is not None else None
    bar = _Progress(len(samples), preset.name, progress)
    metric = "pass@1" if preset.kind == "humaneval" else "accuracy"
    records: list[dict] = []
    # generation counts its passes from the decoders' own NFE (the AR decoder runs the modules itself, out of reach
    # of the forward hooks; CFG counts 2 per step); scoring counts them with hooks
    generation = {"calls": 0, "rows": 0}
    began = time.perf_counter()
    try:
        with count_passes(lm.model) as counts:
            for start, chunk in _chunks(samples, batch_size):
                shots = [tasks.fewshot_examples(start + i, pool, preset.num_fewshot, same_data, seed)
                         for i in range(len(chunk))]
                if preset.method == "generate":
                    new, nfe, row_passes = _generate_batch(lm, preset, chunk, shots, seed, timeout,
                                                            allow_unsandboxed)
                    generation["calls"] += nfe
                    generation["rows"] += row_passes
                else:
                    new = _score_batch(lm, preset, chunk, shots, seed)
                for offset, record in enumerate(new):
                    record = {"index": start + offset, **record}
                    records.append(record)
                    if log is not None:
                        log.write(json.dumps(record, ensure_ascii=False) + "\n")
                        log.flush()
                correct = sum(r["correct"] for r in records)
                bar.advance(len(chunk), f"{metric} {correct / len(records):.3f}")
    finally:
        bar.close()
        if log is not None:
            log.close()
    n = len(records)
    score = sum(r["correct"] for r in records) / n
    if preset.method == "generate":
        counts = generation
    stderr = math.sqrt(score * (1 - score) / (n - 1)) if n > 1 else float("nan")
    return EvalResult(task=preset.name, model=lm.name, metric=metric, score=score, stderr=stderr, n=n,
                      seconds=time.perf_counter() - began, forward_passes=counts["calls"],
                      sequence_passes=counts["rows"], generated_tokens=sum(r.get("generated_tokens", 0) for r in records),
                      row_passes=sum(r.get("passes", 0) for r in records),
                      settings=asdict(preset), records=records)


def _score_batch(lm, preset: TaskPreset, chunk: list[dict], shots: list[list[dict]], seed: int) -> list[dict]:
    from illada.scoring import score_pairs

    requests = []
    for sample, demo in zip(chunk, shots):
        if preset.kind == "mmlu":
            requests.append(tasks.mmlu_request(sample, demo))
        else:
            requests.append(tasks.choice_request(preset, sample, demo))
    pairs = [(context, option) for context, options in requests for option in options]
    scores, _ = score_pairs(lm, pairs, method=preset.method, mc_num=preset.mc_num, seed=seed,
                            add_bos=preset.add_bos, append_eos=preset.append_eos)
    records, at = [], 0
    for sample, (context, options) in zip(chunk, requests):
        values = scores[at:at + len(options)]
        at += len(options)
        prediction = max(range(len(values)), key=values.__getitem__)
        records.append({"prompt": context, "choices": options, "scores": values, "prediction": prediction,
                        "target": sample["answer"], "correct": prediction == sample["answer"]})
    return records


def _generate_batch(lm, preset: TaskPreset, chunk: list[dict], shots: list[list[dict]], seed: int,
                    timeout: float, allow_unsandboxed: bool = False) -> tuple[list[dict], int, int]:
    """(records, forward passes, rows through the model: a pass over B rows counts B) of one batch."""
    tok = lm.tokenizer

    def render(sample: dict, demo: list[dict]) -> str:
        if preset.kind == "mmlu":
            return (tok.apply_chat_template(tasks.mmlu_messages(sample, demo)) if preset.chat
                    else tasks.mmlu_request(sample, demo)[0])
        if preset.kind == "gsm8k":
            return (tok.apply_chat_template(tasks.gsm8k_messages(sample, demo)) if preset.chat
                    else tasks.gsm8k_prompt(sample, demo))
        if preset.kind == "exact":
            return sample["prompt"]
        return tok.apply_chat_template(tasks.humaneval_messages(sample)) if preset.chat else sample["prompt"]

    # a k-shot prompt must leave room to answer: the last shots go until it does (as many as fit; a note says so)
    room = min(preset.sampling.gen_length, lm.config.max_seq_len // 2)
    prompts, used = [], []
    for sample, demo in zip(chunk, shots):
        demo = list(demo)
        prompt = render(sample, demo)
        while demo and len(tok.encode(prompt)) > lm.config.max_seq_len - room:
            demo.pop()
            prompt = render(sample, demo)
        prompts.append(prompt)
        used.append(len(demo))
    if any(n < len(d) for n, d in zip(used, shots)):
        _note_fewer_shots(preset, lm, min(used))
    sampling = preset.sampling
    outputs: list[str] = [""] * len(chunk)
    lengths = [0] * len(chunk)  # generated tokens of each row, up to its stop
    passes = [0] * len(chunk)
    batch_nfe = batch_passes = 0
    gaps = [i for i, sample in enumerate(chunk) if "suffix" in sample]
    if gaps:  # holes before a suffix: filled in place, as many tokens as the answer has
        from illada.sampling import InfillConfig

        sizes = [len(tok.encode(chunk[i]["answer"])) for i in gaps]
        filled, out = lm.infill([prompts[i] for i in gaps], [chunk[i]["suffix"] for i in gaps], sizes,
                                return_output=True, seed=seed, **InfillConfig.knobs_of(sampling))
        for i, text, size, own in zip(gaps, filled, sizes, out.row_nfe.tolist()):
            outputs[i], lengths[i], passes[i] = text, size, own
        batch_passes, batch_nfe = batch_passes + out.nfe * len(gaps), batch_nfe + out.nfe
    rest = sorted(set(range(len(chunk))) - set(gaps))
    if rest:
        texts, out = lm.generate([prompts[i] for i in rest], config=sampling.replace(seed=seed), return_output=True)
        for i, text, size, own in zip(rest, texts, out.generated_lengths.tolist(), out.row_nfe.tolist()):
            outputs[i], lengths[i], passes[i] = text, int(size), int(own)
        batch_passes, batch_nfe = batch_passes + out.nfe * len(rest), batch_nfe + out.nfe
    records = []
    for index, (sample, prompt, output) in enumerate(zip(chunk, prompts, outputs)):
        output = _cut_at_stop(output, sampling.stop_strings)
        # passes: the forward passes that worked on this row (a finished row riding along is not counted)
        record = {"prompt": prompt, "output": output, "generated_tokens": lengths[index], "passes": passes[index],
                  "shots": used[index]}
        if preset.kind == "exact":
            record.update(target=sample["answer"],
                          correct=tasks.exact_normal(output) == tasks.exact_normal(sample["answer"]))
        elif preset.kind == "mmlu":
            letter = extract_letter(output, len(sample["choices"]))
            target = tasks.LETTERS[sample["answer"]]
            record.update(extracted=letter, target=target, correct=letter == target)
        elif preset.kind == "gsm8k":
            answer = extract_answer(output)
            record.update(extracted=answer, target=sample["target"], correct=numbers_equal(answer, sample["target"]))
        else:
            program = tasks.humaneval_program(sample, output, preset.chat)
            result = run_python(program, timeout=timeout, allow_unsandboxed=allow_unsandboxed)
            record.update(task_id=sample["task_id"], status=result.status, stderr=result.stderr[-1000:],
                          correct=result.passed)
        records.append(record)
    return records, batch_nfe, batch_passes


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first stop string (the sampler stops at a stop string but keeps it)."""
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


# ------------------------------------------------------------------------------------------------------ output
def write_results(result: EvalResult, path: str | Path) -> None:
    from illada.files import write_json_atomic

    write_json_atomic(path, result.to_dict())


def print_table(results: list[EvalResult], file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="illada eval")
    for column in ("task", "method", "metric", "value", "± stderr", "n", "passes/sample", "tokens/pass", "tokens/s",
                   "seconds"):
        table.add_column(column, justify="left" if column in ("task", "method", "metric") else "right")
    for r in results:
        data = r.to_dict()
        table.add_row(r.task, r.settings.get("method", ""), r.metric, f"{r.score:.4f}",
                      "-" if math.isnan(r.stderr) else f"{r.stderr:.4f}", str(r.n),
                      f"{r.sequence_passes / max(r.n, 1):.1f}",
                      f"{data['tokens_per_forward']:.2f}" if "tokens_per_forward" in data else "-",
                      f"{data['tokens_per_second']:.1f}" if "tokens_per_second" in data else "-", f"{r.seconds:.1f}")
    console = Console(file=file or sys.stdout)
    if not console.is_terminal:  # a log or a pipe: the whole table, not one squeezed into 80 columns
        console = Console(file=file or sys.stdout, width=160)
    console.print(table)


_NOTED: set = set()


def _note_fewer_shots(preset: TaskPreset, lm, fewest: int) -> None:
    """Once per task and model: its k-shot prompts do not all fit the context with room to answer."""
    key = (preset.name, lm.name, preset.num_fewshot)
    if key not in _NOTED:
        _NOTED.add(key)
        print(f"illada: note: {preset.name}: {preset.num_fewshot}-shot prompts do not fit the context of {lm.name} "
              f"({lm.config.max_seq_len} tokens) with room to answer; the last shots are dropped (as few as "
              f"{fewest}; each sample's count is in the log)", file=sys.stderr)
