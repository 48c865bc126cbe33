"""Training run configuration: one flat dataclass, loadable from YAML/JSON and overridable from the command line."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from illada.config import ModelConfig, is_finite_number, type_mismatch
from illada.errors import IlladaError
from illada.files import loads_strict
from illada.lora import TARGETS as LORA_TARGETS, check_settings as check_lora
from illada.qlora import check_settings as check_qlora

OBJECTIVES = ("diffusion", "ar", "sft-pairs", "sft-blocks")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")


@dataclass
class TrainConfig:
    """Everything that determines a training run. Saved beside every checkpoint as `train_config.json`."""

    data: str = ""                      # dataset directory from `illada prepare`
    out_dir: str = "runs/illada"  # run directory: checkpoints/, metrics.jsonl, loss.png
    val_data: str | None = None         # separate validation dataset; else `val_rows` rows held out from `data`
    val_rows: int = 16  # rows of seq_len tokens held out from the end of `data` for validation
    objective: str = "diffusion"        # diffusion (LLaDA/iLLaDA pre-training + variable-length SFT) | ar | sft-pairs | sft-blocks (a block-causal model)
    # model: a preset (with overrides) for a fresh model, or a checkpoint directory to start from (SFT)
    preset: str = "small"  # model shape for a fresh model: tiny | small | illada-8b | llada-8b
    model_overrides: dict[str, Any] = field(default_factory=dict)  # JSON object of ModelConfig fields, e.g. {"n_layers": 4}
    init_from: str | None = None  # checkpoint or run directory (its newest checkpoint), bundled model name or hub id to start from (SFT); its tokenizer is used
    adapt_causal: bool = False  # --init-from a causal (AR) checkpoint and train it bidirectionally with a diffusion objective (AR-to-diffusion adaptation, as Dream and DiffuLLaMA start)
    adapt_shift: bool = True  # with adapt_causal: keep the AR output alignment, the logits at i predicting token i + 1 (Dream's shift, model shift_logits)
    # LoRA (the `lora` extra, PEFT): train only low-rank adapters on a frozen --init-from model
    lora_r: int = 0  # LoRA rank; 0: off (full fine-tuning). Checkpoints then hold only the adapters, in PEFT's format
    lora_alpha: int = 16  # LoRA scale: the update is (lora_alpha / lora_r) B A
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = ",".join(LORA_TARGETS)  # comma-separated Linear layers that get adapters (attention and MLP projections)
    quantize: str | None = None  # QLoRA (the qlora extra, bitsandbytes): nf4 | fp4, the frozen base's attention and MLP projections held in 4 bits under the --lora-r adapters
    resume_from: str | None = None  # resume from this checkpoint of the run instead of the newest (e.g. past a corrupt one)
    seq_len: int = 256  # tokens per training row
    micro_batch_size: int = 8           # rows per forward on each process
    grad_accum: int = 1                 # micro-batches per optimizer step on each process
    steps: int = 1000  # optimizer steps in the whole run
    lr: float = 4e-4  # peak learning rate
    min_lr: float = 1e-5  # learning rate at the end of the decay
    schedule: str = "wsd"               # wsd (LLaDA) | cosine (iLLaDA) | linear-tail (SFT) | constant
    warmup_steps: int = 100  # linear warmup from 0 to lr
    switch_step: int | None = None      # cosine: start of the decay (default: 80% of steps)
    decay_fraction: float = 0.1         # wsd / linear-tail: final linear decay over this fraction of steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    no_decay_norms_embeddings: bool = True  # no weight decay on norm gains and embeddings
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas, JSON list
    grad_clip: float = 1.0  # max global gradient norm
    mask_eps: float = 1e-3  # masking-rate floor: p = (1 - eps) t + eps
    split_prob: float = 0.3             # iLLaDA random split into two independent segments
    truncate_prob: float = 0.0          # LLaDA: 0.01 of batches cut to a random length
    clean_prefix_prob: float = 0.0      # sft-pairs: rows that keep a random response prefix clean (block-diffusion SFT)
    clean_prefix_block: int = 0  # sft-pairs with clean_prefix_prob: those rows noise only U{1..this} tokens after the prefix and mask the rest outright, the loss on that block (semi-autoregressive SFT); 0: the rest noised
    block_length: int = 8  # sft-blocks: tokens per block, counted from the response start (decode with the same --block-length)
    seed: int = 1234  # seeds the weights, data order and masking noise
    dtype: str = "auto"                 # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16
    compile: bool = False  # torch.compile each Transformer block
    activation_checkpointing: bool = False  # recompute block activations in the backward pass
    distributed: str = "auto"           # auto: ddp under torchrun, else none | none | ddp | fsdp
    save_every: int = 200  # steps between checkpoints (also saved at the end and on Ctrl-C/SIGTERM)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    eval_every: int = 200  # steps between validation ELBO evaluations
    eval_batches: int = 4  # validation batches per evaluation
    eval_mc_samples: int = 4  # Monte Carlo masking samples per validation row
    log_every: int = 10  # steps between metrics.jsonl records
    max_bad_steps: int = 5              # consecutive NaN/inf losses before the run stops
    peak_tflops: float | None = None    # for MFU; default: 0.16 on CPU (2-core fp32), 989 on H100 bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True  # rich progress bar

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)

    def _check_types(self) -> None:
        """Each field has its annotated type (a YAML `steps: ten` or a JSON `--betas '[2]'` is one clear error,
        not a TypeError deep inside the run); floats must be finite (`--lr nan`)."""
        for f in dataclasses.fields(self):
            value, kind, flag = getattr(self, f.name), str(f.type), "--" + f.name.replace("_", "-")
            if kind.startswith("dict"):  # model_overrides
                ModelConfig.check_overrides(value, flag)
                continue
            if kind.startswith("tuple"):  # betas
                ok = (isinstance(value, (tuple, list)) and len(value) == 2
                      and all(is_finite_number(b) and 0 <= b < 1 for b in value))
                want = None if ok else "a JSON list of two numbers in [0, 1)"
            else:
                want = type_mismatch(value, kind)
            if want:
                raise IlladaError(f"train: {f.name} ({flag}) must be {want}, got {value!r}")

    def validate(self) -> None:
        self._check_types()
        if not self.data:
            raise IlladaError("train: --data DIR is required (a dataset from `illada prepare`)")
        if self.objective not in OBJECTIVES:
            raise IlladaError(f"train: objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.distributed not in DISTRIBUTED:
            raise IlladaError(f"train: distributed must be one of {', '.join(DISTRIBUTED)}")
        for name in ("seq_len", "micro_batch_size", "grad_accum", "steps", "save_every", "eval_every", "log_every",
                     "max_bad_steps", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise IlladaError(f"train: {name} must be positive, got {getattr(self, name)}")
        if not all(0.0 <= p <= 1.0 for p in (self.split_prob, self.truncate_prob, self.clean_prefix_prob)):
            raise IlladaError("train: split_prob, truncate_prob and clean_prefix_prob must be in [0, 1]")
        if self.clean_prefix_prob > 0 and self.objective != "sft-pairs":
            raise IlladaError("train: clean_prefix_prob applies to --objective sft-pairs only")
        if self.clean_prefix_block < 0 or (self.clean_prefix_block and not self.clean_prefix_prob):
            raise IlladaError("train: clean_prefix_block must be >= 0 and needs clean_prefix_prob > 0")
        if self.block_length <= 0:
            raise IlladaError(f"train: block_length must be positive, got {self.block_length}")
        if self.adapt_causal and (not self.init_from or self.objective == "ar"):
            raise IlladaError("train: adapt_causal needs --init-from and a diffusion objective")
        if not 0.0 < self.mask_eps < 1.0:
            raise IlladaError("train: mask_eps must be in (0, 1)")
        if self.lr <= 0 or self.min_lr < 0:
            raise IlladaError("train: lr must be positive and min_lr non-negative")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise IlladaError("train: dtype must be auto, fp32 or bf16")
        check_lora(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets)
        if self.lora_r and not self.init_from:
            raise IlladaError("train: --lora-r needs --init-from (LoRA adapts an existing model)")
        check_qlora(self.quantize, self.lora_r)
        if self.quantize and self.distributed == "fsdp":
            raise IlladaError("train: --quantize (QLoRA) runs on one process or under DDP, not --distributed fsdp")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((key for key in data if key not in known), key=str)
        if unknown:
            raise IlladaError(f"train config: unknown keys {', '.join(map(str, unknown))}")
        data = dict(data)
        for f in dataclasses.fields(cls):
            # YAML 1.1 reads `lr: 4e-4` (no dot) as a string: a float field takes a numeric string as its number
            if str(f.type).startswith("float") and isinstance(data.get(f.name), str):
                try:
                    data[f.name] = float(data[f.name])
                except ValueError:
                    pass  # reported by validate() with the field's name
        return cls(**data)


def load_config_file(path: str | Path) -> dict:
    """Keys of a YAML or JSON config file (validated later by TrainConfig.from_dict)."""
    path = Path(path)
    if not path.is_file():
        raise IlladaError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise IlladaError(f"{path}: not UTF-8 text (byte {error.start})") from None
    try:
        if path.suffix == ".json":
            data = loads_strict(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (json.JSONDecodeError, Exception) as error:  # yaml.YAMLError has no common base with json's
        raise IlladaError(f"{path}: cannot parse config ({str(error).splitlines()[0]})") from error
    if not isinstance(data, dict):
        raise IlladaError(f"{path}: a config file must hold a mapping of keys to values")
    return data
