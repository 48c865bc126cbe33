"""`illada rl`: GRPO pieces against hand-computed values, reward plug-ins and their failures, a tiny run that learns,
exact resume, and the CLI's one-line errors."""
import json
import math
import sys

import pytest
import torch

import illada.__main__ as cli
from illada.checkpoint import save_checkpoint
from illada.config import preset
from illada.errors import IlladaError
from illada.model import build_model
from illada.rl.config import RLConfig
from illada.rl.grpo import group_advantages, policy_loss, token_policy_loss
from illada.rl.rewards import RewardError, build_rewards
from illada.rl.trainer import RLTrainer, train_rl
from illada.tokenizer import byte_level_tokenizer


# ---------------------------------------------------------------------------------------------------- GRPO math
def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    # group 1: mean 0.5, population std 0.5 -> +-1; group 2: all equal -> 0
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def test_policy_loss_values_and_gradients_by_hand():
    new = torch.tensor([-10.0, -20.0, -5.0], requires_grad=True)
    old = torch.tensor([-10.0, -20.0, -5.0 - 3.0])  # third: ratio exp(3 / 2) far above 1 + clip
    adv = torch.tensor([1.0, -2.0, 1.0])
    lengths = torch.tensor([5, 4, 2])
    loss, stats = policy_loss(new, old, adv, lengths, clip=0.2)
    # rows 1-2: ratio 1 -> surrogate = A; row 3: min(r A, 1.2 A) = 1.2
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 1.2) / 3)
    loss.backward()
    # d/dnew_j of -(r_j A_j)/N = -A_j r_j / (N n_j); the clipped row has no gradient
    torch.testing.assert_close(new.grad, torch.tensor([-1.0 / (3 * 5), 2.0 / (3 * 4), 0.0]))
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    ref = torch.tensor([-11.0, -20.0, -5.0])
    _, with_kl = policy_loss(new, old, adv, lengths, ref=ref, kl_coef=0.5)
    d = torch.tensor([-1.0 / 5, 0.0, 0.0])
    assert with_kl["kl"] == pytest.approx(float((d.exp() - d - 1).mean()))


def test_token_policy_loss_by_hand():
    # two rows: row 0 has 2 completion positions, row 1 has 1 (its second position is padding)
    new = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0 - 1.0], [-3.0, 0.0]])  # position (0, 1): ratio e^1 > 1 + clip
    completion = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0])
    loss, stats = token_policy_loss(new, old, adv, completion, clip=0.2)
    # row 0: mean(1 * 1, min(e * 1, 1.2 * 1)) = 1.1; row 1: -1 -> loss = -(1.1 - 1) / 2
    assert loss.item() == pytest.approx(-(1.1 - 1.0) / 2)
    loss.backward()
    # d/dnew of -(r A w)/N with w = 1/n_row: (0,0): -1 * 1/2 / 2; (0,1): clipped -> 0; (1,0): +1 * 1 / 2
    torch.testing.assert_close(new.grad, torch.tensor([[-0.25, 0.0], [0.5, 0.0]]))
    assert stats["clip_fraction"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------------- rewards
def test_builtin_rewards():
    rewards = build_rewards({"exact_answer": 1.0, "format": 0.5})
    totals, parts = rewards.score(["2 + 2 = 4\n#### 4", "#### 5", "four"], [{"answer": "#### 4"}] * 3)
    assert parts == {"exact_answer": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0]} and totals == [1.5, 0.5, 0.0]
    exact = build_rewards(["exact_match"])
    assert exact.score([" 1234.", "123"], [{"answer": "1234"}] * 2)[0] == [1.0, 0.0]


