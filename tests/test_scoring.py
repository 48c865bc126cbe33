"""Scoring against independent brute-force implementations written here: confidence score (reference §6.2) by a
per-candidate Python loop, the one-token likelihood by one direct forward pass, the MC bound (§6.1) against the
exact expectation by enumerating every mask set, and the corpus ELBO (§3) against its enumerated integral."""
import itertools
import math

import numpy as np
import pytest
import torch

from illada.api import DiffusionLM
from illada.config import preset
from illada.errors import IlladaError
from illada.model import build_model
from illada.scoring import (
    confidence_score,
    corpus_elbo,
    encode_pair,
    mc_loglikelihood,
    score,
    token_loglikelihood,
)
from illada.tokenizer import byte_level_tokenizer

MASK, EOS, BOS = 3, 2, 1



def sharp_model(seed: int = 0, vocab: int = 128, **overrides):
    """Tiny random model with large weights, so predictions vary strongly with position and context."""
    config = preset("tiny", vocab_size=vocab, tie_word_embeddings=False, eos_token_id=EOS, bos_token_id=BOS,
                    **overrides)
    model = build_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 1 / math.sqrt(p.shape[1]), generator=gen)
        model.lm_head.weight.mul_(3.0)
    return model.eval()


def logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens])).double()[0], -1)


# ------------------------------------------------------------------------------------------- confidence (§6.2)
def naive_confidence(model, context, candidate, bos=None, eos=EOS):
    prefix = [bos] if bos is not None else []
    x = prefix + list(context) + [MASK] * len(candidate) + [eos]
    start = len(prefix) + len(context)
    hidden = set(range(len(candidate)))
    total = 0.0
    for _ in range(len(candidate)):
        lp = logprobs(model, x)
        best_i, best = None, -math.inf
        for i in sorted(hidden):
            value = lp[start + i, candidate[i]].item()
            if value > best:
                best_i, best = i, value
        total += best
        hidden.remove(best_i)
        x[start + best_i] = candidate[best_i]
    return total


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_confidence_matches_brute_force(batch_size):
    model = sharp_model(1)
    context = [20, 21, 22, 23]
    candidates = [[40, 41, 42], [50], [60, 61, 62, 63, 64], [70, 71]]
    got = confidence_score(model, context, candidates, mask_id=MASK, bos_id=BOS, batch_size=batch_size)
    want = [naive_confidence(model, context, c, bos=BOS) for c in candidates]
    assert got == pytest.approx(want, abs=1e-4)
    # Without BOS, single-candidate form, per-candidate contexts.
    assert confidence_score(model, [9, 10], [11, 12, 13], mask_id=MASK) == pytest.approx(
        naive_confidence(model, [9, 10], [11, 12, 13]), abs=1e-4)
    two = confidence_score(model, [[9, 10], [30]], [[11, 12], [31, 32, 33]], mask_id=MASK)
    assert two == pytest.approx([naive_confidence(model, [9, 10], [11, 12]),
                                 naive_confidence(model, [30], [31, 32, 33])], abs=1e-4)


def test_confidence_needs_eos():
    model = build_model(preset("tiny"), seed=0)  # no eos_token_id in the config
    with pytest.raises(IlladaError, match="EOS"):
        confidence_score(model, [5], [6], mask_id=MASK)
    assert isinstance(confidence_score(model, [5], [6], mask_id=MASK, append_eos=False), float)


# ------------------------------------------------------------------------------------- Monte Carlo likelihood (§6.1)
def test_mc_equals_exact_for_one_token_continuations():
    model = sharp_model(2)
    contexts = [[10, 11, 12], [20], [30, 31, 32, 33, 34]]
    tokens = [44, 55, 66]
    want = [logprobs(model, c + [MASK])[-1, t].item() for c, t in zip(contexts, tokens)]
    got = mc_loglikelihood(model, contexts, [[t] for t in tokens], mc_num=16, batch_size=2, mask_id=MASK, seed=3)
    assert got == pytest.approx(want, abs=1e-4)
    assert token_loglikelihood(model, contexts, [[t] for t in tokens], mask_id=MASK) == pytest.approx(want, abs=1e-4)
    with pytest.raises(IlladaError, match="one-token"):
        token_loglikelihood(model, [1, 2], [3, 4], mask_id=MASK)


def exact_elbo(model, context, answer):
    """E_{l ~ U{1..L}} E_{|S| = l} [(L / l) sum_{i in S} log p(r_i | context, r with S masked)], by enumeration."""
    n = len(answer)
    total = 0.0
    for l in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), l))
        for subset in subsets:
            x = list(context) + [MASK if i in subset else a for i, a in enumerate(answer)]
            lp = logprobs(model, x)
            value = sum(lp[len(context) + i, answer[i]].item() for i in subset)
            total += (1 / n) * (1 / len(subsets)) * (n / l) * value
    return total


