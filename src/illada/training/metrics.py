"""Training metrics: append-only JSONL, a PNG of the loss curves, and the FLOP count behind MFU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

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
