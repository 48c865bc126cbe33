"""Sampling from masked diffusion LMs (reference §5): fixed canvas and variable-length generation, remasking
rules, parallel decoding, approximate KV caches, end-think boost and streaming.

Names are loaded on first use, so `illada.sampling.config` (the source of the CLI's sampling flags) is read
without importing torch: `illada generate --help` stays fast.
"""
import importlib
import sys
import types

_HOMES = {"SamplingConfig": "config", "GenerationOutput": "generate", "StepEvent": "generate",
          "generate": "generate", "left_pad": "generate", "stream": "generate", "InfillConfig": "infill",
          "InfillOutput": "infill", "fill_masks": "infill", "infill": "infill", "infill_stream": "infill"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'illada.sampling' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"illada.sampling.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # importing the submodule `generate` (or `infill`) must not replace the function of the same name
        if isinstance(value, types.ModuleType) and _HOMES.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
