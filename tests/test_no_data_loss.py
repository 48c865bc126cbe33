"""No lost data: resume never silently restarts over a run, never deletes another run's metrics or checkpoints,
cleans the staging a killed save left, explains a corrupt newest checkpoint, survives a torn metrics line and a full
disk; `convert --force` replaces only an illada checkpoint and never the directory holding its source."""
import errno
import json
import shutil
from pathlib import Path

import pytest

from illada.__main__ import main
from illada.errors import IlladaError
from illada.training import trainer as trainer_module
from illada.training.checkpointing import latest_checkpoint
from illada.training.config import TrainConfig
from illada.training.trainer import train

def cfg(dataset: Path, out_dir: Path, **overrides) -> TrainConfig:
    values = dict(data=str(dataset), out_dir=str(out_dir), preset="tiny", seq_len=32, micro_batch_size=2,
                  steps=4, lr=3e-3, warmup_steps=1, save_every=2, eval_every=100, eval_batches=1, eval_mc_samples=1,
                  val_rows=2, log_every=1, progress=False, device="cpu", keep_checkpoints=2,
                  model_overrides={"n_layers": 1, "hidden_size": 32, "intermediate_size": 64, "n_heads": 2,
                                   "n_kv_heads": 2})
    values.update(overrides)
    return TrainConfig(**values)


def steps_logged(out_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line]


def ckpts(out_dir: Path) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir() if p.name != "latest")


def test_latest_naming_a_missing_checkpoint_resumes_from_the_newest_on_disk(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg(dataset, out))
    (out / "checkpoints" / "latest").write_text("step-00000099")  # the old code restarted from 0 and pruned
    result = train(cfg(dataset, out, steps=6))
    assert "names step-00000099, which is missing" in capsys.readouterr().err
    assert result.step == 6 and steps_logged(out) == [1, 2, 3, 4, 5, 6]
    assert ckpts(out) == ["step-00000004", "step-00000006"]


def test_pruning_never_deletes_newer_checkpoints_and_resume_from_picks_one(dataset, tmp_path):
    out = tmp_path / "run"
    train(cfg(dataset, out, steps=6, keep_checkpoints=3))
    assert ckpts(out) == ["step-00000002", "step-00000004", "step-00000006"]
    result = train(cfg(dataset, out, steps=6, save_every=1, keep_checkpoints=2,
                       resume_from=str(out / "checkpoints" / "step-00000002")))
    assert result.step == 6
    # step 4 and 6 were re-saved by this timeline; 3 and 5 pruned in turn as older ones; nothing newer lost
    assert ckpts(out) == ["step-00000005", "step-00000006"]
    with pytest.raises(IlladaError, match="not a training checkpoint"):
        train(cfg(dataset, out, resume_from=str(tmp_path / "nowhere")))


def test_staging_left_by_a_killed_save_is_cleaned_on_the_next_start(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg(dataset, out, steps=2))
    staging = out / "checkpoints" / ".step-00000004.k1ll3d"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    mine = out / "checkpoints" / "notes"  # not ours: stays
    mine.mkdir()
    train(cfg(dataset, out, steps=4))
    assert not staging.exists() and mine.is_dir()
    assert "staging directory of a save that was killed" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["training_state", "trainer_state", "weights"])
