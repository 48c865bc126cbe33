"""`illada rl [CONFIG] [--key value ...]`: GRPO-family RL with verifiable rewards (every RLConfig field is a flag)."""
from __future__ import annotations

import argparse
import sys

from illada.commands.config_flags import add_dataclass_flags, values_from_args
from illada.errors import IlladaError
from illada.rl.config import RLConfig

STOPPED_EXIT_CODE = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, RLConfig)


def run(args: argparse.Namespace) -> int:
    from illada.rl.trainer import train_rl

    try:
        config = RLConfig.from_dict(values_from_args(args, RLConfig))
    except TypeError as error:
        raise IlladaError(f"rl config: {error}") from None
    result = train_rl(config)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    evals = [r for r in result.history if r.get("kind") == "eval" and r.get("accuracy") is not None]
    if evals:
        print(f"held-out accuracy: {evals[0]['accuracy']:.3f} at step {evals[0]['step']} -> "
              f"{evals[-1]['accuracy']:.3f} at step {evals[-1]['step']}")
    if result.stopped:
        print("illada: stopped before the last step; run the same command again to resume", file=sys.stderr)
        return STOPPED_EXIT_CODE
    return 0
