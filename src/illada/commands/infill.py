r"""`illada infill TEXT`: fill the `<|mask:N|>` holes of a text with the bidirectional model, the text around them
kept exactly; `--show` watches the holes resolve in place, `--record` saves it (.html / .gif).

    illada infill "The capital of France is <|mask:3|>, a city known for <|mask:8|>."

`<|mask:N|>` is a hole of N tokens; `\<|mask:3|>` is the literal text (see `illada.holes`).
"""
from __future__ import annotations

import argparse
import sys
import time

from illada.commands.generate import add_model_arguments, load_model
from illada.commands.sampling_flags import add_sampling_flags, pick_seed, sampling_changes
from illada.errors import IlladaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="text with holes written <|mask:N|> (N tokens; \\<|mask:N|> is literal); "
                                     "'-' reads it from stdin")
    add_model_arguments(parser)
    from illada.sampling.infill import InfillConfig

    g = parser.add_argument_group("sampling")
    add_sampling_flags(g, only=InfillConfig.option_names(),
                       help={"steps": "denoising passes (default: one per hole token; the holes are filled together)"})
    g.add_argument("--allow-shorter", action="store_true",
                   help="drop EOS/padding the model puts at the end of a hole (a hole may come out shorter)")
    parser.add_argument("--show", action="store_true", help="live view of the holes resolving in the terminal")
    parser.add_argument("--record", default=None, metavar="OUT.html|OUT.gif", help="save the denoising history")


def run(args: argparse.Namespace) -> int:
    from illada import render
    from illada.files import check_output_file, check_unicode, read_stdin_text
    from illada.holes import parse_holes

    text = read_stdin_text() if args.text == "-" else check_unicode(args.text, "the text")
    pieces = parse_holes(text)  # bad syntax is found before the model loads
    if args.record and not args.record.endswith((".html", ".gif")):
        raise IlladaError(f"--record: {args.record} must end in .html or .gif")
    if args.record:
        check_output_file(args.record, "--record")
    from illada.sampling.infill import InfillConfig

    config = InfillConfig(**sampling_changes(args), allow_shorter=args.allow_shorter)
    config = config.replace(seed=pick_seed(args, config.is_random))
    lm = load_model(args)
    token_text = lambda token: lm.tokenizer.decode([token])  # noqa: E731
    frames, live = [], None
    if args.show:
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(stderr=False), refresh_per_second=20, transient=False)
        live.start()

    def watch(event, mask) -> None:
        if event.done or not (live is not None or args.record):
            return
        canvas, step_of = event.canvas[0].tolist(), event.step_of[0].tolist()
        holes = [s >= 0 or t == lm.mask_token_id for t, s in zip(canvas, step_of)]
        pieces_ = render.canvas_pieces(canvas, step_of, holes, mask[0].bool().tolist(), lm.mask_token_id,
                                       token_text)
        frames.append(pieces_)
        if live is not None:
            live.update(render.rich_frame("", pieces_, max(event.step + 1, 1),
                                          f"step {event.step + 1} · NFE {event.nfe}"))

    began = time.perf_counter()
    try:
        texts, output = lm.fill_pieces([pieces], callback=watch, config=config)
    finally:
        if live is not None:
            live.stop()
    seconds = time.perf_counter() - began
    if lm.is_random:
        print("(random-weight stand-in model: the text below is noise)", file=sys.stderr)
    if not args.show:
        print(texts[0])
    holes = len(output.spans[0])
    kept = sum(len(t) for t in output.span_tokens[0])
    print(f"[{holes} hole{'s' * (holes != 1)} · {output.filled} tokens filled"
          f"{f' ({kept} kept)' if args.allow_shorter else ''} · {output.nfe} forward passes · "
          f"{output.filled / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    if args.record:
        total = max((s for piece in frames for _, s in piece), default=0) + 1
        path = render.record(args.record, "", frames, total, title=f"illada infill · {lm.name}")
        print(f"recorded {len(frames)} steps to {path}", file=sys.stderr)
    return 0
