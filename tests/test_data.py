"""`illada prepare` and the shard readers: token streams are checked against encode() applied by hand."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from illada.data import prepare as prep
from illada.data.prepare import prepare_pretrain, prepare_sft
from illada.data.shards import PackedTokens, PairExamples, ShardWriter, open_dataset, token_dtype
from illada.files import write_json_atomic
from illada.errors import IlladaError
from illada.tokenizer import byte_level_tokenizer

DOC_A = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\n  The slings\n"
DOC_C = "Ünïcödé — ελληνικά — 日本語 ✓\n" * 5 + "a line without a newline at the end"
JSONL_DOCS = ["first json document", "second one\nwith two lines", "ß"]


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def naive_stream(out: Path) -> np.ndarray:
    """All shard files of a dataset concatenated, read without the reader classes."""
    manifest = json.loads((out / "manifest.json").read_text())
    dtype = {"uint16": "<u2", "uint32": "<u4"}[manifest["dtype"]]
    parts = [np.fromfile(out / entry["file"], dtype=dtype) for entry in manifest["shards"]]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def write_jsonl(path: Path, lines: list) -> Path:
    """Objects are dumped as JSON; str/bytes lines are written verbatim (for broken records)."""
    with open(path, "wb") as handle:
        for line in lines:
            if isinstance(line, bytes):
                handle.write(line + b"\n")
            elif isinstance(line, str):
                handle.write(line.encode("utf-8") + b"\n")
            else:
                handle.write(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
    return path


@pytest.fixture()
def corpus(tmp_path):
    """Two plain-text files around a JSONL file, and the expected packed stream computed by hand."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(DOC_A, encoding="utf-8")
    write_jsonl(src / "b.jsonl", [{"text": t, "id": i} for i, t in enumerate(JSONL_DOCS)])
    (src / "c.txt").write_text(DOC_C, encoding="utf-8")
    return [src / "a.txt", src / "b.jsonl", src / "c.txt"], [DOC_A, *JSONL_DOCS, DOC_C]


def expected_packed(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for doc in docs:
        out += list(tok.encode(doc)) + [tok.eos_token_id]
    return out


# ------------------------------------------------------------------------------------------------ pre-training

def test_packed_stream_is_encode_plus_eos_per_document(tmp_path, tok, corpus):
    files, docs = corpus
    out = tmp_path / "out"
    manifest = prepare_pretrain(files, out, "bytes", shard_tokens=37, chunk_bytes=32, progress=False)
    want = expected_packed(tok, docs)
    assert naive_stream(out).tolist() == want
    data = open_dataset(out)
    assert isinstance(data, PackedTokens)
    assert data.num_tokens == len(want) == manifest["num_tokens"]
    assert data.read(0, len(want)).tolist() == want
    assert data.eos_token_id == tok.eos_token_id
    assert manifest["num_examples"] == len(docs) and manifest["skipped"] == 0
    assert manifest["format"] == "packed" and manifest["dtype"] == "uint16" and manifest["tokenizer"] == "bytes"
    assert manifest["source"] == [str(f.resolve()) for f in files]
    # shards close at the first record boundary at or past shard_tokens
    sizes = [entry["tokens"] for entry in manifest["shards"]]
    assert len(sizes) > 3 and all(size >= 37 for size in sizes[:-1]) and sum(sizes) == len(want)
    assert not (out / "progress.json").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(e["file"] for e in manifest["shards"])])


def test_plain_text_chunks_do_not_change_tokens(tmp_path, tok):
    # multi-byte characters, blank lines, indented lines and a 300-byte line with no break: tiny chunks must
    # still reproduce the whole-file encoding (a split inside a UTF-8 character would show up as U+FFFD)
    text = ("héllo wörld\n\n   indented\n" * 7) + "日本語" * 100 + "\nend"
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    manifest = prepare_pretrain([path], out, "bytes", chunk_bytes=16, shard_tokens=50, progress=False)
    assert naive_stream(out).tolist() == list(tok.encode(text)) + [tok.eos_token_id]
    assert manifest["num_examples"] == 1


