"""Which rows form each batch: a pure function of (seed, step), so resume is exact and world size does not matter.

A global batch of `world * grad_accum * micro` rows is drawn per optimizer step from a per-epoch permutation of the
dataset rows. Micro-batch k of rank r takes the slice `(r * grad_accum + k) * micro ...` of it, so a run with
(world=2, accum=1) sees the same micro-batches as (world=1, accum=2), and each micro-batch's noise is seeded by
its global index.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from illada.errors import IlladaError


def micro_batch_seed(seed: int, step: int, micro_index: int) -> int:
    """A 63-bit seed for the noise of one micro-batch, independent of the process that draws it."""
    return int(np.random.SeedSequence([seed, step, micro_index]).generate_state(2, dtype=np.uint64)[0] >> 1)


@dataclass
class BatchPlan:
    num_rows: int
    global_batch: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_rows <= 0:
            raise IlladaError("the training set has no complete rows: use a shorter seq_len or more data")
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._perm

    def rows(self, step: int) -> np.ndarray:
        """Dataset row indices of the global batch of `step` (0-based)."""
        flat = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
        out = np.empty_like(flat)
        for epoch in np.unique(flat // self.num_rows):
            sel = flat // self.num_rows == epoch
            out[sel] = self._permutation(int(epoch))[flat[sel] % self.num_rows]
        return out

    def micro_rows(self, step: int, rank: int, grad_accum: int, micro: int, k: int) -> np.ndarray:
        start = (rank * grad_accum + k) * micro
        return self.rows(step)[start:start + micro]


class PackedRows:
    """Fixed-length rows cut from a packed token stream; the last `holdout` rows are reserved for validation."""

    def __init__(self, tokens, seq_len: int, holdout: int = 0) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        total = tokens.num_tokens // seq_len
        if holdout >= total:
            raise IlladaError(f"dataset has {total} rows of {seq_len} tokens: too few to hold out {holdout} for validation")
        self.train_rows, self.holdout = total - holdout, holdout

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        ids = np.stack([self.tokens.read(int(r) * self.seq_len, self.seq_len) for r in rows])
        return {"input_ids": torch.from_numpy(ids).long()}

    def validation_rows(self) -> np.ndarray:
        return np.arange(self.train_rows, self.train_rows + self.holdout)


class PairRows:
    """LLaDA SFT rows: prompt + response (+ EOS padding to the longest row of the batch, capped at seq_len)."""

    def __init__(self, examples, seq_len: int, holdout: int = 0) -> None:
        self.examples, self.seq_len = examples, seq_len
        if holdout >= len(examples):
            raise IlladaError(f"dataset has {len(examples)} examples: too few to hold out {holdout} for validation")
        self.train_rows, self.holdout = len(examples) - holdout, holdout

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        pairs = [self.examples[int(r)] for r in rows]
        rows_ids = [np.concatenate([p, r])[: self.seq_len] for p, r in pairs]
        width = max(len(r) for r in rows_ids)
        eos = self.examples.eos_token_id
        ids = torch.full((len(rows_ids), width), eos, dtype=torch.long)
        for i, row in enumerate(rows_ids):
            ids[i, : len(row)] = torch.from_numpy(row)
        prompt_lengths = torch.tensor([min(len(p), self.seq_len - 1) for p, _ in pairs], dtype=torch.long)
        return {"input_ids": ids, "prompt_lengths": prompt_lengths}

    def validation_rows(self) -> np.ndarray:
        return np.arange(self.train_rows, self.train_rows + self.holdout)
