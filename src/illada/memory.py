"""Memory planner: the peak memory of an `sft`, `rl` or `generate` job from the model's shapes alone
(`illada info --plan`), so a user knows before launching whether a job fits a card.

Everything is bytes of tensor storage, what torch's allocator hands out (`torch.cuda.max_memory_allocated`, or on
CPU the storages `measure_peak` follows); a CUDA job adds its context (a fixed estimate, `CUDA_CONTEXT`).

What is counted, read off illada's own code (`illada.model`, the trainers, the sampler):

- weights: every parameter in its storage format. `sft` keeps fp32 master weights (bf16 is autocast, as `illada
  sft --dtype bf16` does) and, with LoRA, the frozen base in fp32 too (the trainer loads it so); QLoRA (`--quantize
  int4|int8` with `--lora-r`; `nf4`/`fp4`, `illada sft --quantize`'s names, plan as int4) a bitsandbytes frozen base
  (NF4: 4 bits + an fp32 absmax per 64 weights, as `illada.qlora` makes it; int8: 1 byte + an fp32 scale per row)
  with the embedding, head and norms in bf16. `rl` trains the checkpoint's dtype
  as is (no autocast) and holds a second copy as the KL reference. `generate` with `--quantize` uses torchao's
  layout of `illada.quantize` (int8 per row; int4 groups of 128 with a scale and zero per group in the compute
  dtype; the embedding int8; a tied head its own int4 copy).
- gradients and AdamW's two states in the trainable parameters' dtype; the optimizer's temporaries (CPU: two
  tensors the size of the largest parameter; CUDA `fused` (sft): none; CUDA foreach (rl): one copy of the states).
- activations saved for backward, per block, as autograd saves them: each RMSNorm its float32 input, the rsqrt and
  (trainable gain only) the normalised input; each Linear its input when its weight is trained (under bf16 autocast
  a separate bf16 cast per Linear) and, under autocast, its bf16 weight copy (cached for trained weights, saved for
  frozen ones); SDPA its q, k, v, output and logsumexp (flash/efficient kernels: no L x L scores) and, with an
  attention mask, the mask converted to the compute dtype; SiLU its input, the gate product both factors, the down
  projection the product; a LoRA adapter its input (A) and the rank-r intermediate (B). Rotary tables are shared.
  With activation checkpointing only each block's input stays, and one block is recomputed at a time.
- the loss at vocabulary size, the term that dominates small models: the (B, L, V) logits, the float32 copy of the
  masked rows and their log-softmax (saved), their gradients in the backward pass.
- generate: the weights, the KV cache (`--cache prefix|dual`: keys and values of every layer for the whole
  canvas), the logits the sampler still holds from the previous step, and the largest transient of a step: one
  full-canvas forward (the SwiGLU intermediates or the logits) or the sampler's float32 (with a temperature,
  float64 Gumbel) block temporaries.
- rl: the rollouts (a generate of batch x group rows), the no-grad scoring of the old policy and the reference,
  and the training forward/backward on the estimator's stacked rows (log-softmax over every position).

Gradients and activations do not peak together: the peak is the largest of the phases of a step (end of the
forward, the loss's backward, the top block's backward, the end of the backward, the optimizer step), each the sum
of what is alive then, plus what lives throughout (weights, optimizer states, KV cache, reference).

`measure_peak` measures the same quantity on a real run (a TorchDispatchMode that follows every tensor storage
from the operator that returns it until it is freed), `measure_memory` runs one step of a job for it;
tests/test_memory_plan.py and benchmarks/memory_plan.py compare them with the plans.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from illada.config import ModelConfig
from illada.errors import IlladaError

JOBS = ("sft", "rl", "generate")
DTYPES = {"fp32": 4, "bf16": 2}
CACHES = ("none", "prefix", "dual", "committed")
QUANTIZE = ("int8", "int4")
ESTIMATOR_FORWARDS = {"mean_field": 1, "coupled": 2, "elbo": 2}  # stacked rows of one scoring forward (elbo: 2 samples)
DEVICES = ("cuda", "cpu")
CUDA_CONTEXT = 512 * 2**20  # the CUDA context and cuBLAS workspace of one process, approximately
GiB = 2**30
# float32-sized copies of the block's logits alive in one sampler step: greedy (softmax, scratch), and sampling
# (temperature > 0: the float64 Gumbel-max perturbation, noise and its logs)
_SAMPLER_COPIES = {False: 3, True: 8}


@dataclass(frozen=True)
class Item:
    key: str
    label: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    """An itemised estimate. `items` are the parts (not all alive at once); `peak` is the largest phase of a step
    plus what lives throughout; `peak_checkpointed` the same with activation checkpointing (sft only)."""

    job: str
    settings: dict
    items: list[Item]
    peak: int
    phase: str
    peak_checkpointed: int | None = None
    phase_checkpointed: str | None = None
    params: dict = field(default_factory=dict)

    def item(self, key: str) -> int:
        return next((i.bytes for i in self.items if i.key == key), 0)

    def fits(self, gpu_bytes: float) -> tuple[bool, bool | None]:
        """Whether the peak (and the checkpointed peak) fit in `gpu_bytes`."""
        ck = None if self.peak_checkpointed is None else self.peak_checkpointed <= gpu_bytes
        return self.peak <= gpu_bytes, ck

    def to_dict(self) -> dict:
        return {"job": self.job, "settings": self.settings, "params": self.params,
                "items": [{"key": i.key, "label": i.label, "bytes": i.bytes, "note": i.note} for i in self.items],
                "peak_bytes": self.peak, "peak_phase": self.phase,
                "peak_checkpointed_bytes": self.peak_checkpointed, "peak_checkpointed_phase": self.phase_checkpointed}


# ------------------------------------------------------------------------------------------------------ shapes
def _linears(config: ModelConfig) -> dict[str, tuple[int, int, str]]:
    """The Linear layers of one block: name -> (in, out, the input they read)."""
    h, qd, kvd, f = config.hidden_size, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, \
        config.intermediate_size
    return {"q_proj": (h, qd, "attn_in"), "k_proj": (h, kvd, "attn_in"), "v_proj": (h, kvd, "attn_in"),
            "o_proj": (qd, h, "attn_out"), "gate_proj": (h, f, "mlp_in"), "up_proj": (h, f, "mlp_in"),
            "down_proj": (f, h, "mlp_mid")}


def torchao_linear_bytes(in_features: int, out_features: int, mode: str, compute_bytes: int) -> int:
    """Bytes of one Linear weight quantised as `illada.quantize` does (torchao weight-only)."""
    if mode == "int8":  # int8 rows, an fp32 scale and an int8 zero point per row
        return out_features * in_features + out_features * 5
    from illada.quantize import _group_size

    group = _group_size(in_features)
    if group is None:  # stays in the compute dtype
        return out_features * in_features * compute_bytes
    # a scale and a zero point per group, bfloat16 on both devices (CUDA's int4 needs bf16; CPU's is quantised from it)
    return out_features * in_features // 2 + (in_features // group) * out_features * 2 * 2


def bnb_linear_bytes(in_features: int, out_features: int, mode: str) -> int:
    """Bytes of one Linear weight of a QLoRA base (bitsandbytes NF4, blocks of 64 with an fp32 absmax; or int8 rows
    with an fp32 scale), without double quantisation."""
    n = in_features * out_features
    if mode == "int4":
        return n // 2 + math.ceil(n / 64) * 4
    return n + out_features * 4


@dataclass(frozen=True)
class _Weights:
    total: int          # bytes of every parameter
    trainable: int      # trainable parameters (count)
    trainable_bytes: int
    largest_trainable: int  # bytes of the largest trainable tensor
    note: str


def _weights(config: ModelConfig, *, job: str, weight_bytes: int, compute_bytes: int, lora_r: int,
             targets: tuple[str, ...], quantize: str | None) -> _Weights:
    linears = _linears(config)
    n_l, h, v = config.n_layers, config.hidden_size, config.vocab_size
    head_params = 0 if config.tie_word_embeddings else v * h
    norms = (2 * n_l + 1) * h
    embedding = v * h
    if job == "generate":
        if quantize is None:
            total = config.num_parameters() * compute_bytes
            note = f"{format_count(config.num_parameters())} parameters, {_name(compute_bytes)}"
        else:
            body = n_l * sum(torchao_linear_bytes(i, o, quantize, compute_bytes) for i, o, _ in linears.values())
            embed = v * h + v * 4  # int8 rows + fp32 scale
            if config.tie_word_embeddings:
                head = 0 if quantize == "int8" else torchao_linear_bytes(h, v, quantize, compute_bytes)
            else:
                head = torchao_linear_bytes(h, v, quantize, compute_bytes)
            total = body + embed + head + norms * compute_bytes
            note = f"torchao {quantize} Linears, int8 embedding" + (", int4 head copy" if quantize == "int4"
                                                                    and config.tie_word_embeddings else "")
        return _Weights(total, 0, 0, 0, note)
    if lora_r == 0:  # full fine-tuning: everything trainable
        count = config.num_parameters()
        largest = max(embedding, max(i * o for i, o, _ in linears.values()))
        return _Weights(count * weight_bytes, count, count * weight_bytes, largest * weight_bytes,
                        f"{format_count(count)} parameters, {_name(weight_bytes)}, all trained")
    adapters = n_l * sum(lora_r * (i + o) for name, (i, o, _) in linears.items() if name in targets)
    largest = max(lora_r * max(i, o) for name, (i, o, _) in linears.items() if name in targets)
    if quantize is None:
        base = config.num_parameters() * weight_bytes
        note = f"frozen {_name(weight_bytes)} base + {format_count(adapters)} fp32 adapters"
    else:
        base = (n_l * sum(bnb_linear_bytes(i, o, quantize) for i, o, _ in linears.values())
                + (embedding + head_params + norms) * 2)
        note = f"QLoRA {'NF4' if quantize == 'int4' else 'int8'} base + {format_count(adapters)} fp32 adapters"
    return _Weights(base + adapters * 4, adapters, adapters * 4, largest * 4, note)


def _name(nbytes: int) -> str:
    return {4: "fp32", 2: "bf16"}[nbytes]


def format_count(n: int) -> str:
    """A count as 7.62B, 41.94M, 12.3K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


