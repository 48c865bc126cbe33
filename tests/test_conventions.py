"""The conventions a new user expects (issue 12 §3): --threads, --version and a LICENSE, no --no-no- flags and every
default in --help, a printed random seed, model names everywhere (bundled, run directories, hub ids through the
local Hugging Face cache, never the network), and a chat that streams its reply and survives Ctrl-C."""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import illada
from illada.__main__ import build_parser, main
from test_bad_input import one_error
from test_cli import checkpoint  # noqa: F401 (the tiny byte-level checkpoint fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--seq-len", "64", "--micro-batch-size", "4", "--val-rows", "2", "--eval-batches", "1",
        "--log-every", "1", "--device", "cpu", "--no-progress"]


# ----------------------------------------------------------------------------------------------------- threads
# each compute command with the arguments it requires (its `run` is replaced: only the plumbing is under test)
COMMANDS = {
    "generate": [], "chat": [], "infill": ["a <|mask:2|> b"], "serve": [], "rl": [],
    "eval": ["--task", "gsm8k", "--data", "x.jsonl"], "train": [], "sft": [],
    "prepare": ["in.txt", "--tokenizer", "bytes", "--out", "out"],
}


@pytest.fixture
def threads(monkeypatch):
    """Records torch.set_num_threads calls; each command's run records how many threads it started with."""
    calls: list[int] = []
    started: list[tuple[str, list[int]]] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)
    for name in ("ILLADA_NUM_THREADS", "OMP_NUM_THREADS", "RAYON_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for command in COMMANDS:
        module = f"illada.commands.{command}"
        monkeypatch.setattr(f"{module}.run", lambda args, command=command: started.append((command, list(calls))))
    return calls, started


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_threads_flag_reaches_torch_before_the_command_runs(threads, command):
    calls, started = threads
    assert main([command, *COMMANDS[command], "--threads", "3"]) == 0
    assert calls == [3] and started == [(command, [3])]


@pytest.mark.parametrize("command", ["generate", "train", "serve", "prepare"])
def test_threads_environment_variable_and_the_flag_wins(threads, monkeypatch, command):
    calls, started = threads
    monkeypatch.setenv("ILLADA_NUM_THREADS", "2")
    assert main([command, *COMMANDS[command]]) == 0
    assert main([command, *COMMANDS[command], "--threads", "1"]) == 0
    assert calls == [2, 1] and [c for c, _ in started] == [command, command]


@pytest.mark.parametrize("cpus, want", [(1, 1), (2, 1), (4, 2), (8, 4), (64, 4)])
def test_default_threads_leave_room_on_the_machine(threads, monkeypatch, cpus, want):
    calls, _ = threads
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    assert main(["generate"]) == 0
    assert calls == [want]


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
def test_bad_thread_counts_are_one_line_errors(threads, monkeypatch, capsys, value):
    calls, started = threads
    assert "--threads" in one_error(capsys, ["generate", "--threads", value])
    monkeypatch.setenv("ILLADA_NUM_THREADS", value)
    assert "ILLADA_NUM_THREADS" in one_error(capsys, ["train"])
    assert calls == [] and started == []


# -------------------------------------------------------------------------------------------- version, license
def test_version_and_license(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"illada {illada.__version__}"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert re.search(r'^license = "Apache-2.0"$', (ROOT / "pyproject.toml").read_text(), re.M)


# ------------------------------------------------------------------------------------------------- flags, help
def _subparsers():
    parser = build_parser()
    choices = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices
    return choices


def test_no_flag_is_named_no_no():
    for name, sub in _subparsers().items():
        flags = [s for a in sub._actions for s in a.option_strings]
        assert not [f for f in flags if f.startswith("--no-no-")], name


@pytest.mark.parametrize("command", ["train", "sft"])
def test_decay_norms_embeddings_flag_and_the_old_config_key(tmp_path, command):
    from illada.commands.train import DEFAULTS, config_from_args

    sub = _subparsers()[command]

    def no_decay(*argv: str) -> bool:
        return config_from_args(sub.parse_args([*argv, "--data", "x"]), DEFAULTS).no_decay_norms_embeddings

    assert not no_decay("--decay-norms-embeddings")
    assert no_decay("--no-decay-norms-embeddings")
    assert no_decay()  # the default: no decay on norms and embeddings
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"no_decay_norms_embeddings": False}))  # a config file keeps the field's key
    assert not no_decay(str(path))
    assert no_decay(str(path), "--no-decay-norms-embeddings")


