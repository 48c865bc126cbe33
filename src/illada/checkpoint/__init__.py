"""Checkpoint directories: load the iLLaDA and LLaDA layouts, save and convert to the iLLaDA layout."""
from illada.checkpoint.adapter import (
    ADAPTERS,
    StateDictAdapter,
    config_from_hf,
    config_to_hf,
    detect_layout,
)
from illada.checkpoint.io import (
    ConversionReport,
    convert_checkpoint,
    inspect_checkpoint,
    load_checkpoint,
    load_config,
    save_checkpoint,
)

__all__ = [
    "ADAPTERS", "StateDictAdapter", "config_from_hf", "config_to_hf", "detect_layout", "ConversionReport",
    "convert_checkpoint", "inspect_checkpoint", "load_checkpoint", "load_config", "save_checkpoint",
]
