"""Tokenise text and chat corpora into token shards (see `illada.data.shards` for the format).

Streaming: inputs are read record by record (JSONL) or in bounded chunks (plain text), tokenised in batches, and
appended to the open shard file, so memory stays bounded whatever the corpus size.

Documents:
- plain text (any suffix but .jsonl/.ndjson/.json): a whole file is one document, followed by one EOS. It is read
  in chunks of `chunk_bytes` to 2 * `chunk_bytes`, each cut after a lone line break (between two non-space bytes),
  failing that before a lone space: byte-level BPE pre-tokenisers (GPT-2 and Llama-3 regexes) always split there,
  so chunking does not change the tokens (unless 2 * `chunk_bytes` of text hold neither; then the cut is at a
  UTF-8 character boundary).
- JSONL: one document per line, taken from `text_field`.
- chat JSONL (SFT): `{"messages": [{"role", "content"}, ...]}` whose last message is the assistant's response, or
  `{"prompt", "response"}`, or a plain `{"prompt", "completion"}` pair of strings used as written (no template).
  Otherwise the prompt (all messages before the response) is rendered with the chat template and
  `add_generation_prompt=True`; prompt and response are tokenised separately (as at generation time, when the
  prompt is tokenised alone) and the response gets one EOS. "variable" writes prompt + response + EOS into one
  packed stream; "pairs" keeps (prompt, response) apart for LLaDA SFT.

Resume: the state file records, at every closed shard, the position (input, byte offset, line) right after the
last record in it. A rerun of the same command deletes what came after and continues from there; since shards
close at the first record boundary at or past `shard_tokens`, the output is identical to an uninterrupted run.

Bad records (invalid UTF-8 or JSON, missing or mistyped fields, empty messages, template errors, a literal mask
token) are reported as `file:line: reason`, counted in the manifest's "skipped", and skipped. A mask token inside
plain text is removed from the chunk instead (the document goes on).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from illada.data.shards import MANIFEST, STATE, ShardWriter, token_dtype
from illada.files import read_json_object, write_json_atomic
from illada.errors import IlladaError

if TYPE_CHECKING:
    from illada.tokenizer import Tokenizer

DEFAULT_SHARD_TOKENS = 1 << 25     # ~33M tokens (64 MiB as uint16) per shard: at most this much work redone on resume
DEFAULT_CHUNK_BYTES = 1 << 16      # plain text is tokenised 64-128 KiB at a time (HF Encodings take ~100x the text)
DEFAULT_BATCH_SIZE = 256           # records per encode_batch call ...
DEFAULT_BATCH_BYTES = 1 << 20      # ... or fewer, to keep a batch under ~1 MiB of text (~100 MB of HF Encodings)
MAX_LINE_BYTES = 1 << 26           # a JSONL record longer than 64 MiB is a bad record, not a memory blow-up
MAX_REPORTED = 20                  # bad records printed per run
MAX_LISTED = 1000                  # bad records listed in the manifest
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
TEXT_SUFFIXES = {".txt", ".text", ".md"}
FORMAT_VERSION = 1


class _BadRecord(Exception):
    """A record that cannot be used; its message is the reason shown to the user."""


@dataclass
class _Item:
    """One record read from an input, with the position right after it."""
    input_index: int
    offset: int                     # byte offset after this record
    line: int                       # lines consumed so far (JSONL: this record's 1-based line number)
    texts: tuple[str, ...] = ()     # pretrain: (text,); sft: (rendered prompt, response)
    end_doc: bool = True            # False for a plain-text chunk that is not the end of its file
    skip: str | None = None         # reason, when the record is bad
    end_of_input: bool = False      # a marker after the last record of an input (moves the position on)
    chunk: bool = False             # a piece of a plain-text document rather than a whole record


# --------------------------------------------------------------------------------------------- tokenizer + inputs

def load_tokenizer(spec: "Tokenizer | str | Path") -> tuple["Tokenizer", str]:
    """A tokenizer and the name the manifest records: 'bytes' for the byte-level one, else a directory path (a model
    name or hub id is resolved to its directory, see illada.sources)."""
    from illada.tokenizer import Tokenizer, byte_level_tokenizer

    if isinstance(spec, Tokenizer):
        return spec, str(getattr(spec, "name_or_path", None) or getattr(spec, "path", None) or "in-memory")
    if str(spec) == "bytes":
        return byte_level_tokenizer(), "bytes"
    from illada.sources import resolve_model_dir

    # a tokenizer directory, a checkpoint or run directory, a bundled model name or a Hugging Face hub id
    path = resolve_model_dir(spec, "tokenizer; or pass 'bytes' for the byte-level tokenizer")
    if not path.is_dir():
        raise IlladaError(f"tokenizer {str(spec)!r} is not a directory (or pass 'bytes' for the byte-level tokenizer)")
    return Tokenizer.from_dir(path), str(path.resolve())


def expand_inputs(inputs: Sequence[str | Path], suffixes: set[str]) -> list[Path]:
    """Input files in order; a directory contributes its files with a known suffix, sorted, recursively."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise IlladaError(f"input directory {str(path)!r} has no {'/'.join(sorted(suffixes))} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise IlladaError(f"input {str(path)!r} does not exist")
    if not files:
        raise IlladaError("no input files given")
    resolved = [p.resolve() for p in files]
    if len(set(resolved)) != len(resolved):
        dup = next(p for p in resolved if resolved.count(p) > 1)
        raise IlladaError(f"input {str(dup)!r} is given more than once")
    return resolved


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


