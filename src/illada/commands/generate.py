"""`illada generate [PROMPT ...]`: sample from a model, optionally watching the canvas resolve (`--show`)."""
from __future__ import annotations

import argparse
import sys
import time
import warnings

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
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="generation budget: exactly this many tokens unless a stop comes first (capped by the "
                        "model context, with a note)")
    g.add_argument("--steps", type=int, default=None,
                   help="denoising steps (fixed: total, default max-new-tokens; variable: per block, default block length)")
    g.add_argument("--block-length", type=int, default=32, help="tokens per block (default: 32)")
    g.add_argument("--variable-length", dest="variable_length", action="store_true", default=True,
                   help="iLLaDA: append blocks until EOS or a stop string (default)")
    g.add_argument("--fixed-length", dest="variable_length", action="store_false",
                   help="LLaDA: one canvas of max-new-tokens masks")
    add_decoding_arguments(g)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--end-think-boost", type=float, default=0.0, help="boost for </think> (e.g. 100), §5.3")
    g.add_argument("--end-think-power", type=float, default=3.0, help="how the boost grows along a block (default: 3.0)")


def add_decoding_arguments(g) -> None:
    """The knobs of each denoising step (shared by `generate` and `infill`)."""
    g.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random", "margin", "entropy"],
                   help="which masked tokens to commit each step (default: low_confidence)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0.0)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: 1, off)")
    g.add_argument("--cfg-scale", type=float, default=0.0, help="unsupervised classifier-free guidance weight")
    g.add_argument("--threshold", type=float, default=None, help="parallel decoding: commit all tokens above this confidence")
    g.add_argument("--factor", type=float, default=None, help="parallel decoding: factor rule")
    g.add_argument("--cache", default="none", choices=["none", "prefix", "dual"], help="approximate KV cache")
    g.add_argument("--forbid-eos", action="store_true", help="never generate EOS")
    g.add_argument("--eos-confidence", default="normal", choices=["normal", "neg_inf"],
                   help="neg_inf: commit EOS/EOT candidates last")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the random draws (default: a fresh one when sampling is random, printed as "
                        "'illada: seed N' so the run can be repeated with --seed N)")


def is_random(args: argparse.Namespace) -> bool:
    """Whether the decoding draws random numbers: temperature sampling or random remasking."""
    return (args.temperature or 0) > 0 or args.remasking == "random"


def pick_seed(args: argparse.Namespace) -> int | None:
    """`--seed`, else for random decoding a fresh seed, printed once (`illada: seed N`) so the run can be repeated;
    greedy decoding needs none. Sets `args.seed`, so a second call (each chat turn) reuses it."""
    if args.seed is None and is_random(args):
        import random

        args.seed = random.SystemRandom().randrange(2**31)
        print(f"illada: seed {args.seed}", file=sys.stderr)
    return args.seed


def decoding_options(args: argparse.Namespace) -> dict:
    """The options of `add_decoding_arguments`, by their sampler names (a seed picked for random decoding)."""
    pick_seed(args)
    return dict(steps=args.steps, remasking=args.remasking, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, cfg_scale=args.cfg_scale, threshold=args.threshold, factor=args.factor,
                cache=args.cache, forbid_eos=args.forbid_eos, eos_confidence=args.eos_confidence, seed=args.seed)


def sampling_options(args: argparse.Namespace, tokenizer) -> dict:
    options = dict(decoding_options(args), max_new_tokens=args.max_new_tokens, block_length=args.block_length,
                   variable_length=args.variable_length, stop_strings=tuple(args.stop))
    if args.end_think_boost:
        end_think = tokenizer.encode("</think>")
        options.update(end_think_ids=end_think, end_think_boost=args.end_think_boost,
                       end_think_power=args.end_think_power)
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="*", help="prompt text(s), batched together; '-' reads one from stdin")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user turn")
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
    if lm.config.causal:  # an `--objective ar` twin: greedy left to right with a KV cache
        if args.show or args.record:
            raise IlladaError(f"{lm.name} is an autoregressive model: --show/--record show diffusion canvases")
        began = time.perf_counter()
        with warnings.catch_warnings():  # its notes are printed below, as for the diffusion path
            warnings.simplefilter("ignore")
            texts, output = lm.generate(prompts, chat=args.chat, return_output=True,
                                        max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - began
        _print_notes(output)
        for prompt, text in zip(prompts, texts):
            print(prompt + text if not args.chat else text)
        generated = int(output.generated_lengths.sum())
        print(f"[{generated} tokens · {output.nfe} forward passes (autoregressive, KV cache) · "
              f"{generated / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
        return 0
    options = lm.sampling_options(sampling_options(args, lm.tokenizer))
    ids, mask = lm.encode_prompts(prompts, chat=args.chat)
    token_text = _token_text(lm.tokenizer)
    prompt_text = lm.tokenizer.decode(ids[0][mask[0].bool()].tolist())
    start = ids.shape[1]
    mask_id, pad_id = options["mask_id"], lm.tokenizer.pad_token_id
    frames, live, output = [], None, None
    if args.show:
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(stderr=False), refresh_per_second=20, transient=False)
        live.start()
    began = time.perf_counter()
    try:
        with torch.inference_mode():
            for event in stream(lm.model, ids, attention_mask=mask, decode=lm.tokenizer.decode, **options):
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
