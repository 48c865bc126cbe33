"""Block-causal models (Fast-dLLM v2 / SDAR adaptation): the attention pattern, the sft-blocks loss against a
per-block naive computation, exact caches, the AR equivalence at blocks of one token, and the CLI round trip."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import illada
from illada.__main__ import main
from illada.checkpoint.io import load_checkpoint, save_checkpoint
from illada.config import preset
from illada.diffusion.objective import sft_blocks_loss
from illada.errors import IlladaError
from illada.model import block_causal_pattern, build_model
from illada.rl.trainer import train_rl
from illada.sampling import generate, left_pad
from illada.sampling.autoregressive import greedy_generate_ar
from illada.sampling.infill import infill
from illada.scoring.likelihood import mc_loglikelihood
from illada.tokenizer import byte_level_tokenizer
from illada.training.checkpointing import latest_checkpoint
from test_rl import rl_config
from test_sampling import sharp_model as random_model  # pytest puts tests/ on sys.path

MASK = 3  # the tiny preset's mask_token_id


def sharp_model(seed: int, n_layers: int = 3, causal: bool = False, shift: bool = True, block_causal: bool = True):
    """test_sampling's tiny random model (predictions vary with position and context), made block-causal."""
    model = random_model(seed, n_layers=n_layers, causal=causal, shift=shift)
    if block_causal:
        model.config = model.config.replace(block_causal=True)
    return model


PROMPTS = [[10, 11, 12, 13, 14, 15], [20, 21, 22], [30, 31, 32, 33, 34]]


def test_pattern_is_causal_outside_the_block_and_full_inside():
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0],  # the block 2..3 sees itself both ways
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(block_causal_pattern(5, 2, 4)[0, 0], expected)


def test_a_block_causal_model_refuses_a_forward_without_its_block():
    model = sharp_model(0, n_layers=1)
    ids = torch.tensor([[10, 11, MASK]])
    with pytest.raises(IlladaError, match="block-causal"):
        model(ids)
    with pytest.raises(IlladaError, match="block-causal"):
        mc_loglikelihood(model, [10, 11], [12], mc_num=2, batch_size=2, mask_id=MASK)
    with pytest.raises(IlladaError, match="block-causal"):
        infill(model, torch.tensor([[10, MASK, 12]]), mask_id=MASK)


