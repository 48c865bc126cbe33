"""LoRA through PEFT: zero-B equals the base, a LoRA SFT learns a reply, PEFT's format, merge, exact resume, CLI."""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")  # the dev extra installs it (make setup / CI): these run there

import illada
from illada.__main__ import main
from illada.errors import IlladaError
from illada.training.checkpointing import latest_checkpoint
from illada.training.config import TrainConfig
from illada.training.trainer import Trainer, train

QUESTION, ANSWER = "Who wrote Hamlet?", "Shakespeare."
TINY = ["--preset", "tiny", "--seq-len", "64", "--micro-batch-size", "4", "--val-rows", "2", "--eval-batches", "1",
        "--log-every", "1", "--device", "cpu", "--no-progress"]
IDS = torch.tensor([[5, 17, 42, 3, 3, 99, 7, 3]])


def base_and_sft_data(root: Path) -> None:
    """root/pre: a base model pre-trained briefly on a text that has the answer's word; root/sft: an SFT set of one
    repeated exchange (also tests/test_qlora.py's)."""
    (root / "corpus.txt").write_text("Shakespeare wrote plays long ago, and people still read them.\n" * 40)
    assert main(["prepare", str(root / "corpus.txt"), "--tokenizer", "bytes", "--out", str(root / "packed"),
                 "--quiet"]) == 0
    assert main(["train", "--data", str(root / "packed"), "--out-dir", str(root / "pre"), "--steps", "40",
                 "--lr", "1e-2", "--warmup-steps", "5", "--save-every", "40", "--eval-every", "40", *TINY]) == 0
    record = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    (root / "chat.jsonl").write_text("\n".join([json.dumps(record)] * 48) + "\n")
    assert main(["prepare", str(root / "chat.jsonl"), "--kind", "sft", "--sft-format", "pairs",
                 "--tokenizer", str(root / "pre"), "--out", str(root / "sft"), "--quiet"]) == 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """The base and SFT set of `base_and_sft_data`, and a LoRA SFT run on them."""
    root = tmp_path_factory.mktemp("lora")
    base_and_sft_data(root)
    assert main(["sft", "--init-from", str(root / "pre"), "--data", str(root / "sft"), "--out-dir", str(root / "run"),
                 "--objective", "sft-pairs", "--steps", "150", "--lr", "1e-2", "--warmup-steps", "5",
                 "--weight-decay", "0", "--save-every", "150", "--eval-every", "150", "--lora-r", "8",
                 "--lora-alpha", "16", *TINY]) == 0
    return root


def base_model(root: Path):
    return illada.load(root / "pre").model


