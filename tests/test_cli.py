"""The user-facing commands `generate` and `chat` on a tiny checkpoint built here, and their error handling."""
from __future__ import annotations

import io
import re

import pytest
import torch

import illada
from illada.__main__ import main
from illada.checkpoint import save_checkpoint
from illada.commands.chat import chat_loop
from illada.config import preset
from illada.model import build_model
from illada.sampling import generate
from illada.tokenizer import byte_level_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=96, mask_token_id=tokenizer.mask_token_id,
                    eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    model = build_model(config, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, config, path, tokenizer=tokenizer)
    return path


def expected_text(path, prompt: str, **options) -> str:
    """The generation computed directly through the library, independent of the CLI's plumbing."""
    lm = illada.load(path)
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    out = generate(lm.model, ids, mask_id=lm.mask_token_id, eos_token_id=lm.tokenizer.eos_token_id,
                   eot_token_id=lm.tokenizer.eot_token_id, **options)
    return lm.tokenizer.decode(out.generated_tokens()[0], skip_special_tokens=True)


def test_generate_prints_prompt_and_the_library_generation(checkpoint, capsys):
    code = main(["generate", "Hello", "--model", str(checkpoint), "--fixed-length", "--max-new-tokens", "12",
                 "--block-length", "4", "--steps", "6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    want = expected_text(checkpoint, "Hello", gen_length=12, block_length=4, steps=6)
    assert out == "Hello" + want + "\n"
    stats = re.search(r"\[(\d+) tokens · (\d+) forward passes", err)
    assert stats and int(stats.group(2)) <= 6


@pytest.mark.parametrize("mode", ["--variable-length", "--fixed-length"])
def test_generate_honours_max_new_tokens_exactly_and_caps_with_a_note(checkpoint, capsys, mode):
    """40 new tokens with 32-token blocks are 40 (not 32, nor an error for the fixed canvas); 1000 on a 96-token
    context are what fits after the prompt, with a note (they used to be cut to whole blocks, or refused)."""
    lm = illada.load(checkpoint)
    room = 96 - len(lm.tokenizer.encode("Hi"))
    for asked, want in ((40, 40), (1000, room)):
        code = main(["generate", "Hi", "--model", str(checkpoint), mode, "--max-new-tokens", str(asked),
                     "--block-length", "32", "--forbid-eos"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert int(re.search(r"\[(\d+) tokens ·", err).group(1)) == want
        assert (f"note: max_new_tokens {asked} capped to {room}" in err) == (asked > room)
        steps = want if mode == "--fixed-length" else 32
        text = expected_text(checkpoint, "Hi", gen_length=want, block_length=32, steps=steps, forbid_eos=True,
                             variable_length=mode == "--variable-length")
        assert out == "Hi" + text + "\n"


def test_record_html_holds_one_frame_per_step(checkpoint, tmp_path, capsys):
    page = tmp_path / "run.html"
    code = main(["generate", "Hi", "--model", str(checkpoint), "--fixed-length", "--max-new-tokens", "8",
                 "--block-length", "8", "--steps", "4", "--record", str(page)])
    assert code == 0
    text = page.read_text()
    frames = re.findall(r'<div class="frame">(.*?)</div>', text)
    assert len(frames) == 4  # 8 tokens in 4 steps: 2 committed per step
    for k, frame in enumerate(frames):
        steps = [int(s) for s in re.findall(r'title="step (\d+)"', frame)]
        assert sorted(steps) == sorted(2 * list(range(k + 1)))  # frame k: steps 0..k, two tokens each
        assert frame.count('class="m"') == 8 - 2 * (k + 1)  # the rest still masked
    assert "recorded 4 steps" in capsys.readouterr().err


def test_record_gif_is_an_animated_gif(checkpoint, tmp_path):
    gif = tmp_path / "run.gif"
    assert main(["generate", "Hi", "--model", str(checkpoint), "--fixed-length", "--max-new-tokens", "4",
                 "--block-length", "4", "--steps", "2", "--record", str(gif)]) == 0
    data = gif.read_bytes()
    assert data[:6] in (b"GIF87a", b"GIF89a")
    assert data.count(b"\x21\xf9\x04") >= 2  # a graphic-control block per frame: more than one frame


@pytest.mark.parametrize("argv, message", [
    (["--record", "out.png"], "must end in .html or .gif"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--threshold", "1.5"], "threshold must be in [0, 1]"),
    (["--steps", "0"], "steps must be a positive integer"),
])
def test_generate_user_mistakes_exit_2_with_one_line(checkpoint, capsys, argv, message):
    code = main(["generate", "Hi", "--model", str(checkpoint), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_generate_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "nope")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_chat_loop_feeds_history_and_resets():
    seen: list[list[dict]] = []

    def reply(messages, write):
        seen.append([dict(m) for m in messages])
        return f"answer {len(seen)}"

    out = io.StringIO()
    final = chat_loop(reply, ["hello\n", "again\n", "/reset\n", "fresh\n", "/exit\n", "never\n"], out, system="be brief")
    assert [m["content"] for m in seen[1]] == ["be brief", "hello", "answer 1", "again"]
    assert [m["content"] for m in seen[2]] == ["be brief", "fresh"]  # /reset dropped the history, kept the system
    assert len(seen) == 3  # nothing after /exit
    assert final[-1] == {"role": "assistant", "content": "answer 3"}
    assert out.getvalue().splitlines() == ["answer 1", "answer 2", "(new conversation)", "answer 3"]


def test_chat_command_replies_match_the_handle(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "8", "--block-length", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    lm = illada.load(checkpoint)
    want = lm.chat([{"role": "user", "content": "hello"}], max_new_tokens=8, block_length=8, seed=0)
    assert out == [want]
    assert "<|endoftext|>" not in want and "<|eot_id|>" not in want
