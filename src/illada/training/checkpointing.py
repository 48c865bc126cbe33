"""Training checkpoints: one directory per save, written atomically, loadable by `illada.load` as a model too.

    out_dir/checkpoints/step-00000100/
        config.json, model.safetensors (iLLaDA layout), tokenizer files   <- a normal model checkpoint
          (a LoRA run instead: adapter_config.json, adapter_model.safetensors   <- a PEFT adapter, see illada.lora)
        training_state.pt     full (unsharded) optimizer state keyed by parameter name, RNG states
        trainer_state.json    step, tokens seen, RNG state, counters
        train_config.json     the resolved TrainConfig
    out_dir/checkpoints/latest   name of the newest complete checkpoint

Full (unsharded) state dicts make checkpoints independent of the world size and of DDP/FSDP.
`Checkpointer` is the training loop's checkpoint component: when to save and what a failed save says.
Nothing here deletes what it did not write: staging directories (`.step-N.*`, left by a kill during a save) are
removed on the next start; pruning removes only complete checkpoints older than the one just saved.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from illada.config import ModelConfig
from illada.errors import IlladaError
from illada.files import loads_strict, write_atomic
from illada.model import Transformer


def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


_STEP_DIR = re.compile(r"step-(\d+)")


def complete_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under out_dir/checkpoints, oldest first."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names, else the newest complete one on disk, else None.

    A `latest` naming a missing directory (deleted by hand, a copy that lost it) falls back to the newest complete
    checkpoint with a note, never to a fresh start over an existing run."""
    pointer = checkpoints_dir(out_dir) / "latest"
    complete = complete_checkpoints(out_dir)
    if pointer.is_file():
        named = checkpoints_dir(out_dir) / pointer.read_text(errors="replace").strip()
        if (named / "trainer_state.json").is_file():
            return named
        if complete:
            print(f"illada: {pointer} names {named.name}, which is missing or incomplete; using the newest complete "
                  f"checkpoint on disk, {complete[-1][1].name}", file=sys.stderr)
    return complete[-1][1] if complete else None


def clean_staging(out_dir: str | Path) -> list[Path]:
    """Delete the staging directories a killed save left behind (`.step-N.<random>`); returns them."""
    root = checkpoints_dir(out_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and re.fullmatch(r"\.step-\d+\..+", path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


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
    adapter=None,
) -> Path:
    """Write a complete checkpoint for `step` (call on one process), then advance `latest` and prune old ones.

    adapter: the PeftModel of a LoRA run; `model_state` then holds its adapters only, written in PEFT's format."""
    root = checkpoints_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        if adapter is not None:
            from illada.lora import save_adapter

            save_adapter(adapter, staging, model_state)
        else:
            _write_model(staging, model_state, model_config, tokenizer)
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
    # only older checkpoints of this run's past: a newer step-N (another timeline, or one resumed around because it
    # was corrupt) is never ours to delete
    older = [path for s, path in complete_checkpoints(out_dir) if s < step]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_model(staging: Path, model_state: dict[str, torch.Tensor], model_config: ModelConfig, tokenizer) -> None:
    """The model of a checkpoint: a normal model checkpoint's files, in `staging`."""
    from illada.checkpoint import save_checkpoint

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


def load_training_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model state with our parameter names (a LoRA run's: its adapters, with PEFT's keys), training state
    (optimizer, RNG), trainer state) of a checkpoint.

    Any unreadable part (truncated or garbage files) raises `CorruptCheckpoint` naming the file."""
    from illada.checkpoint import load_checkpoint

    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise IlladaError(f"{path} is not a training checkpoint (no trainer_state.json)")
    try:
        trainer_state = loads_strict((path / "trainer_state.json").read_text(encoding="utf-8"))
        step = trainer_state.get("step") if isinstance(trainer_state, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError("no integer 'step'")
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptCheckpoint(path, f"trainer_state.json: {error}") from None
    except RecursionError:
        raise CorruptCheckpoint(path, "trainer_state.json: nested too deeply") from None
    try:
        if (path / "adapter_config.json").is_file():  # a LoRA run's: its adapters, under PEFT's keys
            from safetensors.torch import load_file

            model_state = load_file(path / "adapter_model.safetensors")
        else:
            model, _ = load_checkpoint(path, device="cpu")
            model_state = model.state_dict()
    except (IlladaError, OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise CorruptCheckpoint(path, f"weights: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    try:
        training_state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        if not isinstance(training_state, dict) or "optimizer" not in training_state:
            raise ValueError("no optimizer state")
    except Exception as error:  # torch raises a zoo of types for a truncated zip (RuntimeError, EOFError, ...)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CorruptCheckpoint(path, f"training_state.pt: {message}") from None
    return model_state, training_state, trainer_state


class CorruptCheckpoint(IlladaError):
    """A training checkpoint with an unreadable file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"checkpoint {path} is unreadable ({reason})")
        self.path, self.reason = path, reason


def newest_intact(out_dir: str | Path, below: int | None = None) -> Path | None:
    """The newest complete checkpoint (with a step below `below`) whose files all load; None if there is none."""
    for step, path in reversed(complete_checkpoints(out_dir)):
        if below is not None and step >= below:
            continue
        try:
            load_training_checkpoint(path)
        except IlladaError:
            continue
        return path
    return None


class Checkpointer:
    """When a training loop saves, and what a failed save says (torchtitan's CheckpointManager; the state to save
    is the trainer's): after every `save_every` steps, at `end` (the last step of this call) and when a stop was
    agreed. `save(step, *state)` writes the checkpoint (through `save_training_checkpoint`: atomic, pruned) and
    returns its path, or None on ranks that do not write. `last` is the run's newest checkpoint: the resumed one,
    then each one saved."""

    def __init__(self, save: Callable[..., Path | None], save_every: int, end: int, last: Path | None = None) -> None:
        self._save, self.save_every, self.end, self.last = save, save_every, end, last

    def should_save(self, step: int, stop: bool = False) -> bool:
        return step % self.save_every == 0 or step == self.end or stop

    def maybe_save(self, step: int, *state, stop: bool = False) -> bool:
        """Save after step `step` (1-based) when it is due; whether it was. A write that fails for lack of space,
        quota or permission is one IlladaError naming the intact previous checkpoint."""
        if not self.should_save(step, stop):
            return False
        try:
            self.last = self._save(step, *state) or self.last
        except (OSError, IlladaError, RuntimeError) as error:
            # disk full, quota, permissions (as OSError, as the weights writer's IlladaError, or as torch.save's
            # RuntimeError): the previous checkpoint is untouched
            if isinstance(error, RuntimeError) and "writ" not in str(error):
                raise
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
            raise IlladaError(f"could not save the checkpoint of step {step} ({reason}); the last checkpoint, "
                              f"{self.last or 'none'}, is intact: free space and rerun to resume from it") from None
        return True
