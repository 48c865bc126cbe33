"""Each sequence log-likelihood estimator against the exact quantity it claims to estimate, by enumerating every
masking pattern on a tiny case (vocabulary 8, prompt 2, completion 3): the Monte Carlo mean of the estimate and of its
gradient must match the enumerated expectation. The exact sums are written here from the definitions in the
estimators' docstring, independently of the sampling code."""
import itertools
import math

import pytest
import torch

from illada.config import preset
from illada.model import build_model
from illada.rl.estimators import CoupledEstimator, ELBOEstimator, MeanFieldEstimator, ScoredBatch

MASK = 7
PROMPT, COMPLETION = [1, 3], [4, 2, 5]
N = 24000  # Monte Carlo draws, as rows of one batch


@pytest.fixture(scope="module")
def model():
    config = preset("tiny", vocab_size=8, mask_token_id=MASK, hidden_size=32, intermediate_size=64, n_layers=2,
                    n_heads=2, n_kv_heads=2, max_seq_len=16)
    model = build_model(config, seed=3).float()
    with torch.no_grad():  # sharp, context-dependent conditionals, so that different maskings score differently
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return model


def logp(model, masked_positions: set[int]) -> torch.Tensor:
    """(L,) log p(true token) with exactly `masked_positions` (absolute) replaced by [MASK]; differentiable."""
    ids = torch.tensor([PROMPT + COMPLETION])
    noisy = ids.clone()
    for i in masked_positions:
        noisy[0, i] = MASK
    out = torch.log_softmax(model(noisy).float(), dim=-1)[0]
    return out.gather(-1, ids[0].unsqueeze(-1)).squeeze(-1)


P, L = len(PROMPT), len(COMPLETION)
COMP = list(range(P, P + L))


def exact_mean_field(model, q: float) -> torch.Tensor:
    total = 0.0
    for bits in itertools.product([0, 1], repeat=P):
        weight = math.prod(q if b else 1 - q for b in bits)
        masked = {i for i, b in enumerate(bits) if b} | set(COMP)
        total = total + weight * logp(model, masked)[COMP].sum()
    return total


def exact_coupled(model) -> torch.Tensor:
    total = 0.0
    for i in COMP:
        others = [j for j in COMP if j != i]
        for bits in itertools.product([0, 1], repeat=L - 1):
            m = sum(bits)
            # P(i scored with exactly these others masked) = 2 * B(m + 2, L - m) = 2 (m+1)! (L-m-1)! / (L+1)!
            weight = 2 * math.factorial(m + 1) * math.factorial(L - m - 1) / math.factorial(L + 1)
            masked = {i} | {j for j, b in zip(others, bits) if b}
            total = total + weight * logp(model, masked)[i]
    return total


def exact_elbo(model) -> torch.Tensor:
    total = 0.0
    for bits in itertools.product([0, 1], repeat=L):
        k = sum(bits)
        if k == 0:
            continue
        masked = [j for j, b in zip(COMP, bits) if b]
        # E_t[(1/t) t^k (1-t)^(L-k)] = (k-1)! (L-k)! / L!
        weight = math.factorial(k - 1) * math.factorial(L - k) / math.factorial(L)
        total = total + weight * logp(model, set(masked))[masked].sum()
    return total


def grads(model, value: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    value.backward()
    return torch.cat([p.grad.flatten().clone() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("estimator, exact", [
    (MeanFieldEstimator(prompt_mask_prob=0.3), lambda m: exact_mean_field(m, 0.3)),
    (CoupledEstimator(), exact_coupled),
    (ELBOEstimator(samples=1), exact_elbo),
], ids=["mean_field", "coupled", "elbo"])
def test_estimator_expectation_and_gradient_match_the_enumerated_quantity(model, estimator, exact):
    batch = ScoredBatch.from_lists([PROMPT] * N, [COMPLETION] * N, pad_id=0)
    masks = estimator.draw(batch, torch.Generator().manual_seed(0))
    estimates = estimator.estimate(model, batch, masks, MASK)
    target = exact(model)
    mean, stderr = estimates.mean(), estimates.std() / math.sqrt(N)
    assert abs(mean.item() - target.item()) < 4 * stderr.item() + 1e-4, (mean.item(), target.item(), stderr.item())
    # the test can tell estimators apart: each one's target is far from the others' by many standard errors
    others = {exact_mean_field(model, 0.3).item(), exact_coupled(model).item(), exact_elbo(model).item()}
    assert all(abs(o - target.item()) > 6 * stderr.item() for o in others if o != target.item())
    g_mc, g_exact = grads(model, estimates.mean()), grads(model, exact(model))
    assert torch.linalg.vector_norm(g_mc - g_exact) < 0.05 * torch.linalg.vector_norm(g_exact)


def test_the_elbo_is_below_the_exact_log_likelihood_and_masks_are_shared(model):
    # log p(y | x) of the model's own joint over all 8^3 completions is not defined by a masked model, but the ELBO
    # of every completion is <= 0 and the three estimates of one batch reuse their masks: same noise, same value
    batch = ScoredBatch.from_lists([PROMPT] * 4, [COMPLETION, [4, 2], [5], [1, 1, 1]], pad_id=0)
    for estimator in (MeanFieldEstimator(), CoupledEstimator(), ELBOEstimator(samples=3)):
        masks = estimator.draw(batch, torch.Generator().manual_seed(1))
        assert all(not (m & ~(batch.completion | batch.prompt)).any() for m in masks)  # padding is never masked
        with torch.no_grad():
            a = estimator.estimate(model, batch, masks, MASK)
            b = estimator.estimate(model, batch, masks, MASK)
        assert torch.equal(a, b) and (a <= 0).all()
        with torch.no_grad():  # the per-position terms sum to the estimate and vanish outside the completion
            terms = estimator.token_terms(model, batch, masks, MASK)
        torch.testing.assert_close(terms.sum(dim=1), a)
        assert (terms[~batch.completion] == 0).all()
    coupled = CoupledEstimator().draw(batch, torch.Generator().manual_seed(2))
    assert torch.equal(coupled[0] ^ coupled[1], batch.completion)  # each completion token masked exactly once
