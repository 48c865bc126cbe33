"""Training metrics: append-only JSONL, a PNG of the loss curves, the FLOP count behind MFU, the progress display
and `TrainMetrics`, the trainer's metrics component (when a step is recorded and shown)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

from illada.config import ModelConfig
from illada.files import write_atomic


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 per weight of the blocks and the head, plus
    attention scores and values (12 * layers * hidden * seq_len). The embedding lookup costs no FLOPs."""
    h, layers = config.hidden_size, config.n_layers
    kv = config.n_kv_heads * config.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size
    weights = layers * per_layer + config.vocab_size * h
    return 6.0 * weights + 12.0 * layers * h * seq_len


def default_peak_flops(device_type: str) -> float:
    """Peak FLOP/s for MFU when not given: 2-core fp32 CPU measured here (~160 GFLOP/s), H100 dense bf16 otherwise."""
    return 989e12 if device_type == "cuda" else 160e9


class MetricsLog:
    """metrics.jsonl in the run directory; on resume, records after the resumed step are dropped first.

    A line that does not parse (the torn last line of a killed write) is dropped with a note, not fatal."""

    def __init__(self, out_dir: str | Path, resume_step: int = 0) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept, torn = [], 0
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:
                    torn += 1
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    kept.append(line)
            if torn:
                print(f"illada: {self.path}: dropped {torn} unreadable line(s) (a write cut short)", file=sys.stderr)
            write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return [r for r in records if isinstance(r, dict)]


class Progress:
    """A rich progress bar on a terminal (when enabled); elsewhere (nohup, Slurm, `--no-progress`) a plain line
    `step N/total · info` on stderr at every step given an `info`; nothing on ranks other than the main one."""

    def __init__(self, label: str, total: int, start: int, enabled: bool, main: bool = True) -> None:
        self.bar, self.total = None, total
        self.plain = main and not (enabled and sys.stderr.isatty())
        if not enabled or self.plain:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.bar = Bar(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[info]}"), transient=False)
        self.task = self.bar.add_task(label, total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, info: str | None = None) -> None:
        """Step `step` done; `info` (the summary of a logged step) is shown beside the bar or printed as a line."""
        if self.plain and info is not None:
            print(f"step {step}/{self.total} · {info}", file=sys.stderr, flush=True)
        if self.bar is None:
            return
        fields = {} if info is None else {"info": info}
        self.bar.update(self.task, completed=step, **fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class TrainMetrics:
    """The trainer's metrics and progress (torchtitan's MetricsProcessor): it owns `log_every`.

    Every `log_every` steps and at the last step of the call (`end`): a "train" record in metrics.jsonl with the
    throughput and MFU since the previous one, and a summary line (plain off a terminal) or beside the bar; "val"
    records with the loss plot. Records are written on the main rank only; opening drops those after `start`."""

    def __init__(self, out_dir: Path, *, main: bool, log_every: int, start: int, end: int, total: int, tokens: int,
                 progress: bool, flops_per_token: float, peak_flops: float, elapsed: Callable[[], float],
                 title: str, exact_likelihood: bool = False) -> None:
        self.out_dir, self.log_every, self.end, self.title = out_dir, log_every, end, title
        # an AR model's validation loss is its exact NLL (perplexity); a diffusion model's an ELBO (a bound)
        self.ppl_key = "ppl" if exact_likelihood else "ppl_bound"
        self.flops_per_token, self.peak_flops, self.elapsed = flops_per_token, peak_flops, elapsed
        # a fresh start over this very run's aborted first attempt drops its records, as a resume from step 0 would
        self.log = MetricsLog(out_dir, resume_step=start) if main else None
        self.progress = Progress("train", total=total, start=start, enabled=progress and main, main=main)
        self.t_last, self.tokens_last = time.perf_counter(), tokens

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.end

    def log_step(self, step: int, loss: float, lr: float, tokens: int, stats: dict) -> None:
        """After step `step` (1-based), `tokens` seen in the whole run."""
        if not self.should_log(step):
            self.progress.update(step)
            return
        now = time.perf_counter()
        tps = (tokens - self.tokens_last) / max(now - self.t_last, 1e-9)
        mfu = tps * self.flops_per_token / self.peak_flops
        self.t_last, self.tokens_last = now, tokens
        if self.log:
            self.log.write({"kind": "train", "step": step, "loss": loss, "lr": lr, "tokens": tokens,
                            "tokens_per_s": tps, "mfu": mfu, "elapsed_s": round(self.elapsed(), 3),
                            **{k: v for k, v in stats.items() if k != "finite"}})
        self.progress.update(step, f"loss {loss:.4f} · {tps:,.0f} tok/s · MFU {100 * mfu:.1f}%")

    def log_val(self, step: int, val_loss: float) -> None:
        if self.log:
            self.log.write({"kind": "val", "step": step, "val_loss": val_loss,
                            self.ppl_key: math.exp(min(val_loss, 50.0))})
            self.plot()

    def plot(self) -> None:
        """loss.png from every record of the run (main rank)."""
        if self.log:
            plot_losses(self.log.records(), self.out_dir / "loss.png", title=self.title)

    def close(self) -> None:
        self.progress.close()


def plot_losses(records: list[dict], path: str | Path, title: str = "") -> None:
    """PNG with the training loss and the validation bound per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation (nats/token bound)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
