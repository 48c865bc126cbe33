"""`illada train [CONFIG] [--key value ...]`: pre-training (diffusion or `--objective ar`).

Every TrainConfig field is a flag (`--micro-batch-size 8`); a YAML/JSON config file gives the base values and
flags override it. Under `torchrun --nproc-per-node N -m illada train ...` each process trains its slice.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from illada.commands.config_flags import field_comments
from illada.errors import IlladaError
from illada.files import check_output_dir, loads_strict
from illada.training.config import TrainConfig, load_config_file

DEFAULTS: dict = {}  # `illada sft` swaps in its own defaults
_NEGATED = "_positive_of_"  # the dest of the positive flag of a `no_...` field


def _flag_type(annotation: str):
    if "bool" in annotation:
        return None
    if "int" in annotation and "float" not in annotation:
        return int
    if "float" in annotation and "tuple" not in annotation:
        return float
    return str


def add_config_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("config", nargs="?", help="YAML or JSON file with TrainConfig keys (flags override it)")
    comments = field_comments(TrainConfig)  # the dataclass source is the one place the help is written
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        annotation = str(f.type)
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        help_text = " ".join(filter(None, [comments.get(f.name), f"(default: {default})"]))
        help_text = help_text.replace("%", "%%")
        if "bool" in annotation and f.name.startswith("no_"):
            # a negative field (no_decay_norms_embeddings) is the positive flag --decay-norms-embeddings and its
            # --no-... form, never --no-no-...; config files keep the field's own key
            positive = f.name.removeprefix("no_")
            help_text = " ".join(filter(None, [f"--no-{positive.replace('_', '-')}: {comments.get(f.name, '')}",
                                               f"(default: {'--no-' if default else '--'}{positive.replace('_', '-')})"]))
            parser.add_argument("--" + positive.replace("_", "-"), dest=_NEGATED + f.name,
                                action=argparse.BooleanOptionalAction, default=None, help=help_text.replace("%", "%%"))
        elif "bool" in annotation:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name in ("betas", "model_overrides"):
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_flag_type(annotation), default=None, help=help_text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DEFAULTS)


def config_from_args(args: argparse.Namespace, defaults: dict) -> TrainConfig:
    values = dict(defaults)
    if args.config:
        values.update(load_config_file(args.config))
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        negated = getattr(args, _NEGATED + f.name, None)
        if negated is not None:
            value = not negated
        if value is None:
            continue
        if f.name in ("betas", "model_overrides"):
            try:
                value = loads_strict(value)
            except ValueError as error:  # JSONDecodeError, and NaN/Infinity
                raise IlladaError(f"--{f.name.replace('_', '-')}: not valid JSON ({error})") from None
            except RecursionError:
                raise IlladaError(f"--{f.name.replace('_', '-')}: not valid JSON (nested too deeply)") from None
        values[f.name] = value
    config = TrainConfig.from_dict(values)
    config.validate()
    return config


def run(args: argparse.Namespace) -> int:
    return run_config(config_from_args(args, DEFAULTS))


STOPPED_EXIT_CODE = 130


def run_config(config: TrainConfig) -> int:
    from illada.training.trainer import train

    check_output_dir(config.out_dir, "--out-dir")

    result = train(config)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    if result.val_loss is not None:
        import math

        # an AR model's loss is its exact NLL; a diffusion model's is an ELBO, so its perplexity is a bound
        kind = "perplexity" if config.objective == "ar" else "perplexity bound"
        print(f"validation: {result.val_loss:.4f} nats/token ({kind} {math.exp(min(result.val_loss, 50)):.2f})")
    if result.stopped_early:
        # non-zero so a script does not go on as if the run had finished; rerunning the command resumes it
        print("illada: stopped before the last step; run the same command again to resume", file=sys.stderr)
        return STOPPED_EXIT_CODE
    return 0