@pytest.mark.parametrize("shift,block_length", [(True, 4), (True, 1), (False, 3), (True, 16)])
def test_sft_blocks_loss_equals_one_forward_per_block(shift, block_length):
    """The 2L layout (noisy row beside the clean row) must give, for every block, the logits of the canvas the
    sampler shows that block: clean before it, the noisy block, masks after, under block_causal_pattern."""
    model = sharp_model(1, n_layers=2, shift=shift)
    gen = torch.Generator().manual_seed(0)
    b, length, eps = 3, 13, 1e-3
    ids = torch.randint(4, 60, (b, length), generator=gen)
    prompt_lengths = torch.tensor([3, 5, 2])
    n_blocks = -(-(length - 2) // block_length)
    t = torch.rand(b, n_blocks, generator=gen)
    loss, stats = sft_blocks_loss(model, ids, prompt_lengths, MASK, block_length, eps=eps,
                                  generator=torch.Generator().manual_seed(5), t=t)
    u = torch.rand(b, length, generator=torch.Generator().manual_seed(5))  # the same per-token draws
    total, masked_count = 0.0, 0
    for r in range(b):
        p_len = int(prompt_lengths[r])
        row = 0.0
        for k in range(-(-(length - p_len) // block_length)):
            start, end = p_len + k * block_length, min(p_len + (k + 1) * block_length, length)
            p = (1 - eps) * float(t[r, k]) + eps
            hole = torch.zeros(length, dtype=torch.bool)
            hole[start:end] = u[r, start:end] < p
            canvas = ids[r].clone()
            canvas[hole] = MASK
            canvas[end:] = MASK
            with torch.no_grad():
                logits = model(canvas[None], attention_pattern=block_causal_pattern(length, start, end))[0]
            for i in hole.nonzero().flatten().tolist():
                row += F.cross_entropy(logits[i][None], ids[r, i][None]).item() / p
                masked_count += 1
        total += row / (length - p_len)
    assert int(stats["masked_tokens"]) == masked_count > 0
    assert loss.item() == pytest.approx(total / b, rel=1e-4)


@pytest.mark.parametrize("threshold", [None, 0.2])
def test_every_cache_gives_the_tokens_of_no_cache(threshold):
    """Committed tokens never see later positions, so their keys/values are final: every policy is exact, with
    three layers (the bidirectional model's caches are exact only with one)."""
    model = sharp_model(2)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    outs = {cache: generate(model, ids, attention_mask=mask, mask_id=MASK, gen_length=12, block_length=4,
                            steps=12, threshold=threshold, cache=cache, variable_length=False, forbid_eos=True)
            for cache in ("none", "prefix", "dual", "committed")}
    for cache, out in outs.items():
        assert torch.equal(out.sequences, outs["none"].sequences), cache
    if threshold is not None:
        assert outs["none"].nfe < 9  # several tokens per pass somewhere: the test covers parallel commits


def test_variable_length_equals_the_fixed_canvas():
    """The masks after the block are invisible to a block-causal model: growing the canvas block by block gives
    the fixed canvas's tokens."""
    model = sharp_model(3)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    options = dict(attention_mask=mask, mask_id=MASK, gen_length=12, block_length=4, steps=12, forbid_eos=True,
                   cache="committed")
    fixed = generate(model, ids, variable_length=False, **options)
    grown = generate(model, ids, variable_length=True, **options)
    assert torch.equal(fixed.sequences, grown.sequences)


def test_blocks_of_one_token_are_the_ar_model_exactly():
    """An AR model's weights with the shift and blocks of one token: each token is predicted from the causal
    state before it, i.e. greedy AR decoding."""
    ar = sharp_model(4, causal=True, shift=False, block_causal=False)
    adapted = sharp_model(4, causal=True, shift=False, block_causal=False)
    adapted.config = adapted.config.replace(causal=False, shift_logits=True, block_causal=True)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    want = greedy_generate_ar(ar, ids, 10, attention_mask=mask).sequences
    for cache in ("none", "committed"):
        got = generate(adapted, ids, attention_mask=mask, mask_id=MASK, gen_length=10, block_length=1, steps=10,
                       cache=cache, variable_length=False, eos_token_id=None).sequences
        assert torch.equal(got[:, ids.shape[1]:], want[:, ids.shape[1]:]), cache


def test_block_causal_survives_a_checkpoint_round_trip(tmp_path, capsys):
    model = sharp_model(5, n_layers=1)
    save_checkpoint(model, model.config, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["block_causal"] is True
    loaded, config = load_checkpoint(tmp_path / "ckpt")
    assert config.block_causal and loaded.config.block_causal
    assert main(["info", "--model", str(tmp_path / "ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attention"] == "block-causal"
    with pytest.raises(IlladaError, match="causal must be false"):
        preset("tiny", causal=True, block_causal=True)


# -------------------------------------------------------------------------------------------- the CLI, end to end
QUESTION, ANSWER = "Who wrote Hamlet?", "Shakespeare."
TINY = ["--seq-len", "64", "--micro-batch-size", "4", "--val-rows", "2", "--eval-batches", "1", "--log-every", "1",
        "--device", "cpu", "--no-progress", "--split-prob", "0", "--warmup-steps", "5"]


def losses(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_ar_twin_adapted_to_block_causal_learns_and_answers(tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    record = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    chat.write_text("\n".join([json.dumps(record)] * 48) + "\n")
    data = tmp_path / "pairs"
    assert main(["prepare", str(chat), "--kind", "sft", "--sft-format", "pairs", "--tokenizer", "bytes",
                 "--out", str(data), "--quiet"]) == 0
    # the AR twin knows the reply left to right; adapted, it must learn to fill blocks of masks
    assert main(["train", "--data", str(data), "--out-dir", str(tmp_path / "ar"), "--objective", "ar",
                 "--preset", "tiny", "--steps", "60", "--lr", "1e-2", "--save-every", "60", "--eval-every", "60",
                 *TINY]) == 0
    out = tmp_path / "blocks"
    assert main(["train", "--data", str(data), "--out-dir", str(out), "--objective", "sft-blocks",
                 "--init-from", str(tmp_path / "ar"), "--adapt-causal", "--block-length", "4", "--steps", "50",
                 "--lr", "3e-3", "--save-every", "50", "--eval-every", "50", *TINY]) == 0
    curve = losses(out)
    assert sum(curve[-10:]) / 10 < 0.5 * sum(curve[:10]) / 10
    config = json.loads((latest_checkpoint(out) / "config.json").read_text())
    assert config["block_causal"] and config["shift_logits"] and not config["causal"]
    lm = illada.load(latest_checkpoint(out))
    reply = lm.chat([{"role": "user", "content": QUESTION}], max_new_tokens=24, block_length=4, cache="committed")
    assert reply == ANSWER
    # a block-causal model trains with sft-blocks only; the bidirectional objectives would train another model
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out-dir", str(tmp_path / "x"), "--objective", "sft-pairs",
                 "--init-from", str(out), "--steps", "1", *TINY]) == 2
    assert "sft-blocks only" in capsys.readouterr().err


def test_rl_refuses_a_block_causal_model_before_writing_anything(tmp_path):
    tok = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64, mask_token_id=tok.mask_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, hidden_size=32,
                    intermediate_size=64, n_layers=1, n_heads=2, n_kv_heads=2, shift_logits=True, block_causal=True)
    save_checkpoint(build_model(config, seed=0), config, tmp_path / "init", tokenizer=tok)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Say a:", "answer": "aaaa"}) + "\n")
    with pytest.raises(IlladaError, match="block-causal"):
        train_rl(rl_config(tmp_path))
    assert not (tmp_path / "rl").exists()


def test_the_server_answers_as_the_library_does():
    """The server's batcher runs rows block by block; for a block-causal model a row resumed at a block boundary
    recomputes only causal prefixes, so every cache gives the library's answer."""
    from test_serve import KEY, client, tiny_handle

    from illada.serving import ServerSettings, create_app, serve_in_thread

    lm = tiny_handle(seed=3)
    lm.model.config = lm.config = lm.config.replace(shift_logits=True, block_causal=True)
    with serve_in_thread(create_app(lm, ServerSettings(api_key=KEY, max_batch=4, timeout=60))) as url:
        for cache in ("none", "dual", "committed"):
            knobs = {"block_length": 4, "cache": cache, "forbid_eos": True, "threshold": 0.2}
            r = client(url).completions.create(model="tiny-serve", prompt="ROMEO:", max_tokens=12, temperature=0,
                                               extra_body=knobs)
            want = lm.generate("ROMEO:", max_new_tokens=12, temperature=0.0, **knobs)
            assert r.choices[0].text == want, cache
