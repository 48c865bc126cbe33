"""The high-level handle: `illada.load(...)` returns a `DiffusionLM` bundling model, tokenizer and config."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from illada.config import ModelConfig, preset
from illada.errors import IlladaError
from illada.model import Transformer, build_model
from illada.runtime import resolve_device, resolve_dtype
from illada.sampling.config import SamplingConfig
from illada.sampling.generation_config import GenerationDefaults, read_generation_config
from illada.special_tokens import SpecialTokens
from illada.tokenizer import Tokenizer

ASSETS = Path(__file__).parent / "assets" / "models"
DEFAULT_MODEL = "illada-shakespeare-tiny"


def bundled_models() -> dict[str, Path]:
    """Names of the models shipped inside the package, with their directories."""
    names = {DEFAULT_MODEL: ASSETS / DEFAULT_MODEL}
    if ASSETS.is_dir():
        names.update({p.name: p for p in ASSETS.iterdir() if (p / "config.json").is_file()})
    return names


@dataclass
class DiffusionLM:
    """A loaded model with its tokenizer. `is_random` marks the untrained stand-in for a missing bundled model;
    `generation` holds the defaults of its generation_config.json (illada.sampling.generation_config)."""

    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    name: str
    is_random: bool = False
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    special: SpecialTokens = field(init=False)  # resolved once, here, and passed to the sampler and scorers

    def __post_init__(self) -> None:
        self.special = SpecialTokens.resolve(self.tokenizer, self.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def mask_token_id(self) -> int:
        if self.special.mask is None:
            raise IlladaError(f"model {self.name}: no mask token id in config.json or the tokenizer; pass mask_token_id=")
        return self.special.mask

    def sampling_config(self, config: SamplingConfig | None = None, **options) -> SamplingConfig:
        """`config` (default: this model's generation defaults over `SamplingConfig()`) with `options` applied and
        this model's token ids filled in."""
        config = config if config is not None else self.generation.sampling_config()
        if options:
            config = config.replace(**options)
        if self.special.mask is None and not self.config.causal:
            self.mask_token_id  # raises: a diffusion model needs its mask
        return config.with_tokens(self.special)

    @property
    def pad_token_id(self) -> int:
        """The id that left-pads a batch (masked out by the attention mask): the tokenizer's pad, else the mask."""
        return self.special.prompt_pad

    def encode_prompts(self, prompts: list[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (ids, attention_mask) for a batch of prompts (rendered with the chat template if `chat`)."""
        from illada.sampling import left_pad

        if chat:
            prompts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        encoded = [self.tokenizer.encode(p) for p in prompts]
        ids, mask = left_pad(encoded, self.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    def generate(self, prompts: str | list[str], *, config: SamplingConfig | None = None, chat: bool = False,
                 return_output: bool = False, callback=None, **options):
        """Continue each prompt; returns the generated text (a str for a str prompt, else a list).

        `config` is an `illada.sampling.SamplingConfig`; options are its fields, applied on top (max_new_tokens,
        steps, block_length, remasking, temperature, cfg_scale, variable_length, threshold, factor, cache,
        stop_strings, ...). A causal model (`--objective ar`) decodes greedily with a KV cache until EOS, within max_new_tokens and the context.
        Each row gets exactly max_new_tokens unless a stop ends it first, in both modes (the last block is shorter
        when it is not a multiple of block_length), capped by the context after its own prompt: a warning says so
        (and `output.notes`). With `return_output=True` returns (texts, GenerationOutput) instead. `callback` sees
        every denoising step (`illada.sampling.StepEvent`; not called for a causal model).
        """
        import warnings

        from illada.sampling import generate

        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        ids, mask = self.encode_prompts(batch, chat=chat)
        cfg = self.sampling_config(config, **options)
        with torch.inference_mode():
            if self.config.causal:  # an autoregressive twin: greedy left to right, the diffusion knobs do not apply
                from illada.sampling.autoregressive import greedy_generate_ar

                # each row's budget capped by the context after its own prompt, with a note (as the sampler does)
                output = greedy_generate_ar(self.model, ids, cfg.gen_length, eos_token_id=cfg.eos_token_id,
                                            attention_mask=mask)
            else:
                # the sampler checks prompt + budget against the context (illada.sampling.blocks.plan_blocks)
                output = generate(self.model, ids, config=cfg, attention_mask=mask, decode=self.tokenizer.decode,
                                  callback=callback)
        for note in output.notes:
            warnings.warn(note, stacklevel=2)
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in output.generated_tokens()]
        result = texts[0] if single else texts
        return (result, output) if return_output else result

    def infill(self, text: str | list[str], suffix: str | list[str] | None = None,
               length: int | list[int] | None = None, *, allow_shorter: bool = False, return_output: bool = False,
               **options):
        """Fill holes with the bidirectional model (`illada.sampling.infill`); the text around them never changes.

        Two forms: `lm.infill("The capital of France is <|mask:3|>, known for <|mask:8|>.")` fills every
        `<|mask:N|>` placeholder (N tokens; syntax and escapes in `illada.holes`) and returns the whole text with
        the holes filled; `lm.infill(prefix, suffix, length)` returns just the `length` tokens between them.
        Lists give a batch (list results). `allow_shorter`: EOS/padding the model puts at the end of a hole is
        dropped. Options are `illada.sampling.InfillConfig` fields (steps, remasking, temperature, cfg_scale,
        threshold, factor, top_k, top_p, forbid_eos, eos_confidence, seed). `return_output=True` returns
        (result, InfillOutput) instead; `output.fills` holds each hole's text.
        """
        from illada.holes import parse_holes

        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if suffix is None and length is None:
            rows = [parse_holes(t) for t in texts]
            whole = True
        elif suffix is None or length is None:
            raise IlladaError("infill: give a text with <|mask:N|> holes, or prefix, suffix and length together")
        else:
            suffixes = [suffix] if isinstance(suffix, str) else list(suffix)
            lengths = [length] * len(texts) if isinstance(length, int) else list(length)
            if not len(texts) == len(suffixes) == len(lengths):
                raise IlladaError("infill: prefix, suffix and length lists must have the same length")
            if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
                raise IlladaError(f"infill: lengths must be positive integers, got {lengths}")
            rows = [[p, n, q] for p, n, q in zip(texts, lengths, suffixes)]
            whole = False
        results, output = self.fill_pieces(rows, allow_shorter=allow_shorter, **options)
        if not whole:
            results = [fills[0] for fills in output.fills]
        result = results[0] if single else results
        return (result, output) if return_output else result

    def edit(self, text: str, spans: list[tuple[int, int]], *, lengths: list[int] | None = None,
             allow_shorter: bool = False, return_output: bool = False, **options):
        """`text` with the character `spans` [(start, end), ...] remasked and regenerated from both sides: each
        span becomes a hole of as many tokens as its text has (or `lengths[i]`); the rest is kept exactly.
        Options as for `infill`."""
        from illada.holes import edit_pieces

        pieces = edit_pieces(text, spans, lambda piece: len(self.tokenizer.encode(piece)), lengths)
        results, output = self.fill_pieces([pieces], allow_shorter=allow_shorter, **options)
        return (results[0], output) if return_output else results[0]

    def infill_config(self, config: "InfillConfig | None" = None, **options) -> "InfillConfig":
        """`config` (default: `InfillConfig()`) with `options` applied and this model's mask, EOS, EOT and padding
        ids filled in (for `illada.sampling.infill`)."""
        from illada.sampling import InfillConfig

        config = config if config is not None else InfillConfig()
        config = config.replace(**options) if options else config
        ids = {"mask_id": self.mask_token_id, "eos_token_id": self.special.eos, "eot_token_id": self.special.eot,
               "pad_token_id": self.special.pad}
        return config.replace(**{k: v for k, v in ids.items() if getattr(config, k) is None})

    def encode_pieces(self, rows: list[list]) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]:
        """Left-padded (canvas, attention_mask, hole spans) for rows of pieces (str: text, int: a hole of that
        many tokens), checked against the context."""
        from illada.sampling import left_pad

        if self.config.causal:
            raise IlladaError(f"model {self.name} is causal (autoregressive): it cannot fill a gap before a suffix")
        if not rows:
            raise IlladaError("infill: no text given")
        mask_id, canvases, holes = self.mask_token_id, [], []
        for pieces in rows:
            ids, spans = [], []
            for piece in pieces:
                if isinstance(piece, int):
                    spans.append((len(ids), len(ids) + piece))
                    ids += [mask_id] * piece
                elif piece:
                    ids += self.tokenizer.encode(piece)
            if len(ids) > self.config.max_seq_len:
                raise IlladaError(f"infill: the text with its holes is {len(ids)} tokens, longer than the model "
                                  f"context ({self.config.max_seq_len} tokens)")
            canvases.append(ids)
            holes.append(spans)
        ids, mask = left_pad(canvases, self.pad_token_id)
        width = ids.shape[1]
        holes = [[(s + width - len(c), e + width - len(c)) for s, e in spans] for c, spans in zip(canvases, holes)]
        return ids.to(self.device), mask.to(self.device), holes

    def fill_pieces(self, rows: list[list], callback=None, config: "InfillConfig | None" = None, **options):
        """(texts, InfillOutput) for rows of pieces: each text is its literal pieces exactly as given with every
        hole's decoded fill in place; `output.fills` holds the fills per row. `callback(event, mask)` sees each
        pass's `StepEvent` (the canvas is padded as `mask`, its (B, L) attention mask, says)."""
        from illada.sampling import infill_stream

        ids, mask, holes = self.encode_pieces(rows)
        with torch.inference_mode():
            for event in infill_stream(self.model, ids, spans=holes, attention_mask=mask,
                                       config=self.infill_config(config, **options)):
                if callback is not None:
                    callback(event, mask)
                output = event.output
        decode = self.tokenizer.decode
        output.fills = [[decode(t, skip_special_tokens=True) for t in row] for row in output.span_tokens]
        texts = []
        for pieces, fills in zip(rows, output.fills):
            it = iter(fills)
            texts.append("".join(next(it) if isinstance(p, int) else p for p in pieces))
        output.texts = texts
        return texts, output

    def chat(self, messages: list[dict], callback=None, **options) -> str:
        """The assistant's reply to a conversation (list of {"role", "content"}), via the checkpoint's template;
        `callback` sees every denoising step (as in `generate`)."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, callback=callback, **options).strip()

    def score(self, context: str, choices: list[str], *, method: str = "confidence", **options) -> list[float]:
        """One score per choice (higher is better): method "confidence" (iLLaDA §6.2), "mc" (Monte Carlo
        likelihood bound, mc_num=128) or "exact" (one-token likelihood). Options: mc_num, batch_size,
        cfg_scale, seed, add_bos."""
        from illada.scoring import score

        return score(self, context, choices, method=method, **options)

    def loglikelihood(self, context: str, continuation: str | list[str], **options) -> float | list[float]:
        """Monte Carlo lower bound on log p(continuation | context) in nats (exact for one-token continuations);
        a list of continuations gives a list. Options: mc_num (128), batch_size, cfg_scale, seed, add_bos."""
        from illada.scoring import loglikelihood

        return loglikelihood(self, context, continuation, **options)


def _random_stand_in(device: torch.device, dtype: torch.dtype | None) -> DiffusionLM:
    from illada.tokenizer import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    config = preset("tiny", name="random-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=512,
                    mask_token_id=tokenizer.mask_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = build_model(config, device=device, dtype=dtype, seed=0).eval()
    return DiffusionLM(model=model, tokenizer=tokenizer, config=config, name="random-tiny", is_random=True)


def load(path_or_name: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, mask_token_id: int | None = None,
         adapter: str | Path | None = None, quantize: str | None = None) -> DiffusionLM:
    """Load a checkpoint directory (iLLaDA or LLaDA layout), a training run directory (its latest checkpoint),
    a bundled model by name (default: the demo model) or a Hugging Face hub id (`owner/name`, see illada.sources).

    device: 'cpu', 'cuda', 'cuda:1' or None/'auto'. dtype: 'bf16'/'fp16'/'fp32', or None: the checkpoint's own
    dtype on GPU and float32 on CPU (CPU bf16 matmuls are slow and lose precision).

    adapter: a PEFT LoRA adapter directory (or a LoRA training run: its newest checkpoint), merged into the weights
    (the `lora` extra); without a model it applies to the base model its adapter_config.json records. A LoRA
    checkpoint given as the model is that base with this adapter.

    quantize: "int8" or "int4", torchao weight-only quantisation (the `quant` extra; `illada.quantize`), applied
    layer by layer while the checkpoint streams in, so the full-precision model is never resident (with an
    adapter it is, once: the adapter is merged first). int4 on CUDA needs bf16.
    """
    from illada.checkpoint import load_checkpoint

    if path_or_name is not None and adapter is None and _lora_checkpoint(path_or_name):
        path_or_name, adapter = None, path_or_name
    if adapter is not None:
        from illada.lora import adapter_dir, recorded_base

        adapter = adapter_dir(adapter)
        if path_or_name is None:
            path_or_name = recorded_base(adapter)
            if path_or_name is None:
                raise IlladaError(f"--adapter {adapter}: its adapter_config.json names no base model; pass --model")
    name = str(path_or_name) if path_or_name is not None else DEFAULT_MODEL
    device_, dtype_ = resolve_device(device), resolve_dtype(dtype)
    if dtype_ is None and device_.type == "cpu":
        dtype_ = torch.float32
    if quantize is not None:
        from illada.quantize import check_mode

        check_mode(quantize, device_, dtype_)  # before anything is read or downloaded
    bundled = bundled_models()
    if name in bundled and not Path(name).exists() and not (bundled[name] / "config.json").is_file():
        print(f"illada: note: the bundled model {name!r} is not in this install yet; using an untrained "
              "random-weight tiny model (its output is noise)", file=sys.stderr)
        return _random_stand_in(device_, dtype_)
    from illada.sources import resolve_model_dir

    path = resolve_model_dir(name)  # a directory, a run (its newest checkpoint), a bundled name or a hub id
    model, config = load_checkpoint(path, device=device_, dtype=dtype_, quantize=None if adapter else quantize)
    if adapter is not None:
        from illada.lora import apply_adapter

        model = apply_adapter(model, adapter)
        if quantize is not None:
            from illada.quantize import quantize_model

            quantize_model(model, quantize, next(model.parameters()).dtype)
        name = f"{name}+{adapter.parent.name if adapter.name.startswith('step-') else adapter.name}"
    tokenizer = Tokenizer.from_dir(path, mask_token_id=mask_token_id)
    if mask_token_id is not None:
        config = config.replace(mask_token_id=mask_token_id)
    return DiffusionLM(model=model.eval(), tokenizer=tokenizer, config=config, name=name,
                       generation=read_generation_config(path))


def _lora_checkpoint(name: str | Path) -> bool:
    """Whether a local model path is a LoRA adapter (or a LoRA run) rather than a full model."""
    from illada.lora import is_adapter

    path = Path(name).expanduser()
    if not path.is_dir() or (path / "config.json").exists():
        return False
    if (path / "checkpoints").is_dir():
        from illada.training.checkpointing import latest_checkpoint

        path = latest_checkpoint(path) or path
    return is_adapter(path)
