"""`illada chat`: a multi-turn conversation in the terminal, rendered with the checkpoint's chat template."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, TextIO

from illada.commands.generate import (add_model_arguments, add_sampling_arguments, load_model,
                                      model_sampling_config)

HELP = "commands: /reset starts a new conversation, /exit quits (Ctrl-D too)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt placed before the conversation")


class ReplyStream:
    """A step callback that writes a reply as it becomes final: the generated tokens up to the first mask are
    committed for good, so their text (to the first EOS/EOT, before any stop string) is printed as it grows.

    Held back until later steps: trailing whitespace (the reply is stripped), a partly decoded character, and
    the tail that could still become a stop string."""

    def __init__(self, decode: Callable[..., str], write: Callable[[str], None], mask_id: int,
                 end_ids: Iterable[int | None] = (), stop_strings: Iterable[str] = ()) -> None:
        self.decode, self.write, self.mask_id = decode, write, mask_id
        self.end_ids = {i for i in end_ids if i is not None}
        self.stops = [s for s in stop_strings if s]
        self.written = ""

    def final_text(self, canvas: list[int], step_of: list[int]) -> str:
        start = next((i for i, (t, s) in enumerate(zip(canvas, step_of)) if s >= 0 or t == self.mask_id),
                     len(canvas))
        tokens = []
        for token in canvas[start:]:
            if token == self.mask_id or token in self.end_ids:
                break
            tokens.append(token)
        text = self.decode(tokens, skip_special_tokens=True).lstrip()
        found = [text.index(stop) for stop in self.stops if stop in text]
        if found:  # final up to the first stop string
            return text[: min(found)].rstrip()
        hold = max((len(stop) - 1 for stop in self.stops), default=0)  # the start of a stop string, maybe
        return text[: len(text) - hold].rstrip().rstrip("\ufffd") if hold < len(text) else ""

    def __call__(self, event) -> None:
        if event.done:
            return
        text = self.final_text(event.canvas[0].tolist(), event.step_of[0].tolist())
        if len(text) > len(self.written) and text.startswith(self.written):
            self.write(text[len(self.written):])
            self.written = text


def chat_loop(reply: Callable[[list[dict], Callable[[str], None]], str], lines: Iterable[str], out: TextIO,
              system: str | None = None, prompt: Callable[[], None] | None = None) -> list[dict]:
    """Run the conversation over `lines` (user turns and /commands); returns the final conversation.

    `reply(messages, write)` gives the assistant's text; it may `write` the start of it to `out` as it is
    produced (what it wrote must begin the answer; the rest is printed after it). The answer must already be free
    of EOS/EOT markers, since it is fed back verbatim as the next turn's history. Ctrl-C (KeyboardInterrupt)
    during a reply cancels that turn, its question dropped from the history, and the conversation goes on.
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
            written: list[str] = []

            def write(piece: str) -> None:
                written.append(piece)
                out.write(piece)
                out.flush()

            messages.append({"role": "user", "content": text})
            try:
                answer = reply(messages, write)
            except KeyboardInterrupt:
                messages.pop()
                print(("\n" if written else "") + "(reply cancelled)", file=out, flush=True)
            else:
                messages.append({"role": "assistant", "content": answer})
                shown = "".join(written)
                print(answer[len(shown):] if answer.startswith(shown) else "\n" + answer, file=out, flush=True)
        if prompt:
            prompt()
    return messages


def run(args: argparse.Namespace) -> int:
    import torch

    from illada.files import check_unicode, stdin_lines

    if args.system is not None:
        check_unicode(args.system, "--system")
    lm = load_model(args)
    config = model_sampling_config(lm, args)
    interactive = sys.stdin.isatty()
    if lm.is_random:
        print("(random-weight stand-in model: its replies are noise)", file=sys.stderr)
    if interactive:
        print(f"illada chat · {lm.name} · {HELP}", file=sys.stderr)

    def reply(messages: list[dict], write: Callable[[str], None]) -> str:
        if lm.config.causal:  # the autoregressive decoder has no denoising steps to stream
            return lm.chat(messages, config=config)
        streamer = ReplyStream(lm.tokenizer.decode, write, lm.mask_token_id, lm.special.stops, config.stop_strings)
        with torch.inference_mode():
            return lm.chat(messages, callback=streamer, config=config)

    def show_prompt() -> None:
        print("> ", end="", file=sys.stderr, flush=True)

    chat_loop(reply, stdin_lines(), sys.stdout, system=args.system, prompt=show_prompt if interactive else None)
    return 0
