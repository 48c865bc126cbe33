"""Property-based bad input (issue 11, section 4): Hypothesis throws arbitrary argv, bytes, JSON values, sizes and
unicode (lone surrogates included) at the CLI parsers, the config and checkpoint readers, data preparation and the
server's request parsing. The properties:

- CLI: exit code 0, or 2 with a last stderr line `illada...: error: ...` and no traceback; nothing half-written.
- readers: the result, or an IlladaError (never another exception type).
- prepare: bad records skipped and counted, or one IlladaError; the output is complete (manifest consistent with
  its shards) or absent.
- server: every status < 500; a 4xx is an OpenAI error object.

Examples are bounded and seeded (derandomized, no example database) so the file is fast and the same on every
run; ILLADA_FUZZ_EXPLORE=1 draws fresh examples and ILLADA_FUZZ_SCALE=N runs N times as many (to hunt for more).
Heavy work is kept out: models are tiny checkpoints built here, `train`/`rl` are stubbed after validation, budgets
are capped by the tiny context, and no server is started by the CLI.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import tempfile
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from illada.__main__ import build_parser, main
from illada.checkpoint import inspect_checkpoint, load_checkpoint
from illada.errors import IlladaError
from illada.tokenizer import byte_level_tokenizer

SCALE = max(int(os.environ.get("ILLADA_FUZZ_SCALE", "1")), 1)
EXPLORE = os.environ.get("ILLADA_FUZZ_EXPLORE") == "1"
HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
          HealthCheck.filter_too_much]


def fuzz(examples: int):
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=not EXPLORE, database=None,
                    suppress_health_check=HEALTH, print_blob=True)


# ------------------------------------------------------------------------------------------------ strategies
SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc80", "\udcff", "\udfff"])
# text that argv can carry: any code point but NUL (a C string ends there); lone surrogates come from non-UTF-8
# argv bytes (surrogateescape) and from JSON escapes
TEXT = st.text(st.one_of(st.characters(exclude_characters="\x00"), SURROGATES), max_size=12)
NUMBERS = st.one_of(
    st.integers(-3, 70), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([2**31, 2**63, -2**63 - 1, 10**30, 10**400]),
).map(str) | st.sampled_from(["nan", "NaN", "inf", "-inf", "1e999", "-0", "0x10", "1_000", " 3", "٣", "", "1e-320"])
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(st.one_of(st.characters(), SURROGATES), max_size=6))
JSON_VALUES = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
JSON_TEXT = JSON_VALUES.map(json.dumps) | st.sampled_from([
    "{", "[1,", '{"n_layers": 1e999}', "[0.9, 0.95]", '{"bogus": 1}', '{"n_layers": 1}', "[" * 5000, "{}", "[]",
    '{"exact_match": 1}', '{"a": NaN}', "null", "\ufeff{}",
])
VALUES = st.one_of(TEXT, NUMBERS, JSON_TEXT)


def _safe_name(text: str) -> str:
    """A relative path in the working directory made from arbitrary text (never `..`, never absolute)."""
    return "o-" + "".join("_" if c in "/\\\x00" else c for c in text)[:20]


# outputs stay inside the per-example working directory: sampled paths (a path below a regular file, nested
# new directories, an existing directory) or arbitrary text made into a relative name
OUT_PATHS = st.one_of(st.sampled_from(["out", "new/deeper/out", "a-file/out", "a-file", "existing", "out.html",
                                       "out.gif", "out.txt", "x.jsonl", "exists.jsonl"]), TEXT.map(_safe_name))
WRITES = {"--record", "--out", "--out-dir"}
NEVER = {"-h", "--help", "--show", "--debug", "--threads"}  # help is not an error; --show is a live terminal
# view; --threads sets the thread count of this (test) process


def _subparser(*names: str):
    parser = build_parser()
    for name in names:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


def _flags(*names: str) -> dict[str, st.SearchStrategy[str]]:
    """The command's flags, each with the values it is meant to take (its choices, small numbers of its type), so
    that some examples get past the parser into the command's own checks."""
    flags = {}
    for action in _subparser(*names)._actions:
        if action.choices:
            meant = st.sampled_from([str(c) for c in action.choices])
        elif action.type is int:
            meant = st.integers(-1, 8).map(str)
        elif action.type is float:
            meant = st.floats(-1, 4).map(str)
        else:
            meant = st.sampled_from(["1", "0.5", "2", "true", "none"])
        flags.update({flag: meant for flag in action.option_strings if flag not in NEVER})
    return dict(sorted(flags.items()))


