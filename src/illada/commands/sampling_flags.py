"""The sampling flags of `generate`, `chat`, `infill`, `eval` and `serve`, generated from `SamplingConfig`'s fields
(name, type, choices, help), so a knob is declared once, in illada.sampling.config."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Iterable

from illada.sampling.config import SamplingConfig

# a boolean knob with a second flag that turns it off, named for what it means
NEGATIVE_FLAGS = {"variable_length": "--fixed-length"}


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def add_sampling_flags(group, *, only: Iterable[str] | None = None, skip: Iterable[str] = (),
                       defaults: bool = True, unset: str | None = None, help: dict[str, str] | None = None,
                       layered: bool = False) -> None:
    """One flag per user-set `SamplingConfig` field (those in `only`, minus `skip`), dest = the field name.

    `defaults`: the flags default to the config's defaults (shown in --help); otherwise to None, meaning
    "unset", described by `unset` (e.g. "the preset's") in each help text. `layered`: None too (so a layer under
    the flags, a model's generation_config.json, shows through), with the config's defaults still shown in --help.
    `help` overrides a field's text."""
    only = set(only) if only is not None else None
    fields = [f for f in SamplingConfig.user_fields("flag")
              if (only is None or f.name in only) and f.name not in skip]
    group.set_defaults(sampling_fields=tuple(f.name for f in fields))  # what `sampling_changes` reads back
    for f in fields:
        text = (help or {}).get(f.name, f.metadata["help"])
        known = defaults or layered  # --help states the config's default
        default = _default(f) if known else None
        if "(default" not in text:
            shown = f.metadata["shown"] or ("none" if default is None or default == () else default)
            text = f"{text} (default: {shown if known else unset or 'none'})"
        if layered:
            default = None
        kind = str(f.type)
        if kind == "bool":
            if f.name in NEGATIVE_FLAGS:
                group.add_argument(_flag(f), dest=f.name, action="store_true", default=default, help=text)
                group.add_argument(NEGATIVE_FLAGS[f.name], dest=f.name, action="store_false",
                                   help=f"the opposite of {_flag(f)}")
            else:
                group.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                   help=text)
            continue
        metavar = _flag(f).lstrip("-").upper().replace("-", "_")
        if kind.startswith("Sequence"):
            group.add_argument(_flag(f), dest=f.name, action="append", default=None, metavar=metavar, help=text)
        elif f.metadata["choices"]:
            group.add_argument(_flag(f), dest=f.name, default=default, choices=f.metadata["choices"], help=text)
        else:
            convert = float if kind.startswith("float") else int if kind.startswith("int") else str
            group.add_argument(_flag(f), dest=f.name, type=convert, default=default, metavar=metavar, help=text)


def sampling_changes(args: argparse.Namespace) -> dict:
    """The sampling flags (of `add_sampling_flags`) that were given (not None), by field name."""
    names = getattr(args, "sampling_fields", ())
    changes = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if "stop_strings" in changes:
        changes["stop_strings"] = tuple(changes["stop_strings"])
    return changes


def pick_seed(args: argparse.Namespace, random: bool) -> int | None:
    """`--seed`, else for random decoding a fresh seed, printed once (`illada: seed N`) so the run can be repeated;
    greedy decoding needs none. Sets `args.seed`, so a second call (each chat turn) reuses it."""
    if getattr(args, "seed", None) is None and random:
        import random as random_

        args.seed = random_.SystemRandom().randrange(2**31)
        print(f"illada: seed {args.seed}", file=sys.stderr)
    return args.seed


def sampling_config(args: argparse.Namespace, base: SamplingConfig | None = None) -> SamplingConfig:
    """`base` (default: `SamplingConfig()`) with the sampling flags given; a seed picked for random decoding."""
    config = (base or SamplingConfig()).replace(**sampling_changes(args))
    seed = pick_seed(args, config.is_random)
    return config.replace(seed=seed) if seed != config.seed else config