# --------------------------------------------------------------------------------------------------- readers

def _utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of data that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead or ASCII byte
            need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if need <= back else len(data) - back
    return len(data)


_SPACE = frozenset(b" \t\r\n\x0b\x0c")


def _fallback_cut(data: bytes) -> int:
    """Where to cut a chunk that reached 2 * chunk_bytes without a good cut point past chunk_bytes.

    Preference: after the last lone line break (between two non-space bytes), else before the last lone space; both
    are pre-token boundaries of byte-level BPE (GPT-2 / Llama-3 regexes). Else at the last UTF-8 boundary.
    """
    for byte, after in ((b"\n", 1), (b" ", 0)):
        end = len(data) - 1
        while (pos := data.rfind(byte, 1, end)) > 0:
            if data[pos - 1] not in _SPACE and data[pos + 1] not in _SPACE:
                return pos + after
            end = pos
    return _utf8_prefix(data)


def _read_text(path: Path, index: int, offset: int, lines: int, chunk_bytes: int, size: int,
               warn: Callable[[str], None]) -> Iterator[_Item]:
    """A plain-text file as chunks of chunk_bytes to 2 * chunk_bytes bytes, the last one ending the document."""
    warned = False
    with open(path, "rb") as handle:
        handle.seek(offset)
        while offset < size:
            parts, n, clean_cut = [], 0, False
            while True:
                piece = handle.readline(min(chunk_bytes, 2 * chunk_bytes - n))
                if not piece:
                    clean_cut = True
                    break
                parts.append(piece)
                n += len(piece)
                if n >= chunk_bytes and piece.endswith(b"\n") and len(piece) >= 2 and piece[-2] not in _SPACE:
                    following = handle.peek(1)[:1]
                    if not following or following[0] not in _SPACE:
                        clean_cut = True
                        break
                if n >= 2 * chunk_bytes:  # no cut point at a line start: look back for another one
                    break
            data = b"".join(parts)
            if not data:
                break
            if not clean_cut:
                keep = _fallback_cut(data)
                if 0 < keep < len(data):
                    data = data[:keep]
                    handle.seek(offset + keep)
            offset += len(data)
            lines += data.count(b"\n")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("utf-8", errors="replace")
                if not warned:
                    warn(f"{path}: invalid UTF-8 bytes replaced with U+FFFD")
                    warned = True
            yield _Item(index, offset, lines, (text,), end_doc=offset >= size, chunk=True)


def _read_jsonl(path: Path, index: int, offset: int, lines: int,
                parse: Callable[[object], tuple[str, ...]]) -> Iterator[_Item]:
    """One item per non-blank line; bad lines become items with a skip reason."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            offset += len(raw)
            lines += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while True:  # drain the rest of the oversized line without holding it
                    more = handle.readline(1 << 20)
                    offset += len(more)
                    if not more or more.endswith(b"\n"):
                        break
                yield _Item(index, offset, lines, skip=f"record longer than {MAX_LINE_BYTES} bytes")
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
                if lines == 1:
                    text = text.lstrip("\ufeff")
                record = json.loads(text)
                yield _Item(index, offset, lines, _unicode_texts(parse(record)))
            except UnicodeDecodeError:
                yield _Item(index, offset, lines, skip="invalid UTF-8")
            except json.JSONDecodeError as error:
                yield _Item(index, offset, lines, skip=f"invalid JSON ({error.msg}, column {error.colno})")
            except RecursionError:
                yield _Item(index, offset, lines, skip="invalid JSON (nested too deeply)")
            except _BadRecord as error:
                yield _Item(index, offset, lines, skip=str(error))


def _unicode_texts(texts: tuple[str, ...]) -> tuple[str, ...]:
    """The texts of a record, which must be valid Unicode: JSON can spell a lone surrogate ("\\ud800") that no
    tokenizer can encode (a bad record, not the end of the run)."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise _BadRecord(f"not valid Unicode text (a lone surrogate U+{ord(text[error.start]):04X})") from None
    return texts


