"""Model configuration: one dataclass for the architecture, and the named presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from illada.errors import IlladaError


# Shapes beyond these are refused before anything is built (even on the meta device, where 10^8 layers of Python
# modules alone exhaust memory). The largest published models have ~128 layers and ~2e12 parameters.
MAX_LAYERS = 4096
MAX_PARAMETERS = 10**13


def format_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} bytes"


def is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def type_mismatch(value: object, annotation: str) -> str | None:
    """What `value` should be for a dataclass field annotated `annotation` ("int", "float | None", "bool", "str"),
    or None when it is that: ints exclude bools, floats must be finite (a NaN passes every `<= 0` check)."""
    if value is None and "None" in annotation:
        return None
    if annotation.startswith("int"):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation.startswith("float"):
        return None if is_finite_number(value) else "a finite number"
    if annotation.startswith("bool"):
        return None if isinstance(value, bool) else "true or false"
    return None if isinstance(value, str) else "a string"


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
    # Dream's shift: the logits at position i predict token i + 1 (as an AR model's do), so AR weights adapted to
    # masked diffusion keep their output alignment; the network still scores every masked position
    shift_logits: bool = False
    # causal attention except inside the block being denoised, whose tokens attend to each other both ways (the
    # block-causal adaptation of Fast-dLLM v2 / SDAR): committed tokens keep the AR model's representations, so
    # every cache is exact. The sampler passes the block (`block_causal_pattern`); nothing else can run it
    block_causal: bool = False
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

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count from the shapes alone (what `Transformer(config).num_parameters()` gives, without
        building anything): a tied head counts once; non_embedding drops the embedding and the head."""
        h, q, kv = self.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h
        body = self.n_layers * per_layer + h
        if non_embedding:
            return body
        embedding = self.vocab_size * h
        return body + embedding * (1 if self.tie_word_embeddings else 2)

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            want = type_mismatch(getattr(self, f.name), str(f.type))
            if want:
                raise IlladaError(f"model config: {f.name} must be {want}, got {getattr(self, f.name)!r}")

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise IlladaError(f"model config: {key} must be a positive integer, got {value!r}")
        self._check_types()
        if self.hidden_size % self.n_heads:
            raise IlladaError(f"model config: hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise IlladaError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise IlladaError(f"model config: n_kv_heads {self.n_kv_heads} must divide n_heads {self.n_heads}")
        if self.shift_logits and self.causal:
            raise IlladaError("model config: shift_logits is for bidirectional (diffusion) models, not causal ones")
        if self.block_causal and self.causal:
            raise IlladaError("model config: block_causal already makes attention causal outside the block; "
                              "causal must be false")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise IlladaError("model config: rope_theta and rms_norm_eps must be positive")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise IlladaError(f"model config: mask_token_id {self.mask_token_id} outside the vocabulary ({self.vocab_size})")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise IlladaError(f"model config: {key} must be non-negative, got {getattr(self, key)}")
        params = self.num_parameters()
        if self.n_layers > MAX_LAYERS or params > MAX_PARAMETERS:
            raise IlladaError(f"model config: {self.n_layers:,} layers and {params:,} parameters (about "
                              f"{format_bytes(2 * params)} of bf16 weights) is beyond what illada builds (at most "
                              f"{MAX_LAYERS:,} layers and {MAX_PARAMETERS:.0e} parameters)")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **self.check_overrides(changes))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise IlladaError(f"model config: unknown fields {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def check_overrides(cls, overrides: object, what: str = "model overrides") -> dict:
        """`overrides` as a dict of known field names (types and ranges are checked when the config is built)."""
        if not isinstance(overrides, dict):
            raise IlladaError(f"{what}: expected a JSON object of model config fields, got {overrides!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise IlladaError(f"{what}: unknown fields {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}")
        return overrides


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
