"""Graceful stops for the training loops (`illada train`/`sft`/`rl`): SIGINT or SIGTERM asks the run to stop after
the current step (a second one interrupts at once); under torch.distributed every rank stops when any rank was asked.
"""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from illada.training.parallelize import DistEnv


def any_rank(flag: bool, env: DistEnv, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is true on at least one (a collective: every rank must call it)."""
    if not env.enabled:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class StopRequest:
    def __init__(self, env: DistEnv, device: torch.device | str = "cpu") -> None:
        self.env, self.device, self.requested = env, device, False

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C: give up on the graceful path
            raise KeyboardInterrupt
        self.requested = True
        if self.env.is_main:
            print("\nillada: stop requested; saving a checkpoint after this step", file=sys.stderr)

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """SIGINT/SIGTERM handlers for the duration (none off the main thread, e.g. inside a server)."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, self._handle)
        except ValueError:  # not the main thread
            previous = {}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (collective)."""
        return any_rank(self.requested, self.env, self.device)