def test_chunk_cuts_do_not_change_bpe_tokens(tmp_path):
    # with merges (unlike the byte tokenizer) a cut in the wrong place would change the tokens
    from illada.tokenizer import train_tokenizer

    text = ("The quick brown fox.\n\n  Indented line here\n\tTabbed the the\nThe end, the end!\n" * 30
            + "Ωμέγα the quick 日本語 fox\n" * 10)
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    bpe = train_tokenizer([path], 400, tmp_path / "bpe", show_progress=False)
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) // 2  # the merges are really used
    prepare_pretrain([path], tmp_path / "out", bpe, chunk_bytes=24, shard_tokens=40, progress=False)
    assert naive_stream(tmp_path / "out").tolist() == bpe.encode(text) + [bpe.eos_token_id]


def test_chunk_cut_points(tmp_path):
    # cuts land after a line break followed by a non-space byte, or inside an over-long line at a UTF-8 boundary
    text = "aaaa\n  bbbb\ncccc\n" + "é" * 40 + "\nz"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    size = path.stat().st_size
    chunks = [item.texts[0] for item in prep._read_text(path, 0, 0, 0, 8, size, print)]
    assert "".join(chunks) == text
    assert chunks[0] == "aaaa\n  bbbb\n"  # not cut before "  bbbb": the next byte there is a space
    assert all("\ufffd" not in c for c in chunks)
    assert all(len(c.encode("utf-8")) <= 16 for c in chunks)


def test_reads_span_shard_boundaries(tmp_path, corpus):
    files, _ = corpus
    out = tmp_path / "out"
    prepare_pretrain(files, out, "bytes", shard_tokens=10, progress=False)
    naive = naive_stream(out)
    data = PackedTokens(out)
    n = data.num_tokens
    rng = np.random.default_rng(0)
    spans = [(0, n), (0, 0), (n, 0), (n - 1, 1), (9, 3), (5, 40)] + [
        (int(s), int(rng.integers(0, n - s + 1))) for s in rng.integers(0, n, size=200)]
    for start, length in spans:
        got = data.read(start, length)
        assert got.dtype == np.int64 and got.tolist() == naive[start:start + length].tolist()
    for start, length in [(-1, 2), (n - 1, 2), (0, n + 1), (n + 1, 0)]:
        with pytest.raises(IlladaError):
            data.read(start, length)


def test_dtype_follows_vocab_size(tmp_path, tok, monkeypatch):
    assert token_dtype(256) == token_dtype(65536) == "uint16"
    assert token_dtype(65537) == token_dtype(200_000) == "uint32"
    doc = tmp_path / "d.txt"
    doc.write_text("abc", encoding="utf-8")
    small = prepare_pretrain([doc], tmp_path / "small", "bytes", progress=False)
    assert small["dtype"] == "uint16"
    assert (tmp_path / "small" / small["shards"][0]["file"]).stat().st_size == 2 * small["num_tokens"]
    monkeypatch.setattr(type(tok), "vocab_size", property(lambda self: 70_000))
    big = prepare_pretrain([doc], tmp_path / "big", tok, progress=False)
    assert big["dtype"] == "uint32" and big["vocab_size"] == 70_000
    assert (tmp_path / "big" / big["shards"][0]["file"]).stat().st_size == 4 * big["num_tokens"]
    assert naive_stream(tmp_path / "big").tolist() == list(tok.encode("abc")) + [tok.eos_token_id]


def test_uint32_ids_round_trip(tmp_path):
    ids = [69_999, 65_536, 0, 65_535, 3]
    writer = ShardWriter(tmp_path, "uint32", 70_000, with_index=False)
    writer.append(ids[:2])
    first = writer.close_shard()
    writer.append(ids[2:])
    second = writer.close_shard()
    assert (tmp_path / first["file"]).read_bytes() == np.asarray(ids[:2], dtype="<u4").tobytes()
    write_json_atomic(tmp_path / "manifest.json", {"format": "packed", "dtype": "uint32", "eos_token_id": 3,
                                                   "num_tokens": 5, "shards": [first, second]})
    assert PackedTokens(tmp_path).read(0, 5).tolist() == ids
    with pytest.raises(IlladaError, match="outside its vocabulary"):
        ShardWriter(tmp_path, "uint16", 256, with_index=False).append([256])


# ---------------------------------------------------------------------------------------------------------- SFT