# ------------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class _Regime:
    """How one training forward stores its tensors."""

    c: int          # bytes of matmul inputs/outputs (bf16 under autocast)
    r: int          # bytes of the residual stream and norm outputs (fp32 under autocast: fp32 embedding + bf16)
    autocast: bool  # separate bf16 input casts per Linear, bf16 weight copies
    full: bool      # base weights trained (else LoRA on `targets`)
    targets: tuple[str, ...]
    lora_r: int
    quantized: bool  # a QLoRA base: its Linears save no weight copy


def _block_saved(config: ModelConfig, rg: _Regime, tokens: int, rows: int, length: int, masked: bool) -> int:
    """Bytes one block saves for backward (without its weight copies, see `_weight_copies`)."""
    t, h, f = tokens, config.hidden_size, config.intermediate_size
    qd, kvd = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    norm = t * h * 4 + t * 4 + (t * h * rg.r if rg.full else 0)
    saved = 2 * norm
    linears = _linears(config)
    readers: dict[str, list[str]] = {}
    for name, (_, _, source) in linears.items():
        if rg.full or name in rg.targets:  # its input is saved (for the weight's or the adapter A's gradient)
            readers.setdefault(source, []).append(name)
    widths = {"attn_in": h, "mlp_in": h}
    for source, names in readers.items():
        if source in widths:  # norm outputs (fp32 under autocast: each Linear saves its own bf16 cast)
            saved += (len(names) if rg.autocast else 1) * t * widths[source] * (2 if rg.autocast else rg.r)
        elif source == "mlp_mid":  # the SwiGLU product (already in the matmul dtype: one tensor)
            saved += t * f * rg.c
        # attn_out: the SDPA output, saved by SDPA itself
    if not rg.full:
        saved += sum(t * rg.lora_r * rg.c for name in linears if name in rg.targets)  # adapter A outputs
    saved += t * (2 * qd + 2 * kvd) * rg.c + rows * config.n_heads * length * 4  # SDPA q, k, v, out; logsumexp
    if masked:
        saved += rows * length * length * rg.c  # the boolean mask as an additive one, per call
    saved += 3 * t * f * rg.c  # SiLU input, the two factors of the gate product
    return saved


