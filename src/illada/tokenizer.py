"""Tokenizers: a thin wrapper over the `tokenizers` library for Hugging Face tokenizer directories, chat templates
rendered the way `transformers` renders them, and illada's own byte-level BPE tokenizers.

A tokenizer directory holds `tokenizer.json` and `tokenizer_config.json` (+ `special_tokens_map.json`, and the
model's `config.json` when it is a checkpoint). illada's own tokenizers put these special tokens at fixed low ids:

    0 <|pad|>  1 <|startoftext|> (BOS)  2 <|endoftext|> (EOS)  3 <|mdm_mask|> (mask)
    4 <|start_header_id|>  5 <|end_header_id|>  6 <|eot_id|>  7 <think>  8 </think>

and use the LLaDA chat format (reference §2), one header + content + `<|eot_id|>` per turn:
`<|startoftext|><|start_header_id|>user<|end_header_id|>\\n\\n{msg}<|eot_id|>`
`<|start_header_id|>assistant<|end_header_id|>\\n\\n`.
"""
from __future__ import annotations

import codecs
import json
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from illada.errors import IlladaError
from illada.files import check_unicode, read_json_object, write_atomic

# name -> id of illada's special tokens; the ids are part of the format (datasets and checkpoints rely on them).
SPECIAL_TOKENS: dict[str, int] = {
    "<|pad|>": 0,
    "<|startoftext|>": 1,
    "<|endoftext|>": 2,
    "<|mdm_mask|>": 3,
    "<|start_header_id|>": 4,
    "<|end_header_id|>": 5,
    "<|eot_id|>": 6,
    "<think>": 7,
    "</think>": 8,
}
# Reasoning markers stay visible in `decode(..., skip_special_tokens=True)`: they are part of the answer's text.
VISIBLE_TOKENS = frozenset({"<think>", "</think>"})
PAD, BOS, EOS, MASK, EOT = "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# LLaDA chat format, one turn per message (system turns too), then the assistant header when a reply is wanted.
# Every "\n\n" follows text, never a block tag, so trim_blocks/lstrip_blocks leave it alone.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# The default template is only used for a tokenizer without one whose vocabulary has these (LLaDA-style) tokens.
_DEFAULT_TEMPLATE_NEEDS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Known mask ids of the published models (reference §2).
LLADA_MASK_ID, LLADA_MASK_TOKEN = 126336, "<|mdm_mask|>"
ILLADA_MASK_ID, ILLADA_VOCAB_SIZE = 5, 155136
MASK_TOKEN_NAMES = ("<|mdm_mask|>", "<|mask|>")

ROLES = ("system", "user", "assistant")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")