def test_mc_mean_over_seeds_converges_to_exact_elbo():
    model = sharp_model(3)
    context, answer = [10, 11, 12], [40, 41, 42, 43]
    exact = exact_elbo(model, context, answer)
    estimates = np.array([mc_loglikelihood(model, context, answer, mc_num=8, batch_size=8, mask_id=MASK, seed=s)
                          for s in range(150)])
    stderr = estimates.std(ddof=1) / math.sqrt(len(estimates))
    assert stderr > 0  # the estimator does vary
    assert abs(estimates.mean() - exact) < 4 * stderr + 1e-6
    # and it is a lower bound on the true log-likelihood's neighbourhood: negative, finite
    assert exact < 0


def exact_infill_elbo(model, prefix, gap, suffix):
    """exact_elbo with visible text after the gap: every masking pattern of the gap, prefix and suffix kept."""
    n, total = len(gap), 0.0
    for l in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), l))
        for subset in subsets:
            x = list(prefix) + [MASK if i in subset else a for i, a in enumerate(gap)] + list(suffix)
            lp = logprobs(model, x)
            total += (1 / n) * (1 / len(subsets)) * (n / l) * sum(lp[len(prefix) + i, gap[i]].item() for i in subset)
    return total


def test_mc_infill_likelihood_with_a_suffix():
    """suffix_ids: log p(gap | prefix, suffix). One token: exact, read at the gap with the suffix visible; longer:
    the MC mean converges to the ELBO enumerated with the suffix in place; rows of a batch with different suffixes
    give what they give alone."""
    model = sharp_model(5)
    prefix, suffix = [10, 11, 12], [60, 61]
    want = logprobs(model, prefix + [MASK] + suffix)[len(prefix), 44].item()
    assert mc_loglikelihood(model, prefix, [44], suffix_ids=suffix, mask_id=MASK) == pytest.approx(want, abs=1e-4)
    assert mc_loglikelihood(model, prefix, [44], mask_id=MASK) != pytest.approx(want, abs=1e-3)  # the suffix counts
    gap = [40, 41, 42]
    exact = exact_infill_elbo(model, prefix, gap, suffix)
    estimates = np.array([mc_loglikelihood(model, prefix, gap, suffix_ids=suffix, mc_num=8, mask_id=MASK, seed=s)
                          for s in range(150)])
    stderr = estimates.std(ddof=1) / math.sqrt(len(estimates))
    assert stderr > 0 and abs(estimates.mean() - exact) < 4 * stderr + 1e-6
    batch = mc_loglikelihood(model, [prefix, [20]], [gap, [44, 45]], suffix_ids=[suffix, [70, 71, 72]], mc_num=4,
                             mask_id=MASK, seed=1)
    alone = [mc_loglikelihood(model, prefix, gap, suffix_ids=suffix, mc_num=4, mask_id=MASK, seed=1),
             mc_loglikelihood(model, [20], [44, 45], suffix_ids=[70, 71, 72], mc_num=4, mask_id=MASK, seed=1)]
    assert batch == pytest.approx(alone, abs=1e-4)
    with pytest.raises(IlladaError, match="one per continuation"):
        mc_loglikelihood(model, prefix, [gap, gap], suffix_ids=[suffix], mask_id=MASK)


def test_mc_deterministic_and_batch_independent():
    model = sharp_model(4)
    ctx = [5, 6, 7]
    a = mc_loglikelihood(model, ctx, [[20, 21, 22], [30, 31]], mc_num=12, batch_size=5, mask_id=MASK, seed=1)
    b = mc_loglikelihood(model, ctx, [[30, 31]], mc_num=12, batch_size=7, mask_id=MASK, seed=1)
    c = mc_loglikelihood(model, ctx, [30, 31], mc_num=12, batch_size=12, mask_id=MASK, seed=1)
    assert a[1] == pytest.approx(b[0], abs=1e-4) and isinstance(c, float)
    assert a == mc_loglikelihood(model, ctx, [[20, 21, 22], [30, 31]], mc_num=12, batch_size=5, mask_id=MASK, seed=1)
    assert c != mc_loglikelihood(model, ctx, [30, 31], mc_num=12, batch_size=12, mask_id=MASK, seed=2)


