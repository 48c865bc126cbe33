"""Device and dtype names as users type them."""
from __future__ import annotations

import torch

from illada.errors import IlladaError

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name like 'bf16'; None stays None (keep the checkpoint's dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise IlladaError(f"unknown dtype {dtype!r}; choose from bf16, fp16, fp32")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto'/None picks CUDA when available, else CPU; an unavailable device is a user error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise IlladaError(f"unknown device {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IlladaError("device 'cuda' requested but CUDA is not available in this torch build")
    return device
