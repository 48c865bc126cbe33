"""`illada sft --init-from CKPT --data DIR`: supervised fine-tuning.

Default: the iLLaDA variable-length recipe (a packed stream of prompt + response + EOS, every token maskable, the
pre-training objective with the random split) and the SFT schedule (warmup, constant, linear decay over the last
10 %). `--objective sft-pairs` with a `pairs` dataset runs LLaDA's SFT (prompt never masked, EOS padding).
"""
from __future__ import annotations

import argparse

from illada.commands.train import add_config_arguments, config_from_args, run_config
from illada.errors import IlladaError

DEFAULTS = {"schedule": "linear-tail", "lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 20, "decay_fraction": 0.1,
            "steps": 300, "out_dir": "runs/illada-sft"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DEFAULTS)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, DEFAULTS)
    if not config.init_from:
        raise IlladaError("sft: --init-from CHECKPOINT is required (the pre-trained model to fine-tune)")
    if config.objective == "ar":
        raise IlladaError("sft: objective ar is not supported; use diffusion (variable-length) or sft-pairs")
    return run_config(config)
