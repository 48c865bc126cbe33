"""The memory planner (`illada info --plan`, illada.memory): exact parts on a hand-computed tiny shape, the saved
activations against what autograd saves, the estimated peak against the measured one (within 15%) on small CPU
shapes, and the command's output and bad input."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pytest
import torch

from illada.__main__ import main
from illada.config import ModelConfig, preset
from illada.errors import IlladaError
from illada.memory import GiB, measure_memory, plan_memory
from test_bad_input import one_error  # pytest puts tests/ on sys.path

# 1 layer, hidden 16 (2 heads of 8, 1 KV head), SwiGLU 32, vocabulary 64, tied head
HAND = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, n_layers=1, n_heads=2, n_kv_heads=1,
                   max_seq_len=32, mask_token_id=3)
# q 16x16, k 16x8, v 16x8, o 16x16, gate/up/down 16x32 each; two norms of 16; final norm; 64x16 embedding
HAND_LINEAR = 256 + 128 + 128 + 256 + 3 * 512
HAND_PARAMS = HAND_LINEAR + 2 * 16 + 16 + 64 * 16
# LoRA r=2 on all seven: r * (in + out) each
HAND_ADAPTERS = 2 * ((16 + 16) + (16 + 8) + (16 + 8) + (16 + 16) + 3 * (16 + 32))
SMALL = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=128, mask_token_id=3)


def test_weights_gradients_and_optimizer_states_by_hand():
    assert HAND_PARAMS == HAND.num_parameters() == 3376
    full = plan_memory(HAND, "sft", seq_len=8, dtype="fp32", device="cpu")
    assert (full.item("weights"), full.item("gradients"), full.item("optimizer")) == (4 * 3376, 4 * 3376, 8 * 3376)
    assert full.item("weight_copies") == 0  # fp32: no autocast copies
    lora = plan_memory(HAND, "sft", seq_len=8, dtype="fp32", device="cpu", lora_r=2)
    assert HAND_ADAPTERS == 512 and lora.params["trainable"] == 512
    assert lora.item("weights") == 4 * (3376 + 512)  # the trainer's fp32 base + fp32 adapters
    assert (lora.item("gradients"), lora.item("optimizer")) == (4 * 512, 2 * 4 * 512)  # AdamW: 2 fp32 states
    bf16 = plan_memory(HAND, "sft", seq_len=8, dtype="bf16", device="cpu")
    assert bf16.item("weights") == 4 * 3376  # fp32 master weights under autocast
    assert bf16.item("weight_copies") == 2 * (HAND_LINEAR + 64 * 16)  # a bf16 copy of every Linear and the head
    # QLoRA: NF4 Linears (half a byte + an fp32 absmax per 64), bf16 embedding and norms, fp32 adapters
    nf4 = sum(n // 2 + math.ceil(n / 64) * 4 for n in (256, 128, 128, 256, 512, 512, 512))
    qlora = plan_memory(HAND, "sft", seq_len=8, lora_r=2, quantize="int4", device="cpu")
    assert qlora.item("weights") == nf4 + 2 * (64 * 16 + 48) + 4 * 512
    generate = plan_memory(HAND, "generate", seq_len=10, batch=2, cache="prefix", device="cpu")
    assert generate.item("weights") == 2 * 3376
    assert generate.item("kv_cache") == 2 * 1 * 2 * 10 * 8 * 2  # k and v x layers x rows x tokens x kv width x bf16
    cuda = plan_memory(HAND, "generate", seq_len=10, batch=2, cache="prefix")
    assert cuda.peak - generate.peak == cuda.item("cuda_context") > 0


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_weights_are_torchao_storage(mode):
    pytest.importorskip("torchao")
    import warnings

    from illada.model import build_model
    from illada.quantize import model_bytes, quantize_model

    config = SMALL.replace(vocab_size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize_model(build_model(config, seed=0), mode, torch.float32)
    plan = plan_memory(config, "generate", seq_len=16, dtype="fp32", quantize=mode, device="cpu")
    assert plan.item("weights") == model_bytes(model)


def _saved_by_autograd(config: ModelConfig, lora_r: int, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves in one forward of the sft loss (parameters excluded)."""
    from illada.diffusion.objective import pretrain_loss
    from illada.model import build_model

    model = build_model(config, seed=0)
    if lora_r:
        pytest.importorskip("peft")
        from illada.lora import TARGETS, wrap

        wrap(model, lora_r, 8, 0.0, ",".join(TARGETS))
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = (storage, storage.nbytes())  # the storage kept: its address stays unique
        return tensor

    ids = torch.randint(4, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), cast:
        pretrain_loss(model, ids, 3, t=torch.ones(2))
    return sum(size for _, size in saved.values())