def test_a_user_reward_module_and_its_failures(tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text(
        "def length(completion, sample):\n    return len(completion)\n"
        "def broken(completion, sample):\n    return {'Q1': 1.0}[sample['question']]\n"
        "def nan(completion, sample):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("myreward", None)
    assert build_rewards(["myreward:length"]).score(["abc"], [{}])[0] == [3.0]
    with pytest.raises(RewardError, match=r"reward myreward:broken failed on sample 1 \('Q2'\): KeyError"):
        build_rewards(["myreward:broken"]).score(["a", "b"], [{"question": "Q1"}, {"question": "Q2"}])
    with pytest.raises(RewardError, match="returned nan"):
        build_rewards(["myreward:nan"]).score(["a"], [{}])
    for spec, message in [("nosuchmodule:f", "cannot import"), ("myreward:missing", "no function"),
                          ("bogus", "unknown reward")]:
        with pytest.raises(IlladaError, match=message):
            build_rewards([spec])


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture
def tiny_run(tmp_path):
    tok = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64, mask_token_id=tok.mask_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, hidden_size=32,
                    intermediate_size=64, n_layers=1, n_heads=2, n_kv_heads=2)
    save_checkpoint(build_model(config, seed=0), config, tmp_path / "init", tokenizer=tok)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {c}:", "answer": c * 4}) + "\n" for c in "abcdef"))
    (tmp_path / "rewardmod.py").write_text(
        "def count_a(completion, sample):\n    return completion.count('a') / max(len(completion), 1)\n")
    return tmp_path


def counting_reward(root, monkeypatch, module: str, value: str) -> None:
    """A user reward module `module:reward` returning the expression `value` of completion and calls[0] (the number
    of calls so far); `_raise(error)` raises."""
    source = ("calls = [0]\n"
              "def _raise(error):\n    raise error\n"
              "def reward(completion, sample):\n"
              "    calls[0] += 1\n"
              f"    return {value}\n")
    (root / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(root))
    sys.modules.pop(module, None)


def rl_config(root, **overrides) -> RLConfig:
    values = dict(init_from=str(root / "init"), data=str(root / "prompts.jsonl"), task="exact",
                  out_dir=str(root / "rl"), steps=4, prompts_per_step=2, group_size=4, inner_updates=2,
                  max_new_tokens=8, block_length=8, sampling_steps=8, temperature=1.0, lr=1e-3, warmup_steps=1,
                  save_every=2, eval_every=100, progress=False, device="cpu")
    values.update(overrides)
    return RLConfig(**values)


@pytest.mark.parametrize("estimator, ratio", [("mean_field", "sequence"), ("coupled", "sequence"),
                                             ("elbo", "sequence"), ("coupled", "token")])
def test_rl_raises_a_reward_on_a_tiny_model(tiny_run, monkeypatch, estimator, ratio):
    monkeypatch.syspath_prepend(str(tiny_run))
    cfg = rl_config(tiny_run, rewards={"rewardmod:count_a": 1.0}, steps=30, lr=3e-3, group_size=8, ratio=ratio,
                    inner_updates=2, estimator=estimator, out_dir=str(tiny_run / f"rl-{estimator}-{ratio}"),
                    save_every=30)
    history = [r for r in train_rl(cfg).history if r["kind"] == "rl"]
    first, last = history[:5], history[-5:]
    mean = lambda rows: sum(r["reward_mean"] for r in rows) / len(rows)  # noqa: E731
    assert mean(last) > mean(first) + 0.15, (mean(first), mean(last))
    assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in history)


def test_rl_resume_repeats_the_uninterrupted_run_exactly(tiny_run):
    full = train_rl(rl_config(tiny_run, out_dir=str(tiny_run / "full")))
    RLTrainer(rl_config(tiny_run, out_dir=str(tiny_run / "split"))).run(max_steps=2)
    split = train_rl(rl_config(tiny_run, out_dir=str(tiny_run / "split")))
    keys = ("step", "reward_mean", "loss", "kl", "completion_tokens")
    rows = lambda res: [tuple(r[k] for k in keys) for r in res.history if r["kind"] == "rl"]  # noqa: E731
    assert rows(split) == rows(full) and len(rows(full)) == 4
    from safetensors.torch import load_file

    assert all(torch.equal(x, y) for x, y in zip(load_file(full.checkpoint / "model.safetensors").values(),
                                                load_file(split.checkpoint / "model.safetensors").values()))
    import illada

    assert illada.load(full.checkpoint).generate("Say a:", max_new_tokens=4, steps=4, block_length=4) is not None
    assert (tiny_run / "full" / "rl.png").is_file()


