"""`illada generate [PROMPT ...]`: sample from a model, optionally watching the canvas resolve (`--show`)."""
from __future__ import annotations

import argparse
import sys
import time
import warnings

from illada.commands.sampling_flags import add_sampling_flags, sampling_config
from illada.errors import IlladaError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint directory, run directory (its newest checkpoint), bundled model name or "
                             "Hugging Face hub id owner/name (default: the demo model)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: fp32 on CPU, checkpoint dtype on GPU)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a PEFT LoRA adapter (or a LoRA training run), merged into --model's weights; without "
                             "--model, the base it records (needs the lora extra: pip install 'illada[lora]')")
    parser.add_argument("--quantize", default=None, metavar="int8|int4",
                        help="torchao weight-only quantisation, applied layer by layer while loading (needs the "
                             "quant extra: pip install 'illada[quant]'; int4 on CUDA needs --dtype bf16)")


def load_model(args: argparse.Namespace):
    """The model that `add_model_arguments`' flags name (illada.load)."""
    import illada

    return illada.load(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter,
                       quantize=args.quantize)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `SamplingConfig` knob as a flag (illada.commands.sampling_flags), over the model's defaults."""
    group = parser.add_argument_group(
        "sampling", "a flag not given takes the model's generation_config.json value, else the default shown")
    add_sampling_flags(group, layered=True)


def model_sampling_config(lm, args: argparse.Namespace):
    """The sampler config of a run: the model's generation defaults with the sampling flags given on top."""
    return lm.sampling_config(sampling_config(args, base=lm.generation.sampling_config()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="*", help="prompt text(s), batched together; '-' reads one from stdin")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user turn")
    parser.add_argument("--raw", action="store_true",
                        help="use each prompt as given, without the prompt_template of the model's "
                             "generation_config.json")
    parser.add_argument("--show", action="store_true", help="live view of the denoising in the terminal")
    parser.add_argument("--record", default=None, metavar="OUT.html|OUT.gif", help="save the denoising history")


def _print_notes(output) -> None:
    """What the sampler changed in the request (a budget capped by the context), on stderr."""
    for note in output.notes:
        print(f"note: {note}", file=sys.stderr)


def _token_text(tokenizer):
    return lambda token: tokenizer.decode([token])


def run(args: argparse.Namespace) -> int:
    import torch

    from illada import render
    from illada.sampling import stream

    from illada.files import check_output_file, check_unicode, read_stdin_text

    prompts = [read_stdin_text() if p == "-" else check_unicode(p, "the prompt") for p in args.prompt] or [""]
    if args.record and not args.record.endswith((".html", ".gif")):
        raise IlladaError(f"--record: {args.record} must end in .html or .gif")
    if args.record:  # before any work: an unwritable path is found now, not after the generation
        check_output_file(args.record, "--record")
    lm = load_model(args)
    config = model_sampling_config(lm, args)
    if not args.chat and not args.raw:  # a base model's framing of a bare prompt, e.g. "Question: ...\nAnswer:"
        prompts = [lm.generation.format_prompt(p) for p in prompts]
    if lm.config.causal:  # an `--objective ar` twin: greedy left to right with a KV cache
        if args.show or args.record:
            raise IlladaError(f"{lm.name} is an autoregressive model: --show/--record show diffusion canvases")
        began = time.perf_counter()
        with warnings.catch_warnings():  # its notes are printed below, as for the diffusion path
            warnings.simplefilter("ignore")
            texts, output = lm.generate(prompts, chat=args.chat, return_output=True,
                                        max_new_tokens=config.gen_length)
        seconds = time.perf_counter() - began
        _print_notes(output)
        for prompt, text in zip(prompts, texts):
            print(prompt + text if not args.chat else text)
        generated = int(output.generated_lengths.sum())
        print(f"[{generated} tokens · {output.nfe} forward passes (autoregressive, KV cache) · "
              f"{generated / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
        return 0
    ids, mask = lm.encode_prompts(prompts, chat=args.chat)
    token_text = _token_text(lm.tokenizer)
    prompt_text = lm.tokenizer.decode(ids[0][mask[0].bool()].tolist())
    start = ids.shape[1]
    mask_id, pad_id = config.mask_id, lm.tokenizer.pad_token_id
    frames, live, output = [], None, None
    if args.show:
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(stderr=False), refresh_per_second=20, transient=False)
        live.start()
    began = time.perf_counter()
    try:
        with torch.inference_mode():
            for event in stream(lm.model, ids, config=config, attention_mask=mask, decode=lm.tokenizer.decode):
                if event.done:
                    output = event.output
                    break
                if live is not None or args.record:
                    canvas, step_of = event.canvas[0].tolist(), event.step_of[0].tolist()
                    pieces = render.frame_pieces(canvas, step_of, start, mask_id, token_text, pad_id)
                    frames.append(pieces)
                    if live is not None:
                        live.update(render.rich_frame(prompt_text, pieces, max(event.step + 1, 1),
                                                      f"step {event.step + 1} · NFE {event.nfe}"))
    finally:
        if live is not None:
            live.stop()
    seconds = time.perf_counter() - began
    _print_notes(output)
    texts = [lm.tokenizer.decode(t, skip_special_tokens=True) for t in output.generated_tokens()]
    if lm.is_random:
        print("(random-weight stand-in model: the text below is noise)", file=sys.stderr)
    if not args.show:
        for prompt, text in zip(prompts, texts):
            print(prompt + text if not args.chat else text)
            if len(prompts) > 1:
                print("-" * 40)
    generated = int(output.generated_lengths.sum())
    # per row: the passes that worked on it, so a batch reports what each sequence cost
    per_row = generated / max(int(output.row_nfe.sum()), 1)
    print(f"[{generated} tokens · {output.nfe} forward passes · {per_row:.2f} tokens/forward per row · "
          f"{generated / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    if args.record:
        total = max((s for piece in frames for _, s in piece), default=0) + 1
        path = render.record(args.record, prompt_text, frames, total, title=f"illada · {lm.name}")
        print(f"recorded {len(frames)} steps to {path}", file=sys.stderr)
    return 0
