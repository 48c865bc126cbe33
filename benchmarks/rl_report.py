"""The RL report: what `bash recipes/sudoku-rl.sh` (or `sudoku-rl-mid.sh`) measured, as a table and a plot under docs/rl/.

Per variant: held-out accuracy at the start, the best and the last evaluation; the rollout reward of the first and
last ten steps; the mean within-batch reward std; the KL to the start; seconds per step. Per estimator it also measures
the spread of the log-likelihood estimate itself: the std over 16 mask draws of each completion's estimate (nats per
token), on 32 rollouts of the start model, side by side in one run.

    python benchmarks/rl_report.py --out docs/rl                 # sudoku: docs/rl/rl.md, rl.png
    python benchmarks/rl_report.py --suite sudoku-mid --out docs/rl  # from the 67% start: docs/rl/sudoku-mid.*
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUDOKU_NOTE = ("Held-out: 100 test puzzles, greedy, one token per pass, exact grid (the proof table's protocol). "
               "Rollouts: 8 prompts x 8 at temperature 0.7 with threshold-0.9 decoding per step, 2 inner updates, "
               "lr 1e-4, clip 0.2 (recipes/sudoku-rl.yaml). 1 CPU thread per run, three runs at once on 2 cores "
               "(with other work running), so seconds per step are comparable with each other only. The last two "
               "rows ran later, alone with 2 threads: `--ratio token`, and `--group-size 16 --prompts-per-step 4 "
               "--lr 5e-5 --steps 120` (commands in recipes/sudoku-rl.sh).")
SUDOKU_MID_NOTE = ("Start: step 2,750 of the 3,000-step sudoku MDM (recipes/sudoku-mdm.yaml, mid-way through its "
                   "final decay), 67% of the 100 held-out puzzles; the run's own step 3,000 scores 82%. Held-out: "
                   "those 100 puzzles, greedy, one token per pass, exact grid. Rollouts: 8 prompts x 8 at "
                   "temperature 0.7 with threshold-0.9 decoding, 2 inner updates, lr 1e-4, clip 0.2 "
                   "(recipes/sudoku-rl-mid.yaml); the last three rows 16 prompts x 8 per step at lr 2e-5 and 5e-6 (the last, "
                   "seed 1, alone with 2 threads, evaluated every 40 steps). One "
                   "CPU thread per run, two runs at once on 2 cores (with other work), so seconds per step are "
                   "comparable with each other only.")
SUDOKU = {"runs": ROOT / "runs" / "sudoku", "title": "RL on sudoku from an early-stopped MDM "
          "(`bash recipes/sudoku-rl.sh`)", "note": SUDOKU_NOTE, "stem": "rl", "metric": "held-out exact grids",
          "init": "mdm-early", "data": "test.jsonl", "prompt": lambda r: r["prompt"], "tokens": 48,
          "variants": [("coupled, no KL", "rl-coupled", "coupled", 0.0),
                       ("coupled, KL 0.05", "rl-coupled-kl", "coupled", 0.05),
                       ("mean-field (d1)", "rl-mean-field", "mean_field", 0.0),
                       ("ELBO, 2 samples", "rl-elbo", "elbo", 0.0),
                       ("coupled, token ratio", "rl-coupled-token", "coupled", 0.0),
                       ("coupled, 4 x 16, lr 5e-5, 120 steps", "rl-coupled-g16", "coupled", 0.0)]}
SUITES = {
    "sudoku": SUDOKU,
    "sudoku-mid": {**SUDOKU, "title": "RL on sudoku from the MDM at 67% (`bash recipes/sudoku-rl-mid.sh`)",
                   "note": SUDOKU_MID_NOTE, "stem": "sudoku-mid", "init": "rl-mid-start",
                   "variants": [("coupled, no KL", "mid-coupled", "coupled", 0.0),
                                ("coupled, KL 0.05", "mid-coupled-kl", "coupled", 0.05),
                                ("coupled, 16 x 8, lr 2e-5", "mid-coupled-lr2e-5", "coupled", 0.0),
                                ("coupled, 16 x 8, lr 5e-6", "mid-coupled-lr5e-6", "coupled", 0.0),
                                ("coupled, 16 x 8, lr 2e-5, seed 1", "mid-coupled-lr2e-5-seed1", "coupled", 0.0)]},
}


def read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def summarise(label: str, run: Path, estimator: str, kl: float) -> dict | None:
    records = read(run / "metrics.jsonl")
    rl = [r for r in records if r.get("kind") == "rl"]
    ev = [r for r in records if r.get("kind") == "eval" and r.get("accuracy") is not None]
    if not rl or not ev:
        return None
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"label": label, "run": str(run.relative_to(ROOT)), "estimator": estimator, "kl_coef": kl,
            "steps": rl[-1]["step"], "acc_start": ev[0]["accuracy"], "acc_best": max(e["accuracy"] for e in ev),
            "acc_last": ev[-1]["accuracy"], "eval_steps": [e["step"] for e in ev],
            "eval_acc": [e["accuracy"] for e in ev],
            "reward_first": mean([r["reward_mean"] for r in rl[:10]]),
            "reward_last": mean([r["reward_mean"] for r in rl[-10:]]),
            "reward_std": mean([r["reward_std"] for r in rl]), "kl_last": rl[-1].get("kl", float("nan")),
            "seconds_per_step": mean([r["step_s"] for r in rl]),
            "tokens_per_forward": mean([r["tokens_per_forward"] for r in rl if r.get("tokens_per_forward")] or [0]),
            "curve": [(r["step"], r["reward_mean"]) for r in rl]}


def estimator_spread(init: Path, data: Path, prompt_of, tokens: int, draws: int = 16, rows: int = 32) -> list[dict]:
    """Std of each estimator's estimate over mask draws, per completion (nats/token), and seconds per estimate."""
    import torch

    import illada
    from illada.rl.estimators import ScoredBatch, get_estimator

    lm = illada.load(init)
    samples = [json.loads(line) for line in data.read_text().splitlines()[:rows]]
    prompts = [prompt_of(s) for s in samples]
    completions = lm.generate(prompts, max_new_tokens=tokens, block_length=tokens, steps=tokens, temperature=0.7,
                              seed=0)
    tok = lm.tokenizer
    batch = ScoredBatch.from_lists([tok.encode(p) for p in prompts],
                                   [tok.encode(c) + [tok.eos_token_id] for c in completions], lm.pad_token_id)
    out = []
    for name, options in (("mean_field", {"prompt_mask_prob": 0.15}), ("coupled", {}), ("elbo", {"samples": 2})):
        estimator = get_estimator(name, **options)
        values, began = [], time.perf_counter()
        with torch.no_grad():
            for d in range(draws):
                masks = estimator.draw(batch, torch.Generator().manual_seed(d))
                values.append(estimator.estimate(lm.model, batch, masks, lm.mask_token_id))
        seconds = (time.perf_counter() - began) / draws
        stacked = torch.stack(values) / batch.completion_lengths.float()  # (draws, rows) nats per token
        out.append({"estimator": name, "forwards": estimator.forwards, "mean": float(stacked.mean()),
                    "std_over_masks": float(stacked.std(dim=0).mean()), "seconds": seconds})
    return out