CHATS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]},
    {"prompt": "Name a colour.", "response": "Blue, like the sea."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Say bye"}, {"role": "assistant", "content": "<think>easy</think>Bye."}]},
]


def hand_pairs(tok) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for chat in CHATS:
        if "messages" in chat:
            prompt_messages, response = chat["messages"][:-1], chat["messages"][-1]["content"]
        else:
            prompt_messages, response = [{"role": "user", "content": chat["prompt"]}], chat["response"]
        prompt = tok.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
        assert prompt_messages[-1]["content"] in prompt and response not in prompt
        pairs.append((list(tok.encode(prompt)), list(tok.encode(response)) + [tok.eos_token_id]))
    return pairs


def test_sft_variable_is_prompt_response_eos_stream(tmp_path, tok):
    src = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    manifest = prepare_sft([src], tmp_path / "out", "bytes", format="variable", shard_tokens=40, progress=False)
    want = [t for prompt, response in hand_pairs(tok) for t in prompt + response]
    assert naive_stream(tmp_path / "out").tolist() == want
    assert manifest["format"] == "packed" and manifest["kind"] == "sft" and manifest["sft_format"] == "variable"
    assert manifest["num_examples"] == len(CHATS)
    assert PackedTokens(tmp_path / "out").read(0, len(want)).tolist() == want


def test_sft_prompt_completion_records_are_used_as_written(tmp_path, tok):
    records = [{"prompt": "Question: 2+2?\nAnswer:", "completion": " 4"}, CHATS[0],
               {"prompt": "x", "completion": "  "}]  # the last is empty: skipped
    src = write_jsonl(tmp_path / "pc.jsonl", records)
    manifest = prepare_sft([src], tmp_path / "out", "bytes", format="variable", progress=False)
    raw = list(tok.encode("Question: 2+2?\nAnswer:")) + list(tok.encode(" 4")) + [tok.eos_token_id]
    assert "<|" not in tok.decode(raw[:-1])  # no template tokens around a plain prompt
    assert naive_stream(tmp_path / "out").tolist() == raw + [t for p, r in hand_pairs(tok)[:1] for t in p + r]
    assert manifest["num_examples"] == 2 and manifest["skipped"] == 1


def test_sft_pairs_keep_prompt_and_response_apart(tmp_path, tok):
    src = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    manifest = prepare_sft([src], tmp_path / "out", "bytes", format="pairs", shard_tokens=40, progress=False)
    pairs = hand_pairs(tok)
    data = open_dataset(tmp_path / "out")
    assert isinstance(data, PairExamples) and manifest["format"] == "pairs"
    assert len(data) == len(pairs) == manifest["num_examples"]
    for i, (prompt, response) in enumerate(pairs):
        got_prompt, got_response = data[i]
        assert got_prompt.dtype == got_response.dtype == np.int64
        assert got_prompt.tolist() == prompt and got_response.tolist() == response
        assert got_response.tolist().count(tok.eos_token_id) == 1 and got_response[-1] == tok.eos_token_id
    assert [p.tolist() for p in data[-1]] == [pairs[-1][0], pairs[-1][1]]
    with pytest.raises(IndexError):
        data[len(pairs)]
    # the index rows by hand: (global start, prompt_len, total_len)
    index = np.concatenate([np.load(tmp_path / "out" / e["index"]) for e in manifest["shards"]])
    starts = np.cumsum([0] + [len(p) + len(r) for p, r in pairs])[:-1]
    assert index.tolist() == [[int(s), len(p), len(p) + len(r)] for s, (p, r) in zip(starts, pairs)]


# ---------------------------------------------------------------------------------------------------- bad records

def test_bad_pretrain_records_are_skipped_and_reported(tmp_path, tok, capsys):
    src = write_jsonl(tmp_path / "mixed.jsonl", [
        {"text": "good one"},             # 1
        "{not json",                      # 2
        {"body": "no text field"},        # 3
        "",                               # 4 blank: ignored, not a record
        {"text": 5},                      # 5
        [1, 2, 3],                        # 6
        b'{"text": "\xff\xfe"}',          # 7 invalid UTF-8
        {"text": ""},                     # 8
        {"text": "a <|mdm_mask|> inside"},  # 9 the mask token must never be clean training data
        {"text": "good two"},             # 10
    ])
    manifest = prepare_pretrain([src], tmp_path / "out", "bytes", progress=False)
    assert naive_stream(tmp_path / "out").tolist() == expected_packed(tok, ["good one", "good two"])
    bad_lines = [2, 3, 5, 6, 7, 8, 9]
    assert manifest["skipped"] == len(bad_lines) and manifest["num_examples"] == 2
    assert [r["line"] for r in manifest["skipped_records"]] == bad_lines
    err = capsys.readouterr().err
    for line in bad_lines:
        assert f"{src.resolve()}:{line}:" in err
    assert f"{src.resolve()}:4:" not in err and "missing field 'text'" in err and "invalid JSON" in err
    assert "mask token" in err


