"""The `illada` command: one table of subcommands, each a thin module in `illada.commands`."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# subcommand -> (module in illada.commands, one-line help). Modules are imported lazily so `illada --help` is fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("info", "architecture, parameter counts and special tokens of a checkpoint or preset"),
    "generate": ("generate", "sample text from a model (fixed canvas, variable length, parallel decoding)"),
    "infill": ("infill", "fill <|mask:N|> holes anywhere in a text, the text around them kept exactly"),
    "chat": ("chat", "multi-turn chat in the terminal with the checkpoint's chat template"),
    "eval": ("eval", "benchmarks by the paper's protocols on local files (choice tasks, GSM8K, HumanEval)"),
    "serve": ("serve", "OpenAI-compatible HTTP API with streaming, dynamic batching and a live web playground"),
    "convert": ("convert", "convert a LLaDA-layout checkpoint into the iLLaDA layout"),
    "merge": ("merge", "fold a LoRA adapter (PEFT format) into its base model as an iLLaDA-layout checkpoint"),
    "tokenizer": ("tokenizer", "train a byte-level BPE tokenizer with illada's special tokens"),
    "prepare": ("prepare", "tokenise text / chat corpora into packed training shards"),
    "train": ("train", "pre-train a masked diffusion (or autoregressive) model"),
    "sft": ("sft", "supervised fine-tuning"),
    "rl": ("rl", "RL with verifiable rewards (GRPO family) for masked diffusion models"),
    "tasks": ("tasks", "verifiable synthetic tasks (arithmetic, sudoku, reversal facts) as training / eval JSONL"),
}
# the commands that compute: each takes `--threads N` (illada.threads), applied before the command starts
THREADED = {"generate", "infill", "chat", "eval", "serve", "prepare", "train", "sft", "rl"}


def _available() -> dict[str, tuple[str, str]]:
    """Commands whose module is present in this install."""
    return {name: spec for name, spec in COMMANDS.items()
            if importlib.util.find_spec(f"illada.commands.{spec[0]}") is not None}


class _Parser(argparse.ArgumentParser):
    """argparse with its usage error on one line: a stray argument holding a line break stays inside it."""

    def error(self, message: str):
        super().error(" ".join(message.split()))


_SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
             argparse._AppendConstAction, argparse._HelpAction, argparse._VersionAction)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's help ends with its default, unless it says it already (on/off switches and required options
    excepted): `--help` shows every default."""
    for action in parser._actions:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or isinstance(action, _SWITCHES) or "default" in text.lower()):
            continue
        shown = "none" if action.default is None or action.default == [] else "%(default)s"
        action.help = f"{text} (default: {shown})".lstrip()


def build_parser() -> argparse.ArgumentParser:
    from illada import __version__
    from illada.threads import add_threads_argument

    parser = _Parser(prog="illada", description="Masked diffusion language models: iLLaDA / LLaDA.")
    parser.add_argument("--version", action="version", version=f"illada {_version(__version__)}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in _available().items():
        module = importlib.import_module(f"illada.commands.{module_name}")
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        if name in THREADED:
            add_threads_argument(command_parser)
        show_defaults(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def _version(fallback: str) -> str:
    """The installed distribution's version (the package metadata), else the package's `__version__`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("illada")
    except PackageNotFoundError:
        return fallback


def one_line(error: BaseException) -> str:
    """The user-facing text of an error, on one line."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        text = f"{error.strerror}{where}"
    elif isinstance(error, MemoryError):
        text = f"out of memory{f' ({error})' if str(error) else ''}"
    else:
        text = str(error)
    return " ".join(text.split()) or type(error).__name__


def _escape_unencodable_output() -> None:
    """Text that is not valid Unicode (a lone surrogate from a non-UTF-8 argv or file name, or a JSON "\\ud800"
    echoed in a message or an output path) is printed escaped (\\udcff), never a UnicodeEncodeError traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a TextIOWrapper (replaced by a caller): leave it
            pass


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for user mistakes, with a one-line message and no traceback)."""
    from illada.errors import IlladaError

    argv = list(sys.argv[1:] if argv is None else argv)
    _escape_unencodable_output()
    debug = "--debug" in argv or os.environ.get("ILLADA_DEBUG") == "1"
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its one-line usage error
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command in THREADED:
            from illada.threads import apply_threads

            apply_threads(args.threads)
        return int(args._run(args) or 0)
    except (IlladaError, OSError, MemoryError) as error:
        # OSError / MemoryError: the machine said no (a path that cannot be written, a full disk, no memory).
        # Commands check what they can up front; this keeps whatever slips past to one line, never a traceback.
        if debug:
            raise
        print(f"illada: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("illada: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
