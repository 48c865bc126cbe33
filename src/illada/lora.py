"""LoRA adapters through PEFT (the optional `lora` extra): training wraps the model, inference folds them in.

Training (`illada sft --lora-r 16`): `wrap` injects PEFT's LoRA layers into our Transformer in place (B starts at
zero, so step 0 is the base model) and freezes everything else; a LoRA run's checkpoints hold only the adapters,
in PEFT's own format (`adapter_config.json` + `adapter_model.safetensors`, written by `PeftModel.save_pretrained`)
beside the optimizer state, so `PeftModel.from_pretrained` loads any of them.

Inference (`--adapter DIR`, `illada merge`): `apply_adapter` loads an adapter onto a base model and merges it into
the weights, leaving a plain Transformer (no extra matmuls when decoding).

Our parameter names (`layers.0.self_attn.q_proj.lora_A.default.weight`) and PEFT's file keys
(`base_model.model.layers.0.self_attn.q_proj.lora_A.weight`) map one to one (`peft_key`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from illada.errors import IlladaError

# the Linear layers of illada.model's Attention and MLP
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX, _NAME = "base_model.model.", "default"

if TYPE_CHECKING:
    import torch


def require_peft():
    from illada.qlora import quiet_bitsandbytes

    try:
        with quiet_bitsandbytes():  # PEFT imports bitsandbytes where it is installed
            import peft
    except ImportError:
        raise IlladaError("LoRA needs the peft library: pip install 'illada[lora]'") from None
    return peft


def parse_targets(text: str, flag: str = "--lora-targets") -> list[str]:
    """Comma-separated module names, each one of TARGETS."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    unknown = [name for name in names if name not in TARGETS]
    if unknown or not names:
        raise IlladaError(f"{flag}: {'unknown module ' + repr(unknown[0]) if unknown else 'no module named'} "
                          f"(choose from {', '.join(TARGETS)})")
    return names


def check_settings(r: int, alpha: int, dropout: float, targets: str, where: str = "train") -> None:
    """The LoRA settings of a run (`where`: the command named in the messages)."""
    if r < 0:
        raise IlladaError(f"{where}: lora_r (--lora-r) must be >= 0 (0: no LoRA), got {r}")
    if r == 0:
        return
    if alpha <= 0:
        raise IlladaError(f"{where}: lora_alpha (--lora-alpha) must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise IlladaError(f"{where}: lora_dropout (--lora-dropout) must be in [0, 1), got {dropout}")
    parse_targets(targets)


def wrap(model: torch.nn.Module, r: int, alpha: int, dropout: float, targets: str, base: str | None = None,
         seed: int = 0):
    """Inject LoRA adapters into `model` in place (only they stay trainable); returns the PeftModel around it.

    A's initialisation draws from a generator seeded with `seed`, so a run is reproducible."""
    require_peft()
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=parse_targets(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    peft_model.peft_config[_NAME].base_model_name_or_path = base  # recorded in adapter_config.json
    return peft_model


def peft_key(name: str) -> str:
    """PEFT's file key of one of our adapter parameter names."""
    return _PREFIX + name.replace(f".{_NAME}.", ".")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_adapter(peft_model, directory: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Write the adapter tensors `state` (our names, e.g. a full state dict gathered under DDP/FSDP) in PEFT's
    format with PEFT's own writer."""
    peft_model.save_pretrained(str(directory), state_dict={_PREFIX + k: v for k, v in state.items()},
                               save_embedding_layers=False)  # no embedding is adapted


def check_resume_mode(path: Path, trainer_state: dict, lora_r: int, quantize: str | None, kind: str,
                      prefix: str = "") -> None:
    """Refuse to resume a checkpoint of the other mode: LoRA vs full (`kind`: "fine-tuning", "RL"), or adapters
    trained on another base (`--quantize`): the adapters would fit either."""
    if (lora_r > 0) != bool(trainer_state.get("lora")):
        have, want = ("LoRA", "full") if trainer_state.get("lora") else ("full", "LoRA")
        raise IlladaError(f"{prefix}{path} is a {have} {kind} checkpoint; this run is {want} {kind} (--lora-r "
                          f"{lora_r}): resume with the run's own settings")
    if trainer_state.get("quantize") != quantize:
        have, want = (f"--quantize {q}" if q else "a full-precision base"
                      for q in (trainer_state.get("quantize"), quantize))
        raise IlladaError(f"{prefix}{path} was trained on {have}; this run has {want}: resume with the run's own "
                          "settings")


def model_keys(state: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> dict[str, torch.Tensor]:
    """An adapter file's tensors (PEFT keys) under the names of `model`'s trainable adapter parameters."""
    names = {peft_key(name): name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(names):
        missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        detail = "; ".join(f"{label} {keys[0]}{f' and {len(keys) - 1} more' if len(keys) > 1 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise IlladaError(f"{where}: its adapters do not match this run's LoRA settings ({detail})")
    return {names[key]: tensor for key, tensor in state.items()}


def adapter_dir(path: str | Path, flag: str = "--adapter") -> Path:
    """An adapter directory as is; a LoRA training run directory as its newest checkpoint."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise IlladaError(f"{flag} {path}: no such directory")
    if not is_adapter(path) and (path / "checkpoints").is_dir():
        from illada.training.checkpointing import latest_checkpoint

        path = latest_checkpoint(path) or path
    if not is_adapter(path):
        raise IlladaError(f"{flag} {path}: no {ADAPTER_CONFIG} there (a PEFT LoRA adapter directory or a LoRA "
                          "training run)")
    return path


def recorded_base(path: Path) -> str | None:
    """The base model an adapter was trained from, as its adapter_config.json records it."""
    import json

    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def apply_adapter(model: torch.nn.Module, path: str | Path, flag: str = "--adapter") -> torch.nn.Module:
    """`model` with the LoRA adapter at `path` merged into its weights (a plain module again)."""
    path = adapter_dir(path, flag)
    require_peft()
    from peft import PeftModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        stored = set(load_file(path / ADAPTER_WEIGHTS))
        peft_model = PeftModel.from_pretrained(model, str(path))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as error:
        text = " ".join(str(error).split())
        if "size mismatch for " in text:  # the first of torch's list: the adapter is for another shape
            text = "size mismatch for " + text.split("size mismatch for ")[1].rstrip(". ")
        raise IlladaError(f"{flag} {path}: does not fit this model ({text[:300]})") from None
    loaded = {peft_key(name) for name, _ in model.named_parameters() if ".lora_" in name}
    if stored != loaded:
        raise IlladaError(f"{flag} {path}: does not fit this model ({len(stored ^ loaded)} adapter tensors do not "
                          "match its layers)")
    return peft_model.merge_and_unload()
