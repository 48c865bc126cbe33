"""Bad input never reaches a user as a traceback (issue 11, section 2): every case below is one line
`illada: error: ...` and exit code 2 on the command line, leaves no file behind, and is an OpenAI-style 4xx on the
server. One regression test per case, on tiny models built here."""
from __future__ import annotations

import io
import json
import re
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from illada.__main__ import main
from illada.config import PRESETS, ModelConfig, preset
from illada.model import build_model
from illada.tokenizer import byte_level_tokenizer

GEN = ["--max-new-tokens", "4", "--block-length", "4"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file: a path below it can never be written (also as root, where permissions do not bind)."""
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


def copy_of(checkpoint: Path, tmp_path: Path, config=None, weights: bytes | None = None) -> Path:
    """A copy of the tiny checkpoint with config.json edited (a function of its bytes) or the weights replaced."""
    path = tmp_path / "model"
    shutil.copytree(checkpoint, path)
    if config is not None:
        (path / "config.json").write_bytes(config((path / "config.json").read_bytes()))
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return path


def one_error(capsys, argv: list[str]) -> str:
    """Run the CLI; assert the one-line user error contract and return that line."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("illada: error: "), err
    return lines[0]


def _layers(value: bytes):
    return lambda config: config.replace(b'"num_hidden_layers": 2', b'"num_hidden_layers": ' + value)


def _header(obj) -> bytes:
    data = json.dumps(obj).encode()
    return len(data).to_bytes(8, "little") + data


# ------------------------------------------------------------------------------------------------ config.json
@pytest.mark.parametrize("command", ["info", "generate"])
@pytest.mark.parametrize("edit, message", [
    (_layers(b"Infinity"), "Infinity is not a JSON number"),
    (_layers(b"NaN"), "NaN is not a JSON number"),
    (lambda config: b"\xff\xfe\x00\x01 binary", "not UTF-8"),
    (_layers(b"100000000"), "100,000,000 layers"),
])
def test_bad_config_json(checkpoint, tmp_path, capsys, command, edit, message):
    path = copy_of(checkpoint, tmp_path, config=edit)
    argv = ["info", "--model", str(path)] if command == "info" else ["generate", "x", "--model", str(path), *GEN]
    assert message in one_error(capsys, argv)


def test_absurd_shape_is_refused_before_anything_is_built(monkeypatch):
    """The check runs on the config alone: not even a meta-device model (10^8 layers of modules) is built."""
    from illada.errors import IlladaError

    with pytest.raises(IlladaError, match=r"beyond what illada builds"):
        preset("tiny", n_layers=100_000_000)
    with pytest.raises(IlladaError, match=r"parameters"):
        preset("tiny", vocab_size=10**9, hidden_size=2**16, n_heads=2**10, n_kv_heads=2**10)
    for config in PRESETS.values():  # the estimate is the built model's exact count
        meta = build_model(config, device="meta")
        assert config.num_parameters() == meta.num_parameters()
        assert config.num_parameters(non_embedding=True) == meta.num_parameters(non_embedding=True)


def test_a_fresh_model_larger_than_ram_is_refused_before_allocating(monkeypatch, capsys):
    import illada.model

    monkeypatch.setattr(illada.model, "physical_memory", lambda: 2**20)
    from illada.errors import IlladaError

    with pytest.raises(IlladaError, match=r"more than this machine's 1.0 MiB of memory"):
        build_model(PRESETS["small"], device="cpu")
    build_model(PRESETS["small"], device="meta")  # no memory needed: allowed


# ------------------------------------------------------------------------------------------------ safetensors
@pytest.mark.parametrize("weights, message", [
    (b"", "too short for a header"),
    (_header({"model.embed_tokens.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})[:20],
     "does not fit"),
    (bytes(range(256)) * 2, "does not fit"),
    ((2**62).to_bytes(8, "little") + b"{}", "does not fit"),
    (_header({"model.embed_tokens.weight": {"shape": [1], "data_offsets": [0, 4]}}) + bytes(4), "lacks dtype"),
    (_header([1, 2]), "not a JSON object"),
    (_header({"a": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 4]}}) + bytes(4), "non-negative integers"),
    (b"\x10" + bytes(7) + b"\xff" * 16, "not a readable safetensors file"),
])
def test_info_on_a_broken_safetensors_file(checkpoint, tmp_path, capsys, weights, message):
    path = copy_of(checkpoint, tmp_path, weights=weights)
    line = one_error(capsys, ["info", "--model", str(path)])
    assert "model.safetensors: not a readable safetensors file" in line and message in line


def test_a_pickle_torch_refuses_is_one_line_without_weights_only_advice(checkpoint, tmp_path, capsys):
    path = copy_of(checkpoint, tmp_path)
    (path / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload()}, path / "pytorch_model.bin")
    line = one_error(capsys, ["generate", "x", "--model", str(path), *GEN])
    assert "refused" in line and "weights_only" not in line