def _weight_copies(config: ModelConfig, rg: _Regime) -> tuple[int, int]:
    """bf16 copies of weights under autocast: (of one block, of the head)."""
    if not rg.autocast:
        return 0, 0
    block = sum(i * o for i, o, _ in _linears(config).values())
    adapters = sum(rg.lora_r * (i + o) for name, (i, o, _) in _linears(config).items() if name in rg.targets)
    base = 0 if rg.quantized else block
    return 2 * (base + (0 if rg.full else adapters)), 2 * config.vocab_size * config.hidden_size


def _head_saved(config: ModelConfig, rg: _Regime, tokens: int, loss_rows: int) -> int:
    """Saved by the final norm, the head and the loss (the log-softmax of the loss rows), and the embedding."""
    t, h, v = tokens, config.hidden_size, config.vocab_size
    norm = t * h * 4 + t * 4 + (t * h * rg.r if rg.full else 0)
    head_input = (t * h * (2 if rg.autocast else rg.r)) if rg.full else 0
    loss = loss_rows * v * 4 + loss_rows * (8 + 8 + 8 + 4)  # log-softmax; row/col indices, targets, 1/p weights
    embedding = t * 8 if rg.full else 0
    return norm + head_input + loss + embedding


@dataclass(frozen=True)
class _Phases:
    peak: int
    phase: str
    saved: int        # activations saved at the end of the forward (without weight copies)
    copies: int       # bf16 weight copies alive at the end of the forward (autocast)
    logits: int       # the vocabulary-sized transient at the end of the forward