def _token_content(value: Any) -> str | None:
    """The text of a token as written in tokenizer_config / special_tokens_map: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None




class Tokenizer:
    """A `tokenizers.Tokenizer` plus what transformers keeps beside it: special-token ids and the chat template.

    `config` is the tokenizer_config.json dict, `special_map` special_tokens_map.json and `model_config` the model's
    config.json (a source of bos/eos/pad/mask ids). Use `Tokenizer.from_dir` to read a directory.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: dict | None = None,
        *,
        special_map: dict | None = None,
        model_config: dict | None = None,
        mask_token_id: int | None = None,
    ) -> None:
        self.backend = backend
        self.config = dict(config or {})
        special_map, model_config = special_map or {}, model_config or {}

        def declared(key: str) -> int | None:
            # tokenizer_config first, then special_tokens_map: the token's text, mapped to its id
            for source in (self.config, special_map):
                content = _token_content(source.get(key))
                if content is not None and self.backend.token_to_id(content) is not None:
                    return self.backend.token_to_id(content)
            return None

        def resolve(key: str, fallback_name: str) -> int | None:
            found = declared(f"{key}_token")
            if found is None:
                found = _as_id(model_config.get(f"{key}_token_id"))
            if found is None:
                found = self.backend.token_to_id(fallback_name)
            return found

        self._bos = resolve("bos", BOS)
        self._eos = resolve("eos", EOS)
        self._pad = resolve("pad", PAD)
        self._mask = self._resolve_mask(mask_token_id, model_config, declared("mask_token"))
        self._eot = self.backend.token_to_id(EOT)
        self._template = self._find_template()
        self._compiled: dict[str, Any] = {}

    def _resolve_mask(self, explicit: int | None, model_config: dict, declared: int | None) -> int | None:
        """explicit > config.json mask_token_id > tokenizer mask_token > LLaDA/iLLaDA defaults > a mask-named token."""
        if explicit is not None:
            if _as_id(explicit) is None:
                raise IlladaError(f"mask_token_id must be a non-negative integer, got {explicit!r}")
            return explicit
        if _as_id(model_config.get("mask_token_id")) is not None:
            return model_config["mask_token_id"]
        if declared is not None:
            return declared
        if self.backend.id_to_token(LLADA_MASK_ID) == LLADA_MASK_TOKEN:
            return LLADA_MASK_ID
        # iLLaDA's mask (id 5) is not declared anywhere in its tokenizer: recognise the model by its vocabulary size.
        if ILLADA_VOCAB_SIZE in (model_config.get("vocab_size"), self.vocab_size):
            return ILLADA_MASK_ID
        for name in MASK_TOKEN_NAMES:
            if self.backend.token_to_id(name) is not None:
                return self.backend.token_to_id(name)
        return None

    def _find_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) and template else None

    # ------------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | Path, mask_token_id: int | None = None) -> "Tokenizer":
        """Read a Hugging Face tokenizer directory (tokenizer.json required; config files optional)."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise IlladaError(f"tokenizer directory {str(path)!r} does not exist")
        if not (path / "tokenizer.json").is_file():
            raise IlladaError(f"{path}: no tokenizer.json (only fast, tokenizer.json-based tokenizers are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as error:  # the Rust side raises plain Exceptions for malformed files
            raise IlladaError(f"{path / 'tokenizer.json'}: cannot load ({error})") from error
        optional = {name: read_json_object(path / name) if (path / name).is_file() else {}
                    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json")}
        config = optional["tokenizer_config.json"]
        if "chat_template" not in config:
            # newer transformers keep the template beside tokenizer_config.json
            if (path / "chat_template.jinja").is_file():
                config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
            elif (path / "chat_template.json").is_file():
                config["chat_template"] = read_json_object(path / "chat_template.json").get("chat_template")
        return cls(backend, config, special_map=optional["special_tokens_map.json"],
                   model_config=optional["config.json"], mask_token_id=mask_token_id)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (special tokens, chat template) into `directory`."""
        directory = Path(directory)
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("clean_up_tokenization_spaces", False)
        for key, token_id in (("bos_token", self._bos), ("eos_token", self._eos), ("pad_token", self._pad),
                              ("mask_token", self._mask)):
            content = self.id_to_token(token_id) if token_id is not None else None
            if content is not None:  # an id outside the vocabulary (a padded embedding) has no text to record
                config[key] = content
        if self._template is not None:
            config["chat_template"] = self._template
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_atomic(directory / "tokenizer.json", self.backend.to_str(pretty=True))
            write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        except OSError as error:
            raise IlladaError(f"cannot write the tokenizer to {directory}: {error}") from error

    # --------------------------------------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of ids: the vocabulary with the added tokens (and at least the largest added id + 1)."""
        added = self.backend.get_added_tokens_decoder()
        return max(self.backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def pad_token_id(self) -> int | None:
        return self._pad

    @property
    def mask_token_id(self) -> int | None:
        return self._mask

    @property
    def eot_token_id(self) -> int | None:
        """`<|eot_id|>`, which ends a chat turn, or None."""
        return self._eot

    @property
    def special_tokens(self) -> dict[str, int]:
        """Role -> id of the special tokens it has: bos, eos, pad, mask, start/end_header, eot, think, end_think."""
        roles = {"bos": self._bos, "eos": self._eos, "pad": self._pad, "mask": self._mask,
                 "start_header": self.token_to_id("<|start_header_id|>"),
                 "end_header": self.token_to_id("<|end_header_id|>"), "eot": self._eot,
                 "think": self.token_to_id("<think>"), "end_think": self.token_to_id("</think>")}
        return {role: token_id for role, token_id in roles.items() if token_id is not None}

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template (None when it has none)."""
        return self._template

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self._bos}, eos={self._eos}, pad={self._pad}, "
                f"mask={self._mask}, chat_template={'yes' if self._template else 'no'})")

    # ------------------------------------------------------------------------------------------ encode/decode

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. from a chat template) become single ids."""
        if not isinstance(text, str):
            raise IlladaError(f"can only encode a string, got {type(text).__name__}")
        check_unicode(text, "the text to encode")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        for text in texts:
            if not isinstance(text, str):
                raise IlladaError(f"can only encode strings, got {type(text).__name__}")
            check_unicode(text, "a text to encode")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tensor or array); ids the vocabulary does not have are dropped."""
        size = self.vocab_size
        # (the Rust side rejects ids >= 2**32 and silently drops unknown ones; drop all of them alike)
        ids = [i for i in (int(t) for t in ids) if 0 <= i < size]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------ chat template

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render a conversation with the chat template (as transformers does); token ids if `tokenize`.

        A template that rejects the system role (iLLaDA's) gets the system text merged into the first user turn:
        `system + "\\n\\n" + user`.
        """
        messages = _validate_messages(messages)
        template = self._template
        if template is None:
            if any(self.token_to_id(t) is None for t in _DEFAULT_TEMPLATE_NEEDS):
                raise IlladaError("this tokenizer has no chat template (tokenizer_config.json 'chat_template')")
            template = DEFAULT_CHAT_TEMPLATE
        try:
            text = self._render(template, messages, add_generation_prompt)
        except IlladaError:
            if not any(m["role"] == "system" for m in messages):
                raise
            text = self._render(template, _merge_system(messages), add_generation_prompt)
        return self.encode(text) if tokenize else text

    def _render(self, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
        compiled = self._compiled.get(template)
        if compiled is None:
            compiled = self._compiled[template] = _compile_template(template)
        variables = {key: _token_content(self.config.get(key)) for key in _SPECIAL_KEYS
                     if _token_content(self.config.get(key)) is not None}
        for key, token_id in (("bos_token", self._bos), ("eos_token", self._eos), ("pad_token", self._pad)):
            if key not in variables and token_id is not None and self.id_to_token(token_id) is not None:
                variables[key] = self.id_to_token(token_id)
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except Exception as error:  # raise_exception(), undefined names, sandbox violations: all the template's fault
            raise IlladaError(f"chat template: {error}") from error


def _validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise IlladaError("messages must be a non-empty list of {'role', 'content'} dicts")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise IlladaError(f"message {index} is a {type(message).__name__}, not a dict")
        if message.get("role") not in ROLES:
            raise IlladaError(f"message {index}: role must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise IlladaError(f"message {index}: content must be a string")
    return [dict(m) for m in messages]


def _merge_system(messages: list[dict]) -> list[dict]:
    """Move the system text into the first user turn (system + "\\n\\n" + user); a user turn if there is none."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for message in rest:
        if message["role"] == "user":
            message["content"] = system + "\n\n" + message["content"]
            return rest
    return [{"role": "user", "content": system}] + rest


def _compile_template(template: str):
    """A jinja2 template in the environment transformers uses (sandboxed, trim_blocks, lstrip_blocks)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, indent=None):
        return json.dumps(value, ensure_ascii=False, indent=indent)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except TemplateError as error:
        raise IlladaError(f"chat template does not compile: {error}") from error


# ------------------------------------------------------------------------------------- illada's own tokenizers

def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte as one printable character.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space, ...) are shifted to
    256 + n in byte order, so no token ever contains whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _added_token(content: str) -> AddedToken:
    return AddedToken(content, special=content not in VISIBLE_TOKENS, normalized=False)