# ----------------------------------------------------------------------------------------------------- prompts
def _stdin(data: bytes, errors: str = "strict"):
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=errors)


@pytest.mark.parametrize("case", ["argv", "stdin-strict", "stdin-surrogateescape", "chat-strict",
                                  "chat-surrogateescape", "chat-system"])
def test_a_prompt_that_is_not_utf8(checkpoint, capsys, monkeypatch, case):
    model = ["--model", str(checkpoint), *GEN]
    errors = "surrogateescape" if case.endswith("surrogateescape") else "strict"
    monkeypatch.setattr(sys, "stdin", _stdin(b"ab\xff\xfe\n", errors))
    if case == "argv":  # what Python makes of a non-UTF-8 byte in argv
        argv = ["generate", "ab\udcff", *model]
    elif case.startswith("stdin"):
        argv = ["generate", "-", *model]
    elif case == "chat-system":
        monkeypatch.setattr(sys, "stdin", _stdin(b"hello\n"))
        argv = ["chat", "--system", "be\udcff", *model]
    else:
        argv = ["chat", *model]
    line = one_error(capsys, argv)
    assert "UTF-8" in line or "Unicode" in line


def test_block_length_zero_names_block_length(checkpoint, capsys):
    line = one_error(capsys, ["generate", "x", "--model", str(checkpoint), "--block-length", "0"])
    assert "block_length must be a positive integer" in line


# ----------------------------------------------------------------------------------------------- output paths
@pytest.mark.parametrize("command", ["generate-record", "train", "prepare", "eval"])
def test_unwritable_output(checkpoint, dataset, tmp_path, blocker, capsys, command):
    target = blocker / "out"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    argv = {
        "generate-record": ["generate", "x", "--model", str(checkpoint), *GEN, "--record", str(target) + ".html"],
        "train": ["train", "--data", str(dataset), "--preset", "tiny", "--seq-len", "32", "--steps", "1",
                  "--warmup-steps", "1", "--val-rows", "2", "--no-progress", "--device", "cpu",
                  "--out-dir", str(target)],
        "prepare": ["prepare", str(corpus), "--tokenizer", "bytes", "--out", str(target), "--quiet"],
        "eval": ["eval", "--model", str(checkpoint), "--task", "gsm8k", "--data", str(samples), "--out", str(target),
                 "--max-new-tokens", "4", "--no-progress"],
    }[command]
    line = one_error(capsys, argv)
    assert "cannot write there" in line and "is not a directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "corpus.txt", "samples.jsonl"]