def _text_field_parser(field: str) -> Callable[[object], tuple[str, ...]]:
    def parse(record: object) -> tuple[str, ...]:
        if not isinstance(record, dict):
            raise _BadRecord(f"expected a JSON object with a {field!r} field")
        if field not in record:
            raise _BadRecord(f"missing field {field!r}")
        text = record[field]
        if not isinstance(text, str):
            raise _BadRecord(f"field {field!r} must be a string, got {type(text).__name__}")
        if not text:
            raise _BadRecord(f"field {field!r} is empty")
        return (text,)
    return parse


def split_chat(record: object) -> tuple[list[dict], str]:
    """(prompt messages, response text) of a chat record; raises _BadRecord with the reason."""
    if not isinstance(record, dict):
        raise _BadRecord("expected a JSON object with 'messages' or 'prompt' and 'response'")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise _BadRecord("'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _BadRecord(f"message {i} must be an object with 'role' and 'content'")
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise _BadRecord(f"message {i}: {key!r} must be a string")
        if messages[-1]["role"] != "assistant":
            raise _BadRecord("the last message must be the assistant's response")
        if len(messages) < 2:
            raise _BadRecord("no prompt before the assistant's response")
        prompt, response = messages[:-1], messages[-1]["content"]
    elif "prompt" in record or "response" in record:
        prompt_text, response = record.get("prompt"), record.get("response")
        if not isinstance(prompt_text, str) or not isinstance(response, str):
            raise _BadRecord("'prompt' and 'response' must both be strings")
        prompt = [{"role": "user", "content": prompt_text}]
    else:
        raise _BadRecord("expected 'messages' or 'prompt' and 'response'")
    if not response.strip():
        raise _BadRecord("empty response")
    return prompt, response


def split_completion(record: dict) -> tuple[str, str]:
    """(prompt, completion) of a prompt-completion record, used as written (no chat template, as in TRL)."""
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise _BadRecord("'prompt' and 'completion' must both be strings")
    if not completion.strip():
        raise _BadRecord("empty completion")
    return prompt, completion


def _chat_parser(tokenizer: "Tokenizer") -> Callable[[object], tuple[str, ...]]:
    def parse(record: object) -> tuple[str, ...]:
        if isinstance(record, dict) and "completion" in record:
            return split_completion(record)
        prompt, response = split_chat(record)
        try:
            rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # the template's own checks (e.g. no system role) make this record unusable
            raise _BadRecord(f"chat template failed: {error}") from error
        return rendered, response
    return parse


# ------------------------------------------------------------------------------------------------ the pipeline

@dataclass
class _Job:
    kind: str                       # "pretrain" | "sft"
    format: str                     # "packed" | "pairs"
    sft_format: str | None          # "variable" | "pairs" for sft
    files: list[Path]
    out_dir: Path
    tokenizer: "Tokenizer"
    tokenizer_name: str
    shard_tokens: int
    text_field: str
    chunk_bytes: int
    batch_size: int
    batch_bytes: int
    resume: bool
    progress: bool
    started: bool = False           # set once the output is this run's (after the resume checks)

    def settings(self) -> dict:
        """Everything that determines the output; a resumed run must match it exactly."""
        inputs = []
        for path in self.files:
            stat = path.stat()
            inputs.append({"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        return {"version": FORMAT_VERSION, "kind": self.kind, "format": self.format, "sft_format": self.sft_format,
                "tokenizer": self.tokenizer_name, "vocab_size": int(self.tokenizer.vocab_size),
                "eos_token_id": int(self.tokenizer.eos_token_id), "shard_tokens": self.shard_tokens,
                "text_field": self.text_field if self.kind == "pretrain" else None,
                "chunk_bytes": self.chunk_bytes if self.kind == "pretrain" else None, "inputs": inputs}


def _owned(path: Path) -> bool:
    """Files this module writes into an output directory (the only ones it ever deletes)."""
    name = path.name
    return (name in (MANIFEST, STATE) or (name.startswith("tokens-") and name.endswith(".bin"))
            or (name.startswith("index-") and name.endswith(".npy")) or ".tmp-" in name
            or name in ("tokenizer", ".tokenizer.tmp"))


def _clean(out_dir: Path, keep: set[str]) -> None:
    for path in out_dir.iterdir():
        if _owned(path) and path.name not in keep:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _initial_state(job: _Job, settings: dict) -> dict:
    """A fresh or resumed state; cleans the output directory of anything the state does not account for."""
    out = job.out_dir
    if out.exists() and not out.is_dir():
        raise IlladaError(f"output {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    foreign = [path.name for path in out.iterdir() if not _owned(path)]
    if foreign:  # never write into (and clean) a directory that holds someone else's files
        raise IlladaError(f"output directory {str(out)!r} holds other files ({foreign[0]!r}, ...); "
                          "choose a new or empty directory")
    fresh = {"settings": settings, "shards": [], "position": [0, 0, 0], "num_tokens": 0, "num_examples": 0,
             "skipped": 0, "skipped_records": []}
    if not job.resume:
        _clean(out, keep=set())
        return fresh
    if (out / MANIFEST).is_file():
        manifest = _read_own(out / MANIFEST)
        if manifest.get("settings") == settings:
            return {"complete": manifest}
        raise IlladaError(f"{out} already holds a dataset made with other settings or inputs; "
                          "pass --no-resume to replace it")
    if (out / STATE).is_file():
        state = _read_own(out / STATE)
        if state.get("settings") != settings:
            raise IlladaError(f"{out} holds an unfinished run with other settings or inputs; "
                              "rerun that command to finish it, or pass --no-resume to start over")
        _clean(out, keep={STATE, *(entry["file"] for entry in state["shards"]),
                          *(entry["index"] for entry in state["shards"] if "index" in entry)})
        return state
    _clean(out, keep=set())
    return fresh


def _read_own(path: Path) -> dict:
    """A manifest or state file of an earlier run; unreadable is one IlladaError with the way out."""
    try:
        return read_json_object(path)
    except IlladaError as error:
        raise IlladaError(f"{error}: the file is corrupt; pass --no-resume to start over") from None


def _new_dirs(path: Path) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first (what creating `path` adds)."""
    new = []
    while not path.exists() and not path.is_symlink() and path.parent != path:
        new.append(path)
        path = path.parent
    return new


def _committed_shards(out: Path) -> bool:
    """Whether the state file of `out` lists closed shards (work a rerun of the same command resumes from)."""
    if not (out / STATE).is_file():
        return False
    try:
        return bool(read_json_object(out / STATE).get("shards"))
    except IlladaError:
        return True  # unreadable: not ours to judge


def _discard_unfinished(job: _Job, created: list[Path]) -> None:
    """After a run refused its input (an IlladaError: the same command would fail the same way again), an output
    with nothing a rerun could reuse (no manifest, no committed shard) is removed, so the output is as it was
    (absent, or the directory it found), never a half-made dataset. An output the run refused (another run's,
    foreign files) is left alone."""
    out = job.out_dir
    if job.started and out.is_dir() and not (out / MANIFEST).exists() and not _committed_shards(out):
        _clean(out, keep=set())
    for path in created:  # the directories this run made, when nothing is left in them
        try:
            path.rmdir()
        except OSError:
            return


def _run(job: _Job) -> dict:
    created = _new_dirs(job.out_dir)
    try:
        return _run_job(job)
    except IlladaError:  # anything else (a crash, a full disk, Ctrl-C) keeps the state: a rerun continues it
        _discard_unfinished(job, created)
        raise


def _run_job(job: _Job) -> dict:
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    settings = job.settings()
    state = _initial_state(job, settings)
    job.started = True
    console = Console(stderr=True, highlight=False)
    if "complete" in state:
        console.print(f"{job.out_dir} is already complete", markup=False, soft_wrap=True)
        return state["complete"]
    write_json_atomic(job.out_dir / STATE, state)

    tokenizer, eos = job.tokenizer, int(job.tokenizer.eos_token_id)
    mask = getattr(tokenizer, "mask_token_id", None)
    writer = ShardWriter(job.out_dir, token_dtype(settings["vocab_size"]), settings["vocab_size"],
                         with_index=job.format == "pairs", next_shard=len(state["shards"]),
                         start_token=state["num_tokens"])
    sizes = [entry["bytes"] for entry in settings["inputs"]]
    counts = {"examples": state["num_examples"], "skipped": state["skipped"]}
    listed: list[dict] = list(state["skipped_records"])
    position = list(state["position"])
    reported = 0

    def say(message: str) -> None:
        bar.console.print(message, markup=False, soft_wrap=True)

    def items() -> Iterator[_Item]:
        first, offset, lines = position
        parse = (_chat_parser(tokenizer) if job.kind == "sft" else _text_field_parser(job.text_field))
        for i in range(first, len(job.files)):
            start, start_lines = (offset, lines) if i == first else (0, 0)
            path = job.files[i]
            try:
                if job.kind == "pretrain" and not _is_jsonl(path):
                    yield from _read_text(path, i, start, start_lines, job.chunk_bytes, sizes[i], say)
                else:
                    yield from _read_jsonl(path, i, start, start_lines, parse)
            except OSError as error:
                raise IlladaError(f"cannot read {path}: {error}") from error
            yield _Item(i, sizes[i], 0, end_of_input=True)

    def commit() -> None:
        entry = writer.close_shard()
        if entry is not None:
            state["shards"].append(entry)
        state.update(position=list(position), inputs=_input_progress(settings, position),
                     num_tokens=writer.total_tokens, num_examples=counts["examples"],
                     skipped=counts["skipped"], skipped_records=listed[:MAX_LISTED])
        write_json_atomic(job.out_dir / STATE, state)

    def process(batch: list[_Item]) -> None:
        nonlocal reported
        texts = [text for item in batch if item.skip is None for text in item.texts]  # markers have no texts
        encoded = tokenizer.encode_batch(texts) if texts else []
        k = 0
        for item in batch:
            if item.end_of_input:
                position[:] = [item.input_index + 1, 0, 0]
                continue
            reason, ids = item.skip, encoded[k:k + len(item.texts)]
            k += len(item.texts)
            if reason is None and mask is not None and any(mask in part for part in ids):
                # a literal mask token in the data would train the model to predict [MASK] as clean text:
                # skip the record, or drop the token from a chunk (skipping it would cut a document in two)
                name = tokenizer.id_to_token(mask)
                if item.chunk:
                    ids = [[t for t in ids[0] if t != mask]]
                    say(f"{job.files[item.input_index]}:{item.line}: removed the mask token {name} from the text")
                else:
                    reason = f"contains the mask token {name}"
            if reason is not None:  # a bad record
                counts["skipped"] += 1
                where = f"{job.files[item.input_index]}:{item.line}"
                if reported < MAX_REPORTED:
                    say(f"skipped {where}: {reason}")
                reported += 1
                if len(listed) < MAX_LISTED:
                    listed.append({"file": str(job.files[item.input_index]), "line": item.line, "reason": reason})
            else:
                if job.kind == "sft":
                    prompt_ids, response_ids = list(ids[0]), list(ids[1]) + [eos]
                    writer.append(prompt_ids + response_ids, prompt_len=len(prompt_ids))
                else:
                    writer.append(list(ids[0]) + ([eos] if item.end_doc else []))
                counts["examples"] += int(item.end_doc)
            position[:] = [item.input_index, item.offset, item.line]
            if writer.open_tokens >= job.shard_tokens:
                commit()

    bar = Progress(TextColumn("[bold]prepare"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[tokens]:,} tokens"),
                   console=console, disable=not job.progress)
    def done_bytes() -> int:
        return sum(sizes[:position[0]]) + (position[1] if position[0] < len(sizes) else 0)

    try:
        with bar:
            task = bar.add_task("prepare", total=sum(sizes), completed=done_bytes(), tokens=writer.total_tokens)
            batch: list[_Item] = []
            size = 0
            for item in items():
                batch.append(item)
                size += sum(len(text) for text in item.texts)
                if len(batch) >= job.batch_size or size >= job.batch_bytes:
                    process(batch)
                    batch, size = [], 0
                    bar.update(task, completed=done_bytes(), tokens=writer.total_tokens)
            process(batch)
            bar.update(task, completed=done_bytes(), tokens=writer.total_tokens)
    except BaseException as error:
        writer.discard()  # the open shard is redone on the next run, from the last committed position
        if isinstance(error, KeyboardInterrupt):
            say(f"stopped: {len(state['shards'])} shards are kept; rerun the same command to continue")
        raise
    commit()
    if counts["examples"] == 0:
        raise IlladaError(f"no usable {'documents' if job.kind == 'pretrain' else 'examples'} in the inputs "
                          f"({counts['skipped']} bad records skipped)")

    if job.tokenizer_name != "bytes":  # a copy makes the dataset self-describing; 'bytes' needs none
        tmp = job.out_dir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tokenizer.save(tmp)
        shutil.rmtree(job.out_dir / "tokenizer", ignore_errors=True)
        os.replace(tmp, job.out_dir / "tokenizer")
    manifest = {
        "format": job.format, "kind": job.kind, "sft_format": job.sft_format,
        "tokenizer": job.tokenizer_name, "tokenizer_dir": None if job.tokenizer_name == "bytes" else "tokenizer",
        "vocab_size": settings["vocab_size"], "dtype": token_dtype(settings["vocab_size"]),
        "eos_token_id": eos, "bos_token_id": _maybe_int(getattr(tokenizer, "bos_token_id", None)),
        "num_tokens": writer.total_tokens, "num_examples": counts["examples"], "shards": state["shards"],
        "source": [str(path) for path in job.files],
        "inputs": _input_progress(settings, position),
        "skipped": counts["skipped"], "skipped_records": listed[:MAX_LISTED], "settings": settings,
    }
    write_json_atomic(job.out_dir / MANIFEST, manifest)
    (job.out_dir / STATE).unlink(missing_ok=True)
    if counts["skipped"]:
        more = f" ({reported - MAX_REPORTED} not printed)" if reported > MAX_REPORTED else ""
        say(f"skipped {counts['skipped']} bad records{more}; they are listed in {job.out_dir / MANIFEST}")
    return manifest


def _input_progress(settings: dict, position: list[int]) -> list[dict]:
    """Per input: bytes and lines consumed up to `position` (the state's source of truth), and whether done."""
    first, offset, lines = position
    out = []
    for i, entry in enumerate(settings["inputs"]):
        done = i < first
        out.append({"path": entry["path"], "bytes": entry["bytes"], "done": done,
                    "offset": entry["bytes"] if done else offset if i == first else 0,
                    "lines": None if done else lines if i == first else 0})
    return out


def _maybe_int(value: object) -> int | None:
    return None if value is None else int(value)


def _check_common(shard_tokens: int, batch_size: int) -> None:
    if shard_tokens < 1:
        raise IlladaError(f"shard_tokens must be positive, got {shard_tokens}")
    if batch_size < 1:
        raise IlladaError(f"batch_size must be positive, got {batch_size}")


def prepare_pretrain(inputs: Sequence[str | Path], out_dir: str | Path, tokenizer: "Tokenizer | str | Path", *,
                     shard_tokens: int = DEFAULT_SHARD_TOKENS, text_field: str = "text", resume: bool = True,
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES, batch_size: int = DEFAULT_BATCH_SIZE,
                     progress: bool = True) -> dict:
    """Tokenise plain-text files and JSONL (`text_field`) into a "packed" dataset; returns its manifest."""
    _check_common(shard_tokens, batch_size)
    if chunk_bytes < 16:
        raise IlladaError(f"chunk_bytes must be at least 16, got {chunk_bytes}")
    files = expand_inputs(inputs, TEXT_SUFFIXES | JSONL_SUFFIXES)
    tok, name = load_tokenizer(tokenizer)
    return _run(_Job("pretrain", "packed", None, files, Path(out_dir), tok, name, shard_tokens, text_field,
                     chunk_bytes, batch_size, DEFAULT_BATCH_BYTES, resume, progress))


def prepare_sft(inputs: Sequence[str | Path], out_dir: str | Path, tokenizer: "Tokenizer | str | Path", *,
                format: str = "variable", shard_tokens: int = DEFAULT_SHARD_TOKENS, resume: bool = True,
                batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> dict:
    """Render chat JSONL with the chat template into a "packed" (format="variable", iLLaDA) or "pairs" (LLaDA)
    dataset; returns its manifest."""
    if format not in ("variable", "pairs"):
        raise IlladaError(f"unknown SFT format {format!r}; choose 'variable' or 'pairs'")
    _check_common(shard_tokens, batch_size)
    files = expand_inputs(inputs, JSONL_SUFFIXES)
    tok, name = load_tokenizer(tokenizer)
    return _run(_Job("sft", "packed" if format == "variable" else "pairs", format, files, Path(out_dir), tok, name,
                     shard_tokens, "text", DEFAULT_CHUNK_BYTES, batch_size, DEFAULT_BATCH_BYTES, resume, progress))
