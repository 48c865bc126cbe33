"""The special token ids of a loaded model, resolved once (tokenizer first, then config.json) and passed on."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialTokens:
    mask: int | None  # None only for a model that cannot denoise (an AR checkpoint without one)
    eos: int | None
    eot: int | None  # end of turn (chat templates), also a stop
    bos: int | None
    pad: int | None  # the tokenizer's own padding token, if any
    end_think: tuple[int, ...]  # the tokens of "</think>" (iLLaDA's end-think boost)

    @property
    def prompt_pad(self) -> int:
        """The id that left-pads a batch of prompts (hidden by the attention mask): pad, else the mask."""
        for token in (self.pad, self.mask, self.eos):
            if token is not None:
                return token
        return 0

    @property
    def stops(self) -> tuple[int, ...]:
        """EOS and EOT, those that exist."""
        return tuple(t for t in (self.eos, self.eot) if t is not None)

    @classmethod
    def resolve(cls, tokenizer, config) -> "SpecialTokens":
        def pick(attr: str) -> int | None:
            value = getattr(tokenizer, attr, None)
            return value if value is not None else getattr(config, attr, None)

        return cls(mask=pick("mask_token_id"), eos=pick("eos_token_id"), eot=getattr(tokenizer, "eot_token_id", None),
                   bos=pick("bos_token_id"), pad=getattr(tokenizer, "pad_token_id", None),
                   end_think=tuple(tokenizer.encode("</think>")))
