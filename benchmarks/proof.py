"""The proof table: what the twins trained by `recipes/{arithmetic,sudoku,reversal}.sh` can do, side by side in one
run, each row with the `illada eval` command that reproduces it.

    OMP_NUM_THREADS=1 python benchmarks/proof.py --out docs/proof          # all sections
    python benchmarks/proof.py --out docs/proof --only speed --fresh          # redo one section

Sections: `tasks` (MDM vs AR accuracy per task), `parallel` (the `--grid-task` MDM, sudoku by default, arithmetic
selectable: every decoding mode x cache, accuracy and tokens per forward, with its AR twin on the same samples in
the same run for tokens/s), `latency` (the block-causal arithmetic MDM vs its AR twin at batch 1), `speed` (the
parallel and latency cells again: tokens/s only compare when measured together),
`scoring` (confidence vs Monte Carlo likelihood on the multiple-choice form of arithmetic), `likelihood`
(Shakespeare validation ELBO vs the AR twin's NLL, where both exist). Each cell's result is cached in
OUT/results.json under its command, so an interrupted run resumes and `--only` reruns one section; the markdown
goes to OUT/proof.md and stdout, the plots to OUT/*.png.

Tokens per forward = generated tokens (up to each row's stop) / rows passed through the model; tokens/s =
generated tokens / wall seconds of the whole eval (prompt tokens are not counted).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import illada
from illada.api import bundled_models
from illada.errors import IlladaError
from illada.evaluation import evaluate, get_preset, load_samples
from illada.files import write_atomic, write_json_atomic
from illada.sampling.config import CACHES

RUNS = Path("runs")
ARITH_TEST = RUNS / "arithmetic" / "test.jsonl"
ARITH_CHOICE = RUNS / "arithmetic" / "test-choice.jsonl"


@dataclass
class Cell:
    """One `illada eval` run. `flags` are the command's own flags (values as the CLI takes them)."""

    section: str
    label: str
    model: str
    task: str
    data: Path
    flags: dict = field(default_factory=dict)
    grid: str = ""  # the parallel section: which task's decoding grid

    @property
    def command(self) -> str:
        parts = ["illada", "eval", "--model", self.model, "--task", self.task, "--data", str(self.data)]
        for key, value in self.flags.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                parts.append(flag)
            elif value is not None:
                parts += [flag, str(value)]
        return " ".join(shlex.quote(p) for p in parts)

    @property
    def run_missing(self) -> bool:
        """A run of `runs/` not trained here (its cached result, if any, is still shown)."""
        return self.model.startswith(str(RUNS)) and not Path(self.model).exists()

    @property
    def key(self) -> str:
        """Its entry in the results cache: a grid's cells apart from another grid's same command (an AR twin
        shared by two grids), since tokens/s only compare within the run that measured a grid."""
        return f"{self.grid}: {self.command}" if self.grid else self.command


PRESET_FLAGS = ("num_fewshot", "max_new_tokens", "block_length", "steps", "variable_length", "threshold", "factor",
                "cache", "remasking", "temperature", "method", "mc_num")


def run_cell(cell: Cell, models: dict, batch_size: int) -> dict:
    """The cell's eval. A model's first cell is preceded by an untimed eval of its first batch (the first forwards of
    a process are slow), so the first cell of a grid, the AR twin's, is not timed cold while the rest run warm."""
    flags = dict(cell.flags)
    limit = flags.pop("limit", None)
    batch_size = flags.pop("batch_size", batch_size)
    if flags.pop("fixed_length", False):
        flags["variable_length"] = False
    preset = get_preset(cell.task).replace(**{k: v for k, v in flags.items() if k in PRESET_FLAGS})
    samples = load_samples(cell.data, preset.kind)
    if cell.model not in models:
        models[cell.model] = illada.load(cell.model)
        evaluate(models[cell.model], preset, samples, limit=batch_size, batch_size=batch_size, progress=False)
    lm = models[cell.model]
    torch.manual_seed(0)
    result = evaluate(lm, preset, samples, limit=limit, batch_size=batch_size, progress=False)
    data = result.to_dict()
    data.pop("settings")
    return data


