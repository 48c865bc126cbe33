"""QLoRA (`--lora-r R --quantize nf4|fp4`): a frozen 4-bit bitsandbytes base under PEFT LoRA adapters, on the CPU.

The base's projections are 4-bit (packed bytes, an fp32 absmax per 64 weights) and never change; zero-B QLoRA is
exactly the 4-bit base; a QLoRA SFT learns a reply, saves only PEFT adapters, and the adapter merged into the
full-precision base (`--adapter`) is close to the QLoRA model (the base's quantisation error apart); exact resume;
`illada rl` too; one-line errors."""
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")  # the dev extra installs both (make setup / CI): these run there
pytest.importorskip("bitsandbytes")

import illada
from illada.__main__ import main
from illada.errors import IlladaError
from illada.lora import TARGETS
from illada.qlora import quantize_base, quantized_layers, weight_bytes
from illada.training.checkpointing import latest_checkpoint
from illada.training.config import TrainConfig
from illada.training.trainer import Trainer, train
from test_lora import ANSWER, IDS, QUESTION, TINY, base_and_sft_data, base_model, learnt_and_saved_adapters_only


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A base pre-trained briefly on a text with the answer's word, an SFT set of one exchange, and a QLoRA SFT
    run on it (NF4 base; it needs more steps than tests/test_lora.py's LoRA run to get the reply letter-perfect)."""
    root = tmp_path_factory.mktemp("qlora")
    base_and_sft_data(root)
    assert main(["sft", "--init-from", str(root / "pre"), "--data", str(root / "sft"), "--out-dir", str(root / "run"),
                 "--objective", "sft-pairs", "--steps", "300", "--lr", "1e-2", "--warmup-steps", "5",
                 "--weight-decay", "0", "--save-every", "300", "--eval-every", "300", "--lora-r", "8",
                 "--lora-alpha", "16", "--quantize", "nf4", *TINY]) == 0
    return root


def kl_and_top1(p_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(p || q) per position (nats) and the fraction of positions whose argmax agrees."""
    p, q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    return float(kl), float((p.argmax(-1) == q.argmax(-1)).float().mean())


def reply_input(root: Path) -> tuple[torch.Tensor, int]:
    """The chat prompt followed by 16 masked positions (the reply the SFT trains), and the prompt's length."""
    lm = illada.load(root / "pre")
    ids, _ = lm.encode_prompts([QUESTION], chat=True)
    return torch.cat([ids, torch.full((1, 16), lm.config.mask_token_id)], dim=1), ids.shape[1]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_base_is_4bit_and_zero_b_qlora_is_exactly_it(setup, quant_type):
    import bitsandbytes as bnb

    full = base_model(setup)
    model = quantize_base(base_model(setup), quant_type, "cpu", torch.float32)
    layers = quantized_layers(model)
    assert len(layers) == 7 * model.config.n_layers  # every attention and MLP projection
    for layer in layers:
        weight, n = layer.weight, layer.in_features * layer.out_features
        assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8 and not weight.requires_grad
        assert weight.quant_state.quant_type == quant_type and weight.quant_state.blocksize == 64
        assert weight.numel() * weight.element_size() == n // 2  # two weights a byte
        assert weight.quant_state.absmax.dtype == torch.float32 and weight.quant_state.absmax.numel() == -(-n // 64)
    sizes = weight_bytes(model)
    projections = sum(layer.in_features * layer.out_features for layer in layers)
    assert 0.5 < sizes["quantized"] / projections <= 0.5 + 4 / 64  # bytes a weight: 4 bits + the absmax
    # the embedding, the norms and the head are the checkpoint's, in full precision
    kept = {n: p for n, p in model.named_parameters() if not isinstance(p, bnb.nn.Params4bit)}
    reference = dict(full.named_parameters())
    assert kept and all(torch.equal(p, reference[n]) and p.dtype == torch.float32 for n, p in kept.items())
    with torch.no_grad():
        before = model(IDS)
        from illada.lora import wrap

        wrap(model, r=4, alpha=8, dropout=0.0, targets=",".join(TARGETS))
        after = model(IDS)
        kl, top1 = kl_and_top1(full(IDS), before)
    assert torch.equal(before, after)  # B = 0: the 4-bit base exactly
    assert kl < 0.05 and top1 >= 0.75, (kl, top1)  # and that base is close to the full-precision one
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * model.config.n_layers and all(".lora_" in name for name in trainable)


def test_qlora_sft_learns_the_reply_and_saves_only_adapters(setup):
    checkpoint, tensors = learnt_and_saved_adapters_only(setup / "run")  # no quantisation state, no base
    assert len(tensors) == 2 * 7 * 2 and all(t.dtype == torch.float32 for t in tensors.values())
    assert json.loads((checkpoint / "trainer_state.json").read_text())["quantize"] == "nf4"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 8
    # --adapter: merged into the full-precision base, it has learnt the reply; the base alone has not
    chat = [{"role": "user", "content": QUESTION}]
    assert illada.load(setup / "pre", adapter=setup / "run").chat(chat, max_new_tokens=32, block_length=16) == ANSWER
    assert illada.load(setup / "pre").chat(chat, max_new_tokens=32, block_length=16) != ANSWER


def test_the_adapter_merged_into_the_full_precision_base_is_close_to_the_qlora_model(setup):
    """`--adapter` merges into the full-precision base, so the merged model differs from the QLoRA training model by
    the base's quantisation error alone (W - deq(Q(W)) in every projection). At the reply's masked positions that
    costs (measured on this model) a mean KL of 0.037 nats, with top-1 agreement 1.0: about 5x the KL between the
    full-precision and the 4-bit base themselves (0.007; the adapted model's sharper logits move more under the
    same perturbation) and 50x below what the adapter changes (1.86 nats, merged vs the base). The bounds leave
    ~2.5x headroom over the measurement; both models give the trained reply."""
    from peft import PeftModel

    ids, prompt = reply_input(setup)
    checkpoint = latest_checkpoint(setup / "run")
    qlora = PeftModel.from_pretrained(quantize_base(base_model(setup), "nf4", "cpu", torch.float32),
                                      str(checkpoint)).eval()
    lm = illada.load(setup / "pre", adapter=setup / "run")
    with torch.no_grad():
        q, m, base = qlora(ids)[:, prompt:], lm.model(ids)[:, prompt:], base_model(setup)(ids)[:, prompt:]
        base4 = quantize_base(base_model(setup), "nf4", "cpu", torch.float32)(ids)[:, prompt:]
    kl, top1 = kl_and_top1(m, q)
    base_error, _ = kl_and_top1(base, base4)
    adapter_effect, _ = kl_and_top1(m, base)
    assert kl < 0.1 and top1 >= 0.9, (kl, top1, base_error)
    assert adapter_effect > 10 * kl, (adapter_effect, kl)
    chat = [{"role": "user", "content": QUESTION}]
    assert lm.chat(chat, max_new_tokens=32, block_length=16) == ANSWER
    lm.model = qlora  # the QLoRA training model itself, decoding through its 4-bit base
    assert lm.chat(chat, max_new_tokens=32, block_length=16) == ANSWER


def qlora_config(root: Path, out_dir: Path, **overrides) -> TrainConfig:
    values = dict(data=str(root / "sft"), out_dir=str(out_dir), init_from=str(root / "pre"), objective="sft-pairs",
                  seq_len=64, micro_batch_size=2, grad_accum=2, steps=6, lr=1e-2, warmup_steps=2,
                  schedule="linear-tail", save_every=3, eval_every=3, eval_batches=1, val_rows=2, log_every=1,
                  progress=False, device="cpu", lora_r=4, lora_alpha=8, lora_dropout=0.1, quantize="nf4")
    values.update(overrides)
    return TrainConfig(**values)


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every frozen tensor of the model: parameters (the packed 4-bit weights among them) and each 4-bit layer's
    absmax."""
    state = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    for i, layer in enumerate(quantized_layers(model)):
        state[f"absmax{i}"] = layer.weight.quant_state.absmax.clone()
    return state


def test_qlora_resume_is_bit_identical_and_the_base_never_changes(setup, tmp_path):
    from safetensors.torch import load_file

    trainer = Trainer(qlora_config(setup, tmp_path / "full"))
    before = frozen_state(trainer.model)
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, param in trainer.model.named_parameters():
        assert param.requires_grad == (".lora_" in name) == (id(param) in in_optimizer), name
    full = trainer.run()  # six steps, two validations (no-grad eval forwards) and two saves between them
    after = frozen_state(trainer.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(quantized_layers(trainer.model)) == 7 * 2
    first = train(qlora_config(setup, tmp_path / "split"), max_steps=4)
    second = train(qlora_config(setup, tmp_path / "split"))
    assert second.step == 6 and first.losses + second.losses == full.losses
    a = load_file(full.checkpoint / "adapter_model.safetensors")
    b = load_file(second.checkpoint / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
    # the adapters would fit the full-precision base too: a LoRA run cannot resume a QLoRA one
    with pytest.raises(IlladaError, match="was trained on --quantize nf4; this run has a full-precision base"):
        train(qlora_config(setup, tmp_path / "split", quantize=None, steps=8))
    with pytest.raises(IlladaError, match="was trained on --quantize nf4; this run has --quantize fp4"):
        train(qlora_config(setup, tmp_path / "split", quantize="fp4", steps=8))


def test_qlora_rl_trains_the_adapters_on_the_4bit_base_and_resumes_exactly(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from illada.checkpoint import save_checkpoint
    from illada.config import preset
    from illada.model import build_model
    from illada.rl.config import RLConfig
    from illada.rl.trainer import RLTrainer, train_rl
    from illada.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64, mask_token_id=tok.mask_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, n_layers=1)
    save_checkpoint(build_model(config, seed=0), config, tmp_path / "init", tokenizer=tok)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say {c}:", "answer": c * 4}) + "\n"
                                                    for c in "abcdef"))
    (tmp_path / "qlora_reward.py").write_text(  # differs within a group: every step updates
        "def parity(completion, sample):\n    return float(sum(map(ord, completion)) % 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "qlora_reward", raising=False)

    def cfg(out: str, **overrides) -> RLConfig:
        values = dict(init_from=str(tmp_path / "init"), data=str(tmp_path / "prompts.jsonl"), task="exact",
                      out_dir=str(tmp_path / out), steps=2, prompts_per_step=2, group_size=4, inner_updates=1,
                      max_new_tokens=8, block_length=8, sampling_steps=8, temperature=1.0, lr=1e-2,
                      warmup_steps=1, save_every=1, eval_every=100, progress=False, device="cpu",
                      rewards={"qlora_reward:parity": 1.0}, lora_r=4, lora_alpha=8, lora_dropout=0.1,
                      quantize="nf4")
        return RLConfig(**{**values, **overrides})

    trainer = RLTrainer(cfg("full"))
    assert len(quantized_layers(trainer.model)) == 7 and trainer.reference is None
    before = frozen_state(trainer.model)
    full = trainer.run()
    after = frozen_state(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    RLTrainer(cfg("split")).run(max_steps=1)
    split = train_rl(cfg("split"))
    keys = ("step", "reward_mean", "loss", "kl", "updated")
    rows = lambda res: [tuple(r[k] for k in keys) for r in res.history if r["kind"] == "rl"]  # noqa: E731
    assert rows(split) == rows(full) and len(rows(full)) == 2 and all(r[-1] == 1.0 for r in rows(full))
    a = load_file(full.checkpoint / "adapter_model.safetensors")
    b = load_file(split.checkpoint / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(".lora_" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
    # the adapter merges into the full-precision base (--adapter) like any LoRA run's
    merged = illada.load(tmp_path / "init", adapter=tmp_path / "full").model
    with torch.no_grad():
        logits, base = merged(IDS), illada.load(tmp_path / "init").model(IDS)
    assert torch.isfinite(logits).all() and not torch.equal(logits, base)


@pytest.mark.parametrize("argv, message", [
    (["sft", "--init-from", "PRE", "--data", "SFT", "--quantize", "nf4"],
     "train: --quantize nf4 trains LoRA adapters on a frozen 4-bit base (QLoRA): give --lora-r"),
    (["sft", "--init-from", "PRE", "--data", "SFT", "--lora-r", "4", "--quantize", "int3"],
     "--quantize 'int3': choose nf4 or fp4"),
    (["sft", "--init-from", "PRE", "--data", "SFT", "--lora-r", "4", "--quantize", "int4"],
     "--quantize 'int4': choose nf4 or fp4"),
    (["sft", "--init-from", "PRE", "--data", "SFT", "--lora-r", "4", "--quantize", "nf4", "--distributed", "fsdp"],
     "not --distributed fsdp"),
    (["rl", "--init-from", "PRE", "--data", "PROMPTS", "--quantize", "nf4"], "rl: --quantize nf4 trains LoRA"),
    (["rl", "--init-from", "PRE", "--data", "PROMPTS", "--lora-r", "4", "--quantize", "fp8"],
     "rl: --quantize 'fp8': choose nf4 or fp4"),
])
def test_bad_qlora_input_is_one_line_with_exit_2(setup, capsys, argv, message):
    (setup / "prompts.jsonl").write_text(json.dumps({"prompt": "Say a:", "answer": "a"}) + "\n")
    names = {"PRE": str(setup / "pre"), "SFT": str(setup / "sft"), "PROMPTS": str(setup / "prompts.jsonl")}
    code = main([names.get(a, a) for a in argv] + ["--out-dir", str(setup / "never")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (setup / "never").exists()


def test_qlora_without_bitsandbytes_or_a_4bit_backend_is_one_line(setup, capsys, monkeypatch):
    args = ["--init-from", str(setup / "pre"), "--lora-r", "4", "--quantize", "nf4", "--out-dir",
            str(setup / "never")]
    (setup / "prompts.jsonl").write_text(json.dumps({"prompt": "Say a:", "answer": "a"}) + "\n")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
        for argv in (["sft", "--data", str(setup / "sft"), "--objective", "sft-pairs", *args],
                     ["rl", "--data", str(setup / "prompts.jsonl"), "--task", "exact", *args]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert "needs the bitsandbytes library: pip install 'illada[qlora]'" in err, err
            assert len(err.splitlines()) == 1, err
    import bitsandbytes.functional

    def refuse(*args, **kwargs):
        raise RuntimeError("no 4-bit kernel\nfor this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", refuse)
    assert main(["sft", "--data", str(setup / "sft"), "--objective", "sft-pairs", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "bitsandbytes cannot run 4-bit layers on cpu (no 4-bit kernel for this device)" in err, err
    assert len(err.splitlines()) == 1 and not (setup / "never").exists()


def test_the_memory_planner_takes_the_training_flags_4bit_types():
    from illada.config import preset
    from illada.memory import plan_memory

    config = preset("illada-8b")
    plans = [plan_memory(config, "sft", lora_r=16, quantize=q) for q in ("int4", "nf4", "fp4")]
    assert plans[0].peak == plans[1].peak == plans[2].peak
    assert plans[1].peak < plan_memory(config, "sft", lora_r=16).peak / 2