def test_mask_token_is_removed_from_plain_text(tmp_path, tok):
    path = tmp_path / "doc.txt"
    path.write_text("before <|mdm_mask|> after\n", encoding="utf-8")
    prepare_pretrain([path], tmp_path / "out", "bytes", progress=False)
    want = [t for t in tok.encode("before <|mdm_mask|> after\n") if t != tok.mask_token_id] + [tok.eos_token_id]
    assert tok.mask_token_id not in want and naive_stream(tmp_path / "out").tolist() == want


def test_bad_chat_records_are_skipped_and_reported(tmp_path, tok, capsys):
    good = CHATS[0]
    src = write_jsonl(tmp_path / "chat.jsonl", [
        good,                                                                     # 1
        {"messages": []},                                                         # 2
        {"messages": [{"role": "user", "content": "only a question"}]},           # 3
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},  # 4
        {"prompt": "no response"},                                                # 5
        {"messages": "not a list"},                                               # 6
        {"prompt": "q", "response": "   "},                                       # 7
        {"messages": [{"role": "assistant", "content": "answer without prompt"}]},  # 8
        "[1,",                                                                    # 9
        CHATS[1],                                                                 # 10
    ])
    manifest = prepare_sft([src], tmp_path / "out", "bytes", format="pairs", progress=False)
    assert manifest["skipped"] == 8 and manifest["num_examples"] == 2
    assert [r["line"] for r in manifest["skipped_records"]] == list(range(2, 10))
    data = PairExamples(tmp_path / "out")
    pairs = hand_pairs(tok)
    assert [data[0][0].tolist(), data[1][1].tolist()] == [pairs[0][0], pairs[1][1]]
    err = capsys.readouterr().err
    assert all(f"{src.resolve()}:{line}:" in err for line in range(2, 10))
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["{", {"messages": []}])
    with pytest.raises(IlladaError, match="no usable examples"):
        prepare_sft([only_bad], tmp_path / "empty", "bytes", progress=False)


# -------------------------------------------------------------------------------------------------------- resume

class Crash(Exception):
    pass


def crash_after(monkeypatch, tok, calls: int | None) -> dict:
    """Make tok.encode_batch raise on call number `calls` + 1, as if the process died there; count the calls."""
    real = type(tok).encode_batch
    count = {"n": 0}

    def encode_batch(self, texts):
        count["n"] += 1
        if calls is not None and count["n"] > calls:
            raise Crash("simulated crash")
        return real(self, texts)

    monkeypatch.setattr(type(tok), "encode_batch", encode_batch)
    return count


def same_dataset(a: Path, b: Path) -> None:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*"))
    for name in names:
        if (a / name).is_file():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("when", [0.0, 0.5, 0.95])
def test_pretrain_resume_after_crash_is_identical(tmp_path, tok, corpus, monkeypatch, when):
    files, _ = corpus
    opts = dict(shard_tokens=23, chunk_bytes=32, batch_size=2, progress=False)
    with monkeypatch.context() as patch:
        total = crash_after(patch, tok, None)
        prepare_pretrain(files, tmp_path / "once", tok, **opts)
    out = tmp_path / "twice"
    with monkeypatch.context() as patch:
        crash_after(patch, tok, int(when * total["n"]))
        with pytest.raises(Crash):
            prepare_pretrain(files, out, tok, **opts)
    assert (out / "progress.json").exists() and not (out / "manifest.json").exists()
    with pytest.raises(IlladaError, match="unfinished"):
        open_dataset(out)
    state = json.loads((out / "progress.json").read_text())
    assert bool(state["shards"]) == (when > 0)  # a crash before the first closed shard, and after some
    # leftovers of a hard kill: a half-written temp shard and a shard never recorded in the state
    (out / ".tokens-00042.bin.tmp-1").write_bytes(b"junk")
    (out / f"tokens-{len(state['shards']):05d}.bin").write_bytes(b"junk")
    prepare_pretrain(files, out, tok, **opts)
    same_dataset(tmp_path / "once", out)


