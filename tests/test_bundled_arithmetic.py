"""The bundled `illada-arithmetic`: a block-causal, shifted-logits MDM adapted from an AR model, decoded on its own
canvas."""
import pytest
import torch

import illada
from illada.api import bundled_models

NAME = "illada-arithmetic"
# questions the shipped weights answer (it scores about 90% held-out, not every one): the pipeline must keep doing so
QUESTIONS = ["What is 37 + 48 * 2?", "What is (12 + 7) * 45?", "What is 25 * 4?", "What is 9 + 16?"]
CANVAS = dict(max_new_tokens=96, block_length=8, steps=96, variable_length=False)


@pytest.fixture(scope="module")
def lm():
    if NAME not in bundled_models():
        pytest.skip(f"{NAME} is not in this install")
    torch.manual_seed(0)
    return illada.load(NAME)


def answer(text: str) -> int:
    return int(text.split("####")[-1].split()[0])


@pytest.mark.parametrize("options", [{}, dict(threshold=0.9), dict(threshold=0.9, cache="dual")])
def test_it_computes_and_threshold_decoding_commits_several_tokens_per_pass(lm, options):
    assert lm.config.shift_logits and lm.config.block_causal and not lm.config.causal
    prompts = [f"Question: {q}\nAnswer:" for q in QUESTIONS]
    texts, out = lm.generate(prompts, return_output=True, **CANVAS, **options)
    expected = [eval(q.removeprefix("What is ").removesuffix("?")) for q in QUESTIONS]  # independent arithmetic
    assert [answer(t) for t in texts] == expected
    per_pass = (out.generated_lengths.float() / out.row_nfe.float()).min().item()
    assert per_pass > (2.0 if options else 0.0) and (per_pass <= 1.0) == (not options)


def test_the_issue_command_needs_no_prompt_or_canvas_flags(lm, capsys):
    """`illada generate "What is 37 + 48 * 2?" --model illada-arithmetic --threshold 0.9`: the model's
    generation_config.json frames the question and sets its canvas; several tokens commit per pass."""
    from illada.__main__ import main

    assert main(["generate", "What is 37 + 48 * 2?", "--model", NAME, "--threshold", "0.9"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Question: What is 37 + 48 * 2?\nAnswer:") and answer(out) == 37 + 48 * 2
    assert float(err.split(" tokens/forward")[0].split("·")[-1]) > 2.0


def test_every_cache_gives_the_same_answers(lm):
    """Block-causal: committed tokens never see later positions, so every cache is exact on the shipped weights."""
    prompts = [f"Question: {q}\nAnswer:" for q in QUESTIONS]
    texts = {cache: lm.generate(prompts, **CANVAS, threshold=0.9, cache=cache) for cache in ("none", "committed")}
    assert texts["none"] == texts["committed"]
