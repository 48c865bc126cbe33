"""Tokenizer: byte-level round trips, fixed special ids, chat templates, save/load, mask-id resolution, CLI."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from illada.errors import IlladaError
from illada.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    Tokenizer,
    byte_level_tokenizer,
    bytes_to_unicode,
    train_tokenizer,
)

FIXED_IDS = {"<|pad|>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "<|mdm_mask|>": 3, "<|start_header_id|>": 4,
             "<|end_header_id|>": 5, "<|eot_id|>": 6, "<think>": 7, "</think>": 8}


def _random_unicode(seed: int, length: int) -> str:
    """Random code points from the whole Unicode range (no surrogates, which UTF-8 cannot encode)."""
    rng = random.Random(seed)
    chars = []
    while len(chars) < length:
        cp = rng.choice([rng.randrange(1, 0x80), rng.randrange(0x80, 0x3000), rng.randrange(0x3000, 0x110000)])
        if not 0xD800 <= cp <= 0xDFFF:
            chars.append(chr(cp))
    return "".join(chars)


SAMPLES = [
    "",
    "Hello, world!",
    " leading and trailing spaces  ",
    "\n\n\t  tabs\tand\r\nnewlines\n   \n",
    "naïve café — 日本語のテキスト 🙂👍🏽 e\u0301 שלום Ελληνικά 👨‍👩‍👧",
    "nul\x00byte and \x7f del and \u00a0nbsp",
    "def f(x):\n    return x ** 2  # comment\n",
    _random_unicode(0, 300),
    _random_unicode(1, 300),
]

CORPUS = "\n".join([
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Masked diffusion language models unmask tokens in parallel, most confident first.",
    "Ünïcödé téxt: café, naïve, façade, 日本語, 中文字符, 😀 🙂 👍.",
    "    indented code:\n\tdef add(a, b):\n\t\treturn a + b\n",
    "Numbers 12345 67890 3.14159 and punctuation !?;:,.()[]{}",
] * 30)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Tokenizer, Path]:
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = root / "tok"
    return train_tokenizer([corpus], vocab_size=400, out_dir=out, min_frequency=2, show_progress=False), out


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return byte_level_tokenizer()


def _write_dir(path: Path, backend: tokenizers.Tokenizer, tokenizer_config: dict | None = None,
               config: dict | None = None, special_map: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    for name, data in (("tokenizer_config.json", tokenizer_config), ("config.json", config),
                       ("special_tokens_map.json", special_map)):
        if data is not None:
            (path / name).write_text(json.dumps(data))
    return path


def _word_level(tokens: list[str]) -> tokenizers.Tokenizer:
    """A word-level tokenizer whose ids are the positions in `tokens` (no special tokens declared)."""
    backend = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return backend


# ------------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_byte_level(byte_level, text):
    ids = byte_level.encode(text)
    assert byte_level.decode(ids) == text
    # no merges: one token per UTF-8 byte, byte b at id 9 + b
    assert ids == [len(FIXED_IDS) + b for b in text.encode("utf-8")]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_trained(trained, text):
    tokenizer, _ = trained
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_trained_vocabulary(trained):
    tokenizer, _ = trained
    assert len(FIXED_IDS) + 256 < tokenizer.vocab_size <= 400
    for char in pre_tokenizers.ByteLevel.alphabet():  # every byte is in the vocabulary, seen in the corpus or not
        assert tokenizer.token_to_id(char) is not None
    # the merges learned something: the corpus takes well under one token per byte
    assert len(tokenizer.encode(CORPUS)) < len(CORPUS.encode("utf-8")) / 2


def test_byte_alphabet_matches_tokenizers():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert all(not c.isspace() and c.isprintable() for c in table.values())


def test_encode_batch_and_bos(trained, byte_level):
    for tokenizer in (trained[0], byte_level):
        texts = SAMPLES[1:5]
        assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
        assert tokenizer.encode("hi", add_special_tokens=True) == [1] + tokenizer.encode("hi")
    with pytest.raises(IlladaError):
        byte_level.encode(123)


# -------------------------------------------------------------------------------------------- special tokens

def test_special_token_ids(trained, byte_level):
    assert SPECIAL_TOKENS == FIXED_IDS
    for tokenizer in (trained[0], byte_level):
        assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id,
                tokenizer.eot_token_id) == (0, 1, 2, 3, 6)
        assert tokenizer.special_tokens == {"bos": 1, "eos": 2, "pad": 0, "mask": 3, "start_header": 4,
                                            "end_header": 5, "eot": 6, "think": 7, "end_think": 8}
        for name, token_id in FIXED_IDS.items():
            assert tokenizer.token_to_id(name) == token_id
            assert tokenizer.id_to_token(token_id) == name
            assert tokenizer.encode(name) == [token_id]
            inside = tokenizer.encode(f"a{name}b")
            assert inside == tokenizer.encode("a") + [token_id] + tokenizer.encode("b")


def test_decode_skip_special(byte_level):
    ids = byte_level.encode("<|startoftext|>hi<|eot_id|><|endoftext|>")
    assert byte_level.decode(ids) == "<|startoftext|>hi<|eot_id|><|endoftext|>"
    assert byte_level.decode(ids, skip_special_tokens=True) == "hi"
    # reasoning markers are part of the answer text
    assert byte_level.decode(byte_level.encode("<think>x</think>y"), skip_special_tokens=True) == "<think>x</think>y"
    # ids past the vocabulary (a padded embedding) are dropped, not an error
    assert byte_level.decode([9 + ord("a"), 100_000, 9 + ord("b")]) == "ab"


# --------------------------------------------------------------------------------------------- chat templates

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]
EXPECTED_CHAT = ("<|startoftext|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_default_chat_template(trained, byte_level):
    for tokenizer in (trained[0], byte_level):
        assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
        assert tokenizer.apply_chat_template(CONVERSATION) == EXPECTED_CHAT
        without = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False)
        assert without == EXPECTED_CHAT[: -len("<|start_header_id|>assistant<|end_header_id|>\n\n")]
        ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)
        assert ids == tokenizer.encode(EXPECTED_CHAT)
        suffix = [4] + tokenizer.encode("assistant") + [5] + tokenizer.encode("\n\n")
        assert ids[:2] == [1, 4] and ids[-len(suffix):] == suffix and ids.count(6) == 3
        # our template supports a system turn as-is
        system = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, CONVERSATION[0]])
        assert system == ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                          "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n")


NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _with_template(tmp_path: Path, template: str, **config) -> Tokenizer:
    _write_dir(tmp_path / "t", byte_level_tokenizer().backend, {"chat_template": template, **config})
    return Tokenizer.from_dir(tmp_path / "t")


def test_system_merged_when_template_rejects_it(tmp_path):
    tokenizer = _with_template(tmp_path, NO_SYSTEM_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert tokenizer.apply_chat_template(messages) == (
        "<|user|>\nBe brief.\n\nHi\n<|assistant|>\nHello\n<|user|>\nBye\n<|assistant|>\n")
    # a system turn alone becomes a user turn
    assert tokenizer.apply_chat_template(messages[:1], add_generation_prompt=False) == "<|user|>\nBe brief.\n"
    # the caller's list is left alone
    assert messages[1]["content"] == "Hi"


def test_template_errors(tmp_path):
    tokenizer = _with_template(tmp_path, "{{ raise_exception('only pairs of turns') }}")
    with pytest.raises(IlladaError, match="only pairs of turns"):
        tokenizer.apply_chat_template(CONVERSATION)
    sandboxed = _with_template(tmp_path, "{{ messages.append(1) }}")  # the sandbox forbids mutating the input
    with pytest.raises(IlladaError, match="chat template"):
        sandboxed.apply_chat_template(CONVERSATION)
    broken = _with_template(tmp_path, "{% for m in messages %}")
    with pytest.raises(IlladaError, match="does not compile"):
        broken.apply_chat_template(CONVERSATION)


def test_template_environment_like_transformers(tmp_path):
    # trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before one
    template = ("{% for m in messages %}\n    {% if m['role'] == 'user' %}\n{{ m['content'] }}|\n"
                "    {% endif %}\n{% endfor %}")
    tokenizer = _with_template(tmp_path, template, bos_token="<|startoftext|>")
    assert tokenizer.apply_chat_template(CONVERSATION) == "What is 2+2?|\nAnd 3+3?|\n"
    tokens = _with_template(tmp_path, "{{ bos_token }}[{{ eos_token }}]{{ messages | tojson }}", bos_token="<B>",
                            eos_token={"content": "<E>", "special": True})
    rendered = tokens.apply_chat_template([{"role": "user", "content": "é"}])
    assert rendered == '<B>[<E>][{"role": "user", "content": "é"}]'


@pytest.mark.parametrize("messages", [
    [],
    "hello",
    [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": 3}],
    [{"content": "x"}],
    ["user: hi"],
])
def test_bad_messages(byte_level, messages):
    with pytest.raises(IlladaError):
        byte_level.apply_chat_template(messages)


def test_no_template(tmp_path):
    plain = _write_dir(tmp_path / "plain", _word_level(["<unk>", "a", "b"]), {})
    with pytest.raises(IlladaError, match="no chat template"):
        Tokenizer.from_dir(plain).apply_chat_template(CONVERSATION)
    # a LLaDA-style vocabulary without a template falls back to the default one
    llada_like = _write_dir(tmp_path / "llada", byte_level_tokenizer().backend,
                            {"bos_token": "<|startoftext|>"})
    tokenizer = Tokenizer.from_dir(llada_like)
    assert tokenizer.chat_template is None
    assert tokenizer.apply_chat_template(CONVERSATION) == EXPECTED_CHAT


def test_template_from_chat_template_jinja(tmp_path):
    directory = _write_dir(tmp_path / "t", byte_level_tokenizer().backend, {})
    (directory / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_dir(directory).apply_chat_template(CONVERSATION) == "[What is 2+2?][4.][And 3+3?]"


# ----------------------------------------------------------------------------------------------- save / load

def test_save_from_dir_round_trip(trained, tmp_path):
    tokenizer, out = trained
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    loaded = Tokenizer.from_dir(out)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.backend.get_vocab() == tokenizer.backend.get_vocab()
    assert loaded.special_tokens == tokenizer.special_tokens
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    for text in SAMPLES:
        assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode("<think>é</think>"), skip_special_tokens=True) == "<think>é</think>"

    # a custom template and an explicit mask id survive save -> from_dir
    custom = _with_template(tmp_path, NO_SYSTEM_TEMPLATE)
    custom = Tokenizer(custom.backend, custom.config, mask_token_id=7)
    custom.save(tmp_path / "again")
    again = Tokenizer.from_dir(tmp_path / "again")
    assert again.chat_template == NO_SYSTEM_TEMPLATE
    assert again.mask_token_id == 7
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 0)
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert config["mask_token"] == "<think>" and config["bos_token"] == "<|startoftext|>"


def test_missing_files(tmp_path):
    with pytest.raises(IlladaError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IlladaError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "tokenizer.json").write_text("{not json")
    with pytest.raises(IlladaError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "corrupt")
    bad_config = _write_dir(tmp_path / "bad", byte_level_tokenizer().backend)
    (bad_config / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(IlladaError, match="tokenizer_config.json"):
        Tokenizer.from_dir(bad_config)


# --------------------------------------------------------------------------------------- special-id resolution

def test_mask_id_resolution_order(tmp_path):
    backend = byte_level_tokenizer().backend  # has <|mdm_mask|> at 3
    d = _write_dir(tmp_path / "a", backend, {"mask_token": "<|eot_id|>"}, {"mask_token_id": 4})
    assert Tokenizer.from_dir(d, mask_token_id=7).mask_token_id == 7        # explicit argument first
    assert Tokenizer.from_dir(d).mask_token_id == 4                          # then config.json
    d = _write_dir(tmp_path / "b", backend, {"mask_token": "<|eot_id|>"}, {"vocab_size": 155136})
    assert Tokenizer.from_dir(d).mask_token_id == 6                          # then tokenizer_config mask_token
    d = _write_dir(tmp_path / "c", backend, {}, {"vocab_size": 155136})
    assert Tokenizer.from_dir(d).mask_token_id == 5                          # iLLaDA default beats a named token
    d = _write_dir(tmp_path / "d", backend, {})
    assert Tokenizer.from_dir(d).mask_token_id == 3                          # a token named <|mdm_mask|>
    d = _write_dir(tmp_path / "e", _word_level(["<unk>", "a", "<|mask|>"]))
    assert Tokenizer.from_dir(d).mask_token_id == 2                          # or <|mask|>
    d = _write_dir(tmp_path / "f", _word_level(["<unk>", "a"]))
    assert Tokenizer.from_dir(d).mask_token_id is None
    with pytest.raises(IlladaError):
        Tokenizer.from_dir(d, mask_token_id=-1)


def test_llada_mask_default(tmp_path):
    tokens = [f"t{i}" for i in range(126336)] + ["<|mdm_mask|>"]
    d = _write_dir(tmp_path / "llada", _word_level(tokens), {}, {"vocab_size": 155136})
    assert Tokenizer.from_dir(d).mask_token_id == 126336  # LLaDA's layout wins over the iLLaDA guess


def test_bos_eos_pad_sources(tmp_path):
    backend = _word_level(["<unk>", "<s>", "</s>", "<pad>", "x"])
    d = _write_dir(tmp_path / "cfg", backend, {}, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    tokenizer = Tokenizer.from_dir(d)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.eot_token_id is None
    # tokenizer files beat config.json; AddedToken dicts and special_tokens_map.json are understood
    d = _write_dir(tmp_path / "tok", backend, {"eos_token": {"content": "<s>", "special": True}},
                   {"bos_token_id": 4, "eos_token_id": 2, "pad_token_id": 2}, {"pad_token": "<pad>"})
    tokenizer = Tokenizer.from_dir(d)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (4, 1, 3)
    assert tokenizer.special_tokens == {"bos": 4, "eos": 1, "pad": 3}


# ------------------------------------------------------------------------------------------------------- CLI

def test_cli_train(tmp_path, capsys):
    from illada.__main__ import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS[:3000], encoding="utf-8")
    out = tmp_path / "out" / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out), "--quiet"]) == 0
    assert "vocabulary of" in capsys.readouterr().out
    tokenizer = Tokenizer.from_dir(out)
    assert tokenizer.vocab_size <= 300 and tokenizer.mask_token_id == 3
    assert tokenizer.decode(tokenizer.encode(SAMPLES[4])) == SAMPLES[4]


def test_cli_train_bad_input(tmp_path, capsys):
    from illada.__main__ import main

    good = tmp_path / "good.txt"
    good.write_text("some text " * 50)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = str(tmp_path / "out")
    cases = [
        [str(tmp_path / "missing.txt"), "--vocab-size", "300", "--out", out],
        [str(empty), "--vocab-size", "300", "--out", out],
        [str(binary), "--vocab-size", "300", "--out", out],
        [str(tmp_path), "--vocab-size", "300", "--out", out],
        [str(good), "--vocab-size", "100", "--out", out],
        [str(good), "--vocab-size", "300", "--out", out, "--min-frequency", "0"],
        [str(good), "--vocab-size", "300", "--out", str(a_file)],
        [str(good), "--vocab-size", "lots", "--out", out],
        [str(good), "--out", out],
    ]
    for argv in cases:
        assert main(["tokenizer", "train", *argv, "--quiet"]) == 2, argv
        assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out" / "tokenizer.json").exists()
