"""The high-level handle: `illada.load(...)` returns a `DiffusionLM` bundling model, tokenizer and config."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from illada.config import ModelConfig, preset
from illada.errors import IlladaError
from illada.model import Transformer, build_model
from illada.runtime import resolve_device, resolve_dtype
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
    """A loaded model with its tokenizer. `is_random` marks the untrained stand-in for a missing bundled model."""

    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    name: str
    is_random: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def mask_token_id(self) -> int:
        mask_id = self.tokenizer.mask_token_id if self.tokenizer.mask_token_id is not None else self.config.mask_token_id
        if mask_id is None:
            raise IlladaError(f"model {self.name}: no mask token id in config.json or the tokenizer; pass mask_token_id=")
        return mask_id


def _random_stand_in(device: torch.device, dtype: torch.dtype | None) -> DiffusionLM:
    from illada.tokenizer import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    config = preset("tiny", name="random-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=512,
                    mask_token_id=tokenizer.mask_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = build_model(config, device=device, dtype=dtype, seed=0).eval()
    return DiffusionLM(model=model, tokenizer=tokenizer, config=config, name="random-tiny", is_random=True)


def load(path_or_name: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, mask_token_id: int | None = None) -> DiffusionLM:
    """Load a checkpoint directory (iLLaDA or LLaDA layout) or a bundled model by name (default: the demo model).

    device: 'cpu', 'cuda', 'cuda:1' or None/'auto'. dtype: 'bf16'/'fp16'/'fp32' or None (the checkpoint's own).
    """
    from illada.checkpoint import load_checkpoint

    name = str(path_or_name) if path_or_name is not None else DEFAULT_MODEL
    device_, dtype_ = resolve_device(device), resolve_dtype(dtype)
    bundled = bundled_models()
    if name in bundled and not Path(name).exists():
        path = bundled[name]
        if not (path / "config.json").is_file():
            print(f"illada: note: the bundled model {name!r} is not in this install yet; using an untrained "
                  "random-weight tiny model (its output is noise)", file=sys.stderr)
            return _random_stand_in(device_, dtype_)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise IlladaError(f"no model at {name!r}: not a directory and not a bundled model "
                              f"({', '.join(sorted(bundled))})")
    model, config = load_checkpoint(path, device=device_, dtype=dtype_)
    tokenizer = Tokenizer.from_dir(path, mask_token_id=mask_token_id)
    if mask_token_id is not None:
        config = config.replace(mask_token_id=mask_token_id)
    return DiffusionLM(model=model.eval(), tokenizer=tokenizer, config=config, name=name)