def _training_phases(config: ModelConfig, rg: _Regime, *, rows: int, length: int, loss_rows: int, masked: bool,
                     checkpointing: bool, grads: int, optimizer_temp: int, gather: bool,
                     grads_in_forward: bool, grads_in_backward: bool, logits_copy: int = 0) -> _Phases:
    """The largest of a training step's phases (bytes beyond what lives throughout). `grads_in_forward` /
    `_backward`: the previous gradients are alive then (gradient accumulation; rl zeroes them before backward).
    `logits_copy`: bytes of a rearranged copy of the logits that the loss reads (sft-blocks with the shift)."""
    t, h, v, f, n_l = rows * length, config.hidden_size, config.vocab_size, config.intermediate_size, config.n_layers
    block = _block_saved(config, rg, t, rows, length, masked)
    block_copy, head_copy = _weight_copies(config, rg)
    head = _head_saved(config, rg, t, loss_rows)
    shared = 2 * rows * length * config.head_dim * 4 + (rows * length * length if masked else 0)  # rope, bool mask
    lsm = loss_rows * v * 4
    cached_copies = n_l * block_copy if rg.full else 0  # trained weights: autocast's cache holds them all forward
    if checkpointing:
        body = n_l * t * h * rg.r  # each block's input
        forward_copies = cached_copies + head_copy
        backward_copies = head_copy
    else:
        # a frozen embedding (LoRA): the first block's input needs no gradient, so its first norm saves nothing
        body = n_l * block - (0 if rg.full else t * h * 4 + t * 4)
        forward_copies = backward_copies = n_l * block_copy + head_copy
    saved = body + head + shared
    grad_head = grads if grads_in_backward else (v * h * 4 + h * 4 if rg.full else 0)  # head + final norm
    during_forward = grads if grads_in_forward else 0
    during_backward = grads if grads_in_backward else 0
    # the (B, L, V) logits; then the float32 rows the loss reads (a gathered copy, or .float() of a bf16 tensor)
    logits = t * v * rg.c + logits_copy + (loss_rows * v * 4 if gather or rg.c != 4 else 0)
    phases = {
        "end of forward": during_forward + saved + forward_copies + logits,
        "loss backward": during_backward + saved + backward_copies + 2 * lsm,
        "logits backward": during_backward + saved - lsm + backward_copies
        + loss_rows * v * (4 + (2 if rg.c == 2 else 0)) + t * v * rg.c,
        "head weight gradient": saved - head + backward_copies + t * v * rg.c + t * h * rg.c + grad_head
        + (v * h * 2 if rg.autocast and rg.full else 0),
    }
    transient = 3 * t * f * rg.c + 2 * t * h * 4  # gradients of the SwiGLU intermediates and of the block input
    if checkpointing:  # the top block recomputed under the head's gradients; the bottom one under all gradients
        phases["top block recomputed"] = (saved - head + backward_copies - head_copy + block + block_copy
                                          + grad_head + transient)
        phases["bottom block recomputed"] = grads + block + block_copy + transient
    else:
        phases["top block backward"] = saved - head + backward_copies - head_copy + grad_head + transient
    embed_temp = v * h * 4 if rg.full else 0  # the dense embedding gradient, added into the tied head's
    phases["end of backward"] = grads + embed_temp
    phases["optimizer step"] = grads + optimizer_temp
    name = max(phases, key=phases.get)
    return _Phases(phases[name], name, saved, forward_copies, logits)


def _inference_peak(config: ModelConfig, *, rows: int, length: int, c: int, block: int, cache: str = "none",
                    prompt_len: int = 0, fixed_length: bool = False, quantize: str | None = None,
                    sampling: bool = False) -> tuple[int, str]:
    """The largest transient of a denoising step: its forward or its sampler, beside the logits the sampler still
    holds from the step before (in fp32 the block's logits are a view that keeps the whole forward's logits alive;
    in bf16 they are a float32 copy of the block). With a cache, a step after a refresh forwards only the block
    (dual; prefix on a variable-length canvas, which ends with the block) or the canvas from the block on
    (prefix on a fixed canvas: at most all but the prompt), or two blocks (committed, at a block's first step):
    a small forward beside the refresh's full logits, or
    the refresh beside a small step's."""
    v = config.vocab_size

    def forward(width: int) -> dict[str, int]:
        t, h, f = rows * width, config.hidden_size, config.intermediate_size
        qd, kvd = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        residual = t * h * c
        return {"SwiGLU of a block": residual + t * h * c + 3 * t * f * c,  # normed input, SiLU, up, product
                "attention of a block": residual + t * h * c + t * (qd + 2 * kvd) * c + t * qd * (3 * 4 + c),
                "logits": 2 * residual + t * v * c * (2 if quantize == "int8" else 1)}  # int8: matmul, then scale

    def held(width: int) -> int:
        return rows * width * v * 4 if c == 4 else rows * block * v * 4

    sampler = {"sampler step": _SAMPLER_COPIES[sampling] * rows * block * v * 4}
    candidates = {name: held(length) + value for name, value in {**forward(length), **sampler}.items()}
    if cache != "none":  # the refresh beside a small step's logits; a small step's forward beside the refresh's
        small = (max(block, length - prompt_len) if cache == "prefix" and fixed_length
                 else min(2 * block, length) if cache == "committed" else block)  # committed: a block's first step
        candidates = {name: held(small) + value for name, value in forward(length).items()}
        candidates.update({f"{name} (cached step)": held(length) + value
                           for name, value in {**forward(small), **sampler}.items()})
    name = max(candidates, key=candidates.get)
    return candidates[name], name


def kv_cache_bytes(config: ModelConfig, rows: int, length: int, c: int) -> int:
    """Keys and values of every layer for a whole canvas (after rotary, at n_kv_heads)."""
    return 2 * config.n_layers * rows * length * config.n_kv_heads * config.head_dim * c