def argv_extras(flags: dict[str, st.SearchStrategy[str]], paths: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    """Flags of the command (each with a value it is meant to take or an arbitrary one, or bare), then maybe a
    stray positional."""
    def pair(flag: str) -> st.SearchStrategy[list[str]]:
        value = OUT_PATHS if flag in WRITES else st.one_of(flags[flag], flags[flag], VALUES, paths)
        return st.one_of(value.map(lambda v: [flag, v]), value.map(lambda v: [f"{flag}={v}"]), st.just([flag]))

    pairs = st.lists(st.sampled_from(sorted(flags)).flatmap(pair), max_size=4)
    stray = st.one_of(st.just([]), st.just([]), TEXT.map(lambda t: [t]))
    return st.tuples(pairs, stray).map(lambda ps: [item for p in ps[0] for item in p] + ps[1])


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@contextlib.contextmanager
def workdir():
    """A fresh working directory for one example, holding the files the sampled paths name."""
    old = os.getcwd()
    root = Path(tempfile.mkdtemp(prefix="illada-fuzz-"))
    try:
        (root / "a-file").write_text("x")
        (root / "existing").mkdir()
        (root / "exists.jsonl").write_text('{"text": "already here"}\n')
        (root / "corpus.txt").write_text("To be, or not to be.\n")
        (root / "docs.jsonl").write_text('{"text": "a document"}\n{"text": 1}\n')
        (root / "gsm8k.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
        os.chdir(root)
        yield root
    finally:
        os.chdir(old)
        shutil.rmtree(root, ignore_errors=True)


INPUTS = {"exists.jsonl", "docs.jsonl", "gsm8k.jsonl", "in.jsonl"}  # written by the tests, not by illada
TORN = re.compile(r"\.tmp|^\.step-|^\.tokenizer\.tmp$")


def assert_nothing_half_written(root: Path) -> None:
    """No temp or staging file survives; every dataset directory is complete; every JSONL output parses."""
    for path in root.rglob("*"):
        assert not TORN.search(path.name), f"left behind: {path.relative_to(root)}"
        if path.name == "progress.json":
            pytest.fail(f"a half-made dataset: {path.parent.relative_to(root)}")
        if path.name == "manifest.json":
            check_dataset(path.parent)
        if path.suffix == ".jsonl" and path.is_file() and path.name not in INPUTS:
            for line in path.read_text(encoding="utf-8").splitlines():
                json.loads(line)


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """The CLI's contract: 0, or 2 with one error line last and no traceback (any other exception fails here)."""
    code = main(argv)
    out, err = capsys.readouterr()
    event(f"exit {code}")  # --hypothesis-show-statistics: how many examples got past validation
    assert "Traceback" not in err, err
    if code != 0:
        lines = err.strip().splitlines()
        assert code == 2, (code, err)
        assert lines and re.match(r"illada( [\w-]+)*: error: ", lines[-1]), err
        if lines[-1].startswith("illada: error: "):  # ours (argparse's has a usage line above it)
            assert "\n" not in lines[-1]
    return code, out, err


# --------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def stubbed(monkeypatch):
    """`train` and `rl` stop after their configs validate: the parser and validation are fuzzed, no run starts."""
    def train(config):
        return types.SimpleNamespace(checkpoint=None, val_loss=None, stopped_early=False)

    def train_rl(config):
        config.validate()  # what the real one does first
        return types.SimpleNamespace(checkpoint=None, history=[], stopped=False)

    monkeypatch.setattr("illada.training.trainer.train", train)
    monkeypatch.setattr("illada.rl.trainer.train_rl", train_rl)
    monkeypatch.delenv("ILLADA_DEBUG", raising=False)


def _paths(checkpoint: Path) -> st.SearchStrategy[str]:
    return st.sampled_from([str(checkpoint), str(checkpoint / "config.json"), "missing", "corpus.txt",
                            "docs.jsonl", "gsm8k.jsonl", "a-file", "existing", "bytes"])


# command -> (argv before the fuzzed flags, examples). The bases make the command reach its validation; the
# fuzzed flags come after them, so they override (argparse keeps the last value).
COMMANDS = {
    "info": (lambda ckpt: ["info"], 50),
    "generate": (lambda ckpt: ["generate", "x", "--model", str(ckpt), "--max-new-tokens", "4",
                               "--block-length", "4"], 45),
    "train": (lambda ckpt: ["train", "--data", "existing", "--out-dir", "run", "--no-progress"], 60),
    "eval": (lambda ckpt: ["eval", "--model", str(ckpt), "--task", "gsm8k", "--data", "gsm8k.jsonl",
                           "--no-progress", "--max-new-tokens", "4", "--block-length", "4", "--num-fewshot", "0"], 30),
    "prepare": (lambda ckpt: ["prepare", "docs.jsonl", "--tokenizer", "bytes", "--out", "data", "--quiet"], 40),
    "convert": (lambda ckpt: ["convert", str(ckpt), "converted"], 25),
    "tasks make": (lambda ckpt: ["tasks", "make", "arithmetic", "--n", "3", "--out", "t.jsonl"], 40),
    "rl": (lambda ckpt: ["rl", "--init-from", str(ckpt), "--data", "gsm8k.jsonl", "--out-dir", "rl-run",
                         "--no-progress"], 50),
}
# flags whose value decides how much work a valid run does: values stay small (a valid huge one is real work)
SMALL = {"--n": st.integers(-2, 8).map(str) | TEXT, "--limit": st.integers(-1, 2).map(str) | TEXT,
         "--num-fewshot": st.integers(-1, 2).map(str) | TEXT, "--mc-num": st.integers(-1, 2).map(str) | TEXT}


def _cli_case(name: str, examples: int):
    base, _ = COMMANDS[name]
    flags = _flags(*name.split())
    if name == "eval":  # humaneval would run code in the sandbox: other presets only
        flags = {f: v for f, v in flags.items() if f not in ("--timeout", "--allow-unsandboxed-code")}

    @fuzz(examples)
    @given(data=st.data())
    def case(capsys, checkpoint, stubbed, data):
        paths = _paths(checkpoint)
        extras = data.draw(argv_extras(flags, paths), label="flags")
        for i, item in enumerate(extras):  # keep the work-sizing flags small
            flag = item.partition("=")[0]
            if flag in SMALL and (item != flag or i + 1 < len(extras)):
                value = data.draw(SMALL[flag], label=flag)
                if item != flag:
                    extras[i] = f"{flag}={value}"
                else:
                    extras[i + 1] = value
        # the sandboxed task runs model code: it has its own tests (tests/test_sandbox.py)
        extras = [e.replace("humaneval", "gsm8k") for e in extras]
        note(f"argv: {base(checkpoint) + extras}")
        with workdir() as root:
            run_cli(capsys, base(checkpoint) + extras)
            assert_nothing_half_written(root)
            if (root / "converted").exists():  # convert: a complete checkpoint or none
                inspect_checkpoint(root / "converted")

    case.__name__ = f"test_cli_{name.replace(' ', '_')}"
    return case


for _name, (_, _examples) in COMMANDS.items():
    globals()[f"test_cli_{_name.replace(' ', '_')}"] = _cli_case(_name, _examples)


@fuzz(25)
@given(text=st.one_of(TEXT, st.binary(max_size=64).map(lambda b: b.decode("utf-8", "surrogateescape")),
                      st.sampled_from(["steps: ten\n", "lr: .nan\n", "betas: [2]\n", "a: [", "- 1\n", "1: x\n",
                                       "model_overrides: {n_layers: 1.5}\n", "!!python/object:os.system {}",
                                       "seq_len: 99999999999999999999\n"]),
                      st.dictionaries(st.sampled_from(["lr", "steps", "betas", "seq_len", "model_overrides",
                                                       "objective", "progress", "bogus"]),
                                      JSON_VALUES, max_size=3).map(json.dumps)),
       suffix=st.sampled_from([".yaml", ".json"]))
def test_cli_train_config_file(capsys, stubbed, text, suffix):
    """`illada train FILE` (and `illada rl FILE`) with arbitrary file content."""
    with workdir() as root:
        (root / f"run{suffix}").write_bytes(text.encode("utf-8", "surrogateescape"))
        run_cli(capsys, ["train", f"run{suffix}", "--data", "existing", "--out-dir", "run"])
        run_cli(capsys, ["rl", f"run{suffix}", "--init-from", "x", "--data", "y", "--out-dir", "rl-run"])
        assert_nothing_half_written(root)


# ------------------------------------------------------------------------------------------------- readers
def only_illada_errors(function, *args, **kwargs):
    """Call; any exception other than IlladaError fails the property. Returns the result or the error."""
    try:
        return function(*args, **kwargs)
    except IlladaError as error:
        return error


def _edited(value, data) -> object:
    """A JSON object with one key replaced by, or added as, an arbitrary value."""
    if not isinstance(value, dict) or not value:
        return value
    key = data.draw(st.sampled_from(sorted(value)) | st.text(max_size=8), label="key")
    return {**value, key: data.draw(JSON_VALUES | st.sampled_from([10**12, -1, 0, 2**63, 1e308]), label="value")}


def _json_file_content(data, original: bytes) -> bytes:
    kind = data.draw(st.sampled_from(["bytes", "json", "edit", "cut", "deep"]), label="kind")
    if kind == "bytes":
        return data.draw(st.binary(max_size=80), label="bytes")
    if kind == "json":
        return json.dumps(data.draw(JSON_VALUES, label="json")).encode("utf-8", "surrogatepass")
    if kind == "cut":
        return original[:data.draw(st.integers(0, len(original)), label="cut")]
    if kind == "deep":
        return b"[" * 100_000
    edited = _edited(json.loads(original), data)
    return json.dumps(edited).encode("utf-8", "surrogatepass")


@fuzz(60)
@given(data=st.data(), name=st.sampled_from(["config.json", "tokenizer_config.json", "tokenizer.json"]))
def test_checkpoint_json_files(checkpoint, data, name):
    """config.json / tokenizer files of a checkpoint with arbitrary content: load and inspect raise IlladaError."""
    import illada

    with workdir() as root:
        path = root / "model"
        shutil.copytree(checkpoint, path)
        file = path / name
        file.write_bytes(_json_file_content(data, file.read_bytes()))
        only_illada_errors(inspect_checkpoint, path)
        only_illada_errors(illada.load, str(path), device="cpu")


def _safetensors_content(data) -> bytes:
    kind = data.draw(st.sampled_from(["bytes", "header", "tensors"]), label="kind")
    if kind == "bytes":
        return data.draw(st.binary(max_size=64), label="bytes")
    if kind == "header":
        header = json.dumps(data.draw(JSON_VALUES, label="header")).encode("utf-8", "surrogatepass")
    else:  # plausible tensor entries with arbitrary dtypes, shapes and offsets
        entry = st.fixed_dictionaries({
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "X"]) | JSON_LEAF,
            "shape": st.lists(st.integers(-1, 40), max_size=3) | JSON_VALUES,
            "data_offsets": st.lists(st.integers(-4, 2**20), min_size=0, max_size=3) | JSON_VALUES,
        })
        names = st.sampled_from(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                                 "__metadata__", "x"])
        header = json.dumps(data.draw(st.dictionaries(names, entry, max_size=3), label="tensors")).encode()
    length = data.draw(st.sampled_from([len(header)]) | st.integers(0, 2**64 - 1), label="length")
    body = data.draw(st.binary(max_size=64), label="body")
    return length.to_bytes(8, "little") + header + body


