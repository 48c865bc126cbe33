"""Flags generated from a config dataclass: one flag per field, its help from the `# ...` comment after the field,
a YAML/JSON file for the base values, flags on top. Used by `illada rl` (and the same scheme as `illada train`)."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re

from illada.errors import IlladaError
from illada.files import loads_strict


def field_comments(cls: type) -> dict[str, str]:
    source = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^    (\w+): [^#\n]*#(.*)$", source, re.M)}


def _kind(annotation: str) -> str:
    if "dict" in annotation or "list" in annotation or "tuple" in annotation:
        return "json"
    if "bool" in annotation:
        return "bool"
    if "float" in annotation:
        return "float"
    if "int" in annotation:
        return "int"
    return "str"


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument("config", nargs="?", help=f"YAML or JSON file with {cls.__name__} keys (flags override it)")
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        comment = comments.get(f.name, "")
        # a comment that states its own default ("(default: ...)") is not given a second one
        default_text = "" if "(default" in comment else f"(default: {default})"
        help_text = " ".join(filter(None, [comment, default_text])).replace("%", "%%")
        if _kind(str(f.type)) == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def _convert(name: str, kind: str, text: str):
    flag = "--" + name.replace("_", "-")
    if kind == "json":
        try:
            return loads_strict(text)
        except ValueError as error:  # JSONDecodeError, and NaN/Infinity
            raise IlladaError(f"{flag}: not valid JSON ({error})") from None
        except RecursionError:
            raise IlladaError(f"{flag}: not valid JSON (nested too deeply)") from None
    if text.lower() == "none":
        return None
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise IlladaError(f"{flag}: expected an integer, got {text!r}") from None
    if kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise IlladaError(f"{flag}: expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise IlladaError(f"{flag}: expected a finite number, got {text!r}")
        return value
    return text


def values_from_args(args: argparse.Namespace, cls: type) -> dict:
    """The file's keys (if a config file was given) updated with every flag that was set."""
    from illada.training.config import load_config_file

    values = load_config_file(args.config) if args.config else {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        kind = _kind(str(f.type))
        values[f.name] = value if kind == "bool" else _convert(f.name, kind, value)
    return values