# ---------------------------------------------------------------------------------------------------- training
TRAIN = ["--preset", "tiny", "--seq-len", "32", "--steps", "2", "--warmup-steps", "1", "--val-rows", "2",
         "--eval-batches", "1", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("extra, message", [
    (["--model-overrides", '{"bogus": 1}'], "unknown fields bogus"),
    (["--model-overrides", "[1]"], "expected a JSON object"),
    (["--model-overrides", '{"n_layers": true}'], "n_layers must be a positive integer"),
    (["--betas", "[2]"], "betas (--betas) must be a JSON list of two numbers"),
    (["--betas", '[0.9, NaN]'], "--betas: not valid JSON"),
    (["--lr", "nan"], "lr (--lr) must be a finite number"),
    (["--grad-clip", "inf"], "grad_clip (--grad-clip) must be a finite number"),
])
def test_train_options_of_the_wrong_type(dataset, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert message in one_error(capsys, ["train", "--data", str(dataset), "--out-dir", str(out), *TRAIN, *extra])
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("steps: ten\n", "steps (--steps) must be an integer, got 'ten'"),
    ("steps: 1.5\n", "steps (--steps) must be an integer"),
    ("progress: maybe\n", "progress (--progress) must be true or false"),
    ("1: x\nsteps: 2\n", "unknown keys 1"),
])
def test_train_config_file_of_the_wrong_type(dataset, tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {dataset}\nout_dir: {tmp_path / 'run'}\n{text}")
    assert message in one_error(capsys, ["train", str(config)])
    assert not (tmp_path / "run").exists()


def test_yaml_float_without_a_dot_is_a_number():
    from illada.training.config import TrainConfig

    assert TrainConfig.from_dict({"data": "x", "lr": "4e-4"}).lr == 4e-4  # YAML 1.1 reads 4e-4 as a string


def test_an_allocation_failure_is_one_line_and_leaves_no_train_config(dataset, tmp_path, capsys):
    out = tmp_path / "fresh"
    line = one_error(capsys, ["train", "--data", str(dataset), "--out-dir", str(out), *TRAIN,
                              "--micro-batch-size", str(10**12)])
    assert "out of memory" in line and "--micro-batch-size" in line
    assert not (out / "train_config.json").exists() and not (out / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------------- convert
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_convert_max_shard_gb_not_a_positive_number(checkpoint, tmp_path, capsys, value):
    line = one_error(capsys, ["convert", str(checkpoint), str(tmp_path / "out"), "--max-shard-gb", value])
    assert "--max-shard-gb must be a positive number" in line
    assert list(tmp_path.iterdir()) == []


def test_convert_onto_a_full_disk(checkpoint, tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError, not an OSError."""
    import illada.checkpoint.io as checkpoint_io
    from safetensors import SafetensorError

    def full(data, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_io, "save_file", full)
    out = tmp_path / "out"
    line = one_error(capsys, ["convert", str(checkpoint), str(out)])
    assert "No space left on device" in line
    assert list(tmp_path.iterdir()) == []  # no partial output, no staging directory


# -------------------------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("line, message", [
    (b'{"question": "\xff\xfe", "answer": "#### 2"}\n', "not UTF-8"),
    (b'{"question": "1+1?", "answer": NaN}\n', "not valid JSON"),
])
def test_eval_data_with_a_bad_line(checkpoint, tmp_path, capsys, line, message):
    data = tmp_path / "samples.jsonl"
    data.write_bytes(b'{"question": "1+1?", "answer": "#### 2"}\n' + line)
    assert f"{data}:2: {message}" in one_error(capsys, ["eval", "--model", str(checkpoint), "--task", "gsm8k",
                                                         "--data", str(data), "--no-progress"])


# ------------------------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def server():
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    from illada.api import DiffusionLM
    from illada.serving import ServerSettings, create_app, serve_in_thread

    tok = byte_level_tokenizer()
    config = preset("tiny", name="tiny-bad", vocab_size=tok.vocab_size, max_seq_len=64,
                    mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lm = DiffusionLM(model=build_model(config, seed=0).eval(), tokenizer=tok, config=config, name="tiny-bad")
    with serve_in_thread(create_app(lm, ServerSettings(api_key="k"))) as url:
        yield url


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 4}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 4}', "prompt[1]"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"], "max_tokens": 4}', "stop[0]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}', "messages[0]"),
])
def test_server_lone_surrogate_is_a_400(server, route, body, param):
    request = urllib.request.Request(server + route, data=body.encode(), method="POST",
                                     headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 400
    error = json.loads(caught.value.read().decode())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"
    assert error["param"] == param and "Unicode" in error["message"]


def test_model_config_types_are_checked():
    from illada.errors import IlladaError

    for change in ({"rope_theta": float("nan")}, {"n_layers": True}, {"causal": "yes"}, {"eos_token_id": -1}):
        with pytest.raises(IlladaError, match="model config"):
            ModelConfig(**{**PRESETS["tiny"].to_dict(), **change})


# ------------------------------------------------------------------------------ found by tests/test_fuzz.py
def test_a_huge_steps_is_one_token_per_pass(checkpoint, capsys):
    """`--steps 10**30` once overflowed (or allocated 8 bytes per step of) the block schedule."""
    for steps in ("100000000000", str(10**30)):
        assert main(["generate", "x", "--model", str(checkpoint), *GEN, "--steps", steps]) == 0
        assert "4 forward passes" in capsys.readouterr().err


def test_server_huge_steps_is_not_a_500(server):
    body = json.dumps({"prompt": "x", "max_tokens": 4, "steps": 10**30, "block_length": 4}).encode()
    request = urllib.request.Request(server + "/v1/completions", data=body, method="POST",
                                     headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200 and json.loads(response.read())["choices"]


def test_prepare_skips_a_surrogate_or_too_deep_record_and_a_failure_leaves_no_output(tmp_path, capsys):
    from illada.data.prepare import prepare_pretrain
    from illada.errors import IlladaError

    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "a\\ud800b"}\n' + b"[" * 100_000 + b'\n{"text": "fine"}\n')
    manifest = prepare_pretrain([src], tmp_path / "data", "bytes", progress=False)
    assert (manifest["num_examples"], manifest["skipped"]) == (1, 2)
    assert [r["reason"] for r in manifest["skipped_records"]] == [
        "not valid Unicode text (a lone surrogate U+D800)", "invalid JSON (nested too deeply)"]
    src.write_bytes(b'{"text": 1}\n')  # nothing usable: one error, and no half-made dataset (progress.json)
    with pytest.raises(IlladaError, match="no usable documents"):
        prepare_pretrain([src], tmp_path / "new" / "deeper" / "data", "bytes", progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()  # a directory that was there stays, empty
    with pytest.raises(IlladaError, match="no usable documents"):
        prepare_pretrain([src], tmp_path / "empty", "bytes", progress=False)
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("content", [b"[" * 100_000, b'{"step": true}', b'{"step": -1}', b'{"step": NaN}'])
def test_corrupt_trainer_state_json(checkpoint, tmp_path, content):
    from illada.training.checkpointing import CorruptCheckpoint, load_training_checkpoint

    path = copy_of(checkpoint, tmp_path)
    (path / "trainer_state.json").write_bytes(content)
    with pytest.raises(CorruptCheckpoint, match="trainer_state.json"):
        load_training_checkpoint(path)


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "x", "--betas", "[" * 100_000], "--betas: not valid JSON (nested too deeply)"),
    (["rl", "--init-from", "x", "--data", "y", "--rewards", "[" * 100_000], "--rewards: not valid JSON"),
    (["rl", "--init-from", "x", "--data", "y", "--rewards", '{"exact_match": NaN}'], "NaN is not a JSON number"),
    (["train", "--data", "x", "--model-overrides", '{"\ud800": 1}'], "unknown fields \\ud800"),
    (["info", "a\nb\rc\x85d"], "unrecognized arguments: a b c d"),
    (["generate", "x", "--threads", str(2**31)], "--threads: at most 4096 threads"),
])
def test_cli_one_line_for_fuzzed_argv(capsys, argv, message):
    """Deep JSON in a flag, NaN in an rl JSON flag, a lone surrogate echoed in the message (printed escaped, not a
    UnicodeEncodeError) and a stray argument with line breaks (argparse's error kept on one line)."""
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(lines) and message in lines[-1], lines


def test_an_output_path_that_is_not_unicode_is_printed_escaped(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["tasks", "make", "arithmetic", "--n", "1", "--out", "a\udcff.jsonl"]) == 0
    assert "a\\udcff.jsonl: 1 arithmetic" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("threshold: high\n", "threshold (--threshold) must be a finite number"),
    ("? x\n", "unknown keys"),
    ("?\n", "unknown keys None"),
    ("rewards: {1: 1.0}\n", "reward names must be non-empty strings"),
])
def test_rl_config_file_of_the_wrong_type(tmp_path, text, message):
    from illada.errors import IlladaError
    from illada.rl.config import RLConfig
    from illada.training.config import load_config_file

    (tmp_path / "rl.yaml").write_text(f"init_from: x\ndata: y\n{text}")
    with pytest.raises(IlladaError, match=re.escape(message)):
        RLConfig.from_dict(load_config_file(tmp_path / "rl.yaml")).validate()