@pytest.mark.parametrize("fmt", ["variable", "pairs"])
def test_sft_resume_after_crash_is_identical(tmp_path, tok, monkeypatch, fmt):
    lines = (CHATS + ["{bad"]) * 4
    src = write_jsonl(tmp_path / "chat.jsonl", lines)
    opts = dict(format=fmt, shard_tokens=60, batch_size=2, progress=False)
    prepare_sft([src], tmp_path / "once", tok, **opts)
    with monkeypatch.context() as patch:
        crash_after(patch, tok, 5)
        with pytest.raises(Crash):
            prepare_sft([src], tmp_path / "twice", tok, **opts)
    assert json.loads((tmp_path / "twice" / "progress.json").read_text())["shards"]
    manifest = prepare_sft([src], tmp_path / "twice", tok, **opts)
    same_dataset(tmp_path / "once", tmp_path / "twice")
    assert manifest["skipped"] == 4 and manifest["num_examples"] == 12


def test_rerun_of_complete_dataset_and_changed_settings(tmp_path, corpus):
    files, _ = corpus
    out = tmp_path / "out"
    first = prepare_pretrain(files, out, "bytes", shard_tokens=30, progress=False)
    assert prepare_pretrain(files, out, "bytes", shard_tokens=30, progress=False) == first
    with pytest.raises(IlladaError, match="no-resume"):
        prepare_pretrain(files, out, "bytes", shard_tokens=31, progress=False)
    again = prepare_pretrain(files[:1], out, "bytes", shard_tokens=31, resume=False, progress=False)
    assert again["num_examples"] == 1 and len(list(out.glob("tokens-*.bin"))) == len(again["shards"])


# ------------------------------------------------------------------------------------------------ errors and CLI

def test_open_dataset_errors(tmp_path, corpus):
    with pytest.raises(IlladaError, match="does not exist"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(IlladaError, match="not a dataset directory"):
        open_dataset(tmp_path)
    files, _ = corpus
    out = tmp_path / "out"
    manifest = prepare_pretrain(files, out, "bytes", shard_tokens=30, progress=False)
    with pytest.raises(IlladaError, match="expected 'pairs'"):
        PairExamples(out)
    shard = out / manifest["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(IlladaError, match="truncated"):
        open_dataset(out)


def test_output_directory_with_foreign_files_is_refused(tmp_path, corpus):
    files, _ = corpus
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(IlladaError, match="holds other files"):
        prepare_pretrain(files, tmp_path, "bytes", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli(tmp_path, tok, corpus, capsys):
    from illada.__main__ import main

    files, docs = corpus
    out = tmp_path / "out"
    assert main(["prepare", *map(str, files), "--tokenizer", "bytes", "--out", str(out), "--shard-tokens", "50",
                 "--quiet"]) == 0
    assert PackedTokens(out).read(0, PackedTokens(out).num_tokens).tolist() == expected_packed(tok, docs)
    chat = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    assert main(["prepare", str(chat), "--kind", "sft", "--sft-format", "pairs", "--tokenizer", "bytes",
                 "--out", str(tmp_path / "sft"), "--quiet"]) == 0
    assert len(open_dataset(tmp_path / "sft")) == len(CHATS)
    capsys.readouterr()
    bad = [
        ["prepare", str(tmp_path / "nope.txt"), "--tokenizer", "bytes", "--out", str(tmp_path / "x")],
        ["prepare", str(files[0]), "--tokenizer", str(tmp_path / "no-tokenizer"), "--out", str(tmp_path / "x")],
        ["prepare", str(files[0]), "--tokenizer", "bytes", "--out", str(tmp_path / "x"), "--shard-tokens", "0"],
        ["prepare", str(files[0]), "--tokenizer", "bytes", "--out", str(files[0])],
    ]
    for argv in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("illada: error: ") and "Traceback" not in err