def _finish(backend: tokenizers.Tokenizer) -> Tokenizer:
    """Byte-level pre-tokenizer/decoder, BOS on `add_special_tokens`, our special tokens and chat template."""
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, SPECIAL_TOKENS[BOS])])
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "mask_token": MASK,
              "chat_template": DEFAULT_CHAT_TEMPLATE}
    tokenizer = Tokenizer(backend, config)
    for content, token_id in SPECIAL_TOKENS.items():
        if tokenizer.token_to_id(content) != token_id:  # a bug here would silently break every dataset
            raise RuntimeError(f"special token {content} got id {tokenizer.token_to_id(content)}, not {token_id}")
    return tokenizer


def byte_level_tokenizer() -> Tokenizer:
    """illada's special tokens (ids 0-8) + the 256 bytes (id 9 + byte value), no merges: needs no training data."""
    byte_chars = bytes_to_unicode()
    vocab = dict(SPECIAL_TOKENS)
    vocab.update({byte_chars[b]: len(SPECIAL_TOKENS) + b for b in range(256)})
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # (add_special_tokens would mark every token special; the reasoning markers must stay visible)
    backend.add_special_tokens([_added_token(t) for t in SPECIAL_TOKENS if t not in VISIBLE_TOKENS])
    backend.add_tokens([_added_token(t) for t in SPECIAL_TOKENS if t in VISIBLE_TOKENS])
    return _finish(backend)


