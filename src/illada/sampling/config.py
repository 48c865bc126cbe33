"""`SamplingConfig`: every sampler knob, once. Its fields carry their help text, choices and the names they go by
on the command line and on the server's wire, so the flags of `generate`/`chat`/`infill`/`eval`/`serve` and the
server's accepted body fields are generated from here (illada.commands.sampling_flags, illada.serving.protocol).

Special token ids (mask, EOS, EOT, padding) are fields too, left None by users: `DiffusionLM.sampling_config`
fills them from the ids resolved once when the model was loaded (illada.special_tokens); the low-level sampler
falls back to the model config's ids (`token_ids`), for a bare `Transformer`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass, field
from typing import Any, Sequence

from illada.errors import IlladaError

REMASKING = ("low_confidence", "random", "margin", "entropy")
CACHES = ("none", "prefix", "dual", "committed")
EOS_CONFIDENCE = ("normal", "neg_inf")
DEFAULT_BLOCK_LENGTH = 32


def knob(default: Any, help: str, *, shown: str | None = None, flag: str | None = "", wire: str | None = "",
         choices: tuple = (), low: float | None = None, high: float | None = None, factory=None) -> Any:
    """A `SamplingConfig` field a user sets. `shown`: how --help states the default (else its value); `flag`: the
    CLI flag ("" = from the name, None = not on the CLI); `wire`: the server body field ("" = the name, None = not
    accepted there, or handled by the OpenAI fields); `choices`, `low`/`high`: the accepted values (checked by
    `validate`; also the wire's type checks)."""
    meta = {"help": help, "shown": shown, "flag": flag, "wire": wire, "choices": tuple(choices), "low": low,
            "high": high}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def internal(default: Any = None) -> Any:
    """A field set by the code (token ids resolved from the model), neither a flag nor a wire field."""
    return field(default=default, metadata={"flag": None, "wire": None})


@dataclass
class SamplingConfig:
    """Every sampler knob. Defaults are iLLaDA's: variable length in 32-token blocks, one token per pass, greedy.

    steps: total denoising steps for a fixed canvas (shared among the blocks), steps per block for variable
    length; None: one token per pass (max_new_tokens, resp. block_length). Ignored by the threshold/factor rules,
    which run until the block is full.
    """

    gen_length: int = knob(128, "generation budget: exactly this many tokens unless a stop comes first (capped by "
                                "the model context, with a note)", flag="--max-new-tokens", wire=None, low=1)
    steps: int | None = knob(None, "denoising steps (fixed canvas: in total; variable length: per block)",
                             shown="one token per pass: max-new-tokens, resp. block-length", low=1)
    block_length: int | None = knob(None, "tokens per block, at most max-new-tokens",
                                    shown=str(DEFAULT_BLOCK_LENGTH), low=1)
    variable_length: bool = knob(True, "iLLaDA: append blocks until EOS or a stop string; --fixed-length: LLaDA's "
                                       "one canvas of max-new-tokens masks", shown="variable length")
    remasking: str = knob("low_confidence", "which masked tokens to commit each step", choices=REMASKING)
    temperature: float = knob(0.0, "0 is greedy", wire=None, low=0.0)
    top_k: int | None = knob(None, "sample among the k likeliest tokens", shown="all", low=1)
    top_p: float | None = knob(None, "nucleus sampling mass", shown="1, off", wire=None, low=0.0,
                                high=1.0)
    cfg_scale: float = knob(0.0, "unsupervised classifier-free guidance weight", low=0.0)
    threshold: float | None = knob(None, "parallel decoding: commit every token above this confidence (at least "
                                         "one per step)", low=0.0, high=1.0)
    factor: float | None = knob(None, "parallel decoding: commit the n most confident while (n + 1)(1 - c_n) < "
                                      "factor", low=0.0)
    cache: str = knob("none", "approximate KV cache: prefix/dual (Fast-dLLM, refreshed at every block), committed "
                              "(finished blocks' keys/values kept, never refreshed)", choices=CACHES)
    cache_refresh: int | None = knob(None, "also refresh the cache every k steps inside a block", low=1)
    forbid_eos: bool = knob(False, "never generate EOS")
    eos_confidence: str = knob("normal", "neg_inf: commit EOS/EOT candidates last", choices=EOS_CONFIDENCE)
    stop_strings: Sequence[str] = knob((), "stop string (repeatable)", flag="--stop", wire=None, factory=tuple)
    end_think_boost: float = knob(0.0, "boost for </think> (e.g. 100), iLLaDA §5.3")
    end_think_power: float = knob(3.0, "how the end-think boost grows along a block")
    seed: int | None = knob(None, "seed of the random draws", shown="a fresh one when sampling is random, printed "
                            "as 'illada: seed N' so the run can be repeated with --seed N", wire=None)
    early_stop: bool = internal(True)  # fixed canvas: stop once every row has a stop in its finished blocks
    stop_token_ids: Sequence[int] = field(default=(), metadata={"flag": None, "wire": None})
    end_think_ids: Sequence[int] | None = internal()  # None: the tokens of "</think>" (DiffusionLM resolves them)
    mask_id: int | None = internal()  # None: the model config's mask_token_id
    eos_token_id: int | None = internal()  # None: the model config's eos_token_id
    eot_token_id: int | None = internal()
    pad_token_id: int | None = internal()  # fills the canvas after the stop; None: eos, else mask id
    max_new_tokens: InitVar[int | None] = None

    def __post_init__(self, max_new_tokens: int | None) -> None:
        if max_new_tokens is not None:
            self.gen_length = max_new_tokens
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_token_ids = tuple(int(t) for t in (self.stop_token_ids or ()))
        self.stop_strings = tuple(self.stop_strings or ())
        if self.end_think_ids is not None:
            self.end_think_ids = tuple(int(t) for t in self.end_think_ids)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise IlladaError(message)

        # block_length before steps: a variable-length run's steps default to the block length, so a bad block
        # length would otherwise be reported as bad steps
        for name in ("gen_length", "block_length", "steps"):
            value = getattr(self, name)
            need(value is None and name != "gen_length"
                 or isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        for name in ("temperature", "cfg_scale", "threshold", "factor", "top_p", "end_think_boost", "end_think_power"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                   and math.isfinite(value)), f"{name} must be a finite number, got {value!r}")
        need(self.remasking in REMASKING, f"unknown remasking {self.remasking!r}; choose from {', '.join(REMASKING)}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.cfg_scale >= 0, f"cfg_scale must be >= 0, got {self.cfg_scale}")
        need(self.cache in CACHES, f"unknown cache {self.cache!r}; choose from {', '.join(CACHES)}")
        need(self.cache_refresh is None or self.cache_refresh >= 1, "cache_refresh must be >= 1")
        need(self.cache_refresh is None or self.cache != "committed",
             "cache_refresh applies to the prefix and dual caches; the committed cache never refreshes")
        need(self.threshold is None or self.factor is None, "use either threshold or factor, not both")
        need(self.threshold is None or 0 <= self.threshold <= 1, f"threshold must be in [0, 1], got {self.threshold}")
        need(self.factor is None or self.factor > 0, f"factor must be > 0, got {self.factor}")
        need(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        need(self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.eos_confidence in EOS_CONFIDENCE,
             f"eos_confidence must be one of {', '.join(EOS_CONFIDENCE)}, got {self.eos_confidence!r}")

    @property
    def resolved_block_length(self) -> int:
        """The block length in effect: `block_length`, by default 32 (at most the budget)."""
        return self.block_length if self.block_length is not None else min(DEFAULT_BLOCK_LENGTH, self.gen_length)

    @property
    def resolved_steps(self) -> int:
        """The steps in effect: `steps`, by default one token per pass (per block, or over the whole canvas)."""
        if self.steps is not None:
            return self.steps
        return self.resolved_block_length if self.variable_length else self.gen_length

    @property
    def is_random(self) -> bool:
        """Whether decoding draws random numbers: temperature sampling or random remasking."""
        return self.temperature > 0 or self.remasking == "random"

    @property
    def scheduled(self) -> bool:
        """Whether `steps` decides the commits (not the threshold/factor rules)."""
        return self.threshold is None and self.factor is None

    @classmethod
    def option_names(cls) -> set[str]:
        """Accepted option names (the fields plus the max_new_tokens alias)."""
        return {f.name for f in dataclasses.fields(cls)} | {"max_new_tokens"}

    @classmethod
    def user_fields(cls, where: str) -> list[dataclasses.Field]:
        """The fields a user sets on the CLI (`where="flag"`) or on the server's wire (`where="wire"`)."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get(where) is not None]

    def replace(self, **changes) -> "SamplingConfig":
        """A copy with `changes` (field names, or max_new_tokens). Setting one parallel rule (threshold, factor)
        clears the other unless both are given: a request's factor replaces a server default's threshold."""
        unknown = sorted(set(changes) - self.option_names())
        if unknown:
            raise IlladaError(f"unknown sampling option(s): {', '.join(unknown)}")
        for rule, other in (("threshold", "factor"), ("factor", "threshold")):
            if changes.get(rule) is not None and other not in changes:
                changes[other] = None
        if "max_new_tokens" in changes:
            changes["gen_length"] = changes.pop("max_new_tokens")
        return dataclasses.replace(self, **changes)

    def with_tokens(self, special) -> "SamplingConfig":
        """This config with the token ids it leaves unset taken from `special` (illada.special_tokens)."""
        changes = {name: value for name, value in (("mask_id", special.mask), ("eos_token_id", special.eos),
                                                   ("eot_token_id", special.eot)) if getattr(self, name) is None}
        if self.end_think_boost and self.end_think_ids is None:
            changes["end_think_ids"] = special.end_think
        return dataclasses.replace(self, **changes) if changes else self


def token_ids(cfg, model) -> tuple[int, list[int], int | None]:
    """(mask id, [EOS, EOT] ids present, EOS) of a sampler config, falling back to the model config's ids."""
    config = getattr(model, "config", None)
    mask_id = cfg.mask_id if cfg.mask_id is not None else getattr(config, "mask_token_id", None)
    if mask_id is None:
        raise IlladaError("mask_id is not set and the model config has no mask_token_id")
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else getattr(config, "eos_token_id", None)
    return mask_id, [t for t in (eos, cfg.eot_token_id) if t is not None], eos