# --------------------------------------------------------------------------------------------------- the cells
@dataclass(frozen=True)
class Grid:
    """A decoding grid: every mode x cache of one MDM, and its AR twin on the same samples."""

    mdm: Path
    ar: Path
    task: str
    data: Path
    flags: dict  # every cell's flags
    fixed: tuple[str, dict]  # the fixed-canvas mode: its name and flags
    variable: dict = field(default_factory=dict)  # the variable-length mode's flags (beyond `flags`)
    reference: str = "variable length"  # the one-token-per-pass mode the parallel modes are held to
    # the threshold/factor modes on the variable-length canvas too (a block-causal MDM: the same tokens as the
    # fixed canvas, without the EOS blocks after a row's answer)
    variable_parallel: bool = False


def blocks_of_8_grid(mdm: Path, variable_parallel: bool = False) -> Grid:
    """An arithmetic MDM on the aligned working decoded on a fixed canvas of 96 in blocks of 8, vs the aligned twin."""
    return Grid(mdm, RUNS / "arithmetic" / "aligned-ar", "gsm8k", ARITH_TEST,
                dict(num_fewshot=0, max_new_tokens=96, block_length=8, fixed_length=True, steps=96),
                ("fixed canvas 96, blocks of 8", {}), variable=dict(fixed_length=None, variable_length=True, steps=8),
                reference="fixed canvas 96, blocks of 8", variable_parallel=variable_parallel)


GRIDS = {
    "arithmetic": Grid(RUNS / "arithmetic" / "mdm", RUNS / "arithmetic" / "ar", "gsm8k", ARITH_TEST,
                       dict(num_fewshot=0, max_new_tokens=96), ("fixed canvas 96", dict(fixed_length=True, steps=96))),
    # the aligned working (recipes/arithmetic-aligned.sh): twins trained on the same prompt/response rows
    "arithmetic-aligned": Grid(RUNS / "arithmetic" / "aligned-mdm", RUNS / "arithmetic" / "aligned-ar", "gsm8k",
                               ARITH_TEST, dict(num_fewshot=0, max_new_tokens=160),
                               ("fixed canvas 128", dict(fixed_length=True, max_new_tokens=128, steps=128))),
    # the MDM adapted from the aligned AR twin with semi-autoregressive rows (recipes/arithmetic-adapted.sh): trained
    # on a canvas whose later blocks are masks, so the fixed canvas decoded in blocks of 8 is its own mode
    "arithmetic-adapted": blocks_of_8_grid(RUNS / "arithmetic" / "adapted-mdm-cont"),
    # block-causal (recipes/arithmetic-blocks.sh): causal outside the block being decoded, so every cache is exact
    # and the variable-length canvas gives the fixed canvas's tokens
    "arithmetic-blocks": blocks_of_8_grid(RUNS / "arithmetic" / "blocks-mdm-long", variable_parallel=True),
    "sudoku": Grid(RUNS / "sudoku" / "mdm", RUNS / "sudoku" / "ar", "exact", RUNS / "sudoku" / "test.jsonl",
                   dict(max_new_tokens=48, block_length=48, steps=48), ("fixed canvas 48", dict(fixed_length=True))),
}