# ------------------------------------------------------------------------------------------------------- plan
def _context_item(context: int) -> Item:
    return Item("cuda_context", "CUDA context", context, "approximate")


def _check(job: str, seq_len: int, batch: int, dtype: str, lora_r: int, quantize: str | None, device: str,
           cache: str, block_length: int, group_size: int, estimator: str, grad_accum: int, prompt_len: int,
           config: ModelConfig, block_causal: bool | None) -> None:
    def positive(name: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise IlladaError(f"--plan: {name} must be a positive integer, got {value!r}")

    if job not in JOBS:
        raise IlladaError(f"--plan {job!r}: choose one of {', '.join(JOBS)}")
    for name, value in (("--seq-len", seq_len), ("--batch", batch), ("--block-length", block_length),
                        ("--group-size", group_size), ("--grad-accum", grad_accum)):
        positive(name, value)
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 0 <= prompt_len < seq_len:
        raise IlladaError(f"--plan: --prompt-len must be in [0, --seq-len), got {prompt_len!r}")
    if seq_len > config.max_seq_len:
        raise IlladaError(f"--plan: --seq-len {seq_len} exceeds the model context ({config.max_seq_len})")
    if dtype not in DTYPES:
        raise IlladaError(f"--plan: --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 0:
        raise IlladaError(f"--plan: --lora-r must be >= 0 (0: no LoRA), got {lora_r!r}")
    if quantize is not None and quantize not in QUANTIZE:
        raise IlladaError(f"--plan: --quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    if device not in DEVICES:
        raise IlladaError(f"--plan: --device {device!r}: choose one of {', '.join(DEVICES)}")
    if cache not in CACHES:
        raise IlladaError(f"--plan: --cache {cache!r}: choose one of {', '.join(CACHES)}")
    if estimator not in ESTIMATOR_FORWARDS:
        raise IlladaError(f"--plan: --estimator {estimator!r}: choose one of {', '.join(ESTIMATOR_FORWARDS)}")
    if job == "generate" and lora_r:
        raise IlladaError("--plan generate: --lora-r does not apply (an --adapter is merged into the weights)")
    if job != "generate" and quantize and not lora_r:
        raise IlladaError(f"--plan {job}: --quantize trains adapters on a frozen quantised base (QLoRA): "
                          "give --lora-r")
    if job == "sft" and quantize and dtype != "bf16":
        raise IlladaError("--plan sft: QLoRA computes in bf16 (--dtype bf16)")
    if block_causal and job != "sft":
        raise IlladaError("--block-causal plans --plan sft (--objective sft-blocks) only")
    if job == "rl" and config.block_causal:
        raise IlladaError("--plan rl: illada rl does not train block-causal models")


def plan_memory(config: ModelConfig, job: str, *, seq_len: int = 2048, batch: int = 1, dtype: str = "bf16",
                lora_r: int = 0, lora_targets: str | None = None, quantize: str | None = None,
                device: str = "cuda", cache: str = "none", block_length: int = 32, group_size: int = 8,
                estimator: str = "coupled", grad_accum: int = 1, masked: bool = True,
                temperature: float = 0.0, prompt_len: int = 0, fixed_length: bool = False,
                block_causal: bool | None = None) -> MemoryPlan:
    """Estimate the peak memory of `job` on a model of shape `config` (no weights are read).

    sft: `batch` rows (the micro-batch) of `seq_len` tokens, every token masked (t near 1: the worst step).
    `masked`: an attention mask is in play (packed segments, padding): its per-layer copies are counted.
    `block_causal` (None: the model's own attention): sft of a block-causal model (`--objective sft-blocks`), whose
    rows run as their noisy and clean halves side by side: 2 x `seq_len` tokens under a pattern, loss on one half.
    rl: `batch` prompts x `group_size` rollouts of `seq_len` tokens (prompt + completion), scored by `estimator`.
    generate: `batch` rows of a `seq_len`-token canvas (`prompt_len` + new tokens; a longer prompt only shrinks
    a prefix cache's steps on a fixed canvas, so 0 is the worst case), `block_length`-token blocks appended
    until EOS (iLLaDA) or on one `fixed_length` canvas (LLaDA),
    greedy or (`temperature` > 0) sampled; rl's rollouts always sample (rl needs a temperature > 0)."""
    from illada.lora import TARGETS, parse_targets

    if job != "generate" and quantize in ("nf4", "fp4"):  # the training flag's 4-bit types: int4's storage
        quantize = "int4"
    _check(job, seq_len, batch, dtype, lora_r, quantize, device, cache, block_length, group_size, estimator,
           grad_accum, prompt_len, config, block_causal)
    targets = tuple(parse_targets(lora_targets)) if lora_targets else TARGETS
    c = DTYPES[dtype]
    settings = {"seq_len": seq_len, "batch": batch, "dtype": dtype, "lora_r": lora_r,
                "lora_targets": ",".join(targets) if lora_r else None, "quantize": quantize, "device": device}
    items: list[Item] = []
    context = CUDA_CONTEXT if device == "cuda" else 0
    params = {"total": config.num_parameters()}

    if job == "generate":
        settings.update(cache=cache, block_length=min(block_length, seq_len), temperature=temperature,
                        prompt_len=prompt_len, fixed_length=fixed_length)
        w = _weights(config, job=job, weight_bytes=c, compute_bytes=c, lora_r=0, targets=targets,
                     quantize=quantize)
        kv = kv_cache_bytes(config, batch, seq_len, c) if cache != "none" else 0
        transient, phase = _inference_peak(config, rows=batch, length=seq_len, c=c,
                                           block=min(block_length, seq_len), cache=cache, prompt_len=prompt_len,
                                           fixed_length=fixed_length, quantize=quantize,
                                           sampling=temperature > 0)
        items = [Item("weights", "weights", w.total, w.note),
                 Item("kv_cache", "KV cache", kv, f"{cache}: keys + values of {batch} x {seq_len} tokens"
                      if kv else "--cache none"),
                 Item("activations", "activations (one step)", transient,
                      f"previous step's logits + {phase}")]
        if context:
            items.append(_context_item(context))
        peak = w.total + kv + transient + context
        return MemoryPlan(job, settings, items, peak, phase, params=params)

    full = lora_r == 0
    if job == "sft":
        # the trainer keeps fp32 weights (bf16 is autocast); a LoRA base is loaded in fp32, a QLoRA one quantised
        weight_bytes = 4
        rg = _Regime(c=c, r=4 if not quantize else 2, autocast=(c == 2 and not quantize), full=full,
                     targets=targets, lora_r=lora_r, quantized=quantize is not None)
    else:
        # rl trains the model in the checkpoint's dtype, no autocast; AdamW states in that dtype
        weight_bytes = c if not quantize else 2
        rg = _Regime(c=c if not quantize else 2, r=c if not quantize else 2, autocast=False, full=full,
                     targets=targets, lora_r=lora_r, quantized=quantize is not None)
    w = _weights(config, job=job, weight_bytes=weight_bytes, compute_bytes=rg.c, lora_r=lora_r, targets=targets,
                 quantize=quantize)
    trainable = w.trainable_bytes
    params["trainable"] = w.trainable
    grads = trainable
    optimizer = 2 * trainable
    if device == "cpu":
        optimizer_temp = 2 * w.largest_trainable
        opt_note = "for-loop"
    elif job == "sft":
        optimizer_temp, opt_note = 0, "fused"
    else:
        optimizer_temp, opt_note = trainable, "foreach: + a temporary copy"

    items = [Item("weights", "weights", w.total, w.note),
             Item("gradients", "gradients", grads, f"{format_count(w.trainable)} trainable"),
             Item("optimizer", "optimizer states", optimizer, f"AdamW, 2 states ({opt_note})")]
    if job == "sft":
        blocks = config.block_causal if block_causal is None else block_causal
        settings["block_causal"] = blocks
        rows, length = batch, seq_len * (2 if blocks else 1)
        common = dict(rows=rows, length=length, loss_rows=rows * seq_len, masked=masked or blocks, grads=grads,
                      optimizer_temp=optimizer_temp, gather=True, grads_in_forward=grad_accum > 1,
                      grads_in_backward=grad_accum > 1,
                      # with the shift, the noisy half's logits with each block's first row from the clean half
                      logits_copy=rows * seq_len * config.vocab_size * rg.c if blocks and config.shift_logits else 0)
        plain = _training_phases(config, rg, checkpointing=False, **common)
        ck = _training_phases(config, rg, checkpointing=True, **common)
        items += [Item("activations", "activations", plain.saved, "saved for backward"),
                  Item("activations_checkpointed", "activations, checkpointed", ck.saved,
                       "block inputs + head")]
        if plain.copies:
            items.append(Item("weight_copies", "bf16 weight copies", plain.copies,
                              f"autocast; {ck.copies / GiB:.2f} GiB checkpointed"))
        items.append(Item("logits", "logits + loss", plain.logits, f"{rows * length} x {config.vocab_size}, "
                          + (f"the noisy half ({rows * seq_len}) masked" if blocks else "all masked")))
        if context:
            items.append(_context_item(context))
        static = w.total + optimizer + context
        return MemoryPlan(job, settings, items, static + plain.peak, plain.phase, static + ck.peak, ck.phase,
                          params=params)

    # rl: rollouts, the no-grad scoring of the policy and the reference, one inner update
    forwards = ESTIMATOR_FORWARDS[estimator]
    rows = batch * group_size
    settings.update(group_size=group_size, estimator=estimator, cache=cache)
    # full RL: a frozen second copy as the KL reference; LoRA RL scores the reference with the adapters disabled
    # (PEFT's disable_adapter), so it costs nothing more
    reference = w.total if full else 0
    kv = kv_cache_bytes(config, rows, seq_len, rg.c) if cache != "none" else 0
    rollout, _ = _inference_peak(config, rows=rows, length=seq_len, c=rg.c, block=min(block_length, seq_len),
                                 cache=cache, prompt_len=prompt_len, quantize=quantize, sampling=True)
    t = forwards * rows * seq_len
    v = config.vocab_size
    scoring = t * v * rg.c + t * v * 4 + (t * v * 4 if rg.c != 4 else 0)  # logits, .float() copy, log-softmax
    entropy = 3 * rows * seq_len * v * 4  # the policy's entropy: log-softmax, its exp, their product (float32)
    train = _training_phases(config, rg, checkpointing=False, rows=forwards * rows, length=seq_len, loss_rows=t,
                             masked=True, grads=grads, optimizer_temp=optimizer_temp, gather=False,
                             grads_in_forward=True, grads_in_backward=False)
    phases = {"rollouts": grads + kv + rollout, "scoring (no grad)": grads + scoring,
              "entropy (no grad)": grads + entropy, f"update: {train.phase}": train.peak}
    phase = max(phases, key=phases.get)
    items += [Item("reference", "reference model (KL)", reference,
                   "a second copy, no grad" if full else "the base, adapters disabled: no copy"),
              Item("rollouts", "rollouts (generation)", kv + rollout,
                   f"{rows} rows" + (f", {cache} KV cache" if kv else "")),
              Item("activations", "activations", train.saved + train.copies,
                   f"saved; {forwards} x {rows} stacked rows ({estimator})"),
              Item("logits", "logits + log-softmax", train.logits, f"{t} x {v}, every position")]
    if context:
        items.append(_context_item(context))
    static = w.total + reference + optimizer + context
    return MemoryPlan(job, settings, items, static + phases[phase], phase, params=params)


# ---------------------------------------------------------------------------------------------- measurement
def measure_peak(fn: Callable[[], object], *external) -> int:
    """Run `fn` and return the peak bytes of live tensor storage during it.

    A TorchDispatchMode sees every tensor an operator returns (forward, backward and optimizer alike: on CPU the
    autograd engine runs on the calling thread); each new storage is counted from then until a weak reference to
    it reports it freed (torch keeps a storage's Python object alive exactly as long as the storage). This is how
    torch's own `MemTracker` works; it is not used because it refuses frozen parameters (LoRA). `external`:
    modules (parameters, buffers, gradients), optimizers (their states) and tensors alive before `fn`: counted
    throughout. Storage bytes, not RSS: what a GPU allocator would hand out for the same tensors."""
    import torch

    tracker = _live_storage()
    for thing in external:
        if isinstance(thing, torch.nn.Module):
            for tensor in [*thing.parameters(), *thing.buffers()]:
                tracker.track(tensor)
                if tensor.grad is not None:
                    tracker.track(tensor.grad)
        elif isinstance(thing, torch.optim.Optimizer):
            for state in thing.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        tracker.track(value)
        else:
            tracker.track(thing)
    tracker.peak = tracker.live
    with tracker:
        fn()
    return tracker.peak


def measure_memory(config: ModelConfig, job: str, *, seq_len: int, batch: int = 1, dtype: str = "fp32",
                   lora_r: int = 0, lora_targets: str | None = None, quantize: str | None = None,
                   activation_checkpointing: bool = False, cache: str = "none", block_length: int = 32,
                   temperature: float = 0.0, group_size: int = 4, estimator: str = "coupled", masked: bool = True,
                   prompt_len: int | None = None, fixed_length: bool = False, block_causal: bool | None = None,
                   seed: int = 0) -> int:
    """The measured peak (bytes of live tensor storage, `measure_peak`) of one step of `job` on a randomly
    initialised CPU model of shape `config`, run as illada runs it, with `plan_memory`'s keywords: an sft step
    (autocast in bf16, every token masked, two packed segments when `masked`, backward, clipping, AdamW), an rl
    step (rollouts, scoring by the policy and a reference copy, the entropy, two inner updates) or a generate
    (a prompt of `prompt_len` tokens, default a quarter of the canvas, then blocks of `block_length`, which must
    divide the rest, appended one by one or on one `fixed_length` canvas; two tokens per step); a `block_causal`
    sft step is `sft_blocks_loss` on rows that are all response, in blocks of `block_length`, every token masked.
    A step runs once first so the optimizer's states exist. For small shapes: this is what the estimates are
    checked against."""
    import contextlib
    import copy

    import torch

    from illada.model import build_model

    if quantize and job != "generate":
        raise IlladaError("measure_memory: QLoRA steps are measured by benchmarks/qlora.py (illada.qlora's layers)")
    torch.manual_seed(seed)
    model = build_model(config, device="cpu", seed=seed)
    mask_id = config.mask_token_id if config.mask_token_id is not None else 0
    generator = torch.Generator().manual_seed(seed)
    prompt_len = seq_len // 4 if prompt_len is None else prompt_len
    gen = seq_len - prompt_len
    block = min(block_length, gen)
    if job in ("generate", "rl") and (prompt_len < 1 or gen % block):
        raise IlladaError(f"measure_memory: {gen} new tokens after a {prompt_len}-token prompt are not blocks of "
                          f"{block}")
    if job == "generate":
        from illada.sampling import generate

        model = model.to(torch.float32 if dtype == "fp32" else torch.bfloat16).eval()
        if quantize:
            from illada.quantize import quantize_model

            quantize_model(model, quantize, next(model.parameters()).dtype)
        prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=generator)
        steps = gen // 2 if fixed_length else max(1, block // 2)  # in total, or per block
        step = lambda: generate(model, prompt, gen_length=gen, steps=steps, block_length=block,  # noqa: E731
                                mask_id=mask_id, cache=cache, temperature=temperature,
                                variable_length=not fixed_length, generator=torch.Generator().manual_seed(seed))
        step()
        return measure_peak(step, model, prompt)
    if lora_r:
        from illada.lora import TARGETS, wrap

        wrap(model, lora_r, 2 * lora_r, 0.0, lora_targets or ",".join(TARGETS), seed=seed)
    if activation_checkpointing:
        from illada.training.parallelize import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if job == "sft":
        from illada.diffusion.objective import pretrain_loss, sft_blocks_loss

        blocks = config.block_causal if block_causal is None else block_causal
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)
        segments = (torch.arange(seq_len)[None, :].expand(batch, -1) >= seq_len // 2).long() if masked else None
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" \
            else contextlib.nullcontext

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                if blocks:
                    loss, _ = sft_blocks_loss(model, ids, torch.zeros(batch, dtype=torch.long), mask_id, block_length,
                                              t=torch.ones(batch, -(-seq_len // block_length)))
                else:
                    loss, _ = pretrain_loss(model, ids, mask_id, t=torch.ones(batch), segment_ids=segments)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()

        step()
        return measure_peak(step, model, optimizer, ids)
    if job != "rl":
        raise IlladaError(f"measure_memory: unknown job {job!r}")
    from illada.rl.estimators import ScoredBatch, get_estimator
    from illada.rl.grpo import group_advantages, policy_loss
    from illada.sampling import generate

    model = model.to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    scorer = get_estimator(estimator)
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=generator)
    prompts = prompts.repeat_interleave(group_size, 0)

    def rl_step() -> None:
        model.eval()
        out = generate(model, prompts, gen_length=gen, steps=max(1, block // 2), block_length=block,
                       mask_id=mask_id, cache=cache, temperature=temperature or 0.7,
                       generator=torch.Generator().manual_seed(seed))
        rows = out.sequences.tolist()
        scored = ScoredBatch.from_lists([r[:prompt_len] for r in rows], [r[prompt_len:] for r in rows], 0)
        masks = scorer.draw(scored, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            old = scorer.token_terms(model, scored, masks, mask_id)
            ref = scorer.token_terms(reference, scored, masks, mask_id)
            noisy = torch.where(scored.completion, torch.full_like(scored.input_ids, mask_id), scored.input_ids)
            logp = torch.log_softmax(model(noisy, attention_mask=scored.attention_mask).float(), dim=-1)
            float(-(logp.exp() * logp).sum(-1).mean())  # the trainer's entropy
            del logp
        advantages = group_advantages(torch.randn(len(rows), generator=generator), group_size)
        model.train()
        for _ in range(2):
            new = scorer.token_terms(model, scored, masks, mask_id)
            loss, _ = policy_loss(new.sum(1), old.sum(1), advantages, scored.completion_lengths, ref=ref.sum(1),
                                  kl_coef=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    rl_step()
    return measure_peak(rl_step, model, reference, optimizer, prompts)


def _live_storage_mode():
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
    from torch.utils._pytree import tree_flatten

    class LiveStorage(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0
            self._sizes: dict[int, tuple[int, weakref.ref]] = {}

        def _storages(self, tensor: torch.Tensor) -> list:
            if is_traceable_wrapper_subclass(tensor):  # a quantised weight: its inner tensors
                names, _ = tensor.__tensor_flatten__()
                return [s for n in names if getattr(tensor, n) is not None for s in self._storages(getattr(tensor, n))]
            return [] if tensor.device.type == "meta" else [tensor.untyped_storage()]

        def track(self, tensor: torch.Tensor) -> None:
            for storage in self._storages(tensor):
                key, size = storage._cdata, storage.nbytes()
                known = self._sizes.get(key)
                if known is not None and known[0] == size:
                    continue
                self.live += size - (known[0] if known else 0)
                ref = known[1] if known else weakref.ref(storage, lambda _, key=key: self._release(key))
                self._sizes[key] = (size, ref)
                self.peak = max(self.peak, self.live)

        def _release(self, key: int) -> None:
            size, _ = self._sizes.pop(key, (0, None))
            self.live -= size

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for leaf in tree_flatten(out)[0]:
                if isinstance(leaf, torch.Tensor):
                    self.track(leaf)
            if func._schema.is_mutable:  # in place or out=: a storage it wrote may have grown
                for leaf in tree_flatten((args, kwargs))[0]:
                    if isinstance(leaf, torch.Tensor):
                        self.track(leaf)
            return out

    return LiveStorage


def _live_storage():
    return _live_storage_mode()()
