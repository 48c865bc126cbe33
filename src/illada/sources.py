"""Where a model or tokenizer named by a user lives: one resolver for `--model`, `--init-from` and `--tokenizer`.

In order: an existing local path (a training run directory means its newest checkpoint); a bundled model name
(`illada.api.bundled_models()`); a Hugging Face hub id (`owner/name`, e.g. `GSAI-ML/LLaDA-8B-Instruct`), fetched
with `huggingface_hub.snapshot_download` into the Hugging Face cache when online and read from that cache offline
(no network, or `HF_HUB_OFFLINE=1`). huggingface_hub is the optional `hub` extra, imported only for a hub id.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from illada.errors import IlladaError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(name: str) -> bool:
    """`owner/name` that is not a local path (a local path wins: `runs/foo` that exists is a directory)."""
    return bool(HUB_ID.match(name)) and ".." not in name and not Path(name).expanduser().exists()


def newest_checkpoint(path: Path, what: str) -> Path:
    """A checkpoint directory as is; a training run directory (`checkpoints/` inside) as its newest checkpoint."""
    if not (path / "config.json").exists() and (path / "checkpoints").is_dir():
        from illada.training.checkpointing import latest_checkpoint

        latest = latest_checkpoint(path)
        if latest is None:
            raise IlladaError(f"{what} {path} is a training run without a finished checkpoint yet")
        return latest
    return path


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub places it ($HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub), read now rather than when huggingface_hub was first imported."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def from_hub(repo_id: str) -> Path:
    """The local snapshot of a hub model: downloaded (or brought up to date) online, the cached one offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise IlladaError(f"{repo_id!r} is a Hugging Face hub id; fetching it needs huggingface_hub: "
                          "pip install 'illada[hub]' (or pass a local checkpoint directory)") from None
    how = (f"download it while online (`hf download {repo_id}`, or any illada command with HF_HUB_OFFLINE unset) "
           "or pass a local checkpoint directory")
    cache = hub_cache_dir()
    if not hub_offline():
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache))
        except Exception as error:  # no network, a 404, a gated repo: fall back to the cache, else say why
            online_error = " ".join(str(error).split())[:200]
    else:
        online_error = None
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception:
        pass
    if online_error is None:
        raise IlladaError(f"{repo_id}: offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache {cache}; {how}")
    raise IlladaError(f"{repo_id}: cannot fetch it from the Hugging Face hub ({online_error}) and it is not in the "
                      f"cache {cache}; {how}")


def resolve_model_dir(name: str | Path, what: str = "model") -> Path:
    """The directory of a model (or of its tokenizer) named by a path, a run directory, a bundled name or a hub id."""
    from illada.api import bundled_models

    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        return newest_checkpoint(path, what)
    bundled = bundled_models()
    if text in bundled:
        return bundled[text]
    if is_hub_id(text):
        return from_hub(text)
    raise IlladaError(f"no model at {text!r} ({what}): not a directory, not a bundled model "
                      f"({', '.join(sorted(bundled))}) and not a Hugging Face hub id (owner/name)")
