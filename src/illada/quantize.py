"""Weight-only quantisation through torchao (`--quantize int8|int4`, `illada.load(..., quantize=)`).

Applied while loading (`illada.checkpoint.load_checkpoint(quantize=)`): each Linear is quantised as soon as its
weight is read from the memory-mapped shard, so the full-precision model is never resident; only one tensor at a
time exists in the compute dtype.

int8: torchao's `Int8WeightOnlyConfig` (symmetric, one scale per output row) on every Linear; the token embedding
is quantised the same way (row-chunked, so even a 155k-row embedding never exists in float32) and looked up row by
row; a tied head shares the embedding's int8 tensor.
int4: torchao's int4 weight-only groupwise (asymmetric, groups of 128 input features, or 64/32 when the input size
asks for it): on CPU `PrototypeInt4WeightOnlyConfig` (the `_weight_int4pack_mm_for_cpu` kernel), on CUDA
`Int4WeightOnlyConfig` tile-packed (tinygemm, bfloat16 activations). The embedding is int8 (a table lookup has no
int4 kernel); a tied head gets its own int4 copy. A Linear whose input size is not a multiple of 32 stays in the
compute dtype.

Norm weights stay in the compute dtype. Activations are the compute dtype (float32 on CPU by default).
"""
from __future__ import annotations

import torch
from torch import nn

from illada.errors import IlladaError

MODES = ("int8", "int4")
EXTRA = "pip install 'illada[quant]'"
_CHUNK_ROWS = 8192  # rows of the embedding quantised at once (bounds the float32 temporary)


def check_mode(mode: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """`mode` validated for `device` (and the compute dtype), before any weight is read; None passes."""
    if mode is None:
        return None
    if mode not in MODES:
        raise IlladaError(f"--quantize {mode}: choose one of {', '.join(MODES)}")
    require_torchao()
    if device.type not in ("cpu", "cuda"):
        raise IlladaError(f"--quantize {mode}: supported on cpu and cuda, not {device.type}")
    if mode == "int4" and device.type == "cuda" and dtype is not None and dtype != torch.bfloat16:
        raise IlladaError(f"--quantize int4 on cuda needs bfloat16 activations (--dtype bf16), not {dtype}")
    return mode


def require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise IlladaError(f"--quantize needs torchao: {EXTRA}") from None


def _quiet_import():
    """torchao's quantisation API (its import logs about optional CUDA libraries are silenced)."""
    import logging
    import warnings

    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as q
    finally:
        logger.setLevel(level)
    return q


def _group_size(in_features: int) -> int | None:
    return next((g for g in (128, 64, 32) if in_features % g == 0), None)


def quantize_linear(module: nn.Linear, mode: str) -> bool:
    """Quantise one Linear's weight in place (torchao `quantize_`); False if its shape does not allow it."""
    q = _quiet_import()
    weight = module.weight
    if mode == "int8":
        config = q.Int8WeightOnlyConfig(set_inductor_config=False)
    else:
        group = _group_size(weight.shape[1])
        if group is None:
            return False
        if weight.device.type == "cpu":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            config = PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
        else:  # written for CUDA (tinygemm); not testable on the CPU machines of this project
            config = q.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d",
                                            set_inductor_config=False)
    q.quantize_(module, config, filter_fn=lambda m, _name: m is module)
    return is_quantized(module.weight)


def int8_rows(weight: torch.Tensor, dtype: torch.dtype):
    """A torchao Int8Tensor (one scale per row) of `weight`, quantised a chunk of rows at a time in `dtype`."""
    q = _quiet_import()
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows import Int8Tensor

    qdata, scales = [], []
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        part = Int8Tensor.from_hp(weight[start:start + _CHUNK_ROWS].to(dtype), PerRow())
        qdata.append(part.qdata)
        scales.append(part.scale)
    del q  # imported for its quiet logging
    return Int8Tensor(torch.cat(qdata), torch.cat(scales), part.block_size, dtype)


class QuantizedEmbedding(nn.Embedding):
    """An embedding whose weight is an int8 torchao tensor: each looked-up row is dequantised on its own (torchao's
    own `embedding` would dequantise the whole table)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return w.qdata[ids].to(w.dtype) * w.scale.reshape(-1)[ids].unsqueeze(-1).to(w.dtype)


def quantize_embedding(model: nn.Module, weight: torch.Tensor, mode: str, dtype: torch.dtype) -> None:
    """Give `model` its token embedding `weight` (float, e.g. a memory map) quantised, and a tied head."""
    embed = model.embed_tokens
    qweight = int8_rows(weight, dtype)
    embed.weight = nn.Parameter(qweight, requires_grad=False)
    embed.__class__ = QuantizedEmbedding
    if model.config.tie_word_embeddings:
        if mode == "int8":
            model.lm_head.weight = embed.weight
        else:
            model.lm_head.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
            if not quantize_linear(model.lm_head, mode):  # hidden size not a multiple of 32: share the int8 table
                model.lm_head.weight = embed.weight


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether a parameter is a torchao quantised tensor."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(tensor) and type(tensor).__module__.startswith("torchao")


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantised) tensor holds."""
    if is_quantized(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(storage_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)
    return tensor.numel() * tensor.element_size()


def touch(tensor: torch.Tensor) -> None:
    """Read every byte of a (possibly quantised) tensor once (memory-mapped pages become resident)."""
    if is_quantized(tensor):
        names, _ = tensor.__tensor_flatten__()
        for n in names:
            if getattr(tensor, n) is not None:
                touch(getattr(tensor, n))
    elif tensor.numel():
        tensor.max()  # no promotion: an int8 sum would allocate an int64 copy


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's distinct parameters and buffers."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(storage_bytes(t) for t in seen.values())


def quantize_model(model: nn.Module, mode: str, dtype: torch.dtype) -> nn.Module:
    """Quantise an already loaded model in place (for a merged LoRA adapter: the weights change after loading, so
    the full-precision model is resident once)."""
    check_mode(mode, next(model.parameters()).device, dtype)
    weight = model.embed_tokens.weight.detach()
    for module in list(model.modules()):
        if isinstance(module, nn.Linear) and not (model.config.tie_word_embeddings and module is model.lm_head):
            quantize_linear(module, mode)
    quantize_embedding(model, weight, mode, dtype)
    return model