@fuzz(50)
@given(data=st.data())
def test_safetensors_file(checkpoint, capsys, data):
    """model.safetensors with random bytes, random headers and random header lengths."""
    with workdir() as root:
        path = root / "model"
        shutil.copytree(checkpoint, path)
        (path / "model.safetensors").write_bytes(_safetensors_content(data))
        only_illada_errors(load_checkpoint, path)
        run_cli(capsys, ["info", "--model", str(path)])


@fuzz(40)
@given(text=st.one_of(TEXT, st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
                      st.dictionaries(st.sampled_from(["data", "lr", "steps", "betas", "seq_len", "model_overrides",
                                                       "objective", "dtype", "switch_step", "peak_tflops",
                                                       "progress", "init_from", "bogus"]) | st.text(max_size=4),
                                      JSON_VALUES | st.sampled_from([".nan", "4e-4", "1e999", "-1"]),
                                      max_size=4).map(json.dumps)),
       suffix=st.sampled_from([".yaml", ".json"]), raw=st.booleans())
def test_train_and_rl_config_files(text, suffix, raw):
    """load_config_file + TrainConfig/RLConfig.from_dict + validate: a config or an IlladaError."""
    from illada.rl.config import RLConfig
    from illada.training.config import TrainConfig, load_config_file

    with workdir() as root:
        file = root / f"run{suffix}"
        file.write_bytes(text.encode("utf-8", "surrogatepass") if not raw else text.encode("latin-1", "replace"))
        values = only_illada_errors(load_config_file, file)
        if isinstance(values, dict):
            for cls in (TrainConfig, RLConfig):
                config = only_illada_errors(cls.from_dict, values)
                if isinstance(config, cls):
                    only_illada_errors(config.validate)


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory, checkpoint) -> Path:
    from illada.checkpoint import load_checkpoint as load
    from illada.training.checkpointing import save_training_checkpoint

    model, config = load(checkpoint)
    out = tmp_path_factory.mktemp("fuzz-run")
    return save_training_checkpoint(out, 3, model.state_dict(), {"optimizer": {"state": {}, "param_groups": []}},
                                    {"step": 3, "tokens": 12}, config, {"steps": 3}, tokenizer=byte_level_tokenizer())