@pytest.mark.parametrize("command", ["train", "sft", "generate", "chat", "eval", "serve", "rl", "infill", "prepare"])
def test_help_shows_every_default(command):
    import argparse

    switches = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)
    sub = _subparsers()[command]
    text = sub.format_help()
    for action in sub._actions:
        if not action.option_strings or action.required or isinstance(action, switches):
            continue
        assert action.help and "default" in action.help.lower(), (command, action.option_strings)
    assert "(default: 32)" in text if command in ("generate", "chat") else True


# ------------------------------------------------------------------------------------------------------- seeds
def _seed_of(err: str) -> int | None:
    found = re.findall(r"^illada: seed (\d+)$", err, re.M)
    assert len(found) <= 1, err
    return int(found[0]) if found else None


@pytest.mark.parametrize("argv", [
    ["generate", "Hi", "--max-new-tokens", "8", "--block-length", "8"],
    ["infill", "Hi <|mask:6|> there"],
])
def test_random_sampling_prints_its_seed_and_the_seed_repeats_it(checkpoint, capsys, argv):
    run = [*argv, "--model", str(checkpoint), "--temperature", "1.5"]
    assert main(run) == 0
    first = capsys.readouterr()
    seed = _seed_of(first.err)
    assert seed is not None
    assert main(run) == 0
    second = capsys.readouterr()
    assert _seed_of(second.err) not in (None, seed)  # a fresh seed each run: temperature > 0 varies
    assert main([*run, "--seed", str(seed)]) == 0
    again = capsys.readouterr()
    assert again.out == first.out and _seed_of(again.err) is None
    assert main([*run, "--seed", str(seed)]) == 0
    assert capsys.readouterr().out == first.out
    assert main([*argv, "--model", str(checkpoint)]) == 0  # greedy: nothing random, no seed line
    assert _seed_of(capsys.readouterr().err) is None


def test_chat_prints_one_seed_for_the_session(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n/exit\n"))
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "8", "--block-length", "8",
                 "--temperature", "1"]) == 0
    assert _seed_of(capsys.readouterr().err) is not None


# ---------------------------------------------------------------------------------------- model names everywhere
def test_a_bundled_model_name_is_a_tokenizer_for_prepare(tmp_path, capsys):
    from illada.api import DEFAULT_MODEL, bundled_models

    if not (bundled_models()[DEFAULT_MODEL] / "tokenizer.json").is_file():
        pytest.skip("the bundled model is not in this install")
    (tmp_path / "a.txt").write_text("To be, or not to be.\n" * 20)
    assert main(["prepare", str(tmp_path / "a.txt"), "--tokenizer", DEFAULT_MODEL, "--out", str(tmp_path / "p"),
                 "--quiet"]) == 0
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["tokenizer"] == str(bundled_models()[DEFAULT_MODEL].resolve())


def _run_directory(checkpoint: Path, root: Path) -> Path:
    """A training run directory whose newest complete checkpoint is `checkpoint` (an older one is incomplete)."""
    run = root / "run"
    shutil.copytree(checkpoint, run / "checkpoints" / "step-5")
    (run / "checkpoints" / "step-5" / "trainer_state.json").write_text(json.dumps({"step": 5}))
    (run / "checkpoints" / "step-9").mkdir()  # no trainer_state.json: not complete, never chosen
    return run


def test_sft_init_from_a_run_directory_uses_its_newest_checkpoint(checkpoint, dataset, tmp_path, capsys):
    run = _run_directory(checkpoint, tmp_path)
    assert main(["sft", "--init-from", str(run), "--data", str(dataset), "--out-dir", str(tmp_path / "sft"),
                 "--steps", "1", "--warmup-steps", "0", "--save-every", "1", "--eval-every", "1", *TINY]) == 0
    assert "checkpoint:" in capsys.readouterr().out


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: nothing here may touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


def test_a_hub_id_offline_and_not_cached_is_a_one_line_error(hub_cache, capsys):
    pytest.importorskip("huggingface_hub")
    line = one_error(capsys, ["generate", "Hi", "--model", "GSAI-ML/LLaDA-8B-Instruct"])
    assert "GSAI-ML/LLaDA-8B-Instruct" in line and "offline" in line and "download" in line


