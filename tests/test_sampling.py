"""Samplers against an independent naive transcription of reference §5 (per-row loops), plus exact checks of the
pieces: schedule, filters, Gumbel noise, commit selection, end-think boost, caches, stops and streaming."""
import math

import pytest
import torch

from illada.config import preset
from illada.errors import IlladaError
from illada.model import build_model
from illada.sampling import SamplingConfig, generate, left_pad, stream
from illada.sampling.endthink import end_think_boost
from illada.sampling.remasking import filter_top_k, filter_top_p, gumbel_noise, sample_candidates, select_top
from illada.sampling.schedule import factor_count, linear_schedule, threshold_count

MASK = 3  # the tiny preset's mask_token_id


def sharp_model(seed: int, n_layers: int = 2, head_scale: float = 3.0, causal: bool = False, shift: bool = False):
    """A tiny random model whose predictions depend on position and context (default init makes every masked
    position predict the same token with the same confidence, which hides ordering bugs). GQA: 4 heads, 2 kv."""
    model = build_model(preset("tiny", tie_word_embeddings=False, n_layers=n_layers, causal=causal,
                               shift_logits=shift), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 1 / math.sqrt(p.shape[1]), generator=gen)
        model.lm_head.weight.mul_(head_scale)
    return model.eval()


PROMPTS = [[10, 11, 12, 13, 14, 15], [20, 21, 22], [30, 31, 32, 33, 34]]


def batch(prompts=PROMPTS):
    return left_pad(prompts, pad_id=0)


