"""Model configuration: one dataclass for the architecture, and the named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from illada.errors import IlladaError


@dataclass
class ModelConfig:
    """Shape of a bidirectional (or causal) pre-norm Transformer of the LLaDA/iLLaDA family.

    The special-token ids are metadata carried with the checkpoint (config.json); the network itself
    does not use them.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 176
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    max_seq_len: int = 256
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    causal: bool = False
    initializer_range: float = 0.02
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise IlladaError(f"model config: {key} must be a positive integer, got {value!r}")
        if self.hidden_size % self.n_heads:
            raise IlladaError(f"model config: hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise IlladaError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise IlladaError(f"model config: n_kv_heads {self.n_kv_heads} must divide n_heads {self.n_heads}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise IlladaError("model config: rope_theta and rms_norm_eps must be positive")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise IlladaError(f"model config: mask_token_id {self.mask_token_id} outside the vocabulary ({self.vocab_size})")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise IlladaError(f"model config: unknown fields {', '.join(unknown)}")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # Shapes from the reference table (section 2). iLLaDA's rope_theta is read from its checkpoint; the
    # preset value only matters for freshly initialised models.
    "illada-8b": ModelConfig(
        name="illada-8b", vocab_size=155_136, hidden_size=4096, intermediate_size=14_336, n_layers=32, n_heads=32,
        n_kv_heads=8, max_seq_len=8192, rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        mask_token_id=5,
    ),
    "llada-8b": ModelConfig(
        name="llada-8b", vocab_size=126_464, hidden_size=4096, intermediate_size=12_288, n_layers=32, n_heads=32,
        n_kv_heads=32, max_seq_len=4096, rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        mask_token_id=126_336, bos_token_id=126_080, eos_token_id=126_081, pad_token_id=126_081,
    ),
    # Tests: a few thousand parameters, runs in milliseconds.
    "tiny": ModelConfig(
        name="tiny", vocab_size=128, hidden_size=32, intermediate_size=88, n_layers=2, n_heads=4, n_kv_heads=2,
        max_seq_len=128, mask_token_id=3,
    ),
    # The CPU demo model: ~14M parameters with an 8k vocabulary.
    "small": ModelConfig(
        name="small", vocab_size=8192, hidden_size=384, intermediate_size=1024, n_layers=6, n_heads=6,
        n_kv_heads=2, max_seq_len=512, rope_theta=10_000.0,
    ),
}


def preset(name: str, /, **overrides) -> ModelConfig:
    """A copy of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise IlladaError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