@fuzz(40)
@given(data=st.data(), name=st.sampled_from(["trainer_state.json", "training_state.pt", "train_config.json"]))
def test_training_checkpoint_files(training_checkpoint, data, name):
    """The resume loader on a training checkpoint with one file corrupted: state or CorruptCheckpoint."""
    from illada.training.checkpointing import load_training_checkpoint

    with workdir() as root:
        path = root / training_checkpoint.name
        shutil.copytree(training_checkpoint, path)
        file = path / name
        if name.endswith(".json"):
            content = _json_file_content(data, file.read_bytes())
        else:
            original = file.read_bytes()
            kind = data.draw(st.sampled_from(["bytes", "cut", "flip", "other"]), label="kind")
            if kind == "bytes":
                content = data.draw(st.binary(max_size=200), label="bytes")
            elif kind == "cut":
                content = original[:data.draw(st.integers(0, len(original) - 1), label="cut")]
            elif kind == "flip":
                at = data.draw(st.integers(0, len(original) - 1), label="at")
                content = original[:at] + bytes([original[at] ^ 0xFF]) + original[at + 1:]
            else:  # a readable file of the wrong shape
                import io

                buffer = io.BytesIO()
                torch.save(data.draw(st.sampled_from([[], {}, {"optimizer": None}, torch.zeros(2), "x"])), buffer)
                content = buffer.getvalue()
        file.write_bytes(content)
        only_illada_errors(load_training_checkpoint, path)