def arithmetic_cells(limit: int, batch: int) -> list[Cell]:
    mdm, ar = str(RUNS / "arithmetic" / "mdm"), str(RUNS / "arithmetic" / "ar")
    base = dict(num_fewshot=0, max_new_tokens=96, limit=limit, batch_size=batch)
    cells = [Cell("tasks", "arithmetic · MDM (variable length, 1 token/pass)", mdm, "gsm8k", ARITH_TEST, base),
             Cell("tasks", "arithmetic · AR twin (greedy, KV cache)", ar, "gsm8k", ARITH_TEST, base)]
    # the later runs: a cell whose run is not here is skipped (its cached result, if any, is still shown)
    aligned = RUNS / "arithmetic" / "aligned-mdm", RUNS / "arithmetic" / "aligned-ar"
    long = {**base, "max_new_tokens": 160}  # the aligned working is longer
    cells.append(Cell("tasks", "arithmetic, aligned working · MDM (SFT pairs, variable length, 1 token/pass)",
                      str(aligned[0]), "gsm8k", ARITH_TEST, long))
    cells.append(Cell("tasks", "arithmetic, aligned working · AR twin (AR SFT, greedy, KV cache)",
                      str(aligned[1]), "gsm8k", ARITH_TEST, long))
    block = RUNS / "arithmetic" / "aligned-mdm-bd"  # the same, half the rows with a clean response prefix
    cells.append(Cell("tasks", "arithmetic, aligned working · MDM (SFT pairs + clean prefixes, 1 token/pass)",
                      str(block), "gsm8k", ARITH_TEST, long))
    semi = {**base, "block_length": 8, "fixed_length": True, "steps": 96}  # the canvas semi-AR rows train on
    for run, label in (("semiar-mdm", "the aligned MDM continued on semi-AR SFT rows, blocks <= 16"),
                       ("adapted-mdm", "adapted from the AR twin, semi-AR rows, blocks <= 16, lr 3e-4"),
                       ("adapted-mdm-cont", "the same continued 1,200 steps, blocks <= 8, lr 1e-4"),
                       ("adapted-mdm-long", "that continued 3,000 more steps, blocks <= 8, lr 1e-4"),
                       ("adapted-mdm-b8", "adapted from the AR twin, blocks <= 8, lr 1.5e-4"),
                       ("adapted-mdm-b8-lr75", "adapted from the AR twin, blocks <= 8, lr 7.5e-5")):
        cells.append(Cell("tasks", f"arithmetic, aligned working · MDM {label} (blocks of 8, 1 token/pass)",
                          str(RUNS / "arithmetic" / run), "gsm8k", ARITH_TEST, semi))
    for run in ("adapted-mdm-cont", "adapted-mdm-long"):  # the same with the committed KV cache
        cells.append(Cell("tasks", f"arithmetic, aligned working · MDM `{run}`, committed KV cache (blocks of 8, "
                                   "1 token/pass)", str(RUNS / "arithmetic" / run), "gsm8k", ARITH_TEST,
                          {**semi, "cache": "committed"}))
    # block-causal (recipes/arithmetic-blocks.sh): every cache is exact, so the committed one is the cell
    for run, label in (("blocks-mdm", "`adapted-mdm-cont` made block-causal, sft-blocks of 8, +600 steps"),
                       ("blocks-mdm-cont", "that continued 400 steps, lr 5e-5"),
                       ("blocks-mdm-long", "that continued 1,200 steps, lr 1e-4, a new data order"),
                       ("blocks-ar", "the AR twin adapted block-causal, sft-blocks of 8, 300 steps"),
                       ("blocks-ar-long", "the AR twin adapted block-causal, sft-blocks of 8, 1,000 steps")):
        cells.append(Cell("tasks", f"arithmetic, aligned working · MDM {label} (blocks of 8, 1 token/pass, "
                                   "committed KV cache)", str(RUNS / "arithmetic" / run), "gsm8k", ARITH_TEST,
                          {**semi, "cache": "committed"}))
    return cells


def grid_cells(task: str, limit: int, batch: int) -> list[Cell]:
    """Every decoding mode x cache of the task's MDM, and its AR twin on the same samples in the same run."""
    grid = GRIDS[task]
    base = {**grid.flags, "limit": limit, "batch_size": batch}
    ar_flags = {k: v for k, v in base.items() if k != "fixed_length"}  # the AR decoder has no canvas
    cells = [Cell("parallel", "AR twin (greedy, KV cache)", str(grid.ar), grid.task, grid.data, ar_flags, task)]
    fixed_name, fixed = grid.fixed
    modes = [(f"{fixed_name}, 1 token/pass", fixed), ("variable length, 1 token/pass", grid.variable)]
    parallel = [(f"threshold {t}", dict(threshold=t)) for t in (0.95, 0.9, 0.8, 0.7, 0.5)]
    parallel += [(f"factor {f}", dict(factor=f)) for f in (1, 2)]
    modes += parallel
    if grid.variable_parallel:
        modes += [(f"variable length, {name}", {**grid.variable, **extra}) for name, extra in parallel]
    for name, extra in modes:
        for cache in CACHES:
            cells.append(Cell("parallel", f"{name} · cache {cache}", str(grid.mdm), grid.task, grid.data,
                              {**base, **extra, "cache": cache}, task))
    return cells