@pytest.mark.parametrize("lora_r, dtype", [(0, "fp32"), (4, "fp32"), (0, "bf16")])
def test_saved_activations_are_what_autograd_saves(lora_r, dtype):
    plan = plan_memory(SMALL, "sft", seq_len=32, batch=2, dtype=dtype, lora_r=lora_r, masked=False, device="cpu")
    counted = plan.item("activations") + plan.item("weight_copies")
    # the 4-byte difference: the loss's scalar total weight, not counted
    assert abs(counted - _saved_by_autograd(SMALL, lora_r, dtype == "bf16")) <= 16


@pytest.mark.parametrize("job, options", [
    ("sft", {"seq_len": 64, "batch": 2}),
    ("sft", {"seq_len": 64, "batch": 2, "lora_r": 4, "activation_checkpointing": True}),
    ("generate", {"seq_len": 96, "batch": 2, "cache": "dual", "block_length": 16, "prompt_len": 16}),
    ("generate", {"seq_len": 96, "batch": 2, "cache": "committed", "block_length": 16, "prompt_len": 16,
                  "fixed_length": True}),
], ids=["sft-full", "sft-lora-checkpointed", "generate-dual-cache", "generate-committed-cache"])
def test_estimate_is_within_15_percent_of_the_measured_peak(job, options):
    """measure_memory: the peak of live tensor storage of a real step (fp32, CPU), followed by a dispatch mode."""
    if options.get("lora_r"):
        pytest.importorskip("peft")
    measured = measure_memory(SMALL, job, **options)
    checkpointed = options.pop("activation_checkpointing", False)
    plan = plan_memory(SMALL, job, dtype="fp32", device="cpu", **options)
    estimate = plan.peak_checkpointed if checkpointed else plan.peak
    assert abs(estimate / measured - 1) <= 0.15, (estimate, measured, plan.phase)


@pytest.mark.parametrize("shift", [False, True], ids=["no-shift", "shift"])
@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora-checkpointed"])
def test_block_causal_sft_estimate_is_within_15_percent(shift, lora_r):
    """sft-blocks (a block-causal model): 2 x seq_len tokens per row; the model's own attention is the default."""
    if lora_r:
        pytest.importorskip("peft")
    config = dataclasses.replace(SMALL, block_causal=True, shift_logits=shift)
    measured = measure_memory(config, "sft", seq_len=64, batch=2, block_length=8, lora_r=lora_r,
                              activation_checkpointing=bool(lora_r))
    plan = plan_memory(config, "sft", seq_len=64, batch=2, dtype="fp32", device="cpu", lora_r=lora_r)
    estimate = plan.peak_checkpointed if lora_r else plan.peak
    assert plan.settings["block_causal"] is True
    assert abs(estimate / measured - 1) <= 0.15, (estimate, measured, plan.phase)
    # the same rows through a plain sft step: the pair doubles what the forward holds
    plain = plan_memory(SMALL, "sft", seq_len=64, batch=2, dtype="fp32", device="cpu", lora_r=lora_r)
    assert plan_memory(SMALL, "sft", seq_len=64, batch=2, dtype="fp32", device="cpu", lora_r=lora_r,
                       block_causal=True).peak == plan_memory(dataclasses.replace(SMALL, block_causal=True), "sft",
                                                              seq_len=64, batch=2, dtype="fp32", device="cpu",
                                                              lora_r=lora_r).peak
    assert plan.item("activations") > 1.9 * plain.item("activations")
    with pytest.raises(IlladaError, match="does not train block-causal"):
        plan_memory(config, "rl", seq_len=64)


