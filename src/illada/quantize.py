"""Weight-only quantisation through torchao (`--quantize int8|int4`, `illada.load(..., quantize=)`).

Applied while loading (`illada.checkpoint.load_checkpoint(quantize=)`): the model is built on the `meta` device and
each weight is read from the checkpoint a block of rows at a time (plain file reads, no memory map), each block cast
to the compute dtype and quantised with torchao's `quantize_` on its own, the quantised blocks written into the
weight's preallocated storage. Neither the full-precision model nor one full-precision weight is ever resident: the
float temporaries are those of one block (`BLOCK_ELEMENTS`). torchao's formats quantise rows independently (int8:
one scale per row; int4 on CPU: groups along a row, packed in blocks of up to 64 rows), so the assembled weight is
the one `quantize_` makes of the whole tensor; this is checked once per format on a small tensor, and a format that
fails the check (or CUDA's tile-packed int4) is quantised whole instead.

int8: torchao's `Int8WeightOnlyConfig` (symmetric, one scale per output row) on every Linear; the token embedding
is quantised the same way and looked up row by row; a tied head shares the embedding's int8 tensor.
int4: torchao's int4 weight-only groupwise (asymmetric, groups of 128 input features, or 64/32 when the input size
asks for it): on CPU `PrototypeInt4WeightOnlyConfig` (the `_weight_int4pack_mm_for_cpu` kernel), on CUDA
`Int4WeightOnlyConfig` tile-packed (tinygemm, bfloat16 activations). The embedding is int8 (a table lookup has no
int4 kernel); a tied head gets its own int4 copy, quantised from the same reads. A Linear whose input size is not a
multiple of 32 (or, on CPU, whose output size is not a multiple of 16) stays in the compute dtype.

Norm weights stay in the compute dtype, and so do activations (float32 on CPU by default), except around an int4
Linear on CPU: it is quantised from bfloat16 and takes bfloat16 inputs, its output cast back (torch's CPU int4
kernel is ~100x slower with float32 activations).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from illada.errors import IlladaError

MODES = ("int8", "int4")
EXTRA = "pip install 'illada[quant]'"
BLOCK_ELEMENTS = 1 << 20  # weights quantised at once (bounds the float temporaries: a few times 4 MiB in float32)
_ROW_ALIGN = 64  # blocks start at multiples of 64 rows: torchao's CPU int4 packing works in blocks of up to 64 rows

Rows = Callable[[int, int], torch.Tensor]  # (start, stop) -> those rows of a weight, in any float dtype and device


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


def _config(mode: str, shape: tuple[int, int], device: torch.device):
    """torchao's config for one weight (`mode` "int8", "int4" or "embedding"); None if its shape does not allow it."""
    q = _quiet_import()
    if mode in ("int8", "embedding"):
        return q.Int8WeightOnlyConfig(set_inductor_config=False)
    group = _group_size(shape[1])
    if group is None:
        return None
    if device.type == "cpu":
        if shape[0] % 16:  # the CPU int4 packing takes rows in multiples of 16
            return None
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
    # written for CUDA (tinygemm); not testable on the CPU machines of this project
    return q.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)


def _quantize(weight: torch.Tensor, config) -> torch.Tensor:
    """torchao's `quantize_` of one float weight (rows x in_features), through a Linear that holds only it."""
    q = _quiet_import()
    with torch.device("meta"):
        holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    holder.weight = nn.Parameter(weight, requires_grad=False)
    q.quantize_(holder, config)
    # quantize_ gives the module an `extra_repr` bound to itself: that cycle would keep every block's holder (and
    # its quantised block) alive until the cyclic garbage collector runs
    holder.__dict__.pop("extra_repr", None)
    return holder.weight.detach()


def _row_fields(tensor: torch.Tensor) -> dict[str, int] | None:
    """The data fields of a torchao tensor whose rows are the weight's output rows, each with its row dimension;
    None for a format not assembled from blocks of rows."""
    from torchao.quantization import Int8Tensor

    if type(tensor) is Int8Tensor:
        return {"qdata": 0, "scale": 0, "zero_point": 0}
    if tensor.device.type == "cpu":
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor

        if type(tensor) is Int4OpaqueTensor and tensor.act_mapping_type is None:
            return {"qdata": 0, "scale_and_zero": 1}  # (N, K/2) packed, (K/group, N, 2)
    return None


