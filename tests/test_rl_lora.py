"""`illada rl --lora-r`: PEFT LoRA on the frozen start checkpoint. Zero-B rollouts are the base's, a step moves only
the adapters, the reference is the base (adapters off, no second copy), exact resume, PEFT's format (PeftModel,
--adapter, illada merge), two processes, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")  # the dev extra installs it (make setup / CI)

import illada
import illada.__main__ as cli
from illada.errors import IlladaError
from illada.rl.trainer import RLTrainer, train_rl
from test_rl import counting_reward, rl_config, tiny_run  # noqa: F401 (tiny_run: the tiny model + prompts fixture)

IDS = torch.tensor([[5, 17, 42, 3, 3, 99, 7, 3]])


def lora_config(root, **overrides):
    return rl_config(root, **{"lora_r": 4, "lora_alpha": 8, "rewards": {"varied:reward": 1.0}, **overrides})


@pytest.fixture
def varied(tiny_run, monkeypatch):  # noqa: F811
    """A reward that differs within every group (so each step updates): the parity of the call count."""
    counting_reward(tiny_run, monkeypatch, "varied", "float(calls[0] % 2)")
    return tiny_run


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def test_zero_b_lora_rollouts_are_the_base_models(varied):
    lora = RLTrainer(lora_config(varied, out_dir=str(varied / "a")))
    base = RLTrainer(rl_config(varied, out_dir=str(varied / "b")))
    indices = lora.prompts_for(0)
    assert indices == base.prompts_for(0)
    _, _, lora_tokens, _ = lora.rollouts(0, indices)
    _, _, base_tokens, _ = base.rollouts(0, indices)
    assert lora_tokens == base_tokens
    assert torch.equal(logits(lora.model), logits(base.model))
    assert lora.reference is None and base.reference is not None  # LoRA holds no second copy


def test_a_step_moves_only_the_adapters_and_the_reference_is_the_base(varied):
    trainer = RLTrainer(lora_config(varied, out_dir=str(varied / "step")))
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for name, p in trainer.model.named_parameters() if name in trained}
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    assert trainer.step(0)["updated"] == 1.0
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trained)
    assert any(not torch.equal(before[n], after[n]) for n in trained if ".lora_B." in n)
    # the frozen base is bit for bit the start checkpoint's
    base = illada.load(varied / "init").model
    init = base.state_dict()
    for name, param in trainer.model.named_parameters():
        if name not in trained:
            assert torch.equal(param.detach(), init[name.replace(".base_layer.", ".")]), name
    with trainer.peft.disable_adapter():
        assert torch.equal(logits(trainer.model), logits(base))
    assert not torch.equal(logits(trainer.model), logits(base))  # the adapters are back on, and changed


def test_lora_rl_resume_is_bit_identical_to_the_uninterrupted_run(varied):
    from safetensors.torch import load_file

    overrides = dict(lora_dropout=0.1, steps=3, save_every=1)
    # (the reward's parity pattern repeats every step: 8 rollouts a step, an even count)
    full = train_rl(lora_config(varied, out_dir=str(varied / "full"), **overrides))
    torch.manual_seed(1234)  # as another process would be: LoRA dropout must not depend on the global generator
    RLTrainer(lora_config(varied, out_dir=str(varied / "split"), **overrides)).run(max_steps=1)
    split = train_rl(lora_config(varied, out_dir=str(varied / "split"), **overrides))
    keys = ("step", "reward_mean", "loss", "kl", "completion_tokens", "updated")
    rows = lambda res: [tuple(r[k] for k in keys) for r in res.history if r["kind"] == "rl"]  # noqa: E731
    assert rows(split) == rows(full) and len(rows(full)) == 3 and all(r[-1] == 1.0 for r in rows(full))
    a = load_file(full.checkpoint / "adapter_model.safetensors")
    b = load_file(split.checkpoint / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
    # its settings are the run's: a full or another-rank run cannot resume it
    with pytest.raises(IlladaError, match="is a LoRA RL checkpoint"):
        train_rl(rl_config(varied, out_dir=str(varied / "split"), steps=4))
    with pytest.raises(IlladaError, match="does not fit this run's model or LoRA settings"):
        train_rl(lora_config(varied, out_dir=str(varied / "split"), steps=4, lora_r=2))


def test_the_adapter_loads_with_peft_and_merges_to_the_same_logits(varied, capsys):
    from peft import PeftModel

    run = varied / "peft"
    result = train_rl(lora_config(varied, out_dir=str(run), steps=2))
    files = {p.name for p in result.checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training_state.pt"} <= files
    assert not any(name.startswith("model") for name in files)  # no copy of the base
    config = json.loads((result.checkpoint / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    unmerged = PeftModel.from_pretrained(illada.load(varied / "init").model, str(result.checkpoint))
    merged = illada.load(varied / "init", adapter=run).model  # --adapter: merged into the weights
    torch.testing.assert_close(logits(merged), logits(unmerged), rtol=1e-5, atol=1e-5)
    assert not torch.equal(logits(merged), logits(illada.load(varied / "init").model))
    assert cli.main(["merge", str(varied / "init"), str(run), str(varied / "merged")]) == 0
    torch.testing.assert_close(logits(illada.load(varied / "merged").model), logits(unmerged), rtol=1e-5,
                               atol=1e-5)
    capsys.readouterr()
    # the run as --adapter alone: the base its adapter_config.json records
    assert cli.main(["generate", "--adapter", str(run), "Say a:", "--max-new-tokens", "4", "--block-length", "4",
                     "--device", "cpu"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--lora-r", "-1"], "rl: lora_r (--lora-r) must be >= 0"),
    (["--lora-r", "4", "--lora-targets", "q_proj,nope"], "unknown module 'nope'"),
    (["--lora-r", "4", "--lora-dropout", "1.5"], "must be in [0, 1)"),
    (["--lora-r", "x"], "--lora-r: expected an integer"),
])
def test_bad_lora_rl_input_is_one_line_with_exit_2(tiny_run, capsys, argv, message):  # noqa: F811
    code = cli.main(["rl", "--init-from", str(tiny_run / "init"), "--data", str(tiny_run / "prompts.jsonl"),
                     "--task", "exact", "--out-dir", str(tiny_run / "never"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tiny_run / "never").exists()


def test_two_processes_train_one_adapter(varied):
    out = varied / "ddp"
    args = ["--init-from", str(varied / "init"), "--data", str(varied / "prompts.jsonl"), "--task", "exact",
            "--out-dir", str(out), "--steps", "1", "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "8", "--block-length", "8", "--sampling-steps", "8", "--device", "cpu",
            "--no-progress", "--lora-r", "4", "--lora-alpha", "8", "--rewards", '{"varied:reward": 1}']
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(varied)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                             "-m", "illada", "rl", *args], env=env, capture_output=True, text=True, timeout=300,
                            cwd=varied)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"rl"' in line]
    assert [(r["step"], r["rollouts"], r["updated"]) for r in rows] == [(1, 8, 1.0)]
    checkpoint = out / "checkpoints" / "step-00000001"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "model.safetensors").exists()
    # one process continues it
    more = train_rl(lora_config(varied, out_dir=str(out), steps=2))
    assert more.step == 2 and (out / "checkpoints" / "step-00000002" / "adapter_model.safetensors").is_file()