# -------------------------------------------------------------------------------------------- data preparation
def check_dataset(out: Path) -> None:
    """A complete dataset: a manifest whose shards exist with the sizes and token counts it states."""
    assert not (out / "progress.json").exists()
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    itemsize = {"uint16": 2, "uint32": 4}[manifest["dtype"]]
    total = 0
    for shard in manifest["shards"]:
        file = out / shard["file"]
        assert file.is_file() and file.stat().st_size == shard["tokens"] * itemsize, shard
        total += shard["tokens"]
    assert total == manifest["num_tokens"]


LINE = st.one_of(
    st.binary(max_size=30),
    JSON_VALUES.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
    st.fixed_dictionaries({"text": JSON_VALUES | TEXT}).map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool"]) | JSON_LEAF,
         "content": TEXT | JSON_LEAF}), max_size=3)}).map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
    st.fixed_dictionaries({"prompt": TEXT | JSON_LEAF, "completion": TEXT | JSON_LEAF}).map(
        lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
    st.sampled_from([b'{"text": "fine"}', b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant",'
                     b' "content": "a"}]}', b"[" * 20000, b'{"text": "\\ud800"}', b"\xef\xbb\xbf{}", b"  ",
                     b'{"text": "[MASK]<|mdm_mask|>"}']),
)


@fuzz(40)
@given(lines=st.lists(LINE, min_size=1, max_size=6), kind=st.sampled_from(["pretrain", "sft"]),
       shard_tokens=st.integers(1, 64), nested=st.booleans())
def test_prepare_random_jsonl(lines, kind, shard_tokens, nested):
    from illada.data.prepare import prepare_pretrain, prepare_sft

    with workdir() as root:
        src = root / "in.jsonl"
        src.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
        out = root / ("a/b/data" if nested else "data")
        prepare = prepare_pretrain if kind == "pretrain" else prepare_sft
        result = only_illada_errors(prepare, [src], out, "bytes", shard_tokens=shard_tokens, progress=False)
        if isinstance(result, dict):
            check_dataset(out)
            records = sum(1 for line in src.read_bytes().split(b"\n") if line.strip())
            assert result["num_examples"] + result["skipped"] == records, result
        else:
            assert not (root / "a").exists() and not (root / "data").exists(), sorted(root.rglob("*"))
        assert_nothing_half_written(root)


