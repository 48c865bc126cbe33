"""Training checkpoints: one directory per save, written atomically, loadable by `illada.load` as a model too.

    out_dir/checkpoints/step-00000100/
        config.json, model.safetensors (iLLaDA layout), tokenizer files   <- a normal model checkpoint
        training_state.pt     full (unsharded) optimizer state keyed by parameter name, RNG states
        trainer_state.json    step, tokens seen, RNG state, counters
        train_config.json     the resolved TrainConfig
    out_dir/checkpoints/latest   name of the newest complete checkpoint

Full (unsharded) state dicts make checkpoints independent of the world size and of DDP/FSDP.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from illada.config import ModelConfig
from illada.errors import IlladaError
from illada.files import write_atomic
from illada.model import Transformer


def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = checkpoints_dir(out_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(out_dir) / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def save_training_checkpoint(
    out_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    training_state: dict,
    trainer_state: dict,
    model_config: ModelConfig,
    train_config: dict,
    tokenizer=None,
    keep: int = 2,
) -> Path:
    """Write a complete checkpoint for `step` (call on one process), then advance `latest` and prune old ones."""
    from illada.checkpoint import save_checkpoint

    root = checkpoints_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        with torch.device("meta"):
            module = Transformer(model_config)
        # assign=True adopts the tensors of the full state dict: no second copy of the weights.
        state = dict(model_state)
        if model_config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        module.load_state_dict(state, strict=False, assign=True)
        if model_config.tie_word_embeddings:
            module.lm_head.weight = module.embed_tokens.weight
        model_dir = staging / "model"
        save_checkpoint(module, model_config, model_dir, tokenizer=tokenizer)
        for item in model_dir.iterdir():
            item.rename(staging / item.name)
        model_dir.rmdir()
        torch.save(training_state, staging / "training_state.pt")
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        (staging / "train_config.json").write_text(json.dumps(train_config, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_atomic(root / "latest", final.name)
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model state with our parameter names, training state (optimizer, RNG), trainer state) of a checkpoint."""
    from illada.checkpoint import load_checkpoint

    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise IlladaError(f"{path} is not a training checkpoint (no trainer_state.json)")
    model, _ = load_checkpoint(path, device="cpu")
    model_state = model.state_dict()
    training_state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return model_state, training_state, trainer_state