def test_zero_initialised_lora_is_exactly_the_base_model(setup):
    from illada.lora import wrap

    model = base_model(setup)
    with torch.no_grad():
        before = model(IDS)
        wrap(model, r=4, alpha=8, dropout=0.0, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
        after = model(IDS)
    assert torch.equal(before, after)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * 7 * model.config.n_layers


def learnt_and_saved_adapters_only(run: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LoRA (or QLoRA) SFT run's loss halved and its newest checkpoint holds adapter tensors alone, in PEFT's
    files: that checkpoint and its tensors."""
    from safetensors.torch import load_file

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    checkpoint = latest_checkpoint(run)
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training_state.pt", "trainer_state.json"} <= files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files)
    tensors = load_file(checkpoint / "adapter_model.safetensors")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    return checkpoint, tensors


def test_lora_sft_learns_the_reply_and_saves_only_adapters_in_peft_format(setup):
    from peft import PeftModel

    checkpoint, tensors = learnt_and_saved_adapters_only(setup / "run")
    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert Path(adapter_config["base_model_name_or_path"]) == latest_checkpoint(setup / "pre").resolve()
    # the optimizer state holds the adapters alone
    optimizer = torch.load(checkpoint / "training_state.pt", weights_only=True)["optimizer"]
    assert set(optimizer["state"]) == {k.replace("base_model.model.", "").replace(".weight", ".default.weight")
                                       for k in tensors}
    # PEFT itself loads the adapter, and gives what illada.load(adapter=) gives
    lm = illada.load(setup / "pre", adapter=setup / "run")
    peft_model = PeftModel.from_pretrained(base_model(setup), str(checkpoint))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS), peft_model(IDS), rtol=1e-4, atol=1e-4)
    assert lm.chat([{"role": "user", "content": QUESTION}], max_new_tokens=32, block_length=16) == ANSWER
    # the base alone does not know it
    assert illada.load(setup / "pre").chat([{"role": "user", "content": QUESTION}], max_new_tokens=32,
                                           block_length=16) != ANSWER


def test_merge_equals_the_unmerged_adapter(setup, capsys):
    from peft import PeftModel

    out = setup / "merged"
    assert main(["merge", str(setup / "pre"), str(setup / "run"), str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    unmerged = PeftModel.from_pretrained(base_model(setup), str(latest_checkpoint(setup / "run")))
    with torch.no_grad():
        torch.testing.assert_close(illada.load(out).model(IDS), unmerged(IDS), rtol=1e-4, atol=1e-4)
    assert main(["merge", str(setup / "pre"), str(setup / "run"), str(out)]) == 2  # exists: --force to replace
    assert "--force" in capsys.readouterr().err


def test_generate_with_adapter_end_to_end(setup, capsys):
    chat = ["--chat", QUESTION, "--max-new-tokens", "32", "--block-length", "16"]
    assert main(["generate", "--model", str(setup / "pre"), "--adapter", str(setup / "run"), *chat]) == 0
    assert capsys.readouterr().out.splitlines()[0] == ANSWER
    # the adapter alone: its recorded base; a LoRA run as --model: the same
    for flags in (["--adapter", str(setup / "run")], ["--model", str(setup / "run")]):
        assert main(["generate", *flags, *chat]) == 0
        assert capsys.readouterr().out.splitlines()[0] == ANSWER


def lora_config(root: Path, out_dir: Path, **overrides) -> TrainConfig:
    values = dict(data=str(root / "sft"), out_dir=str(out_dir), init_from=str(root / "pre"), objective="sft-pairs",
                  seq_len=64, micro_batch_size=2, grad_accum=2, steps=6, lr=1e-2, warmup_steps=2,
                  schedule="linear-tail", save_every=3, eval_every=3, eval_batches=1, val_rows=2, log_every=1,
                  progress=False, device="cpu", lora_r=4, lora_alpha=8, lora_dropout=0.1)
    values.update(overrides)
    return TrainConfig(**values)


def test_lora_resume_reproduces_the_uninterrupted_run(setup, tmp_path):
    from safetensors.torch import load_file

    full = train(lora_config(setup, tmp_path / "full"))
    first = train(lora_config(setup, tmp_path / "split"), max_steps=4)
    second = train(lora_config(setup, tmp_path / "split"))
    assert second.step == 6
    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(full.losses),
                               rtol=1e-5, atol=1e-6)
    a = load_file(full.checkpoint / "adapter_model.safetensors")
    b = load_file(second.checkpoint / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    # only the adapters are trained
    trainer = Trainer(lora_config(setup, tmp_path / "other"))
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, param in trainer.model.named_parameters():
        assert param.requires_grad == (".lora_" in name) == (id(param) in in_optimizer), name
    # a full fine-tuning run cannot resume a LoRA one (nor the other way round)
    with pytest.raises(IlladaError, match="LoRA fine-tuning checkpoint"):
        train(lora_config(setup, tmp_path / "split", lora_r=0, steps=8))


@pytest.mark.parametrize("argv, message", [
    (["generate", "--adapter", "/nonexistent/adapter", "hi"], "no such directory"),
    (["generate", "--model", "PRE", "--adapter", "PRE", "hi"], "no adapter_config.json"),
    (["sft", "--init-from", "PRE", "--data", "SFT", "--lora-r", "-1"], "must be >= 0"),
    (["sft", "--init-from", "PRE", "--data", "SFT", "--lora-r", "4", "--lora-targets", "q_proj,nope"],
     "unknown module 'nope'"),
    (["train", "--data", "SFT", "--lora-r", "4"], "needs --init-from"),
    (["merge", "PRE", "/nonexistent/adapter", "OUT"], "no such directory"),
])
def test_bad_lora_input_is_one_line_with_exit_2(setup, capsys, argv, message):
    names = {"PRE": str(setup / "pre"), "SFT": str(setup / "sft"), "OUT": str(setup / "never")}
    assert main([names.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (setup / "never").exists()


def test_adapter_for_another_shape_is_one_line(setup, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", "--data", str(setup / "packed"), "--out-dir", str(other), "--steps", "1",
                 "--warmup-steps", "0", "--save-every", "1", "--eval-every", "1", "--model-overrides", '{"hidden_size": 64}', *TINY]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(other), "--adapter", str(setup / "run"), "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit this model" in err and len(err.splitlines()) == 1, err