# ---------------------------------------------------------------------------------------------------------------
# Naive reference: one prompt, Python lists, straight from reference §5.1 (+ the documented choices: the mask token
# is never a candidate but keeps its probability mass in the confidence, as in the official generate(); ties go to
# the leftmost position, EOS confidence -inf commits EOS last).
# ---------------------------------------------------------------------------------------------------------------
def ceil_div(a, b):
    return -(-a // b)


def naive_fixed(model, prompt, gen_length, block_length, steps, cfg_scale=0.0, eos_neg_inf=None,
                threshold=None, factor=None, rule="low_confidence", renormalise=False, steps_for=None):
    """Returns (tokens, forward passes). threshold/factor replace the step plan by the §5.4 rules. `renormalise`:
    the old, wrong confidence p / (1 - p_mask), for the test that tells the two apart. The last block is shorter
    when gen_length is not a multiple of block_length; `steps_for(s, e)`: steps of the block of generated tokens
    s..e (default: `steps` shared in proportion to the block lengths, `steps // num_blocks` for equal blocks)."""
    x = list(prompt) + [MASK] * gen_length
    p = len(prompt)
    if steps_for is None:
        steps_for = lambda s, e: max(1, ceil_div(steps * e, gen_length) - ceil_div(steps * s, gen_length))  # noqa: E731
    nfe = 0
    for s in range(0, gen_length, block_length):
        e = min(s + block_length, gen_length)
        steps_per_block = steps_for(s, e)
        block = list(range(p + s, p + e))
        m = sum(1 for j in block if x[j] == MASK)
        plan = [m // steps_per_block + (1 if i < m % steps_per_block else 0) for i in range(steps_per_block)]
        if threshold is not None or factor is not None:
            plan = [None] * m  # at least one token per pass
        for k in plan:
            if k == 0 or all(x[j] != MASK for j in block):
                continue
            with torch.no_grad():
                logits = model(torch.tensor([x]))[0].double()
                nfe += 1
                if cfg_scale:
                    uncond = [MASK] * p + x[p:]
                    unc = model(torch.tensor([uncond]))[0].double()
                    nfe += 1
                    logits = unc + (cfg_scale + 1) * (logits - unc)
            found = []
            for j in block:
                if x[j] != MASK:
                    continue
                probs = torch.softmax(logits[j], -1)  # the model's own distribution: the mask keeps its share
                row = logits[j].clone()
                row[MASK] = float("-inf")
                tok = int(row.argmax())
                if renormalise:
                    probs = torch.softmax(row, -1)
                if rule == "low_confidence":
                    conf = float(probs[tok])
                elif rule == "margin":
                    top = sorted(probs.tolist(), reverse=True)
                    conf = top[0] - top[1]
                else:  # entropy: the less uncertain, the earlier
                    conf = sum(q * math.log(q) for q in probs.tolist() if q > 0)
                if eos_neg_inf is not None and tok == eos_neg_inf:
                    conf = float("-inf")
                found.append((conf, j, tok))
            found.sort(key=lambda c: (-c[0], c[1]))
            if threshold is not None:
                k = max(1, sum(1 for c in found if c[0] > threshold))
            elif factor is not None:
                k = 1
                while k < len(found) and (k + 2) * (1 - found[k][0]) < factor and (k + 1) * (1 - found[k - 1][0]) < factor:
                    k += 1
            for _, j, tok in found[:k]:
                x[j] = tok
    return x, nfe


def run(model, prompts=PROMPTS, **options):
    ids, mask = batch(prompts)
    options.setdefault("mask_id", MASK)
    options.setdefault("variable_length", False)  # the LLaDA canvas, as the naive references here
    return generate(model, ids, attention_mask=mask, **options)


def rows(out, prompts=PROMPTS):
    """Each row's prompt + generation without the left padding."""
    p = out.prompt_length
    return [list(prompt) + out.sequences[r, p:].tolist() for r, prompt in enumerate(prompts)]


@pytest.mark.parametrize("gen_length,block_length,steps", [
    (8, 8, 8), (8, 8, 3), (12, 4, 6), (10, 5, 4), (6, 3, 10), (12, 6, 2), (9, 3, 6),
])
def test_fixed_canvas_matches_naive_reference(gen_length, block_length, steps):
    model = sharp_model(seed=gen_length * 100 + block_length * 10 + steps)
    out = run(model, gen_length=gen_length, block_length=block_length, steps=steps)
    for r, prompt in enumerate(PROMPTS):
        expected, _ = naive_fixed(model, prompt, gen_length, block_length, steps)
        assert rows(out)[r] == expected
    # nfe: the naive loop skips only steps that commit nothing, as the sampler does.
    assert out.nfe == naive_fixed(model, PROMPTS[0], gen_length, block_length, steps)[1]
    assert out.generated_lengths.tolist() == [gen_length] * 3


def test_mask_ban_keeps_the_model_confidences():
    """The mask token is never committed, but its probability is not renormalised away: the commit order follows
    p(candidate) under the model's softmax, as the official generate() does (32/32/32 greedy canvas)."""
    model = sharp_model(7)
    with torch.no_grad():  # a mask probability that varies a lot across positions
        model.lm_head.weight[MASK].mul_(8)
    prompt = PROMPTS[0]
    want, _ = naive_fixed(model, prompt, 32, 32, 32)
    renormalised, _ = naive_fixed(model, prompt, 32, 32, 32, renormalise=True)
    assert want != renormalised  # the case tells the two confidences apart
    out = run(model, [prompt], gen_length=32, block_length=32, steps=32)
    assert out.sequences[0].tolist() == want and MASK not in want[len(prompt):]


def test_batch_invariance_alone_vs_padded_batch():
    model = sharp_model(seed=7)
    options = dict(gen_length=12, block_length=4, steps=12, threshold=0.3, variable_length=True)
    together = rows(run(model, **options))
    for r, prompt in enumerate(PROMPTS):
        alone = run(model, prompts=[prompt], **options)
        assert together[r] == rows(alone, [prompt])[0]


def test_cfg_zero_is_single_pass_and_cfg_matches_naive():
    model = sharp_model(seed=11)
    plain = run(model, gen_length=8, block_length=4, steps=8)
    zero = run(model, gen_length=8, block_length=4, steps=8, cfg_scale=0.0)
    assert torch.equal(plain.sequences, zero.sequences) and zero.nfe == 8
    guided = run(model, gen_length=8, block_length=4, steps=8, cfg_scale=1.5)
    assert guided.nfe == 16
    for r, prompt in enumerate(PROMPTS):
        expected, _ = naive_fixed(model, prompt, 8, 4, 8, cfg_scale=1.5)
        assert rows(guided)[r] == expected
    assert not torch.equal(plain.sequences, guided.sequences)  # guidance must actually change something


def frequent_token(out):
    gen = out.sequences[:, out.prompt_length:].flatten()
    return int(gen.bincount().argmax())


def test_forbid_eos_never_emits_eos():
    model = sharp_model(seed=13)
    eos = frequent_token(run(model, gen_length=12, block_length=4, steps=12))
    out = run(model, gen_length=12, block_length=4, steps=12, eos_token_id=eos, forbid_eos=True)
    assert eos not in out.sequences[:, out.prompt_length:].flatten().tolist()
    assert out.generated_lengths.tolist() == [12] * 3


@pytest.mark.parametrize("rule", ["low_confidence", "entropy"])
def test_eos_confidence_neg_inf_matches_naive(rule):
    # With entropy the confidences are negative, so "-inf" must really be -inf, not a zeroed probability.
    model = sharp_model(seed=17)
    eos = frequent_token(run(model, gen_length=12, block_length=6, steps=12))
    out = run(model, gen_length=12, block_length=6, steps=12, eos_token_id=eos, eos_confidence="neg_inf",
              early_stop=False, pad_token_id=1, remasking=rule)
    normal = run(model, gen_length=12, block_length=6, steps=12, eos_token_id=eos, early_stop=False,
                 pad_token_id=1, remasking=rule)
    assert not torch.equal(out.sequences, normal.sequences)
    for r, prompt in enumerate(PROMPTS):
        expected, _ = naive_fixed(model, prompt, 12, 6, 12, eos_neg_inf=eos, rule=rule)
        gen = expected[len(prompt):]
        cut = gen.index(eos) if eos in gen else len(gen)
        assert out.generated_lengths[r].item() == cut
        assert rows(out)[r] == list(prompt) + gen[:cut] + [1] * (len(gen) - cut)


@pytest.mark.parametrize("rule", ["margin", "entropy"])
def test_margin_and_entropy_match_naive(rule):
    model = sharp_model(seed=74, head_scale=1.0)
    out = run(model, gen_length=8, block_length=8, steps=8, remasking=rule)
    for r, prompt in enumerate(PROMPTS):
        assert rows(out)[r] == naive_fixed(model, prompt, 8, 8, 8, rule=rule)[0]
    assert not torch.equal(out.sequences, run(model, gen_length=8, block_length=8, steps=8).sequences)


def test_eos_confidence_neg_inf_does_not_deadlock():
    # Default init: every masked position predicts the same token; make it EOS so every confidence is -inf.
    model = build_model(preset("tiny"), seed=1)
    probe = run(model, gen_length=8, block_length=4, steps=8)
    eos = frequent_token(probe)
    out = run(model, gen_length=8, block_length=4, steps=8, eos_token_id=eos, eos_confidence="neg_inf",
              early_stop=False, return_history=True)
    assert out.nfe == 8 and (out.history[-1][0][:, out.prompt_length:] != MASK).all()


def test_variable_length_equals_fixed_sampler_block_by_block():
    model = sharp_model(seed=19)
    block, steps, blocks = 4, 3, 4
    out = run(model, gen_length=block * blocks, block_length=block, steps=steps, variable_length=True)
    assert out.sequences.shape[1] == out.prompt_length + block * blocks
    for r, prompt in enumerate(PROMPTS):
        text = list(prompt)
        for _ in range(blocks):
            step = generate(model, torch.tensor([text]), mask_id=MASK, gen_length=block, block_length=block,
                            steps=steps)
            text = step.sequences[0].tolist()
        assert rows(out)[r] == text


def test_variable_length_stops_at_first_eos_and_stop_string():
    model = sharp_model(seed=23)
    options = dict(gen_length=20, block_length=4, steps=4, variable_length=True)
    free = run(model, **options)
    gen0 = free.sequences[0, free.prompt_length:].tolist()
    eos = gen0[6]  # appears in the second block of row 0 (maybe earlier too)
    first = gen0.index(eos)
    out = run(model, eos_token_id=eos, return_history=True, **options)
    assert out.generated_lengths[0].item() == first
    assert out.sequences[0, out.prompt_length:out.prompt_length + first].tolist() == gen0[:first]
    # Row 0 stopped after the block containing its EOS: its later blocks were never committed.
    last_canvas, last_steps = out.history[-1]
    row0_gen_steps = last_steps[0, out.prompt_length:]
    assert (row0_gen_steps[(first // 4 + 1) * 4:] == -1).all()
    for r in range(3):
        gen = free.sequences[r, free.prompt_length:].tolist()
        assert out.generated_lengths[r].item() == (gen.index(eos) if eos in gen else 20)
    # Several stop tokens; every row stops within its first two blocks, so generation ends early.
    stops = [gen0[6], free.sequences[1, free.prompt_length + 1].item(), free.sequences[2, free.prompt_length].item()]
    out = run(model, stop_token_ids=stops, **options)
    for r in range(3):
        gen = free.sequences[r, free.prompt_length:].tolist()
        cut = min(gen.index(t) for t in stops if t in gen)
        assert out.generated_lengths[r].item() == cut and out.generated_tokens()[r] == gen[:cut]
    assert out.nfe == 4 * ((max(out.generated_lengths.tolist()) // 4) + 1) < free.nfe

    # Stop string spanning two tokens; decode writes each token as "[id]". Cut after its last token.
    decode = lambda ids: "".join(f"[{t}]" for t in ids)  # noqa: E731
    a, b = gen0[9], gen0[10]
    stop = f"[{a}][{b}]"
    cut = next(i + 2 for i in range(len(gen0) - 1) if gen0[i:i + 2] == [a, b])
    out = run(model, stop_strings=[stop], decode=decode, **options)
    assert out.generated_lengths[0].item() == cut
    assert decode(out.generated_tokens()[0]).endswith(stop)
    with pytest.raises(IlladaError):
        run(model, stop_strings=["x"], **options)


CONTEXT = 128  # the tiny preset's max_seq_len


def naive_variable(model, prompt, gen_length, block_length, steps):
    """iLLaDA variable length (§5.2) for one prompt, without stops: append min(block, budget left) masks at a time
    and denoise that block alone; a shorter last block gets steps in proportion (the same tokens per pass). The
    budget is max_new_tokens capped by the context after this prompt."""
    budget = min(gen_length, CONTEXT - len(prompt))
    x = list(prompt)
    while len(x) - len(prompt) < budget:
        n = min(block_length, budget - (len(x) - len(prompt)))
        x, _ = naive_fixed(model, x, n, n, ceil_div(steps * n, block_length))
    return x


def naive_fixed_capped(model, prompt, gen_length, block_length, steps):
    """LLaDA fixed canvas for one prompt with the budget capped by the context: the canvas is the capped budget,
    the steps keep the requested rate (steps / max_new_tokens per token)."""
    budget = min(gen_length, CONTEXT - len(prompt))
    steps_for = lambda s, e: max(1, ceil_div(steps * e, gen_length) - ceil_div(steps * s, gen_length))  # noqa: E731
    return naive_fixed(model, prompt, budget, block_length, steps, steps_for=steps_for)[0]


@pytest.mark.parametrize("variable_length", [True, False])
@pytest.mark.parametrize("gen_length,block_length,steps", [(10, 4, 4), (10, 4, 2), (7, 3, 7), (5, 8, 5), (9, 4, 9)])
def test_budget_not_a_multiple_of_the_block_is_honoured_exactly(variable_length, gen_length, block_length, steps):
    """max_new_tokens is generated exactly (a shorter last block), in both modes, equal to the naive references;
    it used to be cut to whole blocks (variable length) or refused (fixed canvas)."""
    model = sharp_model(seed=29 + gen_length + steps)
    if not variable_length:
        steps = gen_length if steps == block_length else steps  # fixed canvas: steps are the total
    out = run(model, gen_length=gen_length, block_length=block_length, steps=steps, variable_length=variable_length)
    assert out.sequences.shape[1] - out.prompt_length == gen_length
    assert out.generated_lengths.tolist() == [gen_length] * len(PROMPTS) and not out.notes
    naive = naive_variable if variable_length else naive_fixed_capped
    for r, prompt in enumerate(PROMPTS):
        assert rows(out)[r] == naive(model, prompt, gen_length, block_length, steps)


@pytest.mark.parametrize("variable_length", [True, False])
def test_budget_from_each_rows_own_prompt_near_the_context_end(variable_length):
    """Prompts of 100 and 120 tokens, context 128, 16 new tokens (issue 12: 200/238, context 256, gen 32): the
    long row gets its own 8 tokens (a note says the context capped it), the short one all 16, and every row of
    the batch equals that row alone and the naive reference (the padded width used to cut every row's budget,
    and a fixed canvas refused the whole batch)."""
    model = sharp_model(seed=41)
    prompts = [[10 + i % 90 for i in range(100)], [20 + i % 80 for i in range(120)], [5, 6, 7]]
    options = dict(gen_length=16, block_length=4, steps=4 if variable_length else 16, variable_length=variable_length)
    out = run(model, prompts=prompts, **options)
    assert out.generated_lengths.tolist() == [16, 8, 16] and out.budgets.tolist() == [16, 8, 16]
    assert len(out.notes) == 1 and "row 1" in out.notes[0] and "capped to 8" in out.notes[0]
    naive = naive_variable if variable_length else naive_fixed_capped
    for r, prompt in enumerate(prompts):
        alone = run(model, prompts=[prompt], **options)
        want = naive(model, prompt, 16, 4, options["steps"])
        assert rows(alone, [prompt])[0][:len(want)] == want and alone.generated_tokens()[0] == want[len(prompt):]
        assert out.generated_tokens()[r] == want[len(prompt):]
    capped = run(model, prompts=[prompts[1]], **options)
    assert capped.notes == ["max_new_tokens 16 capped to 8: the prompt (120 tokens) leaves 8 of the model context "
                            "(128 tokens)"]


def test_row_budgets_give_each_row_its_own_budget():
    model = sharp_model(seed=43)
    options = dict(gen_length=8, block_length=4, steps=4, variable_length=True)
    out = run(model, row_budgets=[8, 3, 6], **options)
    assert out.generated_lengths.tolist() == [8, 3, 6]
    for r, (prompt, budget) in enumerate(zip(PROMPTS, [8, 3, 6])):
        assert out.generated_tokens()[r] == naive_variable(model, prompt, budget, 4, 4)[len(prompt):]


def test_threshold_one_is_one_token_per_step():
    model = sharp_model(seed=31)
    ref = run(model, gen_length=12, block_length=4, steps=12)
    out = run(model, gen_length=12, block_length=4, steps=5, threshold=1.0)
    assert torch.equal(out.sequences, ref.sequences) and out.nfe == 12 and out.tokens_per_forward == 1.0


@pytest.mark.parametrize("rule", [dict(threshold=0.2), dict(threshold=0.1), dict(factor=3.0), dict(factor=5.0)])
def test_threshold_and_factor_match_naive(rule):
    model = sharp_model(seed=37)
    out = run(model, gen_length=12, block_length=4, steps=12, **rule)
    nfe = set()
    for r, prompt in enumerate(PROMPTS):
        alone = run(model, prompts=[prompt], gen_length=12, block_length=4, steps=12, **rule)
        expected, passes = naive_fixed(model, prompt, 12, 4, 12, **rule)
        assert rows(out)[r] == expected and rows(alone, [prompt])[0] == expected
        assert alone.nfe == passes
        nfe.add(passes)
    # A batch stays on a block until every row has filled it: at least the slowest row, fewer than one per token.
    assert max(nfe) <= out.nfe < 12


def test_threshold_zero_commits_a_block_per_pass():
    model = sharp_model(seed=37)
    everything = run(model, gen_length=12, block_length=4, steps=12, threshold=0.0)
    assert everything.nfe == 3 and everything.tokens_per_forward == 4.0


def test_threshold_count_and_factor_count_exact():
    conf = torch.tensor([[0.95, 0.5, 0.91, 0.2], [0.1, 0.2, 0.3, 0.4], [0.99, 0.98, 0.97, 0.6]])
    eligible = torch.tensor([[True, True, True, True], [True, True, False, False], [True, False, True, True]])
    assert threshold_count(conf, eligible, 0.9).tolist() == [2, 1, 2]

    def naive_factor(c, e, f):
        vals = sorted((v for v, ok in zip(c, e) if ok), reverse=True)
        n = 0
        while n < len(vals) and (n + 2) * (1 - vals[n]) < f:
            n += 1
        return max(n, 1) if vals else 0

    for f in (0.05, 0.2, 0.5, 1.0, 2.0):
        expected = [naive_factor(c, e, f) for c, e in zip(conf.tolist(), eligible.tolist())]
        assert factor_count(conf, eligible, f).tolist() == expected


def test_linear_schedule_exact():
    for m in range(0, 13):
        for s in range(1, 7):
            got = linear_schedule(torch.tensor([m]), s)[0].tolist()
            expected = [m // s + (1 if i < m % s else 0) for i in range(s)]
            assert got == expected and sum(got) == m
    # per-row steps (rows whose block is shorter get fewer): each row as alone, zeros past its steps
    got = linear_schedule(torch.tensor([7, 2, 5]), torch.tensor([3, 1, 5])).tolist()
    assert got == [[3, 2, 2, 0, 0], [2, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_select_top_uneven_counts_and_neg_inf():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, float("-inf"), float("-inf"), 0.2], [0.4, 0.4, 0.8, 0.1]])
    eligible = torch.tensor([[True, True, False, True], [False, True, True, True], [True, True, True, True]])
    counts = torch.tensor([2, 3, 0])
    got = select_top(conf, eligible, counts)
    expected = torch.tensor([[False, True, False, True], [False, True, True, True], [False, False, False, False]])
    assert torch.equal(got, expected)
    # ties go left; -inf eligible positions are chosen before ineligible ones
    got = select_top(torch.tensor([[0.4, 0.4, 0.4]]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([2]))
    assert got.tolist() == [[True, True, False]]


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("policy", ["prefix", "dual"])
def test_cache_with_refresh_every_step_equals_uncached(policy, shift):
    model = sharp_model(seed=41, shift=shift)
    for options in (dict(gen_length=12, block_length=4, steps=12),
                    dict(gen_length=12, block_length=4, steps=4, variable_length=True, threshold=0.5)):
        plain = run(model, **options)
        cached = run(model, cache=policy, cache_refresh=1, **options)
        assert torch.equal(plain.sequences, cached.sequences) and plain.nfe == cached.nfe


class Recorder(torch.nn.Module):
    """Wraps a model and records the input length of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.lengths = model, model.config, []

    def forward(self, input_ids, **kwargs):
        self.lengths.append(input_ids.shape[1])
        return self.model(input_ids, **kwargs)


def test_shifted_model_cached_path_is_exact_for_one_layer_and_recomputes_the_position_before_the_block():
    # a Dream-style model reads a block's first prediction off the position before it: the cached steps must
    # recompute that position too, else (one layer, so the cache is exact) the tokens would differ
    model = Recorder(sharp_model(seed=44, n_layers=1, shift=True))
    options = dict(gen_length=12, block_length=4, steps=12)
    plain = run(model, **options)
    for policy in ("prefix", "dual"):
        model.lengths.clear()
        assert torch.equal(plain.sequences, run(model, cache=policy, **options).sequences)
        full = plain.sequences.shape[1]
        short = sorted(set(n for n in model.lengths if n < full))
        assert short == ([5] if policy == "dual" else [5, 9, 13])


@pytest.mark.parametrize("policy", ["prefix", "dual"])
def test_cached_path_is_exact_for_one_layer(policy):
    # With one layer, the cached keys/values of positions whose tokens did not change are exactly what a full
    # forward computes, so the approximate caches become exact: this checks the splice (left padding, GQA, batch 3).
    model = Recorder(sharp_model(seed=43, n_layers=1))
    options = dict(gen_length=12, block_length=4, steps=12)
    plain = run(model, **options)
    model.lengths.clear()
    cached = run(model, cache=policy, **options)
    assert torch.equal(plain.sequences, cached.sequences) and cached.nfe == 12
    full = plain.sequences.shape[1]
    short = [n for n in model.lengths if n < full]
    assert len(short) == 9  # 3 blocks x (4 steps - 1 refresh)
    # prefix recomputes from the block start to the end of the canvas, dual only the block
    assert sorted(set(short)) == ([4] if policy == "dual" else [4, 8, 12])
    model.lengths.clear()
    var = dict(gen_length=12, block_length=4, steps=4, variable_length=True)
    assert torch.equal(run(model, **var).sequences, run(model, cache=policy, **var).sequences)


@pytest.mark.parametrize("shift", [False, True])
def test_committed_cache_is_exact_for_one_layer_and_recomputes_at_most_two_blocks(shift):
    # one layer: a token's keys/values depend on it and its position only, so freezing them once committed is exact
    model = Recorder(sharp_model(seed=45, n_layers=1, shift=shift))
    for options in (dict(gen_length=12, block_length=4, steps=12), dict(gen_length=12, block_length=4, steps=12,
                                                                         threshold=0.3),
                    dict(gen_length=12, block_length=4, steps=4, variable_length=True)):
        plain = run(model, **options)
        model.lengths.clear()
        cached = run(model, cache="committed", **options)
        assert torch.equal(plain.sequences, cached.sequences) and cached.nfe == plain.nfe
        # one full pass (the prompt, 6 tokens, and the canvas so far), then the block; at each later block's first
        # step also the block just finished; a shifted model adds the position before the block
        first = 6 + (4 if options.get("variable_length") else 12)
        assert model.lengths[0] == first
        assert set(model.lengths[1:]) <= {4 + shift, 8}
        assert model.lengths.count(8) == 2  # blocks 2 and 3 begin by recomputing blocks 1 and 2


def test_cache_write_before_stores_exactly_the_positions_before_it():
    from illada.model import KVCache

    model = sharp_model(seed=46, n_layers=1)
    ids = torch.randint(4, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 4:8] = torch.randint(4, 60, (2, 4), generator=torch.Generator().manual_seed(1))
    cache, fresh = KVCache(), KVCache()
    with torch.no_grad():
        model(ids, kv_cache=cache)
        before = cache.keys[0].clone()
        cache.write_before = 6
        model(changed[:, 4:8], kv_cache=cache, cache_start=4)
        model(changed, kv_cache=fresh)  # one layer: these are the keys of the changed tokens
    keys = cache.keys[0]
    # written back: the keys of the changed tokens (computed from a shorter input, so equal up to float rounding;
    # the kept positions are copies, bit for bit)
    assert torch.allclose(keys[:, :, 4:6], fresh.keys[0][:, :, 4:6], rtol=0, atol=1e-5)
    assert torch.equal(keys[:, :, :4], before[:, :, :4]) and torch.equal(keys[:, :, 6:], before[:, :, 6:])
    # a canvas that grew past the cache: the new positions are appended
    grown = torch.cat([changed, ids[:, :3]], dim=1)
    cache.write_before = 13
    with torch.no_grad():
        model(grown[:, 8:], kv_cache=cache, cache_start=8)
        model(grown, kv_cache=fresh)
    assert cache.keys[0].shape[2] == 13
    assert torch.allclose(cache.keys[0][:, :, 8:], fresh.keys[0][:, :, 8:], rtol=0, atol=1e-5)


def test_committed_cache_refuses_a_refresh_and_infill():
    from illada.sampling.infill import InfillConfig

    with pytest.raises(IlladaError, match="never refreshes"):
        SamplingConfig(cache="committed", cache_refresh=2)
    with pytest.raises(IlladaError, match="infill takes none, prefix or dual"):
        InfillConfig(cache="committed")


def test_approximate_cache_runs_with_cfg_and_counts_nfe():
    model = sharp_model(seed=47)
    for cache in ("dual", "committed"):
        out = run(model, gen_length=12, block_length=4, steps=12, cache=cache, cfg_scale=1.0, threshold=0.5)
        assert out.nfe % 2 == 0 and (out.sequences[:, out.prompt_length:] != MASK).all()


def test_end_think_boost_exact_formula():
    b, n, v, p, gen_length = 3, 4, 16, 5, 20
    think = [7, 8, 9]
    canvas = torch.full((b, p + gen_length), MASK)
    canvas[:, :p] = 1
    block_start = p + 8
    canvas[:, p:block_start] = 2
    # row 0: first mask at block_start + 1, preceded by nothing of </think>: boost token 7 there
    canvas[0, block_start] = 4
    # row 1: first mask at block_start + 2, preceded by [7, 8]: boost token 9
    canvas[1, block_start:block_start + 2] = torch.tensor([7, 8])
    # row 2: </think> already generated: no boost
    canvas[2, p:p + 3] = torch.tensor(think)
    logits = torch.randn(b, n, v, generator=torch.Generator().manual_seed(0))
    boost, power = 100.0, 3.0
    out = end_think_boost(logits, canvas, block_start, MASK, p, gen_length, think, boost, power)
    delta = out - logits
    expected = torch.zeros_like(delta)
    for row, offset, token in ((0, 1, 7), (1, 2, 9)):
        pos = block_start + offset
        progress = min(max((pos - p + 1) / gen_length, 0.0), 1.0)
        expected[row, offset, token] = boost * progress ** power
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-5)
    # Progress is clipped to 1 beyond the budget.
    late = end_think_boost(torch.zeros(1, 1, v), torch.full((1, p + 40), MASK), p + 30, MASK, p, gen_length,
                           think, 5.0, 2.0)
    assert late[0, 0, 7].item() == 5.0


def test_end_think_prefix_match_uses_generated_tokens_only():
    """A prompt that ends in the first token of </think> must not count as a partial match (official var_generate)."""
    p, gen_length, think = 6, 8, [77, 88]
    canvas = torch.full((2, p + gen_length), MASK)
    canvas[:, :p] = torch.tensor([10, 11, 12, 13, 14, 77])
    canvas[1, p] = 77  # row 1 generated 77 itself: then 88 is next
    logits = torch.zeros(2, gen_length, 128)
    out = end_think_boost(logits, canvas, p, MASK, p, gen_length, think, 100.0, 1.0)
    assert out[0, 0, 77] == pytest.approx(100.0 * 1 / gen_length) and out[0, 0, 88] == 0
    assert out[1, 1, 88] == pytest.approx(100.0 * 2 / gen_length) and out[1, 1, 77] == 0


def test_end_think_boost_steers_generation():
    model = sharp_model(seed=53)
    think = [90, 91]
    plain = run(model, gen_length=12, block_length=4, steps=12)
    boosted = run(model, gen_length=12, block_length=4, steps=12, end_think_ids=think, end_think_boost=1e4,
                  end_think_power=1.0)
    p = boosted.prompt_length
    assert boosted.sequences[:, p:p + 2].tolist() == [think] * 3
    assert plain.sequences[:, p:p + 2].tolist() != [think] * 3


def test_gumbel_noise_float64_and_sampling_distribution():
    noise = gumbel_noise((4, 5), "cpu", torch.Generator().manual_seed(0))
    assert noise.dtype == torch.float64
    assert (noise.float().double() != noise).all()  # not float32 noise cast up
    logits = torch.log(torch.tensor([0.2, 0.8]))[None].expand(20000, 2)
    gen = torch.Generator().manual_seed(1)
    freq = sample_candidates(logits, 1.0, gen).double().mean().item()
    assert abs(freq - 0.8) < 0.015
    # temperature 0.5 sharpens to p^2 / sum p^2 = 0.64 / 0.68
    freq = sample_candidates(logits, 0.5, gen).double().mean().item()
    assert abs(freq - 0.64 / 0.68) < 0.015


def test_seeded_sampling_is_deterministic():
    model = sharp_model(seed=59)
    options = dict(gen_length=8, block_length=4, steps=8, temperature=1.0, remasking="random")
    a = run(model, seed=5, **options)
    b = run(model, seed=5, **options)
    c = run(model, seed=6, **options)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)


def test_top_k_top_p_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.0]])
    assert filter_top_k(logits, 2).isfinite().tolist() == [[False, True, True, False, True]]  # tie at k-th kept
    assert filter_top_k(logits, 1).isfinite().tolist() == [[False, True, False, False, False]]
    probs = logits.softmax(-1)[0].tolist()
    for p in (0.1, 0.5, 0.8, 0.95, 0.999):
        order = sorted(range(5), key=lambda i: -probs[i])
        keep, mass = set(), 0.0
        for i in order:
            if mass >= p:
                break
            keep.add(i)
            mass += probs[i]
        got = filter_top_p(logits, p).isfinite()[0].tolist()
        assert got == [i in keep for i in range(5)], p


def test_remasking_rules_and_top_k_run():
    model = sharp_model(seed=61)
    for rule in ("margin", "entropy", "random"):
        out = run(model, gen_length=8, block_length=4, steps=4, remasking=rule, temperature=0.7, top_k=5,
                  top_p=0.9, seed=0)
        assert (out.sequences[:, out.prompt_length:] != MASK).all()
    # margin at temperature 0 commits in a different order than low_confidence but fills the canvas
    a = run(model, gen_length=8, block_length=8, steps=4, remasking="margin", return_history=True)
    assert a.nfe == 4 and len(a.history) == 4


def test_stream_and_callback_agree_with_generate():
    model = sharp_model(seed=67)
    ids, mask = batch()
    options = dict(mask_id=MASK, gen_length=8, block_length=4, steps=8, variable_length=False)
    seen = []
    out = generate(model, ids, attention_mask=mask, callback=seen.append, return_history=True, **options)
    events = list(stream(model, ids, attention_mask=mask, **options))
    assert len(events) == len(seen) == out.nfe + 1
    assert torch.equal(events[-1].output.sequences, out.sequences) and events[-1].done
    for e, (canvas, step_of) in zip(events[:-1], out.history):
        assert torch.equal(e.canvas, canvas) and torch.equal(e.step_of, step_of)
        assert e.committed.sum().item() == 3  # one token per row per step
    assert (out.history[-1][1][:, out.prompt_length:] >= 0).all()
    config = SamplingConfig(max_new_tokens=8, block_length=4, steps=8, mask_id=MASK, variable_length=False)
    assert torch.equal(generate(model, ids, attention_mask=mask, config=config).sequences, out.sequences)


def test_user_errors():
    model = sharp_model(seed=71)
    with pytest.raises(IlladaError):
        run(model, prompts=[[10] * 128], gen_length=4, block_length=4, steps=4)  # the prompt fills the context
    with pytest.raises(IlladaError):
        run(model, gen_length=8, row_budgets=[8, 0, 8])
    with pytest.raises(IlladaError):
        run(model, gen_length=8, bogus=1)
    with pytest.raises(IlladaError):
        SamplingConfig(remasking="nope")
    with pytest.raises(IlladaError):
        generate(model, torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 0]]), mask_id=MASK)


def test_autoregressive_greedy_with_cache_matches_full_recompute():
    from illada.sampling.autoregressive import greedy_generate_ar

    model = sharp_model(seed=79, causal=True)
    prompt = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    out = greedy_generate_ar(model, prompt, max_new_tokens=10)
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, ids) and out.nfe == 10
    assert len(set(ids[:, 4:].flatten().tolist())) > 4  # a varied continuation, not one repeated token
    eos = ids[0, 4 + 3].item()
    stopped = greedy_generate_ar(model, prompt[:1], max_new_tokens=10, eos_token_id=eos)
    first = ids[0, 4:].tolist().index(eos)
    assert stopped.generated_lengths.tolist() == [first] and stopped.nfe == first + 1
    with pytest.raises(IlladaError):
        greedy_generate_ar(sharp_model(seed=1), prompt, max_new_tokens=4)  # not causal
