"""Learning-rate schedules as small named objects: `schedule(step) -> lr`.

`step` is the 0-based index of the optimizer update the rate is used for. Every schedule is a pure function of the
step (no internal counter), so resuming at step s only needs s: nothing to save beyond the schedule's own fields.

Shared conventions:
- warmup: steps 0..W-1 rise linearly, `peak * (s + 1) / (W + 1)`, so every warmup step is below the peak and
  step W is the first at the peak (W = 0: no warmup);
- a decay that starts at step S uses the progress `u = (s - S) / (T - 1 - S)` with T = total_steps: the rate is
  the level before the decay at s = S and exactly `min_lr` at the run's last step s = T - 1 (and after, clamped),
  so even a one-step decay is felt by the run.

Schedules (reference §3-4):
- `WarmupStableDecay` ("wsd", LLaDA pre-training): warmup, constant, then a linear decay to `min_lr` over the
  last `decay_fraction` of the steps.
- `WarmupConstantCosine` ("cosine", iLLaDA pre-training): warmup, constant until `switch_step`, then a cosine
  decay to `min_lr` at `total_steps`.
- `LinearDecayTail` ("linear-tail", SFT of both): warmup, constant, linear decay to `min_lr` over the last
  `decay_fraction` (10 % in iLLaDA's SFT).
- `Constant` ("constant"): warmup then the peak forever.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from illada.errors import IlladaError


def _warmup(step: int, warmup_steps: int, peak_lr: float) -> float:
    return peak_lr * (step + 1) / (warmup_steps + 1)


def _progress(step: int, start: int, end: int) -> float:
    """Fraction of the decay done at `step`: 0 at `start`, 1 at `end` and after (1 from `start` if end <= start)."""
    if end <= start:
        return 1.0 if step >= start else 0.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


def _decay_start(decay_fraction: float, total_steps: int) -> int:
    """First step of a linear decay over the last `decay_fraction` of the run."""
    # round, not ceil: 0.1 * 300 is 30.000000000000004 in floating point. At least one step when a decay is asked.
    decay_steps = max(1, round(decay_fraction * total_steps)) if decay_fraction > 0 else 0
    return total_steps - decay_steps


def _check_tail(warmup_steps: int, decay_fraction: float, total_steps: int) -> None:
    """The checks shared by the schedules that end in a decay over the last `decay_fraction` of the steps."""
    _check(isinstance(decay_fraction, (int, float)) and 0 <= decay_fraction <= 1,
           f"decay_fraction must be in [0, 1], got {decay_fraction!r}")
    start = _decay_start(decay_fraction, total_steps)
    _check(warmup_steps <= start,
           f"warmup_steps ({warmup_steps}) + decay steps ({total_steps - start}) exceed total_steps ({total_steps})")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise IlladaError(f"lr schedule: {message}")


def _check_common(peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int | None) -> None:
    _check(isinstance(peak_lr, (int, float)) and math.isfinite(peak_lr) and peak_lr > 0,
           f"peak_lr must be a positive number, got {peak_lr!r}")
    _check(isinstance(min_lr, (int, float)) and math.isfinite(min_lr) and 0 <= min_lr <= peak_lr,
           f"min_lr must be in [0, peak_lr={peak_lr}], got {min_lr!r}")
    _check(isinstance(warmup_steps, int) and warmup_steps >= 0,
           f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if total_steps is not None:
        _check(isinstance(total_steps, int) and total_steps > 0,
               f"total_steps must be a positive integer, got {total_steps!r}")
        _check(warmup_steps <= total_steps, f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")


@dataclass(frozen=True)
class Constant:
    """Linear warmup, then `peak_lr` forever."""

    name: ClassVar[str] = "constant"
    peak_lr: float
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check_common(self.peak_lr, 0.0, self.warmup_steps, None)

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup_steps, self.peak_lr) if step < self.warmup_steps else self.peak_lr


@dataclass(frozen=True)
class _LinearTail:
    """Warmup to `peak_lr`, constant, then linear to `min_lr` over the last `decay_fraction` of `total_steps`."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check_common(self.peak_lr, self.min_lr, self.warmup_steps, self.total_steps)
        _check_tail(self.warmup_steps, self.decay_fraction, self.total_steps)

    @property
    def decay_start(self) -> int:
        return _decay_start(self.decay_fraction, self.total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps, self.peak_lr)
        return self.peak_lr + (self.min_lr - self.peak_lr) * _progress(step, self.decay_start, self.total_steps - 1)


@dataclass(frozen=True)
class WarmupStableDecay(_LinearTail):
    """LLaDA pre-training: warmup to `peak_lr`, constant, then a linear decay to `min_lr` over the last
    `decay_fraction` of `total_steps`."""

    name: ClassVar[str] = "wsd"


@dataclass(frozen=True)
class WarmupConstantCosine:
    """iLLaDA: warmup to `peak_lr`, constant until `switch_step`, then cosine to `min_lr` at step total_steps - 1."""

    name: ClassVar[str] = "cosine"
    peak_lr: float
    total_steps: int
    switch_step: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _check_common(self.peak_lr, self.min_lr, self.warmup_steps, self.total_steps)
        _check(isinstance(self.switch_step, int) and self.warmup_steps <= self.switch_step <= self.total_steps,
               f"switch_step must be in [warmup_steps={self.warmup_steps}, total_steps={self.total_steps}], "
               f"got {self.switch_step!r}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps, self.peak_lr)
        u = _progress(step, self.switch_step, self.total_steps - 1)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * u))


@dataclass(frozen=True)
class LinearDecayTail(_LinearTail):
    """SFT: warmup to `peak_lr`, constant, then linear to `min_lr` over the last `decay_fraction` of the steps
    (the shape of "wsd", under the name the SFT recipes use)."""

    name: ClassVar[str] = "linear-tail"


Schedule = Constant | WarmupStableDecay | WarmupConstantCosine | LinearDecayTail
SCHEDULES: dict[str, type] = {
    cls.name: cls for cls in (WarmupStableDecay, WarmupConstantCosine, LinearDecayTail, Constant)
}
# Passed by the trainer to every schedule; dropped silently by those that do not use them (Constant).
_COMMON_KEYS = {"peak_lr", "min_lr", "warmup_steps", "total_steps"}


def build_schedule(name: str, **kw) -> Schedule:
    """A schedule from its name and fields (a config dict): unknown names or keys and bad values raise IlladaError."""
    if name not in SCHEDULES:
        raise IlladaError(f"lr schedule: unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - fields - _COMMON_KEYS)
    if unknown:
        raise IlladaError(f"lr schedule {name}: unknown keys {', '.join(unknown)}; "
                          f"it takes {', '.join(sorted(fields))}")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.default is dataclasses.MISSING and f.name not in kw)
    if missing:
        raise IlladaError(f"lr schedule {name}: missing {', '.join(missing)}")
    return cls(**{k: v for k, v in kw.items() if k in fields})


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (call before `optimizer.step()` with `schedule(step)`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