def check_text_file(path: str | Path) -> Path:
    """`path` as a Path if it is a non-empty UTF-8 text file, else IlladaError (streams; any size)."""
    path = Path(path)
    if not path.exists():
        raise IlladaError(f"{path}: no such file")
    if not path.is_file():
        raise IlladaError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise IlladaError(f"{path}: empty file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                if b"\x00" in chunk:
                    raise UnicodeDecodeError("utf-8", chunk, 0, 1, "NUL byte (binary file?)")
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise IlladaError(f"{path}: not UTF-8 text ({error.reason})") from error
    except OSError as error:
        raise IlladaError(f"{path}: cannot read ({error})") from error
    return path


def _check_writable(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise IlladaError(f"{directory}: exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise IlladaError(f"{directory}: not writable ({error})") from error


def train_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (any text round-trips) with illada's special tokens; saved in `out_dir`.

    `vocab_size` counts the special tokens and the 256 bytes; the result may be smaller when the text has fewer
    pairs worth merging (seen at least `min_frequency` times).
    """
    if not files:
        raise IlladaError("no training files given")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise IlladaError(f"vocab size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                          f"special tokens), got {vocab_size}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise IlladaError(f"min frequency must be a positive integer, got {min_frequency}")
    paths = [check_text_file(f) for f in files]
    out_dir = Path(out_dir)
    _check_writable(out_dir)  # before training, so a long run is never lost to a bad output path

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[_added_token(t) for t in SPECIAL_TOKENS],  # listed first, so they get ids 0..8
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),      # all 256 bytes, seen in the data or not
    )
    try:
        backend.train([str(p) for p in paths], trainer)
    except Exception as error:
        raise IlladaError(f"tokenizer training failed: {error}") from error
    # The trainer marks every token it is given as special; keep the reasoning markers visible when decoding.
    data = json.loads(backend.to_str())
    for token in data["added_tokens"]:
        token["special"] = token["content"] not in VISIBLE_TOKENS
    tokenizer = _finish(tokenizers.Tokenizer.from_str(json.dumps(data)))
    tokenizer.save(out_dir)
    return tokenizer