# ------------------------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def server(checkpoint):
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    import illada
    from illada.serving import Limits, ServerSettings, create_app, serve_in_thread

    lm = illada.load(str(checkpoint), device="cpu")
    settings_ = ServerSettings(api_key="k", max_batch=4, queue_size=64, timeout=30,
                               limits=Limits(max_tokens=6, default_max_tokens=4, max_n=2, max_prompts=2,
                                             max_body_bytes=4096))
    with serve_in_thread(create_app(lm, settings_)) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
          "stream", "stream_options", "stop", "seed", "illada_stream_canvas", "steps", "block_length", "threshold",
          "factor", "cache", "cache_refresh", "variable_length", "remasking", "cfg_scale", "top_k",
          "eos_confidence", "forbid_eos", "logprobs", "echo", "suffix", "best_of", "tools", "user"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | JSON_LEAF,
                                 "content": st.text(max_size=8) | SURROGATES | JSON_VALUES})
FIELD_VALUES = {
    "prompt": st.one_of(st.text(max_size=10), SURROGATES, st.lists(st.text(max_size=5), max_size=3),
                        st.lists(st.integers(-2, 300), max_size=5), JSON_VALUES),
    "messages": st.lists(MESSAGE, max_size=3) | JSON_VALUES,
    "max_tokens": st.integers(-1, 8) | JSON_LEAF, "n": st.integers(-1, 3) | JSON_LEAF,
    "steps": st.integers(-1, 10**30) | JSON_LEAF, "block_length": st.integers(-1, 10**30) | JSON_LEAF,
    "stream": st.booleans() | JSON_LEAF, "model": st.sampled_from(["tiny"]) | JSON_LEAF,
    "temperature": st.floats(0, 2) | JSON_LEAF, "top_p": st.floats(0, 1) | JSON_LEAF,
    "seed": st.integers() | JSON_LEAF, "threshold": st.floats(0, 1) | JSON_LEAF,
    "factor": st.floats(0, 1e308) | JSON_LEAF, "cfg_scale": st.floats(0, 1e308) | JSON_LEAF,
    "top_k": st.integers(-1, 10**30) | JSON_LEAF, "cache_refresh": st.integers(-1, 10**30) | JSON_LEAF,
    "cache": st.sampled_from(["none", "prefix", "dual"]) | JSON_LEAF,
    "remasking": st.sampled_from(["low_confidence", "random", "margin", "entropy"]) | JSON_LEAF,
    "eos_confidence": st.sampled_from(["normal", "neg_inf"]) | JSON_LEAF,
    "variable_length": st.booleans() | JSON_LEAF, "forbid_eos": st.booleans() | JSON_LEAF,
    "illada_stream_canvas": st.booleans() | JSON_LEAF,
    "stop": st.lists(st.text(max_size=3), max_size=5) | JSON_VALUES,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | JSON_LEAF}) | JSON_VALUES,
}


def _body(data, chat: bool) -> bytes:
    kind = data.draw(st.sampled_from(["valid", "valid", "valid", "fields", "json", "bytes"]), label="kind")
    if kind == "bytes":
        return data.draw(st.binary(max_size=60) | st.sampled_from([b"[" * 100_000, b"{" + b" " * 5000,
                                                                   "{}".encode("utf-16")]), label="bytes")
    if kind == "json":
        return json.dumps(data.draw(JSON_VALUES, label="json")).encode("utf-8", "surrogatepass")
    names = data.draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=5), max_size=6 if kind == "fields" else 3,
                               unique=True), label="f")
    body = {name: data.draw(FIELD_VALUES.get(name, JSON_VALUES), label=name) for name in names}
    if kind == "valid":  # a valid request with a few fields on top, so generation runs with odd knobs
        body = {"prompt": "ab", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
        body.pop("prompt" if chat else "messages")
    return json.dumps(body).encode("utf-8", "surrogatepass")


@fuzz(120)
@given(data=st.data(), route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_server_request_bodies(server, data, route):
    body = _body(data, chat=route == "/v1/chat/completions")
    connection = http.client.HTTPConnection(*server, timeout=60)
    try:
        connection.request("POST", route, body=body, headers={"Authorization": "Bearer k",
                                                             "Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    event(f"status {response.status}")
    assert response.status < 500, (response.status, payload[:300])
    if response.status >= 400:
        error = json.loads(payload)["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    elif response.getheader("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in payload.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("server_error" not in event for event in events), events[-3:]
    else:
        assert json.loads(payload)["choices"]