def latency_cells(limit: int) -> list[Cell]:
    """Batch 1 (one user, the regime of Fast-dLLM's throughput numbers): the block-causal MDM's modes with the
    committed cache vs its AR twin, same samples, same run. At batch 16 this CPU is compute-bound and the AR
    decoder, one token per row per forward, does the least arithmetic; at batch 1 the number of forwards counts."""
    grid = GRIDS["arithmetic-blocks"]
    base = {**grid.flags, "limit": limit, "batch_size": 1}
    cells = [Cell("latency", "AR twin (greedy, KV cache)", str(grid.ar), grid.task, grid.data,
                  {k: v for k, v in base.items() if k != "fixed_length"}, "arithmetic-blocks")]
    modes = [("fixed canvas 96, blocks of 8, 1 token/pass", {})]
    modes += [(f"threshold {t}", dict(threshold=t)) for t in (0.95, 0.9, 0.7)]
    modes += [(f"variable length, threshold {t}", {**grid.variable, "threshold": t}) for t in (0.95, 0.9, 0.7)]
    for name, extra in modes:
        cells.append(Cell("latency", f"{name} · cache committed", str(grid.mdm), grid.task, grid.data,
                          {**base, **extra, "cache": "committed"}, "arithmetic-blocks"))
    return cells


def task_cells(limit: int, batch: int) -> list[Cell]:
    cells = []
    sudoku = RUNS / "sudoku" / "test.jsonl"
    for kind in ("mdm", "ar"):
        cells.append(Cell("tasks", f"sudoku 6x6 · {kind.upper()}", str(RUNS / "sudoku" / kind), "exact", sudoku,
                          dict(max_new_tokens=48, block_length=48, steps=48, limit=limit, batch_size=batch)))
    # the byte-level twins, then the twins on a BPE trained on the facts (a name one token)
    twins = [("mdm", "MDM"), ("ar", "AR"), ("bpe-mdm", "MDM, BPE"), ("bpe-ar", "AR, BPE"),
             ("bpe-mdm-long", "MDM, BPE, 2x the steps")]
    for probe in ("forward", "reverse", "infill"):
        for run, label in twins:
            if probe == "infill" and run.endswith("ar"):  # a causal model cannot fill a hole before its context
                continue
            cells.append(Cell("tasks", f"reversal · {probe} · {label}", str(RUNS / "reversal" / run), "exact",
                              RUNS / "reversal" / f"test-{probe}.jsonl",
                              dict(max_new_tokens=32, block_length=16, steps=16, limit=limit, batch_size=batch)))
    return cells


def scoring_cells(limit: int, batch: int) -> list[Cell]:
    mdm = str(RUNS / "arithmetic" / "mdm")
    cells = [Cell("scoring", "confidence", mdm, "multiple_choice", ARITH_CHOICE,
                  dict(method="confidence", limit=limit, batch_size=batch))]
    cells += [Cell("scoring", f"MC likelihood, mc {n}", mdm, "multiple_choice", ARITH_CHOICE,
                   dict(method="mc", mc_num=n, limit=limit, batch_size=batch)) for n in (8, 32, 128)]
    return cells


# ------------------------------------------------------------------------------------------------ likelihood
SHAKESPEARE_DATA = RUNS / "shakespeare" / "data"
SHAKESPEARE_MDM, SHAKESPEARE_AR = "illada-shakespeare-tiny", RUNS / "shakespeare" / "ar"