def _rebuild(first: torch.Tensor, fields: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """A torchao tensor like `first` (a block's) holding the assembled `fields` of the whole weight."""
    from torchao.quantization import Int8Tensor

    if type(first) is Int8Tensor:
        return Int8Tensor(fields["qdata"], fields["scale"], first.block_size, first.dtype,
                          zero_point=fields.get("zero_point"))
    return type(first)(fields["qdata"], fields["scale_and_zero"], first.block_size, torch.Size(shape))


class _Assembler:
    """One quantised weight built from blocks of its rows (or, for a format that cannot be, quantised whole)."""

    def __init__(self, config, shape: torch.Size, by_blocks: bool):
        self.config, self.shape, self.by_blocks = config, torch.Size(shape), by_blocks
        self.fields: dict[str, torch.Tensor] | None = None
        self.dims: dict[str, int] = {}
        self.first: torch.Tensor | None = None
        self.whole: torch.Tensor | None = None

    def add(self, start: int, block: torch.Tensor) -> None:
        rows = block.shape[0]
        if not self.by_blocks:
            if self.whole is None:
                self.whole = torch.empty(self.shape, dtype=block.dtype, device=block.device)
            self.whole[start:start + rows] = block
            return
        part = _quantize(block, self.config)
        if self.fields is None:  # the whole weight's storage, allocated once
            self.first, self.fields = part, {}
            for name, dim in _row_fields(part).items():
                value = getattr(part, name)
                if value is not None:
                    size = list(value.shape)
                    size[dim] = self.shape[0]
                    self.fields[name] = torch.empty(size, dtype=value.dtype, device=value.device)
                    self.dims[name] = dim
        for name, out in self.fields.items():
            out.narrow(self.dims[name], start, rows).copy_(getattr(part, name))

    def result(self) -> torch.Tensor:
        if not self.by_blocks:
            whole, self.whole = self.whole, None
            return _quantize(whole, self.config)
        return _rebuild(self.first, self.fields, self.shape)


_BLOCKWISE: dict[tuple, bool] = {}


def _blockwise(mode: str, config, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether quantising blocks of rows and assembling them gives exactly `quantize_` of the whole weight (checked
    once per format on a small random weight with a short last block)."""
    if mode == "int4" and device.type != "cpu":  # CUDA's tile-packed layout is not assembled from blocks
        return False
    key = (mode, getattr(config, "group_size", None), device.type, dtype)
    if key not in _BLOCKWISE:
        group = getattr(config, "group_size", None) or 32
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(3 * _ROW_ALIGN + 16, 2 * group, generator=generator).to(device=device, dtype=dtype)
        whole = _quantize(weight.clone(), config)
        ok = _row_fields(whole) is not None
        if ok:
            assembler = _Assembler(config, weight.shape, by_blocks=True)
            for start in range(0, weight.shape[0], _ROW_ALIGN):
                assembler.add(start, weight[start:start + _ROW_ALIGN])
            built = assembler.result()
            ok = all(torch.equal(getattr(built, n), getattr(whole, n)) for n in _row_fields(whole)
                     if getattr(whole, n) is not None)
        _BLOCKWISE[key] = ok
    return _BLOCKWISE[key]


def quantization_dtype(mode: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight is quantised from, which fixes the activations its kernel takes: bfloat16 for int4 on CPU
    (torch's `_weight_int4pack_mm_for_cpu` is two orders of magnitude slower with float32 activations), else
    the compute dtype."""
    return torch.bfloat16 if mode == "int4" and device.type == "cpu" else dtype


def _bf16_in(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(torch.bfloat16), *args[1:])


def _back_out(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(module.activation_dtype)


def match_activations(module: nn.Module, mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Where `module`'s weight was quantised from another dtype than the compute `dtype` (int4 on CPU), run it on
    bfloat16 inputs with its output cast back to `dtype`, so the model around it keeps its compute dtype."""
    if quantization_dtype(mode, device, dtype) == dtype:
        return
    module.activation_dtype = dtype
    module.register_forward_pre_hook(_bf16_in)
    module.register_forward_hook(_back_out)


def block_rows(in_features: int) -> int:
    """Rows of a weight read and quantised at once: about BLOCK_ELEMENTS weights, a multiple of 64 rows."""
    return max(_ROW_ALIGN, BLOCK_ELEMENTS // max(1, in_features) // _ROW_ALIGN * _ROW_ALIGN)


def quantize_rows(read: Rows, shape: tuple[int, int], modes: list[str], dtype: torch.dtype,
                  device: torch.device) -> list[torch.Tensor | None]:
    """One quantised tensor per mode of the weight of `shape` whose rows `read` returns, a block of rows at a time
    (each block is read once, cast to `dtype` on `device`, and quantised for every mode); None where the shape
    does not allow a mode. Mode "embedding" is int8 rows without a zero point (what `QuantizedEmbedding` reads)."""
    rows, in_features = shape
    configs = [_config(mode, shape, device) for mode in modes]
    dtypes = [quantization_dtype(mode, device, dtype) for mode in modes]
    assemblers = [None if config is None else
                  _Assembler(config, shape, _blockwise(mode, config, device, qdtype))
                  for mode, config, qdtype in zip(modes, configs, dtypes)]
    if any(assemblers):
        step = block_rows(in_features)
        for start in range(0, rows, step):
            block = read(start, min(rows, start + step)).to(device=device, dtype=dtype)
            for assembler, qdtype in zip(assemblers, dtypes):
                if assembler is not None:
                    assembler.add(start, block if qdtype == dtype else block.to(qdtype))
            del block
    out = [None if a is None else a.result() for a in assemblers]
    for i, mode in enumerate(modes):
        if mode == "embedding":  # symmetric, so no zero point: the embedding reads qdata and scale only
            from torchao.quantization import Int8Tensor

            w = out[i]
            out[i] = Int8Tensor(w.qdata, w.scale, w.block_size, w.dtype)
    return out


_LIBC = None


def release_freed_memory() -> None:
    """Hand memory freed inside the C heap back to the system (glibc's `malloc_trim`; elsewhere a no-op).

    Small weights (under glibc's mmap threshold, which rises to the size of the block temporaries) are allocated
    from the heap between those temporaries; the freed temporaries then stay resident as holes that `free` never
    returns. Called after each weight, this keeps the peak at the weights plus one block's temporaries."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC(0)


def load_linear(module: nn.Linear, read: Rows, mode: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Give `module` its weight (rows from `read`) quantised; kept in `dtype` (False) if its shape does not allow."""
    shape = tuple(module.weight.shape)
    (weight,) = quantize_rows(read, shape, [mode], dtype, device)
    if weight is None:
        module.weight = nn.Parameter(read(0, shape[0]).to(device=device, dtype=dtype),
                                     requires_grad=module.weight.requires_grad)
        return False
    module.weight = nn.Parameter(weight, requires_grad=False)
    match_activations(module, mode, device, dtype)
    return True


class QuantizedEmbedding(nn.Embedding):
    """An embedding whose weight is an int8 torchao tensor: each looked-up row is dequantised on its own (torchao's
    own `embedding` would dequantise the whole table)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return w.qdata[ids].to(w.dtype) * w.scale.reshape(-1)[ids].unsqueeze(-1).to(w.dtype)


def load_embedding(model: nn.Module, read: Rows, mode: str, dtype: torch.dtype, device: torch.device) -> None:
    """Give `model` its token embedding (rows from `read`) quantised, and a tied head (int4: its own copy, from the
    same reads)."""
    embed = model.embed_tokens
    shape = tuple(embed.weight.shape)
    tied = model.config.tie_word_embeddings
    modes = ["embedding", "int4"] if tied and mode == "int4" else ["embedding"]
    weight, *head = quantize_rows(read, shape, modes, dtype, device)
    embed.weight = nn.Parameter(weight, requires_grad=False)
    embed.__class__ = QuantizedEmbedding
    if tied:
        if head and head[0] is not None:
            model.lm_head.weight = nn.Parameter(head[0], requires_grad=False)
            match_activations(model.lm_head, mode, device, dtype)
        else:  # int8, or a hidden size not a multiple of 32: the head shares the int8 table
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


def _rows_of(tensor: torch.Tensor) -> Rows:
    tensor = tensor.detach()
    return lambda start, stop: tensor[start:stop]


def quantize_model(model: nn.Module, mode: str, dtype: torch.dtype) -> nn.Module:
    """Quantise an already loaded model in place, exactly as loading with `quantize=` does (for a merged LoRA
    adapter: the weights change after loading, so the full-precision model is resident once)."""
    device = next(model.parameters()).device
    check_mode(mode, device, dtype)
    for module in list(model.modules()):
        if isinstance(module, nn.Linear) and not (model.config.tie_word_embeddings and module is model.lm_head):
            load_linear(module, _rows_of(module.weight), mode, dtype, device)
    load_embedding(model, _rows_of(model.embed_tokens.weight), mode, dtype, device)
    return model