@pytest.mark.parametrize("argv, message", [
    ([], "--init-from"),
    (["--estimator", "magic"], "unknown estimator 'magic'"),
    (["--group-size", "1"], "group_size must be >= 2"),
    (["--lr", "nan"], "expected a finite number"),
    (["--rewards", "{bad json"], "not valid JSON"),
    (["--rewards", '{"nosuch:f": 1}'], "cannot import nosuch"),
    (["--temperature", "0"], "temperature must be > 0"),
])
def test_rl_cli_mistakes_are_one_line(tiny_run, capsys, argv, message):
    base = [] if not argv else ["--init-from", str(tiny_run / "init"), "--data", str(tiny_run / "prompts.jsonl"),
                                "--task", "exact", "--out-dir", str(tiny_run / "cli"), "--prompts-per-step", "2"]
    code = cli.main(["rl", *base, *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_failing_reward_stops_the_run_naming_the_sample_and_keeps_the_checkpoint(tiny_run, monkeypatch, capsys):
    counting_reward(tiny_run, monkeypatch, "flaky", "_raise(ValueError('bad sample')) if calls[0] > 16 else 0.0")
    code = cli.main(["rl", "--init-from", str(tiny_run / "init"), "--data", str(tiny_run / "prompts.jsonl"),
                     "--task", "exact", "--out-dir", str(tiny_run / "flaky"), "--rewards", '{"flaky:reward": 1}',
                     "--steps", "4", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8",
                     "--block-length", "8", "--sampling-steps", "8", "--save-every", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "reward flaky:reward failed on sample 0" in err and "ValueError: bad sample" in err
    assert (tiny_run / "flaky" / "checkpoints" / "step-00000002").is_dir()  # steps 1-2 kept, step 3 failed


def test_two_processes_split_the_rollouts_and_resume_as_one(tiny_run):
    import os
    import subprocess

    out = tiny_run / "ddp"
    args = ["--init-from", str(tiny_run / "init"), "--data", str(tiny_run / "prompts.jsonl"), "--task", "exact",
            "--out-dir", str(out), "--steps", "2", "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "8", "--block-length", "8", "--sampling-steps", "8", "--save-every", "2",
            "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                             "-m", "illada", "rl", *args], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tiny_run)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl_rows = [r for r in rows if r["kind"] == "rl"]
    assert [r["step"] for r in rl_rows] == [1, 2] and all(r["rollouts"] == 8 for r in rl_rows)  # 2 ranks x 1 x 4
    # the checkpoint is world-size independent: one process continues it
    more = train_rl(rl_config(tiny_run, out_dir=str(out), steps=3, prompts_per_step=2, group_size=4))
    assert more.step == 3 and (out / "checkpoints" / "step-00000003").is_dir()


def test_rl_help_states_each_default_once(capsys):
    assert cli.main(["rl", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in text.split(" --")[1:]:
        assert option.count("(default") <= 1, option
    assert "(default: best available)" in text and "(default: coupled)" in text


def test_a_batch_without_signal_does_not_move_the_weights(tiny_run, monkeypatch):
    counting_reward(tiny_run, monkeypatch, "onceonly", "completion.count('a') + calls[0] % 3 if calls[0] <= 8 else 1.0")
    trainer = RLTrainer(rl_config(tiny_run, rewards={"onceonly:reward": 1.0}, prompts_per_step=2, group_size=4,
                                  out_dir=str(tiny_run / "quiet")))
    first = trainer.step(0)  # 8 rollouts with differing rewards: an update
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    second = trainer.step(1)  # all rewards 1.0: no signal, and Adam's momentum must not move anything
    assert first["updated"] == 1.0 and second["updated"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_off_a_terminal_rl_logs_one_plain_line_per_step(tiny_run, capsys):
    train_rl(rl_config(tiny_run, steps=2, progress=True, out_dir=str(tiny_run / "plain")))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split(" · ")[0] for line in lines] == ["step 1/2", "step 2/2"]
    assert all(" · reward " in line and " · kl " in line for line in lines)


def test_sigterm_saves_after_the_step_and_the_rerun_resumes(tiny_run):
    import os
    import signal
    import subprocess
    import time

    out = tiny_run / "sig"
    cmd = [sys.executable, "-m", "illada", "rl", "--init-from", str(tiny_run / "init"), "--data",
           str(tiny_run / "prompts.jsonl"), "--task", "exact", "--out-dir", str(out), "--steps", "100000",
           "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8", "--block-length", "8",
           "--sampling-steps", "8", "--save-every", "100000", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count('"rl"') < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]  # stopped early, said so
    from illada.training.checkpointing import latest_checkpoint

    checkpoint = latest_checkpoint(out)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"rl"' in line]
    assert state["step"] >= 2 and logged == list(range(1, state["step"] + 1))
    resumed = train_rl(rl_config(tiny_run, out_dir=str(out), steps=state["step"] + 1))
    assert resumed.step == state["step"] + 1
