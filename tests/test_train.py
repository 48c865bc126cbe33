"""Trainer: exact resume, multi-process equivalence (gloo), NaN handling, signals, CLI validation."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from illada.__main__ import main
from illada.training.checkpointing import latest_checkpoint
from illada.training.config import TrainConfig
from illada.training.trainer import Trainer, train

def tiny_config(dataset: Path, out_dir: Path, **overrides) -> TrainConfig:
    values = dict(data=str(dataset), out_dir=str(out_dir), preset="tiny", seq_len=32, micro_batch_size=2,
                  grad_accum=2, steps=6, lr=3e-3, warmup_steps=2, schedule="wsd", save_every=3, eval_every=3,
                  eval_batches=1, eval_mc_samples=2, val_rows=2, log_every=1, progress=False, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def train_losses(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_loss_decreases_and_checkpoint_is_a_loadable_model(dataset, tmp_path):
    import illada

    result = train(tiny_config(dataset, tmp_path / "run", steps=30, save_every=30, eval_every=30))
    assert len(result.losses) == 30 and all(math.isfinite(x) for x in result.losses)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    lm = illada.load(result.checkpoint)
    assert lm.config.mask_token_id == lm.tokenizer.mask_token_id
    assert lm.model(torch.tensor([[5, 6, 7]])).shape == (1, 3, lm.config.vocab_size)


def test_resume_reproduces_uninterrupted_run(dataset, tmp_path):
    full = train(tiny_config(dataset, tmp_path / "full"))
    first = train(tiny_config(dataset, tmp_path / "split"), max_steps=4)
    assert first.step == 4 and latest_checkpoint(tmp_path / "split").name == "step-00000004"
    seconds_first = json.loads((first.checkpoint / "trainer_state.json").read_text())["train_seconds"]
    second = train(tiny_config(dataset, tmp_path / "split"))
    assert second.step == 6
    # wall time adds up over sessions: the resumed run's total includes the first session's
    elapsed = [json.loads(line)["elapsed_s"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
               if '"train"' in line]
    assert elapsed == sorted(elapsed) and elapsed[4] > seconds_first > 0
    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(full.losses),
                               rtol=1e-5, atol=1e-6)
    assert train_losses(tmp_path / "split") == pytest.approx(full.losses, rel=1e-5)


def test_lr_follows_schedule(dataset, tmp_path):
    from illada.training.trainer import build_schedule_for

    cfg = tiny_config(dataset, tmp_path / "lr", steps=8, schedule="cosine", switch_step=4)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    schedule = build_schedule_for(cfg)
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert lrs == pytest.approx([schedule(step) for step in range(8)])


def test_non_finite_steps_are_skipped_then_stop(dataset, tmp_path, monkeypatch):
    from illada.errors import IlladaError

    trainer = Trainer(tiny_config(dataset, tmp_path / "nan", steps=10, max_bad_steps=3, save_every=100))
    real = trainer.objective
    calls = {"n": 0}

    def flaky(model, batch, generator):
        calls["n"] += 1
        loss, stats = real(model, batch, generator)
        step = (calls["n"] - 1) // trainer.cfg.grad_accum
        return (loss * float("nan"), stats) if step == 1 or step >= 4 else (loss, stats)

    trainer.objective = flaky
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(IlladaError, match="3 consecutive non-finite"):
        trainer.run()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # good steps did update
    assert all(torch.isfinite(v).all() for v in after.values())


def _torchrun(args: list[str], nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           "-m", "illada", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _cli_args(dataset: Path, out_dir: Path, **kw) -> list[str]:
    values = dict(data=dataset, out_dir=out_dir, preset="tiny", seq_len=32, micro_batch_size=2, steps=4, lr=3e-3,
                  warmup_steps=2, save_every=2, eval_every=100, eval_batches=1, val_rows=2, log_every=1,
                  device="cpu")
    values.update(kw)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    return args + ["--no-progress"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_reproduce_single_process(dataset, tmp_path, mode):
    # A constant schedule: the 4-step multi-process run and the 6-step runs then share every step's learning rate.
    same = dict(steps=6, grad_accum=2, save_every=100, eval_every=100, schedule="constant")
    single = train(tiny_config(dataset, tmp_path / "single", **same))
    # Two processes, one micro-batch each: the same global batch of 4 rows per step.
    result = _torchrun(_cli_args(dataset, tmp_path / "multi", grad_accum=1, distributed=mode,
                                                  schedule="constant"), 2, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "multi")), torch.tensor(single.losses[:4]),
                               rtol=1e-4, atol=1e-5)
    # ...and its checkpoint resumes as a single process, continuing the single-process trajectory.
    resumed = train(tiny_config(dataset, tmp_path / "multi", **same))
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(single.losses[4:]), rtol=1e-4, atol=1e-5)


def test_sigterm_saves_a_checkpoint_and_resume_continues(dataset, tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "illada", "train",
           *_cli_args(dataset, out, steps=100000, save_every=100000, eval_every=100000)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]  # stopped, not finished: scripts must not carry on
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] >= 3 and state["step"] == len(train_losses(out))


def test_ar_objective_trains_a_causal_model(dataset, tmp_path):
    import illada

    result = train(tiny_config(dataset, tmp_path / "ar", objective="ar", steps=3, save_every=3, eval_every=3))
    assert all(math.isfinite(x) for x in result.losses)
    assert illada.load(result.checkpoint).config.causal is True
    # an AR validation loss is an exact NLL: reported as perplexity, not as a bound
    val = [json.loads(line) for line in (tmp_path / "ar" / "metrics.jsonl").read_text().splitlines()
           if '"val"' in line][-1]
    assert "ppl_bound" not in val and val["ppl"] == pytest.approx(math.exp(val["val_loss"]))


def test_adapt_causal_starts_a_diffusion_run_from_ar_weights_with_attention_opened(dataset, tmp_path):
    import illada
    from illada.model import build_model

    ar = train(tiny_config(dataset, tmp_path / "ar", objective="ar", steps=3, save_every=3, eval_every=3))
    with pytest.raises(Exception, match="causal"):  # without the flag the mismatch is refused
        Trainer(tiny_config(dataset, tmp_path / "refused", init_from=str(ar.checkpoint)))
    trainer = Trainer(tiny_config(dataset, tmp_path / "adapted", init_from=str(ar.checkpoint), adapt_causal=True))
    source = illada.load(ar.checkpoint).model.eval()
    assert trainer.model_config.causal is False and trainer.model_config.shift_logits is True  # Dream's shift
    # the reference: a fresh bidirectional model of the same shape given the AR weights
    reference = build_model(trainer.model_config, device="cpu", seed=0)
    reference.load_state_dict(source.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        adapted = trainer.model.eval()(ids)
        torch.testing.assert_close(adapted, reference.eval()(ids))
        assert not torch.allclose(adapted[:, 0], source(ids)[:, 0])  # position 0 now sees the later tokens
    result = train(tiny_config(dataset, tmp_path / "adapted", init_from=str(ar.checkpoint), adapt_causal=True))
    assert illada.load(result.checkpoint).config.causal is False and all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize("argv,message", [
    (["train", "--steps", "5"], "--data"),
    (["train", "--data", "/nonexistent/dir"], "/nonexistent/dir"),
    (["train", "--data", "X", "--objective", "bogus"], "objective"),
    (["sft", "--data", "X"], "--init-from"),
    (["train", "--data", "X", "--clean-prefix-prob", "0.5"], "sft-pairs only"),
    (["train", "--data", "X", "--objective", "sft-pairs", "--clean-prefix-prob", "2"], "clean_prefix_prob"),
    (["train", "--data", "X", "--objective", "sft-pairs", "--clean-prefix-block", "8"], "clean_prefix_prob > 0"),
    (["train", "--data", "X", "--adapt-causal"], "adapt_causal needs --init-from"),
])
def test_cli_user_mistakes_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_config_file_and_overrides(dataset, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {dataset}\nout_dir: {tmp_path / 'cfg'}\npreset: tiny\nseq_len: 32\n"
                      "micro_batch_size: 2\nsteps: 50\nwarmup_steps: 1\nval_rows: 2\neval_batches: 1\nlog_every: 1\n")
    assert main(["train", str(config), "--steps", "2", "--save-every", "2", "--no-progress"]) == 0
    saved = json.loads((tmp_path / "cfg" / "train_config.json").read_text())
    assert saved["steps"] == 2 and saved["seq_len"] == 32
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nnot_a_key: 1\n")
    assert main(["train", str(bad)]) == 2
    assert "not_a_key" in capsys.readouterr().err


def test_off_a_terminal_training_logs_plain_lines(dataset, tmp_path, capsys):
    """nohup / Slurm: no progress bar, but one plain line per logged step on stderr."""
    train(tiny_config(dataset, tmp_path / "run", steps=4, log_every=2, save_every=4, eval_every=4))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("step ")]
    assert [x.split(" · ")[0] for x in lines] == ["step 2/4", "step 4/4"] and all("tok/s" in x for x in lines)