def likelihood(results: dict, fresh: bool) -> None:
    """Validation ELBO of the bundled Shakespeare MDM vs the NLL of its AR twin, on the rows the training run held
    out (the last `val_rows` rows of runs/shakespeare/data, as prepared by recipes/shakespeare-tiny.sh)."""
    from illada.data.shards import PackedTokens
    from illada.diffusion.objective import ar_loss
    from illada.scoring import corpus_elbo
    from illada.training.batches import PackedRows

    if not (SHAKESPEARE_DATA / "manifest.json").exists():
        print(f"skip likelihood: no {SHAKESPEARE_DATA} (bash recipes/shakespeare-tiny.sh prepares it)", file=sys.stderr)
        return
    config = json.loads((bundled_models()[SHAKESPEARE_MDM] / "train_config.json").read_text())
    held_out = PackedRows(PackedTokens(SHAKESPEARE_DATA), config["seq_len"], holdout=config["val_rows"])
    rows = held_out.batch(held_out.validation_rows())["input_ids"]
    key = f"likelihood:{SHAKESPEARE_MDM}"
    if key not in results or fresh:
        lm = illada.load(SHAKESPEARE_MDM)
        elbo = corpus_elbo(lm.model, rows.flatten(), seq_len=config["seq_len"], num_samples=16, seed=0)
        results[key] = {"nll": elbo.nll, "stderr": elbo.stderr, "tokens": elbo.tokens, "kind": "ELBO (upper bound)"}
    key = f"likelihood:{SHAKESPEARE_AR}"
    if (key not in results or fresh) and (SHAKESPEARE_AR / "checkpoints").exists():
        lm = illada.load(str(SHAKESPEARE_AR))
        with torch.no_grad():
            losses = [float(ar_loss(lm.model, batch)[0]) for batch in rows.split(8)]
        results[key] = {"nll": sum(losses) / len(losses), "tokens": int(rows.numel()), "kind": "exact NLL"}