def write(out: Path, suite: dict, rows: list[dict], spread: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {suite['title']}", "", suite["note"], "",
             "| variant | estimator | KL coef | steps | held-out start | best | last | gain (last) | rollout reward "
             "first 10 -> last 10 | reward std | KL to start | s/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['estimator']} | {r['kl_coef']} | {r['steps']} | {100 * r['acc_start']:.0f}% "
                     f"| {100 * r['acc_best']:.0f}% | {100 * r['acc_last']:.0f}% | "
                     f"{100 * (r['acc_last'] - r['acc_start']):+.0f} pts | {r['reward_first']:.3f} -> "
                     f"{r['reward_last']:.3f} | {r['reward_std']:.3f} | {r['kl_last']:.4f} | "
                     f"{r['seconds_per_step']:.1f} |")
    if spread:
        lines += ["", "Estimator spread on 32 rollouts of the start model (16 mask draws each, one run):", "",
                  "| estimator | forwards per estimate | mean estimate (nats/token) | std over masks (nats/token) | "
                  "s per estimate (32 rows) |", "|---|---:|---:|---:|---:|"]
        for s in spread:
            lines.append(f"| {s['estimator']} | {s['forwards']} | {s['mean']:.3f} | {s['std_over_masks']:.4f} | "
                         f"{s['seconds']:.3f} |")
    stem = suite["stem"]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"variants": rows, "estimator_spread": spread}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        left.plot(r["eval_steps"], [100 * a for a in r["eval_acc"]], "o-", label=r["label"])
        steps, rewards = zip(*r["curve"])
        window = 10
        smooth = [statistics.fmean(rewards[max(0, i - window + 1): i + 1]) for i in range(len(rewards))]
        right.plot(steps, smooth, label=r["label"])
    left.set(xlabel="RL step", ylabel=f"{suite['metric']} (%)", title="held-out accuracy (greedy)")
    right.set(xlabel="RL step", ylabel="rollout reward (10-step mean)", title="rollout reward (T = 0.7)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "rl"))
    parser.add_argument("--suite", choices=list(SUITES), default="sudoku")
    parser.add_argument("--no-spread", action="store_true", help="skip the estimator spread measurement")
    args = parser.parse_args()
    suite = SUITES[args.suite]
    runs = suite["runs"]
    rows = [s for s in (summarise(label, runs / name, est, kl) for label, name, est, kl in suite["variants"]) if s]
    if not rows:
        print(f"no finished RL runs under {runs}/rl-*", file=sys.stderr)
        return 1
    spread = [] if args.no_spread else estimator_spread(runs / suite["init"], runs / suite["data"], suite["prompt"],
                                                        suite["tokens"])
    write(Path(args.out), suite, rows, spread)
    print((Path(args.out) / f"{suite['stem']}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