def test_info_plan_block_causal_flag(capsys):
    assert main(["info", "--preset", "tiny", "--plan", "sft", "--seq-len", "64", "--block-causal", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["block_causal"] is True
    assert out["peak_bytes"] == plan_memory(preset("tiny"), "sft", seq_len=64, block_causal=True).peak
    assert main(["info", "--preset", "tiny", "--plan", "sft", "--seq-len", "64", "--block-causal"]) == 0
    assert "sft-blocks" in capsys.readouterr().out


def test_info_plan_json_and_table(capsys, tmp_path):
    assert main(["info", "--preset", "tiny", "--plan", "sft", "--seq-len", "64", "--batch", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = plan_memory(preset("tiny"), "sft", seq_len=64, batch=2)
    assert out["peak_bytes"] == plan.peak and out["fits"] is True and out["gpu_memory_gib"] == 24
    assert {i["key"] for i in out["items"]} >= {"weights", "gradients", "optimizer", "activations",
                                                 "activations_checkpointed", "logits"}
    # a config.json of ModelConfig fields plans as well as a preset (nothing but the JSON is read)
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_dict()))
    assert main(["info", "--model", str(tmp_path / "config.json"), "--plan", "sft", "--seq-len", "64",
                 "--batch", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] == plan.peak


def test_8b_on_a_24_gib_card(capsys):
    """QLoRA r16 on the 8B shape fits 24 GiB at 2048 tokens; full bf16 fine-tuning does not, even checkpointed."""
    assert main(["info", "--model", "illada-8b", "--plan", "sft", "--lora-r", "16", "--quantize", "int4",
                 "--seq-len", "2048", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "fits on a 24 GiB card: yes" in out and "weights" in out and "optimizer states" in out
    full = plan_memory(preset("illada-8b"), "sft", seq_len=2048)
    assert full.peak_checkpointed > 24 * GiB and full.item("optimizer") == 8 * preset("illada-8b").num_parameters()
    assert main(["info", "--preset", "illada-8b", "--plan", "sft", "--gpu-memory", "24"]) == 0
    assert "fits on a 24 GiB card: no" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--plan", "train"], "choose one of sft, rl, generate"),
    (["--plan", "sft", "--seq-len", "-5"], "--seq-len must be a positive integer"),
    (["--plan", "sft", "--seq-len", "100000"], "exceeds the model context"),
    (["--plan", "sft", "--quantize", "int4"], "give --lora-r"),
    (["--plan", "sft", "--quantize", "int3", "--lora-r", "4"], "--quantize 'int3'"),
    (["--plan", "sft", "--lora-r", "4", "--lora-targets", "attn"], "unknown module 'attn'"),
    (["--plan", "generate", "--gpu-memory", "0"], "--gpu-memory must be a positive number"),
    (["--plan", "generate", "--cache", "full"], "--cache 'full'"),
    (["--seq-len", "64"], "--seq-len needs --plan"),
    (["--plan", "generate", "--block-causal"], "--block-causal plans --plan sft"),
    (["--block-causal"], "--block-causal needs --plan"),
])
def test_bad_plan_input_is_one_line(capsys, argv, message):
    assert message in one_error(capsys, ["info", "--preset", "illada-8b", *argv])


def test_unknown_model_is_one_line(capsys):
    assert "no checkpoint at 'no-such-model'" in one_error(capsys, ["info", "--model", "no-such-model", "--plan",
                                                                      "sft"])