def test_a_corrupt_newest_checkpoint_names_itself_and_the_newest_intact_one(dataset, tmp_path, damage, capsys):
    out = tmp_path / "run"
    train(cfg(dataset, out))
    newest = out / "checkpoints" / "step-00000004"
    if damage == "training_state":
        data = (newest / "training_state.pt").read_bytes()
        (newest / "training_state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "trainer_state":
        (newest / "trainer_state.json").write_text('{"step": 4, "tok')
    else:
        (newest / "model.safetensors").write_bytes(b"\x00" * 20)
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    code = main(["train", "--data", str(dataset), "--out-dir", str(out), "--preset", "tiny", "--seq-len", "32",
                 "--micro-batch-size", "2", "--steps", "6", "--lr", "3e-3", "--warmup-steps", "1", "--save-every",
                 "2", "--eval-every", "100", "--val-rows", "2", "--log-every", "1", "--no-progress",
                 "--model-overrides", json.dumps(cfg(dataset, out).model_overrides)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"checkpoint {newest} is unreadable" in err
    assert f"--resume-from {out / 'checkpoints' / 'step-00000002'}" in err
    assert (out / "metrics.jsonl").read_text() == before and newest.is_dir()
    result = train(cfg(dataset, out, steps=6, resume_from=str(out / "checkpoints" / "step-00000002")))
    assert result.step == 6


def test_a_torn_metrics_line_does_not_block_the_resume(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg(dataset, out))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # killed mid-write
    assert train(cfg(dataset, out, steps=6)).step == 6
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    assert "dropped 1 unreadable line" in capsys.readouterr().err


def test_a_fresh_start_never_deletes_an_earlier_runs_metrics(dataset, tmp_path):
    out = tmp_path / "run"
    train(cfg(dataset, out))
    shutil.rmtree(out / "checkpoints")  # an earlier run whose checkpoints are gone (or elsewhere)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(IlladaError, match="holds an earlier run"):
        train(cfg(dataset, out, lr=1e-3))
    assert (out / "metrics.jsonl").read_text() == before
    # the very same run started again (its first attempt died before any checkpoint) may start over
    assert train(cfg(dataset, out)).step == 4 and steps_logged(out) == [1, 2, 3, 4]


@pytest.mark.parametrize("where", ["weights", "training_state"])
def test_disk_full_inside_the_writers_names_the_intact_checkpoint(dataset, tmp_path, monkeypatch, where):
    """The weights writer reports a full disk as its own one-line error, torch.save as a RuntimeError."""
    import torch

    import illada.checkpoint

    out = tmp_path / "run"
    train(cfg(dataset, out, steps=2))
    if where == "weights":
        def full(*args, **kwargs):
            raise IlladaError("cannot write the checkpoint x: No space left on device")
        monkeypatch.setattr(illada.checkpoint, "save_checkpoint", full)
    else:
        def full(*args, **kwargs):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        monkeypatch.setattr(torch, "save", full)
    with pytest.raises(IlladaError, match=r"could not save the checkpoint of step 4 .*step-00000002, is intact"):
        train(cfg(dataset, out))
    assert latest_checkpoint(out).name == "step-00000002"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging left


def test_disk_full_during_a_save_keeps_the_last_checkpoint(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = trainer_module.save_training_checkpoint
    calls = []

    def full_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_training_checkpoint", full_on_second)
    with pytest.raises(IlladaError, match=r"could not save the checkpoint of step 4 \(No space left on device\).*"
                                          r"step-00000002, is intact"):
        train(cfg(dataset, out))
    assert latest_checkpoint(out).name == "step-00000002" and ckpts(out) == ["step-00000002"]
    monkeypatch.setattr(trainer_module, "save_training_checkpoint", real)
    assert train(cfg(dataset, out)).step == 4


# ---------------------------------------------------------------------------------------------------- convert
@pytest.fixture
def checkpoint(tmp_path) -> Path:
    from illada.checkpoint import save_checkpoint
    from illada.config import preset
    from illada.model import build_model

    config = preset("tiny").replace(n_layers=1, hidden_size=32, intermediate_size=64, n_heads=2, n_kv_heads=2)
    path = tmp_path / "parent" / "src"
    save_checkpoint(build_model(config), config, path)
    return path


def test_convert_force_never_replaces_the_directory_holding_its_source(checkpoint, capsys):
    parent = checkpoint.parent
    (parent / "sibling.txt").write_text("mine")
    code = main(["convert", str(checkpoint), str(parent), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "contains the source" in err and len(err.strip().splitlines()) == 1
    assert (checkpoint / "config.json").is_file() and (parent / "sibling.txt").read_text() == "mine"
    assert main(["convert", str(checkpoint), str(checkpoint), "--force"]) == 2


def test_convert_force_replaces_only_an_illada_checkpoint(checkpoint, tmp_path, capsys):
    other = tmp_path / "mydir"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    assert main(["convert", str(checkpoint), str(other), "--force"]) == 2
    assert "not an illada checkpoint" in capsys.readouterr().err
    assert (other / "thesis.tex").read_text() == "years of work"
    dst = tmp_path / "converted"
    assert main(["convert", str(checkpoint), str(dst)]) == 0
    (dst / "README.md").write_text("card")  # a checkpoint with its card is still a checkpoint
    assert main(["convert", str(checkpoint), str(dst), "--force", "--dtype", "bf16"]) == 0
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
