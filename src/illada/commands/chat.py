"""`illada chat`: a multi-turn conversation in the terminal, rendered with the checkpoint's chat template."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, TextIO

from illada.commands.generate import add_model_arguments, add_sampling_arguments, sampling_options

HELP = "commands: /reset starts a new conversation, /exit quits (Ctrl-D too)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt placed before the conversation")


def chat_loop(reply: Callable[[list[dict]], str], lines: Iterable[str], out: TextIO,
              system: str | None = None, prompt: Callable[[], None] | None = None) -> list[dict]:
    """Run the conversation over `lines` (user turns and /commands); returns the final conversation.

    `reply(messages)` gives the assistant's text; it must already be free of EOS/EOT markers, since it is fed
    back verbatim as the next turn's history.
    """
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if prompt:
        prompt()
    for line in lines:
        text = line.rstrip("\n")
        command = text.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages = list(start)
            print("(new conversation)", file=out)
        elif command.startswith("/"):
            print(f"unknown command {command!r}; {HELP}", file=out)
        elif command:
            messages.append({"role": "user", "content": text})
            answer = reply(messages)
            messages.append({"role": "assistant", "content": answer})
            print(answer, file=out)
        if prompt:
            prompt()
    return messages


def run(args: argparse.Namespace) -> int:
    import torch

    import illada
    from illada.files import check_unicode, stdin_lines

    if args.system is not None:
        check_unicode(args.system, "--system")
    lm = illada.load(args.model, device=args.device, dtype=args.dtype)
    options = sampling_options(args, lm.tokenizer)
    interactive = sys.stdin.isatty()
    if lm.is_random:
        print("(random-weight stand-in model: its replies are noise)", file=sys.stderr)
    if interactive:
        print(f"illada chat · {lm.name} · {HELP}", file=sys.stderr)

    def reply(messages: list[dict]) -> str:
        with torch.inference_mode():
            return lm.chat(messages, **options)

    def show_prompt() -> None:
        print("> ", end="", file=sys.stderr, flush=True)

    chat_loop(reply, stdin_lines(), sys.stdout, system=args.system, prompt=show_prompt if interactive else None)
    return 0
