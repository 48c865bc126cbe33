"""SFT end to end from raw files, through the CLI: pre-train -> chat JSONL -> prepare --kind sft -> sft -> chat."""
import json
from pathlib import Path

import pytest

import illada
from illada.__main__ import main
from illada.training.checkpointing import latest_checkpoint

QUESTION, ANSWER = "Who wrote Hamlet?", "Shakespeare."
TINY = ["--preset", "tiny", "--seq-len", "64", "--micro-batch-size", "4", "--val-rows", "2", "--eval-batches", "1",
        "--log-every", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    (root / "corpus.txt").write_text("Some plays were written long ago, and people still read them.\n" * 40)
    assert main(["prepare", str(root / "corpus.txt"), "--tokenizer", "bytes", "--out", str(root / "packed"),
                 "--quiet"]) == 0
    assert main(["train", "--data", str(root / "packed"), "--out-dir", str(root / "pre"), "--steps", "3",
                 "--warmup-steps", "1", "--save-every", "3", "--eval-every", "3", *TINY]) == 0
    # the chat corpus: the same exchange many times, plus a malformed record that must be skipped, not fatal
    chat = root / "chat.jsonl"
    record = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    chat.write_text("\n".join([json.dumps(record)] * 48 + ['{"messages": "not a list"}']) + "\n")
    return root


def sft_losses(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.parametrize("fmt, objective", [("variable", "diffusion"), ("pairs", "sft-pairs")])
def test_sft_from_raw_chat_file_learns_the_reply(pretrained, capsys, fmt, objective):
    root = pretrained
    data = root / f"sft-{fmt}"
    init = latest_checkpoint(root / "pre")
    assert main(["prepare", str(root / "chat.jsonl"), "--kind", "sft", "--sft-format", fmt,
                 "--tokenizer", str(init), "--out", str(data), "--quiet"]) == 0
    assert "1 bad records skipped" in capsys.readouterr().out
    extra = []
    if fmt == "variable":
        # rows of exactly one exchange (prompt + response + EOS): the stream then shows every row the same
        # example from its start, which a tiny model learns in a few dozen steps
        manifest = json.loads((data / "manifest.json").read_text())
        per_example, rest = divmod(manifest["num_tokens"], 48)
        assert rest == 0
        extra = ["--seq-len", str(per_example)]
    out = root / f"run-{fmt}"
    assert main(["sft", "--init-from", str(init), "--data", str(data), "--out-dir", str(out), "--objective", objective,
                 "--steps", "60", "--lr", "1e-2", "--warmup-steps", "5", "--split-prob", "0",
                 "--save-every", "60", "--eval-every", "60", *TINY, *extra]) == 0
    losses = sft_losses(out)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    lm = illada.load(latest_checkpoint(out))
    reply = lm.chat([{"role": "user", "content": QUESTION}], max_new_tokens=32, block_length=16)
    if fmt == "pairs":
        # the prompt is never masked, so 60 steps suffice to learn the reply and the EOS after it
        assert reply == ANSWER
    else:
        # every token is maskable here (the model must also denoise the prompt, and RoPE gives it no absolute
        # positions when all is masked): it learns more slowly, so only the plumbing and the loss are checked
        assert isinstance(reply, str) and "<|" not in reply


def test_sft_requires_a_checkpoint_to_start_from(pretrained, capsys):
    assert main(["sft", "--data", str(pretrained / "packed")]) == 2
    assert "--init-from" in capsys.readouterr().err


def test_ar_twin_trains_on_a_pairs_dataset(pretrained, capsys):
    """`--objective ar` on a pairs dataset is AR SFT (next-token loss on the responses): the twin of an sft-pairs
    run on the same rows; a causal model trained so from scratch answers the question."""
    root = pretrained
    data = root / "sft-pairs-ar"
    assert main(["prepare", str(root / "chat.jsonl"), "--kind", "sft", "--sft-format", "pairs",
                 "--tokenizer", "bytes", "--out", str(data), "--quiet"]) == 0
    out = root / "run-ar-pairs"
    assert main(["train", "--data", str(data), "--out-dir", str(out), "--objective", "ar", "--steps", "60",
                 "--lr", "1e-2", "--warmup-steps", "5", "--split-prob", "0", "--save-every", "60",
                 "--eval-every", "60", *TINY]) == 0
    losses = sft_losses(out)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    lm = illada.load(latest_checkpoint(out))
    assert lm.config.causal
    assert lm.chat([{"role": "user", "content": QUESTION}], max_new_tokens=32) == ANSWER
