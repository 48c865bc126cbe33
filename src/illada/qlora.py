"""QLoRA: LoRA adapters (illada.lora, PEFT) on a frozen 4-bit base through bitsandbytes (the optional `qlora` extra).

`illada sft|rl --lora-r 16 --quantize nf4` loads the `--init-from` checkpoint as usual, then `quantize_base` replaces
every attention and MLP projection of every block (the seven Linears of `illada.lora.TARGETS`, adapted or not) by a
bitsandbytes `Linear4bit` (NF4 or FP4, blocks of 64 weights with an fp32 absmax, no double quantisation: what the
memory planner counts), quantised one layer at a time onto the training device, so the full-precision projections
are never on it (the host holds the checkpoint as loaded meanwhile, as for LoRA, then only the unquantised rest).
The embedding, the norms and the head stay unquantised, in the compute dtype: bf16 where the run computes in bf16
(`--dtype auto` on CUDA, `--dtype bf16`), else fp32 (CPU). PEFT then wraps the 4-bit Linears
with its own bitsandbytes LoRA layers (`peft.tuners.lora.bnb.Linear4bit`; the model is flagged `is_loaded_in_4bit`,
which is how PEFT picks them); only the fp32 adapters train, and the checkpoints hold them alone in PEFT's format,
exactly as a LoRA run's.

`peft.prepare_model_for_kbit_training` is not used: it is written for transformers models (it freezes every
parameter, which `get_peft_model` does anyway, upcasts fp16/bf16 parameters to fp32, which would undo the bf16
embedding and head, and turns on gradient checkpointing through transformers' `gradient_checkpointing_enable`,
which an illada Transformer does not have). `--activation-checkpointing` is illada's own (non-reentrant, so no
input-requires-grad hook is needed).

An adapter trained on the 4-bit base is an ordinary PEFT adapter: `--adapter` / `illada merge` fold it into the
full-precision base (loaded normally), which differs from the training model by the quantisation error of the base.

bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 CPU inference kernel at the first no-grad eval
forward; that kernel computes in bf16 and has no backward, so a validation pass would change what the following
training steps compute. The repacking is switched off on the layers made here (`support_avx512bf16_for_cpu`):
training and evaluation see one and the same base.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from illada.errors import IlladaError

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64  # weights per absmax (bitsandbytes' default for 4-bit)

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def quiet_bitsandbytes():
    """Imports inside are spared bitsandbytes' import-time warning: its CPU backend logs one when the optional
    `kernels` package (a faster kernel for the repacked inference layout, which QLoRA training never uses, see
    above) is missing. PEFT imports bitsandbytes wherever it is installed, so plain LoRA runs need this too."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def require_bitsandbytes():
    """The bitsandbytes module, or one line naming the extra."""
    try:
        with quiet_bitsandbytes():
            import bitsandbytes
    except ImportError:
        raise IlladaError("QLoRA (--quantize) needs the bitsandbytes library: pip install 'illada[qlora]'") from None
    except Exception as error:  # a broken install (a missing native library) fails in its own way
        raise IlladaError(f"QLoRA (--quantize): bitsandbytes does not load ({_first_line(error)})") from None
    return bitsandbytes


def check_settings(quantize: str | None, lora_r: int, where: str = "train") -> None:
    """`--quantize` of a training run: a 4-bit type, and LoRA to train (the quantised base is frozen)."""
    if quantize is None:
        return
    if quantize not in QUANT_TYPES:
        raise IlladaError(f"{where}: --quantize {quantize!r}: choose {' or '.join(QUANT_TYPES)} (a 4-bit bitsandbytes "
                          "base for QLoRA; int8/int4 are the inference commands' torchao modes)")
    if not lora_r:
        raise IlladaError(f"{where}: --quantize {quantize} trains LoRA adapters on a frozen 4-bit base (QLoRA): "
                          "give --lora-r")


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]


def _linear4bit(bnb, weight: torch.Tensor, quant_type: str, device: torch.device, compute_dtype: torch.dtype,
                bias: torch.Tensor | None = None):
    """A bitsandbytes Linear4bit holding `weight` (out, in) quantised on `device`."""
    import torch

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=False, quant_type=quant_type, device="meta")
    layer.support_avx512bf16_for_cpu = False  # no in-place repacking for bf16 CPU inference (module docstring)
    param = bnb.nn.Params4bit(weight.detach().to(compute_dtype), requires_grad=False, blocksize=BLOCKSIZE,
                              compress_statistics=False, quant_type=quant_type, module=layer)
    layer.weight = param.to(device)  # quantises (bitsandbytes quantises a Params4bit when it is moved)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().to(device, compute_dtype), requires_grad=False)
    return layer


def check_backend(quant_type: str, device: torch.device, compute_dtype: torch.dtype) -> None:
    """One tiny 4-bit Linear quantised and run on `device`: a build or device bitsandbytes cannot do 4-bit on fails
    here, in one line, before the model is touched."""
    import torch

    bnb = require_bitsandbytes()
    try:
        probe = _linear4bit(bnb, torch.ones(BLOCKSIZE, BLOCKSIZE), quant_type, device, compute_dtype)
        probe(torch.ones(2, BLOCKSIZE, device=device, dtype=compute_dtype))
    except Exception as error:  # RuntimeError, NotImplementedError, AssertionError...: bitsandbytes' own
        raise IlladaError(f"QLoRA (--quantize {quant_type}): bitsandbytes cannot run 4-bit layers on {device} "
                          f"({_first_line(error)})") from None


def quantize_base(model: torch.nn.Module, quant_type: str, device: torch.device | str,
                  compute_dtype: torch.dtype) -> torch.nn.Module:
    """Replace `model`'s attention and MLP projections (every block) by bitsandbytes 4-bit Linears on `device`,
    in place, one at a time (each full-precision weight is released as its replacement is made); the other
    floating-point parameters are cast to `compute_dtype` where they are (the caller moves the model). Every
    parameter is frozen. Returns `model`, flagged for PEFT (`is_loaded_in_4bit`)."""
    import torch

    from illada.lora import TARGETS

    if quant_type not in QUANT_TYPES:
        raise IlladaError(f"--quantize {quant_type!r}: choose {' or '.join(QUANT_TYPES)}")
    device = torch.device(device)
    check_backend(quant_type, device, compute_dtype)
    bnb = require_bitsandbytes()
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in TARGETS:
                linear = getattr(parent, name, None)
                if type(linear) is not torch.nn.Linear:
                    continue
                setattr(parent, name, _linear4bit(bnb, linear.weight, quant_type, device, compute_dtype,
                                                  linear.bias))
                del linear
    for param in model.parameters():
        if not isinstance(param, bnb.nn.Params4bit) and param.is_floating_point():
            param.data = param.data.to(compute_dtype)
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True  # PEFT's switch to its bitsandbytes LoRA layers
    return model


def quantized_layers(model: torch.nn.Module) -> list:
    """The bitsandbytes Linear4bit modules of `model` (PEFT's wrappers hold them as `base_layer`)."""
    bnb = require_bitsandbytes()
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held by `model`'s weights: the packed 4-bit projections with their absmax, and everything else."""
    quantized, seen = 0, set()
    for layer in quantized_layers(model):
        weight = layer.weight
        seen.add(id(weight))
        quantized += weight.numel() * weight.element_size()
        state = weight.quant_state
        if state is not None:
            quantized += state.absmax.numel() * state.absmax.element_size()
    other = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                if id(p) not in seen)
    return {"quantized": quantized, "other": other}
