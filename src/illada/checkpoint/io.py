"""Checkpoint directories: load either published layout, save the iLLaDA layout, convert one into the other.

A checkpoint directory holds config.json, the weights (`model.safetensors`, or shards listed in
`model.safetensors.index.json`; `pytorch_model.bin` is read with `weights_only=True` only) and tokenizer files.

Loading never holds the weights twice: every file's header is checked against the config first (names, shapes,
dtypes: one error listing all problems, before any weight is read), then the model is built on the `meta` device
and adopts each tensor as it is read. On CPU in the checkpoint's own dtype the parameters are copy-on-write
memory maps of the files (pages are read on first use; replacing the files in place while a model is loaded is
unsafe, which the atomic `save_checkpoint` never does). A quantised load (`quantize=`) reads safetensors files with
plain file reads instead, a block of rows at a time, so no shard page ever counts in the process's resident memory
and only the quantised weights stay (`illada.quantize`). Saving writes into a temporary directory next to the
target and renames it into place, so a failure never leaves a partial checkpoint.
"""
from __future__ import annotations

import itertools
import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from illada.checkpoint.adapter import ADAPTERS, config_from_hf, config_to_hf, detect_layout, name_list
from illada.config import ModelConfig
from illada.errors import IlladaError
from illada.files import loads_strict, read_json_object
from illada.model import Transformer
from illada.runtime import resolve_device, resolve_dtype

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# Copied verbatim by convert_checkpoint (plus any *.jinja chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
DEFAULT_SHARD_BYTES = 2**30

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_FLOAT_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: where it is, its on-disk and our name, and its header shape and dtype."""

    file: Path
    key: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # a string for dtypes we cannot load (integers, fp8, ...)

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


@dataclass
class ConversionReport:
    """What `convert_checkpoint` did."""

    source_layout: str
    config: ModelConfig
    dtype: torch.dtype
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0


# --------------------------------------------------------------------------------------------------- reading


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise IlladaError(f"no checkpoint at {path} (the path does not exist)")
    if not path.is_dir():
        raise IlladaError(f"{path} is not a checkpoint directory")
    if not (path / CONFIG_NAME).is_file():
        raise IlladaError(f"{path} is not a checkpoint directory: config.json not found")
    return path


def _index_files(index: Path) -> list[Path]:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise IlladaError(f"{index}: no weight_map")
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise IlladaError(f"{index.parent}: shards listed in {index.name} are missing: {name_list(missing)}")
    return files


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in the order to read them."""
    if (path / SAFE_INDEX).is_file():
        return _index_files(path / SAFE_INDEX)
    if (path / SAFE_WEIGHTS).is_file():
        return [path / SAFE_WEIGHTS]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if (path / BIN_INDEX).is_file():
        return _index_files(path / BIN_INDEX)
    if (path / BIN_WEIGHTS).is_file():
        return [path / BIN_WEIGHTS]
    raise IlladaError(f"{path}: no weights found (expected {SAFE_WEIGHTS}, {SAFE_INDEX} with shards, or {BIN_WEIGHTS})")


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (torch's pickle refusals run to several lines of advice)."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, restricted to tensors (`weights_only=True`: nothing else is ever unpickled)."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False, i.e. running whatever the file contains: never relay that
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" (it needs {found.group(1)})" if found else ""
        raise IlladaError(f"{file}: cannot load as a tensor-only state dict: refused, the pickle holds objects "
                          f"other than tensors{what} (convert it to safetensors where it came from)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise IlladaError(f"{file}: cannot load as a tensor-only state dict ({_first_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise IlladaError(f"{file}: not a state dict of tensors")
    return state


def _dims(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise ValueError(f"{what} must be a list of non-negative integers, got {value!r}"[:200])
    return tuple(value)


def _read_header(file: Path) -> list[tuple[str, tuple[int, ...], torch.dtype | str]]:
    """(key, shape, dtype) of every tensor in a weight file, without reading the data (safetensors)."""
    if file.suffix != ".safetensors":
        return [(k, tuple(v.shape), v.dtype) for k, v in _torch_load(file).items()]
    return [(key, shape, dtype) for key, shape, dtype, _ in _safetensors_header(file)]


def _safetensors_header(file: Path) -> list[tuple[str, tuple[int, ...], torch.dtype | str, int]]:
    """(key, shape, dtype, offset of the data in the file) of every tensor in a safetensors file."""
    # The safetensors header is an 8-byte little-endian length and a JSON object; checking the byte ranges
    # here means a truncated or corrupt file is reported before any weight is read (and before a header length
    # such as 2**62 could make us allocate it).
    try:
        size = file.stat().st_size
        if size < 8:
            raise ValueError(f"{size} bytes: too short for a header")
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= size - 8:
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = loads_strict(handle.read(length).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        out = []
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
                raise ValueError(f"tensor {key} lacks dtype, shape or data_offsets")
            shape, code = _dims(info["shape"], f"tensor {key} shape"), info["dtype"]
            if not isinstance(code, str):
                raise ValueError(f"tensor {key} dtype must be a string, got {code!r}")
            offsets = _dims(info["data_offsets"], f"tensor {key} data_offsets")
            if len(offsets) != 2:
                raise ValueError(f"tensor {key} data_offsets must be [start, end]")
            start, end = offsets
            dtype = _SAFETENSORS_DTYPES.get(code, code)
            numel = 1
            for dim in shape:
                numel *= dim
            if not 0 <= start <= end <= size - 8 - length or (
                    isinstance(dtype, torch.dtype) and end - start != numel * dtype.itemsize):
                raise ValueError(f"tensor {key} has a bad byte range")
            out.append((key, shape, dtype, 8 + length + start))
        return out
    except (OSError, ValueError, TypeError, RecursionError) as error:  # JSONDecodeError, UnicodeError: ValueErrors
        reason = error.strerror if isinstance(error, OSError) and error.strerror else _first_line(error)
        raise IlladaError(f"{file}: not a readable safetensors file ({reason})") from None


@contextmanager
def _open_weights(file: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """A getter key -> tensor for one file; its memory maps are released when the last tensor read is freed."""
    if file.suffix != ".safetensors":
        state = _torch_load(file)
        yield state.__getitem__
        return
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        yield handle.get_tensor


class _RowReader:
    """Row ranges of the tensors of one weight file, each read into fresh memory.

    A safetensors file is read with plain file reads, not memory-mapped: the pages of a map count in the process's
    resident memory for as long as the map lives (and the file's reader keeps it alive), a read's only in the page
    cache. Other files are read whole (`torch.load`, memory-mapped) and sliced."""

    def __init__(self, file: Path):
        self.file = file
        if file.suffix == ".safetensors":
            self.offsets = {key: offset for key, _, _, offset in _safetensors_header(file)}
            self.handle = open(file, "rb", buffering=0)
        else:
            self.state, self.handle = _torch_load(file), None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.state = None

    def rows(self, entry: TensorEntry) -> Callable[[int, int], torch.Tensor]:
        """(start, stop) -> those rows (first-dimension entries) of `entry`, in its stored dtype."""
        if self.handle is None:
            tensor = self.state[entry.key]
            return lambda start, stop: tensor[start:stop]
        inner = entry.shape[1:]
        row_bytes = entry.dtype.itemsize * (entry.numel // entry.shape[0] if entry.shape and entry.shape[0] else 1)
        base = self.offsets[entry.key]

        def read(start: int, stop: int) -> torch.Tensor:
            out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
            view, done = memoryview(out.numpy()), 0
            self.handle.seek(base + start * row_bytes)
            while done < len(view):
                n = self.handle.readinto(view[done:])
                if not n:
                    raise IlladaError(f"{self.file}: ends inside tensor {entry.key} (truncated while loading?)")
                done += n
            return out.view(entry.dtype).view(stop - start, *inner) if entry.shape else out.view(entry.dtype)[0]

        return read


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names -> shapes for a config (a tied head is not listed: it is the embedding)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def inspect_checkpoint(path: str | Path) -> tuple[ModelConfig, str, list[TensorEntry]]:
    """(config, layout, tensors to load) of a checkpoint directory, checked against its config.json.

    Only headers are read. Unknown, duplicate, missing, misshapen and non-float tensors are reported together
    in one IlladaError.
    """
    path = _checkpoint_dir(path)
    raw = read_json_object(path / CONFIG_NAME)
    headers = [(file, key, shape, dtype) for file in weight_files(path) for key, shape, dtype in _read_header(file)]
    layout = detect_layout(key for _, key, _, _ in headers)
    adapter = ADAPTERS[layout]
    has_head = any(adapter.from_hf_name(key) == "lm_head.weight" for _, key, _, _ in headers)
    try:
        config = config_from_hf(raw, has_lm_head=has_head)
    except IlladaError as error:
        raise IlladaError(f"{path}: {error}") from error
    expected = expected_shapes(config)

    entries: dict[str, TensorEntry] = {}
    unknown, duplicate, misshapen, bad_dtype = [], [], [], []
    for file, key, shape, dtype in headers:
        name = adapter.from_hf_name(key)
        if name is None:
            if not adapter.is_ignored(key):
                unknown.append(key)
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            # A tied head is the embedding: a stored copy is not read, only its shape is checked.
            if shape != expected["embed_tokens.weight"]:
                misshapen.append(f"{key} {_shape(shape)} (expected {_shape(expected['embed_tokens.weight'])})")
            continue
        if name not in expected:
            unknown.append(key)
            continue
        if name in entries:
            duplicate.append(key)
            continue
        if shape != expected[name]:
            misshapen.append(f"{key} {_shape(shape)} (expected {_shape(expected[name])})")
        if dtype not in _FLOAT_DTYPES:
            bad_dtype.append(f"{key} {dtype}")
        entries[name] = TensorEntry(file, key, name, shape, dtype)
    missing = [adapter.to_hf_name(name) for name in expected if name not in entries]

    problems = [f"{label} ({len(items)}): {name_list(items)}" for label, items in (
        ("missing tensors", missing), ("unexpected tensors", unknown), ("wrong shapes", misshapen),
        ("duplicate tensors", duplicate), ("non-float tensors", bad_dtype)) if items]
    if problems:
        raise IlladaError(f"{path}: weights do not match config.json ({layout} layout): {'; '.join(problems)}")
    return config, layout, list(entries.values())


def load_config(path: str | Path) -> ModelConfig:
    """The model config of a checkpoint directory (headers are checked; no weight is read)."""
    return inspect_checkpoint(path)[0]


def _stored_dtype(entries: list[TensorEntry]) -> torch.dtype:
    """The checkpoint's dtype: the one holding most parameters (norms are sometimes kept in float32)."""
    counts: dict[torch.dtype, int] = {}
    for entry in entries:
        counts[entry.dtype] = counts.get(entry.dtype, 0) + entry.numel
    return max(counts, key=counts.get)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter `name` by `tensor` without copying it."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=old.requires_grad))


def _load_quantized(model: Transformer, entries: list[TensorEntry], device: torch.device, dtype: torch.dtype,
                    mode: str) -> None:
    """Fill the meta `model` from `entries`, each Linear and the embedding quantised a block of rows at a time as
    it is read (`illada.quantize`), everything else cast to `dtype`."""
    from illada import quantize as quant

    linears = {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    for file, group in itertools.groupby(entries, key=lambda e: e.file):
        reader = _RowReader(file)
        try:
            for entry in group:
                read = reader.rows(entry)
                if entry.name == "embed_tokens.weight":
                    quant.load_embedding(model, read, mode, dtype, device)
                elif entry.name in linears:
                    quant.load_linear(linears[entry.name], read, mode, dtype, device)
                else:
                    rows = entry.shape[0] if entry.shape else 1
                    _assign(model, entry.name, read(0, rows).to(device=device, dtype=dtype))
                quant.release_freed_memory()
        finally:
            reader.close()


def load_checkpoint(path: str | Path, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None,
                    quantize: str | None = None) -> tuple[Transformer, ModelConfig]:
    """Load a checkpoint directory (iLLaDA or LLaDA layout) into our model.

    device: None means CPU. dtype: None keeps the checkpoint's dtype; every tensor is cast to one dtype.
    quantize: "int8" or "int4" quantises each Linear (and the embedding) with torchao as its weight is read
    (`illada.quantize`; the `quant` extra); `dtype` is then the compute dtype.
    """
    config, _, entries = inspect_checkpoint(path)
    device = torch.device("cpu") if device is None else resolve_device(device)
    dtype = resolve_dtype(dtype) or _stored_dtype(entries)
    if quantize is not None:
        from illada import quantize as quant

        quant.check_mode(quantize, device, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    try:
        if quantize is not None:
            _load_quantized(model, entries, device, dtype, quantize)
        else:
            for file, group in itertools.groupby(entries, key=lambda e: e.file):
                with _open_weights(file) as get:
                    for entry in group:
                        # A no-op on CPU in the stored dtype: the parameter is then a view of the memory map.
                        _assign(model, entry.name, get(entry.key).to(device=device, dtype=dtype))
    except torch.cuda.OutOfMemoryError as error:
        size = sum(e.numel for e in entries) * dtype.itemsize / 2**30
        raise IlladaError(f"out of memory on {device} loading {path} ({size:.1f} GiB of {dtype} weights)") from error
    if config.tie_word_embeddings and quantize is None:
        model.lm_head.weight = model.embed_tokens.weight
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:  # cannot happen after inspect_checkpoint; kept so a bug never yields a half-loaded model
        raise IlladaError(f"{path}: parameters not loaded: {name_list(left)}")
    return model, config


# --------------------------------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What an illada checkpoint directory may hold (weights, config, tokenizer, and what export and training put beside
# them): the only kind of directory a save or convert replaces.
_CHECKPOINT_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "README.md", "train_config.json", "metrics.jsonl", "loss.png",
                     "trainer_state.json", "training_state.pt", "LICENSE"}


def is_replaceable_checkpoint(path: Path) -> bool:
    """True for an empty directory or an illada checkpoint (config.json + safetensors, only checkpoint files)."""
    entries = list(path.iterdir())
    if not entries:
        return True
    names = {e.name for e in entries}
    if any(e.is_dir() and not e.is_symlink() for e in entries) or "config.json" not in names:
        return False
    if not any(n.endswith(".safetensors") for n in names):
        return False
    return all(n in _CHECKPOINT_FILES or n.endswith((".safetensors", ".safetensors.index.json", ".jinja"))
               for n in names)


@contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh directory next to `path`; on success it replaces `path`, on any error it is deleted.

    An existing `path` is replaced only if it is an illada checkpoint (or empty): never a directory of other files."""
    if path.exists() and not path.is_dir():
        raise IlladaError(f"cannot write a checkpoint to {path}: it exists and is not a directory")
    if path.is_dir() and not is_replaceable_checkpoint(path):
        raise IlladaError(f"{path} is not an illada checkpoint directory (it holds other files); refusing to replace "
                          "it: remove it yourself or choose another destination")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
        yield staging
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        try:
            staging.rename(path)
        except BaseException:
            if old is not None:
                old.rename(path)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class _PendingTensor:
    key: str  # on-disk name
    nbytes: int
    fetch: Callable[[], torch.Tensor]  # produces the CPU tensor to write, in the output dtype


def _write_weights(directory: Path, tensors: list[_PendingTensor], max_shard_bytes: int,
                   after_shard: Callable[[int], None] | None = None) -> list[str]:
    """Write safetensors shards of at most max_shard_bytes (a bigger tensor gets a shard of its own) and, when
    there are several, the index. Only one shard's tensors are materialised at a time. Returns the file names."""
    shards: list[list[_PendingTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    n = len(shards)
    names = [SAFE_WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        data = {t.key: t.fetch() for t in shard}
        save_file(data, str(directory / name), metadata={"format": "pt"})
        # safetensors creates the file owner-only; a checkpoint is shared like any file (the umask decides)
        os.chmod(directory / name, 0o666 & ~_umask())
        del data
        weight_map.update({t.key: name for t in shard})
        if after_shard is not None:
            after_shard(sum(t.nbytes for t in shard))
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(directory / SAFE_INDEX, index)
    return names


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _model_state(model: nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's tensors by our names (wrapper prefixes stripped; a tied head left out), checked against config."""
    state = {}
    for name, tensor in model.state_dict().items():
        for prefix in ("_orig_mod.", "module."):  # torch.compile / DDP wrappers
            name = name.removeprefix(prefix)
        state[name] = tensor
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in state]
    unknown = [n for n in state if n not in expected]
    misshapen = [f"{n} {_shape(tuple(t.shape))} (expected {_shape(expected[n])})"
                 for n, t in state.items() if n in expected and tuple(t.shape) != expected[n]]
    problems = [f"{label}: {name_list(items)}" for label, items in (
        ("missing", missing), ("unexpected", unknown), ("wrong shapes", misshapen)) if items]
    if problems:
        raise IlladaError(f"model does not match its config: {'; '.join(problems)}")
    return state


def _write_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return _first_line(error)


def _check_shard_bytes(max_shard_bytes: int) -> None:
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0:
        raise IlladaError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")


def save_checkpoint(model: nn.Module, config: ModelConfig, path: str | Path, tokenizer=None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` as an iLLaDA-layout checkpoint directory at `path` (atomically; an existing one is replaced).

    dtype: None keeps each tensor's dtype. tokenizer: anything with `.save(directory)` (illada.tokenizer.Tokenizer).
    """
    _check_shard_bytes(max_shard_bytes)
    path = Path(path).expanduser()
    dtype = resolve_dtype(dtype)
    state = _model_state(model, config)
    adapter = ADAPTERS["illada"]
    pending = []
    for name, tensor in state.items():
        out_dtype = dtype or tensor.dtype
        pending.append(_PendingTensor(
            adapter.to_hf_name(name), tensor.numel() * out_dtype.itemsize,
            lambda t=tensor, d=out_dtype: t.detach().to(device="cpu", dtype=d).contiguous()))
    config_dtype = dtype or state["embed_tokens.weight"].dtype
    try:
        with _atomic_dir(path) as staging:
            _write_weights(staging, pending, max_shard_bytes)
            _write_json(staging / CONFIG_NAME, config_to_hf(config, config_dtype))
            if tokenizer is not None:
                tokenizer.save(staging)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        raise IlladaError(f"cannot write the checkpoint {path}: {_write_error(error)}") from None
    return path


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       progress: Callable[[int, int], None] | None = None) -> ConversionReport:
    """Rewrite a checkpoint (LLaDA or iLLaDA layout) in the iLLaDA layout at `dst`, replacing it atomically.

    Tensors are streamed one shard at a time (the model is never built); tokenizer files are copied verbatim.
    dtype: None keeps the checkpoint's dtype. progress(bytes_done, bytes_total) is called after each shard.
    """
    _check_shard_bytes(max_shard_bytes)
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    config, layout, entries = inspect_checkpoint(src)
    if dst.resolve() == src.resolve():
        raise IlladaError(f"convert: source and destination are the same directory ({src})")
    if src.resolve().is_relative_to(dst.resolve()):
        raise IlladaError(f"convert: {dst} contains the source {src}; replacing it would delete the source "
                          "(choose a destination outside it)")
    out_dtype = resolve_dtype(dtype) or _stored_dtype(entries)
    order = {name: i for i, name in enumerate(expected_shapes(config))}
    entries.sort(key=lambda e: order[e.name])
    adapter = ADAPTERS["illada"]

    readers: dict[Path, Callable[[str], torch.Tensor]] = {}
    handles = []

    def read(entry: TensorEntry) -> torch.Tensor:
        if entry.file not in readers:
            context = _open_weights(entry.file)
            readers[entry.file] = context.__enter__()
            handles.append(context)
        return readers[entry.file](entry.key).to(dtype=out_dtype).contiguous()

    def close_readers() -> None:  # drop the memory maps of the shard just written
        for context in handles:
            context.__exit__(None, None, None)
        handles.clear()
        readers.clear()

    total = sum(e.numel for e in entries) * out_dtype.itemsize
    done = 0

    def after_shard(nbytes: int) -> None:
        nonlocal done
        close_readers()
        done += nbytes
        if progress is not None:
            progress(done, total)

    pending = [_PendingTensor(adapter.to_hf_name(e.name), e.numel * out_dtype.itemsize, lambda e=e: read(e))
               for e in entries]
    try:
        with _atomic_dir(dst) as staging:
            files = _write_weights(staging, pending, max_shard_bytes, after_shard)
            _write_json(staging / CONFIG_NAME, config_to_hf(config, out_dtype))
            extras = [src / name for name in TOKENIZER_FILES] + sorted(src.glob("*.jinja"))
            for file in extras:
                if file.is_file():
                    shutil.copy2(file, staging / file.name)
    except (OSError, SafetensorError) as error:
        raise IlladaError(f"cannot write the checkpoint {dst}: {_write_error(error)}") from None
    finally:
        close_readers()
    return ConversionReport(source_layout=layout, config=config, dtype=out_dtype, files=files, total_bytes=total)