def test_a_hub_id_in_the_local_cache_loads(hub_cache, checkpoint, tmp_path, capsys):
    pytest.importorskip("huggingface_hub")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--someone--tiny-illada"
    shutil.copytree(checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    lm = illada.load("someone/tiny-illada")
    assert lm.config.vocab_size == illada.load(checkpoint).config.vocab_size
    want = lm.generate("Hi", max_new_tokens=8, block_length=8)
    assert main(["generate", "Hi", "--model", "someone/tiny-illada", "--max-new-tokens", "8",
                 "--block-length", "8"]) == 0
    assert capsys.readouterr().out == f"Hi{want}\n"
    (tmp_path / "a.txt").write_text("some text\n" * 10)
    assert main(["prepare", str(tmp_path / "a.txt"), "--tokenizer", "someone/tiny-illada",
                 "--out", str(tmp_path / "p"), "--quiet"]) == 0


def test_a_missing_hub_library_is_a_one_line_error(monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.startswith("huggingface_hub"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    assert "illada[hub]" in one_error(capsys, ["generate", "Hi", "--model", "someone/else"])


# -------------------------------------------------------------------------------------------------------- chat
def test_chat_streams_the_reply_as_it_is_committed(checkpoint, monkeypatch, capsys):
    from illada.commands import chat

    pieces: list[str] = []
    original = chat.ReplyStream.__init__

    def spy(self, decode, write, *args, **kwargs):
        original(self, decode, lambda piece: (pieces.append(piece), write(piece)), *args, **kwargs)

    monkeypatch.setattr(chat.ReplyStream, "__init__", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    argv = ["--max-new-tokens", "24", "--block-length", "8", "--forbid-eos"]
    assert main(["chat", "--model", str(checkpoint), *argv]) == 0
    want = illada.load(checkpoint).chat([{"role": "user", "content": "hello"}], max_new_tokens=24, block_length=8,
                                        forbid_eos=True)
    assert capsys.readouterr().out == want + "\n"
    assert len(pieces) >= 2 and want.startswith("".join(pieces))  # written in several pieces, as it became final


def test_ctrl_c_during_a_reply_cancels_the_turn_not_the_session(checkpoint, monkeypatch, capsys):
    from illada.commands import chat

    calls = {"n": 0}
    original = chat.ReplyStream.__call__

    def interrupt_first_reply(self, event):
        calls["n"] += 1
        if calls["n"] == 3:  # the third denoising step of the first reply
            raise KeyboardInterrupt
        return original(self, event)

    monkeypatch.setattr(chat.ReplyStream, "__call__", interrupt_first_reply)
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\nsecond\n/exit\n"))
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "8", "--block-length", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    # the cancelled question is not in the history of the next turn
    want = illada.load(checkpoint).chat([{"role": "user", "content": "second"}], max_new_tokens=8, block_length=8)
    assert out[-1] == want and out[-2].endswith("(reply cancelled)") and len(out) in (2, 3), out


def test_reply_stream_holds_back_whitespace_stops_and_the_end():
    from types import SimpleNamespace

    from illada.commands.chat import ReplyStream

    mask, eos = 0, 1
    decode = lambda ids, skip_special_tokens=True: "".join(chr(i) for i in ids if i > 1)  # noqa: E731
    written: list[str] = []
    stream = ReplyStream(decode, written.append, mask, end_ids=(eos,), stop_strings=("STOP",))
    prompt = [ord(c) for c in "Q:"]

    def step(text_or_masks: list[int]):
        canvas = prompt + text_or_masks
        step_of = [-1] * len(prompt) + [-1 if t == mask else 0 for t in text_or_masks]
        stream(SimpleNamespace(done=False, canvas=torch.tensor([canvas]), step_of=torch.tensor([step_of])))

    word = [ord(c) for c in " hello world  "]
    step([mask] * 20)
    step(word[:3] + [mask] * 17)  # " he" with 3 chars held back for a possible "STOP"
    step(word + [mask] * 6)
    step(word + [ord(c) for c in "STOP"] + [eos, mask])
    assert "".join(written) == "hello world" and all(written)