def likelihood_markdown(results: dict) -> str:
    mdm, ar = results.get(f"likelihood:{SHAKESPEARE_MDM}"), results.get(f"likelihood:{SHAKESPEARE_AR}")
    if mdm is None:
        return ""
    lines = ["### Likelihood on held-out Shakespeare (same rows, same tokenizer)", "",
             "| model | nats/token | perplexity (bound) |", "|---|---:|---:|",
             f"| MDM `{SHAKESPEARE_MDM}` (ELBO, 16 masking levels per row) | {mdm['nll']:.3f} | "
             f"{math.exp(mdm['nll']):.1f} |"]
    if ar is not None:
        lines.append(f"| AR twin `{SHAKESPEARE_AR}` (exact NLL) | {ar['nll']:.3f} | {math.exp(ar['nll']):.1f} |")
    else:
        lines.append(f"| AR twin: not trained yet (`illada train recipes/shakespeare-tiny-ar.yaml`) | - | - |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ output
def pct(x: float) -> str:
    return f"{100 * x:.1f}"


# the decoding tables' columns and the row of a result (the parallel grid and the batch-1 cells)
DECODING_COLUMNS = ["mode · cache", "accuracy %", "tokens/pass", "tokens/s", "passes/sample"]


def decoding_row(r: dict) -> list:
    return [pct(r["score"]), f"{r.get('tokens_per_forward', 0):.2f}", f"{r.get('tokens_per_second', 0):.1f}",
            f"{r['sequence_passes_per_sample']:.1f}"]


# section -> (title, columns, the row of a result); every row ends with the command that reproduces it
TABLES = {
    "tasks": ("Accuracy: masked diffusion vs the autoregressive twin", ["task · model", "accuracy %", "n", "tokens/pass"],
              lambda r: [f"{pct(r['score'])} ± {pct(r['stderr'])}", r["n"], f"{r.get('tokens_per_forward', 0):.2f}"]),
    "parallel": ("Accuracy under parallel decoding: the {grid} MDM, and its AR twin on the same samples",
                 DECODING_COLUMNS, decoding_row),
    "latency": ("Batch 1: the {grid} MDM with the committed cache, and its AR twin on the same samples",
                DECODING_COLUMNS, decoding_row),
    "scoring": ("Scoring the multiple-choice form of arithmetic", ["method", "accuracy %", "passes/sample", "seconds"],
                lambda r: [pct(r["score"]), f"{r['sequence_passes_per_sample']:.1f}", f"{r['seconds']:.1f}"]),
}


def markdown(cells: list[Cell], results: dict) -> str:
    out = []
    for section, (title, columns, row) in TABLES.items():
        grids = list(dict.fromkeys(c.grid for c in cells if c.section == section))
        for grid in grids:
            done = [c for c in cells if c.section == section and c.grid == grid and c.key in results]
            if not done:
                continue
            out += [f"### {title.format(grid=grid)}", "", "| " + " | ".join(columns + ["command"]) + " |",
                    "|---|" + "---:|" * (len(columns) - 1) + "---|"]
            out += [f"| {c.label} | " + " | ".join(str(v) for v in row(results[c.key])) + f" | `{c.command}` |"
                    for c in done]
            out.append("")
            if section == "parallel":
                out += [parallel_summary(done, results), speed_summary(done, results)]
            if section == "latency":
                out.append(speed_summary(done, results))
            if section in ("parallel", "latency"):
                out.append(head_to_head_markdown(results.get(f"head-to-head: {section}: {grid}")))
    return "\n".join(out)


def best_pair(cells: list[Cell], results: dict) -> tuple[Cell, Cell, bool] | None:
    """(AR twin, best MDM mode, whether it is within 1 point of the twin): the highest tokens/s within 1 point of
    the twin's accuracy, else the most accurate mode (the fastest of ties)."""
    ar = next((c for c in cells if c.label.startswith("AR twin") and c.key in results), None)
    modes = [c for c in cells if c.key in results and c is not ar]
    if ar is None or not modes:
        return None
    a = results[ar.key]
    equal = [c for c in modes if results[c.key]["score"] >= a["score"] - 0.01]
    pool = equal or modes
    speed = lambda c: results[c.key].get("tokens_per_second", 0)  # noqa: E731
    best = max(pool, key=speed) if equal else max(pool, key=lambda c: (results[c.key]["score"], speed(c)))
    return ar, best, bool(equal)


def head_to_head(ar: Cell, best: Cell, models: dict, batch_size: int, rounds: int) -> dict:
    """The best pair timed again: one warm-up run each, then `rounds` runs alternating AR twin and MDM mode (a single
    short run is at the mercy of this shared machine's noise). Tokens/s of every run; the ratio of the medians."""
    for cell in (ar, best):
        run_cell(cell, models, batch_size)
    runs: dict[str, list[float]] = {"ar": [], "mode": []}
    for _ in range(rounds):
        for name, cell in (("ar", ar), ("mode", best)):
            runs[name].append(run_cell(cell, models, batch_size)["tokens_per_second"])
    return {"ar": ar.label, "mode": best.label, "ar_command": ar.command, "mode_command": best.command,
            "ar_tokens_per_second": runs["ar"], "mode_tokens_per_second": runs["mode"],
            "ratio": statistics.median(runs["mode"]) / statistics.median(runs["ar"])}


def head_to_head_markdown(h: dict | None) -> str:
    if not h:
        return ""
    def spread(xs: list[float]) -> str:
        return f"median {statistics.median(xs):,.0f} (min {min(xs):,.0f}, max {max(xs):,.0f})"
    return (f"**Head to head** ({len(h['ar_tokens_per_second'])} warm runs each, alternating): {h['mode']}: "
            f"{spread(h['mode_tokens_per_second'])} tokens/s; AR twin: {spread(h['ar_tokens_per_second'])}: "
            f"**{h['ratio']:.2f}x** (ratio of medians).\n")


def speed_summary(cells: list[Cell], results: dict) -> str:
    """Best MDM mode (highest tokens/s within 1 point of the AR twin's accuracy, else the most accurate) vs AR, by
    the single runs of the table (the head-to-head line below times the pair again)."""
    pair = best_pair(cells, results)
    if pair is None:
        return ""
    ar, best, equal = pair
    a, b = results[ar.key], results[best.key]
    ratio = b.get("tokens_per_second", 0) / max(a.get("tokens_per_second", 1e-9), 1e-9)
    note = "at accuracy within 1 point of the AR twin" if equal else \
        "no MDM mode reaches the AR twin's accuracy: the most accurate mode is shown, the fastest of ties"
    return (f"**Best MDM mode vs the AR twin** ({note}; one run each): {best.label}: {pct(b['score'])}% at "
            f"{b.get('tokens_per_second', 0):.1f} tokens/s vs AR {pct(a['score'])}% at "
            f"{a.get('tokens_per_second', 0):.1f} tokens/s: **{ratio:.2f}x**.\n")


def parallel_summary(cells: list[Cell], results: dict) -> str:
    """The fastest-per-pass mode within 1 point of one token per pass (same samples), the target's measure."""
    modes = {c.label: results[c.key] for c in cells if c.section == "parallel" and c.key in results}
    reference = GRIDS[cells[0].grid].reference  # the cells are one grid's
    base = modes.get(f"{reference}, 1 token/pass · cache none")
    if base is None:
        return ""
    close = {k: r for k, r in modes.items() if r["score"] >= base["score"] - 0.01 and "1 token/pass" not in k}
    if not close:
        return (f"**Parallel decoding**: no threshold/factor mode stays within 1 point of one token per pass "
                f"({pct(base['score'])}%).\n")
    label, r = max(close.items(), key=lambda kv: (kv[1].get("tokens_per_forward", 0),
                                                  kv[1].get("tokens_per_second", 0)))
    return (f"**Parallel decoding**: {label} keeps {pct(r['score'])}% (one token per pass: {pct(base['score'])}%) "
            f"at {r.get('tokens_per_forward', 0):.2f} tokens per forward.\n")


def plots(cells: list[Cell], results: dict, out: Path, task: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in cells if c.grid == task]
    modes = [c for c in cells if c.section == "parallel" and c.key in results and not c.label.startswith("AR")]
    if not modes:
        return []
    written = []
    markers = {"none": "o", "prefix": "s", "dual": "^", "committed": "D"}
    for x_key, name, xlabel in (("tokens_per_forward", "accuracy_vs_tokens_per_forward.png", "tokens per forward"),
                                ("tokens_per_second", "accuracy_vs_tokens_per_second.png", "tokens / s (CPU)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c in modes:
            r = results[c.key]
            cache = c.label.rsplit("cache ", 1)[-1]
            ax.scatter(r.get(x_key, 0), 100 * r["score"], marker=markers.get(cache, "o"), s=36)
            ax.annotate(c.label.split(" · ")[0], (r.get(x_key, 0), 100 * r["score"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ar = next((c for c in cells if c.section == "parallel" and c.label.startswith("AR twin")
                   and c.key in results), None)
        if ar is not None:
            r = results[ar.key]
            x = 1.0 if x_key == "tokens_per_forward" else r.get("tokens_per_second", 0)
            ax.scatter(x, 100 * r["score"], marker="*", s=140, color="black", label="AR twin (KV cache)")
            ax.legend(loc="lower left", fontsize=8)
        ax.set_xlabel(xlabel + "   (markers: o no cache, s prefix, ^ dual, D committed)")
        ax.set_ylabel("held-out accuracy %")
        ax.set_title(f"{task} MDM: accuracy vs " + xlabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{task}-{name}"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/proof"))
    p.add_argument("--only", choices=["tasks", "parallel", "speed", "latency", "scoring", "likelihood"], action="append",
                   default=None)
    p.add_argument("--limit", type=int, default=200, help="held-out samples per cell of the task table")
    p.add_argument("--grid-limit", type=int, default=100, help="held-out samples per parallel-decoding cell")
    p.add_argument("--grid-task", choices=list(GRIDS), action="append", default=None,
                   help="task whose MDM a decoding grid measures (repeatable; default: sudoku)")
    p.add_argument("--choice-limit", type=int, default=100, help="samples per scoring cell")
    p.add_argument("--latency-limit", type=int, default=50, help="held-out samples per batch-1 cell")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fresh", action="store_true", help="recompute the selected cells instead of using the cache")
    p.add_argument("--match", default=None, metavar="TEXT", help="only the cells whose command contains TEXT")
    p.add_argument("--rounds", type=int, default=5, help="alternating warm runs of each grid's AR twin and best "
                   "mode (head to head, odd; 0: none)")
    args = p.parse_args()
    if args.rounds < 0 or (args.rounds and args.rounds % 2 == 0):
        p.error("--rounds must be 0 or odd")
    args.out.mkdir(parents=True, exist_ok=True)
    if not ARITH_CHOICE.exists():
        from illada.tasks import get_task, make_records, write_records

        write_records(make_records(get_task("arithmetic", "choice"), "test", 1000, "eval"), ARITH_CHOICE)
    grids = args.grid_task or ["sudoku"]
    cells = arithmetic_cells(args.limit, args.batch_size) + task_cells(args.limit, args.batch_size) + \
        [c for task in grids for c in grid_cells(task, args.grid_limit, args.batch_size)] + \
        latency_cells(args.latency_limit) + scoring_cells(args.choice_limit, args.batch_size)
    cache_path = args.out / "results.json"
    results = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    sections = set(args.only or ["tasks", "parallel", "latency", "scoring", "likelihood"])
    if "likelihood" in sections:
        likelihood(results, args.fresh)
        write_json_atomic(cache_path, results)
    models: dict = {}
    for cell in cells:
        # speed: tokens/s only compare when measured together, so the arithmetic twins and every decoding mode
        speed = "speed" in sections and cell.section in ("parallel", "latency")
        if not (cell.section in sections or speed) or (cell.key in results and not args.fresh):
            continue
        if args.match is not None and args.match not in cell.command:
            continue
        if cell.run_missing:
            continue
        began = time.perf_counter()
        try:
            results[cell.key] = run_cell(cell, models, args.batch_size)
        except IlladaError as error:  # a twin not trained yet
            print(f"skip ({error}): {cell.command}", file=sys.stderr)
            continue
        r = results[cell.key]
        print(f"{cell.section:9s} {cell.label:45s} acc {pct(r['score']):>5s}  tok/pass "
              f"{r.get('tokens_per_forward', 0):5.2f}  tok/s {r.get('tokens_per_second', 0):7.1f}  "
              f"({time.perf_counter() - began:.0f}s)", file=sys.stderr, flush=True)
        write_json_atomic(cache_path, results)
    for section in ("parallel", "latency"):
        if not args.rounds or not ({section, "speed"} & sections) or args.match is not None:
            continue
        for grid in dict.fromkeys(c.grid for c in cells if c.section == section):
            key = f"head-to-head: {section}: {grid}"
            group = [c for c in cells if c.section == section and c.grid == grid]
            pair = best_pair(group, results)
            if (key in results and not args.fresh) or pair is None or pair[0].run_missing or pair[1].run_missing:
                continue
            ar, best, _ = pair
            results[key] = head_to_head(ar, best, models, ar.flags.get("batch_size", args.batch_size), args.rounds)
            print(f"{section:9s} head to head ({grid}): {results[key]['ratio']:.2f}x", file=sys.stderr, flush=True)
            write_json_atomic(cache_path, results)
    text = ["## Proof table", "", f"Machine: {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
            f"batch {args.batch_size}; {args.limit} held-out samples per task cell, {args.grid_limit} per "
            f"parallel-decoding cell (grids: {', '.join(grids)}).", "",
            markdown(cells, results), likelihood_markdown(results)]
    written = [p for task in grids for p in plots(cells, results, args.out, task)]
    text += [f"![{p.stem}]({p.name})" for p in written]
    report = "\n".join(text) + "\n"
    write_atomic(args.out / "proof.md", report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
