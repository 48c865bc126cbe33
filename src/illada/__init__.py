"""illada: train, sample, score, evaluate and serve masked diffusion language models (iLLaDA / LLaDA)."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "DiffusionLM", "ModelConfig", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import illada` (and `illada --help`) does not pay for torch until needed.
    if name in ("load", "DiffusionLM"):
        from illada import api

        return getattr(api, name)
    if name == "ModelConfig":
        from illada.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'illada' has no attribute {name!r}")
