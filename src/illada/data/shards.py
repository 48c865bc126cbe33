"""The on-disk token dataset written by `illada prepare`: a manifest plus raw little-endian token shards.

Layout of a dataset directory:

    manifest.json        written last, only when the dataset is complete
    tokens-00000.bin     raw little-endian uint16 (vocab <= 65536) or uint32 token ids, readable with numpy.memmap
    index-00000.npy      "pairs" only: int64 rows (start, prompt_len, total_len); start is a global token offset
    tokenizer/           a copy of the tokenizer the ids come from (none for the built-in "bytes" tokenizer)

Formats:
- "packed": one token stream, documents (or rendered chat examples) each followed by EOS. Shards are cut at
  record boundaries, but readers treat the shards as one stream.
- "pairs": LLaDA SFT examples; example i is tokens[start : start + total_len], its first prompt_len tokens are the
  prompt and the rest the response, which ends with one EOS.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from illada.errors import IlladaError
from illada.files import fsync_dir as _fsync_dir

MANIFEST = "manifest.json"
STATE = "progress.json"  # an unfinished `illada prepare` run; removed when the manifest is written
FORMATS = ("packed", "pairs")


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype name that holds every id below vocab_size."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _np_dtype(name: str) -> np.dtype:
    if name not in ("uint16", "uint32"):
        raise IlladaError(f"unsupported token dtype {name!r} in manifest (expected uint16 or uint32)")
    return np.dtype(name).newbyteorder("<")


def shard_name(index: int) -> str:
    return f"tokens-{index:05d}.bin"


def index_name(index: int) -> str:
    return f"index-{index:05d}.npy"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class ShardWriter:
    """Appends token ids to numbered shard files; a shard appears under its final name only once closed.

    The open shard is streamed to a hidden temp file, so memory holds at most one record plus, for "pairs",
    the open shard's index rows.
    """

    def __init__(self, directory: Path, dtype: str, vocab_size: int, with_index: bool,
                 next_shard: int = 0, start_token: int = 0) -> None:
        self.directory, self.with_index = Path(directory), with_index
        self.dtype, self.vocab_size = _np_dtype(dtype), vocab_size
        self.next_shard, self.total_tokens = next_shard, start_token  # total_tokens includes the open shard
        self.open_tokens = 0
        self._rows: list[tuple[int, int, int]] = []
        self._handle = None
        self._tmp: Path | None = None

    def append(self, ids: list[int] | np.ndarray, prompt_len: int | None = None) -> None:
        """Append one record (a document, a chunk of one, or an example with its prompt length for "pairs")."""
        array = np.asarray(ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise IlladaError(f"tokenizer produced id {int(array.max())} outside its vocabulary of {self.vocab_size}")
        if self._handle is None:
            self._tmp = _tmp_path(self.directory / shard_name(self.next_shard))
            self._handle = open(self._tmp, "wb")
        self._handle.write(array.astype(self.dtype).tobytes())
        if self.with_index:
            self._rows.append((self.total_tokens, int(prompt_len or 0), int(array.size)))
        self.open_tokens += int(array.size)
        self.total_tokens += int(array.size)

    def close_shard(self) -> dict | None:
        """Finish the open shard (fsync + rename, index first) and return its manifest entry; None if empty."""
        if self._handle is None:
            return None
        handle, self._handle = self._handle, None
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        entry: dict[str, Any] = {"file": shard_name(self.next_shard), "tokens": self.open_tokens}
        if self.with_index:
            rows = np.asarray(self._rows, dtype=np.int64).reshape(-1, 3)
            index_path = self.directory / index_name(self.next_shard)
            tmp_index = _tmp_path(index_path)
            with open(tmp_index, "wb") as out:
                np.save(out, rows)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_index, index_path)
            entry.update(index=index_name(self.next_shard), examples=len(rows))
        os.replace(self._tmp, self.directory / entry["file"])
        _fsync_dir(self.directory)
        self.next_shard += 1
        self.open_tokens, self._rows, self._tmp = 0, [], None
        return entry

    def discard(self) -> None:
        """Drop the open shard (after an error); the next run redoes it from the last committed state."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a complete dataset directory, with a clear error for anything else."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IlladaError(f"dataset directory {str(directory)!r} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        if (directory / STATE).is_file():
            raise IlladaError(f"{directory} holds an unfinished `illada prepare` run: "
                              "rerun the same command to finish it")
        raise IlladaError(f"{directory} is not a dataset directory (no {MANIFEST}); create one with `illada prepare`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IlladaError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        raise IlladaError(f"{path}: 'format' must be one of {', '.join(FORMATS)}")
    for key in ("dtype", "eos_token_id", "num_tokens", "shards"):
        if key not in manifest:
            raise IlladaError(f"{path}: missing key {key!r}")
    return manifest


class _TokenStream:
    """The shards of one dataset seen as one token array; shard files are memory-mapped on first use."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory = directory
        self.dtype = _np_dtype(manifest["dtype"])
        self.files = [entry["file"] for entry in manifest["shards"]]
        sizes = np.asarray([int(entry["tokens"]) for entry in manifest["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        if self.num_tokens != int(manifest["num_tokens"]):
            raise IlladaError(f"{directory}: shard sizes add up to {self.num_tokens} tokens, "
                              f"manifest says {manifest['num_tokens']}")
        for name, size in zip(self.files, sizes):
            path = directory / name
            expected = int(size) * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise IlladaError(f"shard {path} is missing or truncated (expected {expected} bytes)")
        self._maps: dict[int, np.memmap] = {}

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            size = int(self.starts[i + 1] - self.starts[i])
            self._maps[i] = np.memmap(self.directory / self.files[i], dtype=self.dtype, mode="r", shape=(size,))
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IlladaError(f"token range [{start}, {start + length}) outside the dataset's {self.num_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            # skip empty shards; copy the overlap of [start + done, start + length) with this shard
            lo = start + done - int(self.starts[shard])
            take = min(length - done, int(self.starts[shard + 1]) - (start + done))
            if take > 0:
                out[done:done + take] = self._shard(shard)[lo:lo + take]
                done += take
            shard += 1
        return out

    def __getstate__(self) -> dict:  # pickling (e.g. into DataLoader workers) must not copy mapped data
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


class PackedTokens:
    """A "packed" dataset: one token stream with an EOS after each document; read any span as int64."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.manifest = read_manifest(directory)
        if self.manifest["format"] != "packed":
            raise IlladaError(f"{directory} holds {self.manifest['format']!r} data, expected 'packed'")
        self._stream = _TokenStream(directory, self.manifest)
        self.num_tokens = self._stream.num_tokens
        self.eos_token_id = int(self.manifest["eos_token_id"])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as a fresh int64 array (spans shard boundaries)."""
        return self._stream.read(int(start), int(length))

    def __len__(self) -> int:
        return self.num_tokens


class PairExamples:
    """A "pairs" dataset: example i is (prompt_ids, response_ids), the response ending with one EOS."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.manifest = read_manifest(directory)
        if self.manifest["format"] != "pairs":
            raise IlladaError(f"{directory} holds {self.manifest['format']!r} data, expected 'pairs'")
        self._stream = _TokenStream(directory, self.manifest)
        self.num_tokens = self._stream.num_tokens
        self.eos_token_id = int(self.manifest["eos_token_id"])
        parts = []
        for entry in self.manifest["shards"]:
            path = directory / entry.get("index", "")
            try:
                rows = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise IlladaError(f"index file {path} is missing or unreadable: {error}") from error
            if rows.ndim != 2 or rows.shape[1] != 3:
                raise IlladaError(f"index file {path} has shape {rows.shape}, expected (n, 3)")
            parts.append(rows.astype(np.int64, copy=False))
        self.index = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.index)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for {n} examples")
        start, prompt_len, total_len = (int(v) for v in self.index[i])
        ids = self._stream.read(start, total_len)
        return ids[:prompt_len].copy(), ids[prompt_len:].copy()


def open_dataset(directory: str | Path) -> PackedTokens | PairExamples:
    """Open a dataset directory written by `illada prepare`, by the format its manifest names."""
    manifest = read_manifest(directory)
    return PackedTokens(directory) if manifest["format"] == "packed" else PairExamples(directory)