def test_mc_cfg_one_token_matches_formula():
    model = sharp_model(5)
    ctx, tok, w = [10, 11, 12], 50, 1.5
    with torch.no_grad():
        cond = model(torch.tensor([ctx + [MASK]])).double()[0, -1]
        unc = model(torch.tensor([[MASK] * len(ctx) + [MASK]])).double()[0, -1]
    want = torch.log_softmax(unc + (w + 1) * (cond - unc), -1)[tok].item()
    got = mc_loglikelihood(model, ctx, [tok], mc_num=4, cfg_scale=w, mask_id=MASK)
    assert got == pytest.approx(want, abs=1e-4)


def test_mc_errors():
    model = sharp_model(0)
    with pytest.raises(IlladaError, match="empty continuation"):
        mc_loglikelihood(model, [1], [], mask_id=MASK)
    with pytest.raises(IlladaError, match="exceed"):
        mc_loglikelihood(model, [5] * 127, [6, 7], mask_id=MASK)
    with pytest.raises(IlladaError, match="mc_num"):
        mc_loglikelihood(model, [1], [2], mc_num=0, mask_id=MASK)


# ----------------------------------------------------------------------------------------------- corpus ELBO (§3)
def test_corpus_elbo_matches_enumerated_integral():
    model = sharp_model(6)
    x = [30, 31, 32]
    n, eps = len(x), 1e-3
    # E_t [(1/p) sum_{masked} -log p] / L with every subset S masked w.p. p^|S| (1-p)^(L-|S|), p = (1-eps) t + eps:
    # the t-integral of p^(k-1) (1-p)^(L-k) is done on a fine grid.
    t = np.linspace(0, 1, 200_001)
    p = (1 - eps) * t + eps
    exact = 0.0
    for k in range(1, n + 1):
        weight = np.trapezoid(p ** (k - 1) * (1 - p) ** (n - k), t)
        for subset in itertools.combinations(range(n), k):
            lp = logprobs(model, [MASK if i in subset else v for i, v in enumerate(x)])
            exact += weight * sum(-lp[i, x[i]].item() for i in subset) / n
    runs = [corpus_elbo(model, x, seq_len=3, num_samples=64, mask_id=MASK, seed=s).nll for s in range(12)]
    stderr = np.std(runs, ddof=1) / math.sqrt(len(runs))
    assert abs(np.mean(runs) - exact) < 4 * stderr + 1e-3
    result = corpus_elbo(model, list(range(20, 60)) + [61], seq_len=16, num_samples=2, batch_size=2, mask_id=MASK)
    assert result.tokens == 41 and result.rows == 3
    assert result.perplexity_bound == pytest.approx(math.exp(result.nll))


# --------------------------------------------------------------------------------------------- text-level handle
def tiny_handle(seed=0):
    tok = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = build_model(config, seed=seed).eval()
    return DiffusionLM(model=model, tokenizer=tok, config=config, name="tiny")


def test_encode_pair_moves_trailing_space():
    tok = byte_level_tokenizer()
    ctx, cont = encode_pair(tok, "Question: 2+2?\nAnswer: ", "4")
    assert tok.decode(ctx) == "Question: 2+2?\nAnswer:" and tok.decode(cont) == " 4"


def test_handle_score_methods():
    lm = tiny_handle()
    tok = lm.tokenizer
    ctx_ids = tok.encode("The sky is")
    exact = score(lm, "The sky is", ["b", "g"], method="exact")  # bytes: one token each
    want = [logprobs(lm.model, ctx_ids + [MASK])[-1, tok.encode(c)[0]].item() for c in ("b", "g")]
    assert exact == pytest.approx(want, abs=1e-4)
    conf = score(lm, "The sky is", [" blue", " green"], method="confidence")
    assert conf == pytest.approx([naive_confidence(lm.model, ctx_ids, tok.encode(c), bos=tok.bos_token_id,
                                                   eos=tok.eos_token_id) for c in (" blue", " green")], abs=1e-4)
    assert len(score(lm, "The sky is", [" blue", " green"], method="mc", mc_num=4)) == 2
    with pytest.raises(IlladaError, match="unknown scoring method"):
        score(lm, "x", ["y"], method="bogus")


@pytest.mark.parametrize("method", ["confidence", "exact"])
def test_handle_cuts_a_too_long_context_from_the_left(method):
    lm = tiny_handle()
    window = lm.config.max_seq_len
    context = "x" * (window + 50) + "the end"
    extra = 1 if method == "confidence" else 0  # confidence appends an EOS
    bos = 1 if method == "confidence" else 0
    # bytes: one token per character; keep exactly what fits beside BOS, the 1-token choice and the EOS
    kept = context[len(context) - (window - bos - 1 - extra):]
    assert score(lm, context, ["a", "b"], method=method) == pytest.approx(
        score(lm, kept, ["a", "b"], method=method), abs=1e-5)
