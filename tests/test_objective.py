"""Diffusion objective: hand computations, the exact ELBO of a 3-token toy, masking, splits, SFT and AR losses."""
import itertools
import math

import pytest
import torch
from torch import nn

from illada.config import preset
from illada.diffusion.noise import forward_mask
from illada.diffusion.objective import (
    AutoregressiveObjective,
    DiffusionObjective,
    SFTPairsObjective,
    ar_loss,
    diffusion_loss,
    elbo_nll,
    pretrain_loss,
    random_block,
    random_clean_prefix,
    random_split_segments,
    random_truncate,
    sft_pairs_loss,
)
from illada.errors import IlladaError
from illada.model import build_model


def log_softmax(values) -> list[float]:
    values = [float(v) for v in values]
    top = max(values)
    lse = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - lse for v in values]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class FixedLogits(nn.Module):
    """A stub model returning given logits whatever the input, recording what it was fed."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.inputs, self.segments = [], []

    def forward(self, input_ids, attention_mask=None, segment_ids=None, **kw):
        self.inputs.append(input_ids.clone())
        self.segments.append(segment_ids)
        b, length = input_ids.shape
        return self.logits[:b, :length]


# ------------------------------------------------------------------------------------------- hand computations
def test_diffusion_loss_matches_hand_computation():
    logits = torch.randn(2, 4, 5, generator=gen(0))
    targets = torch.tensor([[0, 3, 1, 4], [2, 2, 0, 1]])
    masked = torch.tensor([[True, False, True, True], [False, True, False, False]])
    p = torch.tensor([0.5, 0.25])
    total, per_row = 0.0, [0.0, 0.0]
    for b in range(2):
        for i in range(4):
            if masked[b, i]:
                term = -log_softmax(logits[b, i])[targets[b, i]] / float(p[b])
                total += term
                per_row[b] += term
    got = diffusion_loss(logits, targets, masked, p, normaliser=8)
    assert got.item() == pytest.approx(total / 8, rel=1e-6)
    got_rows = diffusion_loss(logits, targets, masked, p, normaliser=torch.tensor([3.0, 5.0]))
    assert got_rows.item() == pytest.approx(per_row[0] / 3 + per_row[1] / 5, rel=1e-6)


def test_pretrain_loss_matches_hand_computation():
    b, length, vocab, mask_id, eps = 3, 6, 5, 4, 0.1
    model = FixedLogits(torch.randn(b, length, vocab, generator=gen(1)))
    ids = torch.randint(0, 4, (b, length), generator=gen(2))  # never the mask id
    t = torch.tensor([0.3, 0.7, 1.0])
    loss, stats = pretrain_loss(model, ids, mask_id, eps=eps, generator=gen(3), t=t)
    noisy = model.inputs[-1]
    expected = 0.0
    for r in range(b):
        p = (1 - eps) * float(t[r]) + eps
        for i in range(length):
            if noisy[r, i] == mask_id:
                expected -= log_softmax(model.logits[r, i].detach())[ids[r, i]] / p
            else:
                assert noisy[r, i] == ids[r, i]
    assert (noisy[2] == mask_id).all()  # t = 1: p = 1, every token masked
    assert loss.item() == pytest.approx(expected / (b * length), rel=1e-6)
    assert stats["masked_tokens"].item() == int((noisy == mask_id).sum())
    assert stats["t_mean"].item() == pytest.approx(float(t.mean()), rel=1e-6)


def test_only_masked_positions_contribute():
    b, length, vocab, mask_id = 2, 8, 6, 5
    model = FixedLogits(torch.randn(b, length, vocab, generator=gen(4)))
    ids = torch.randint(0, 5, (b, length), generator=gen(5))
    t = torch.tensor([0.5, 0.5])
    loss, _ = pretrain_loss(model, ids, mask_id, generator=gen(6), t=t)
    loss.backward()
    masked = model.inputs[-1] == mask_id
    assert masked.any() and (~masked).any()
    grad_norm = model.logits.grad.norm(dim=-1)
    assert (grad_norm[~masked] == 0).all() and (grad_norm[masked] > 0).all()
    with torch.no_grad():
        model.logits[~masked] += 10 * torch.randn(int((~masked).sum()), vocab, generator=gen(7))
    again, _ = pretrain_loss(model, ids, mask_id, generator=gen(6), t=t)
    assert torch.equal(model.inputs[-1], model.inputs[0])
    assert again.item() == loss.item()


# ------------------------------------------------------------------------------------- 3-token toy, exact ELBO
L_TOY, MASK_TOY = 3, 2          # tokens {0, 1}, mask id 2, vocabulary 3
SEQUENCES = list(itertools.product((0, 1), repeat=L_TOY))


class TableDenoiser(nn.Module):
    """Logits (B, 3, 3) looked up from the whole noisy tuple: a general denoiser of the toy."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table  # (27, L, V)

    def forward(self, input_ids, attention_mask=None, segment_ids=None, **kw):
        code = input_ids[:, 0] * 9 + input_ids[:, 1] * 3 + input_ids[:, 2]
        return self.table[code]


def random_denoiser(seed: int) -> TableDenoiser:
    return TableDenoiser(torch.randn(27, L_TOY, 3, generator=gen(seed), dtype=torch.float64).float())


def posterior_denoiser(p_data: dict) -> TableDenoiser:
    """The true posterior p(x0_i | visible tokens) of a distribution over {0,1}^3, as logits."""
    table = torch.full((27, L_TOY, 3), -30.0)
    for noisy in itertools.product((0, 1, 2), repeat=L_TOY):
        code = noisy[0] * 9 + noisy[1] * 3 + noisy[2]
        consistent = [x for x in SEQUENCES if all(n == MASK_TOY or n == xi for n, xi in zip(noisy, x))]
        norm = sum(p_data[x] for x in consistent)
        for i in range(L_TOY):
            for v in (0, 1):
                mass = sum(p_data[x] for x in consistent if x[i] == v)
                if mass > 0:  # a visible position puts all its mass on the visible token
                    table[code, i, v] = math.log(mass / norm)
    return TableDenoiser(table)


def pattern_weight(k: int, length: int, eps: float) -> float:
    """E_t[p^k (1-p)^(L-k) / p] with t ~ U(0,1], p = (1-eps) t + eps:
    1/(1-eps) * integral_eps^1 p^(k-1) (1-p)^(L-k) dp, the binomial expansion integrated term by term."""
    n = length - k
    total = sum(math.comb(n, j) * (-1) ** j * (1 - eps ** (k + j)) / (k + j) for j in range(n + 1))
    return total / (1 - eps)


def exact_elbo(model: TableDenoiser, x0: tuple, eps: float) -> float:
    """Expected pre-training loss of one clean row (nats/token), enumerating all masking patterns."""
    total = 0.0
    for pattern in itertools.product((False, True), repeat=L_TOY):
        k = sum(pattern)
        if k == 0:
            continue
        noisy = [MASK_TOY if m else x for m, x in zip(pattern, x0)]
        logits = model(torch.tensor([noisy]))[0]
        nll = sum(-log_softmax(logits[i])[x0[i]] for i in range(L_TOY) if pattern[i])
        total += pattern_weight(k, L_TOY, eps) * nll
    return total / L_TOY


def test_pattern_weight_at_eps_zero_is_the_beta_function():
    for k in range(1, 6):
        beta = math.factorial(k - 1) * math.factorial(5 - k) / math.factorial(5)
        assert pattern_weight(k, 5, 0.0) == pytest.approx(beta)
    # eps > 0: compare against a midpoint-rule integral in t
    n = 20000
    for k in (1, 2, 3):
        numeric = sum(((1 - 0.2) * (j + 0.5) / n + 0.2) ** (k - 1) * (1 - ((1 - 0.2) * (j + 0.5) / n + 0.2)) ** (3 - k)
                      for j in range(n)) / n
        assert pattern_weight(k, 3, 0.2) == pytest.approx(numeric, rel=1e-6)


@pytest.mark.parametrize("eps", [1e-3, 0.2])
def test_expected_loss_equals_exact_elbo(eps):
    model = random_denoiser(10)
    generator = gen(11)
    for x0 in SEQUENCES:
        ids = torch.tensor([x0] * 4000)
        means = torch.tensor([pretrain_loss(model, ids, MASK_TOY, eps=eps, generator=generator)[0].item()
                              for _ in range(15)], dtype=torch.float64)
        stderr = means.std().item() / math.sqrt(len(means))
        exact = exact_elbo(model, x0, eps)
        assert abs(means.mean().item() - exact) < 4.5 * stderr + 1e-6, (x0, means.mean().item(), exact, stderr)


def test_elbo_is_tight_for_the_true_posterior_and_bounds_the_entropy():
    weights = torch.rand(len(SEQUENCES), generator=gen(12)).double() + 0.1
    p_data = {x: float(w / weights.sum()) for x, w in zip(SEQUENCES, weights)}
    entropy = -sum(p * math.log(p) for p in p_data.values())
    optimal = posterior_denoiser(p_data)
    for x0 in SEQUENCES:  # eps = 0: the bound is an equality for the exact posterior (any-order factorisation)
        assert L_TOY * exact_elbo(optimal, x0, 0.0) == pytest.approx(-math.log(p_data[x0]), rel=1e-4)
    for seed in (13, 14):  # any other denoiser: the data-averaged ELBO is above the true NLL (the entropy)
        model = random_denoiser(seed)
        assert L_TOY * sum(p_data[x] * exact_elbo(model, x, 0.0) for x in SEQUENCES) > entropy
        # and the code's Monte Carlo estimate agrees with that bound at eps = 1e-3
        mc = sum(p_data[x] * elbo_nll(model, torch.tensor([x] * 2000), MASK_TOY, num_samples=8,
                                      generator=gen(seed)).item() for x in SEQUENCES)
        assert L_TOY * mc > entropy


def test_elbo_nll_estimates_the_exact_elbo():
    model = random_denoiser(15)
    x0 = (1, 0, 1)
    ids = torch.tensor([x0] * 2000)
    values = torch.tensor([elbo_nll(model, ids, MASK_TOY, num_samples=8, generator=gen(100 + s)).item()
                           for s in range(8)], dtype=torch.float64)
    stderr = values.std().item() / math.sqrt(len(values))
    assert abs(values.mean().item() - exact_elbo(model, x0, 1e-3)) < 4.5 * stderr + 1e-6
    with pytest.raises(IlladaError):
        elbo_nll(model, ids, MASK_TOY, num_samples=0)


# ------------------------------------------------------------------------------------------------ forward mask
def test_forward_mask_rate_and_p():
    ids = torch.randint(0, 50, (3, 40000), generator=gen(20))
    t = torch.tensor([0.2, 0.5, 0.9])
    noisy, masked, p = forward_mask(ids, 99, eps=0.1, t=t, generator=gen(21))
    assert torch.allclose(p, 0.9 * t + 0.1)
    for r in range(3):
        rate, pr = masked[r].float().mean().item(), float(p[r])
        assert abs(rate - pr) < 5 * math.sqrt(pr * (1 - pr) / 40000)
    assert torch.equal(noisy[masked], torch.full((int(masked.sum()),), 99))
    assert torch.equal(noisy[~masked], ids[~masked])
    again = forward_mask(ids, 99, eps=0.1, t=t, generator=gen(21))
    assert torch.equal(again[0], noisy)


def test_forward_mask_eps_floor_and_t_distribution():
    ids = torch.zeros(1, 100000, dtype=torch.long)
    _, masked, p = forward_mask(ids, 7, eps=0.01, t=torch.tensor([0.0]), generator=gen(22))
    assert p.item() == pytest.approx(0.01)
    assert abs(masked.float().mean().item() - 0.01) < 5 * math.sqrt(0.01 * 0.99 / 100000)
    _, _, p = forward_mask(torch.zeros(50000, 1, dtype=torch.long), 7, eps=0.01, generator=gen(23))
    assert p.min().item() >= 0.01 and p.max().item() <= 1.0
    t = (p - 0.01) / 0.99
    assert abs(t.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / 50000)


def test_forward_mask_respects_maskable():
    ids = torch.randint(0, 10, (4, 64), generator=gen(24))
    maskable = torch.rand(4, 64, generator=gen(25)) < 0.5
    noisy, masked, _ = forward_mask(ids, 11, t=torch.ones(4), generator=gen(26), maskable=maskable)
    assert torch.equal(masked, maskable)  # t = 1 masks every maskable token and nothing else
    assert torch.equal(noisy[~maskable], ids[~maskable])


# ------------------------------------------------------------------------------------------ split / truncation
def test_random_split_fraction_and_boundaries():
    b, length = 20000, 16
    seg = random_split_segments(torch.zeros(b, length, dtype=torch.long), 0.3, generator=gen(30))
    assert seg.shape == (b, length) and seg.dtype == torch.long
    split = seg.any(dim=1)
    assert abs(split.float().mean().item() - 0.3) < 5 * math.sqrt(0.21 / b)
    assert set(seg.unique().tolist()) <= {0, 1}
    assert (seg[:, 0] == 0).all() and (seg[:, 1:] >= seg[:, :-1]).all()  # 0...0 1...1
    points = (seg[split] == 0).sum(dim=1)
    assert set(points.tolist()) == set(range(1, length))  # every cut point U{1..L-1} occurs, no empty segment
    assert (random_split_segments(torch.zeros(5, 1, dtype=torch.long), 1.0, generator=gen(31)) == 0).all()
    assert (random_split_segments(torch.zeros(5, 9, dtype=torch.long), 0.0, generator=gen(31)) == 0).all()


def test_split_row_equals_its_halves_run_separately():
    model = build_model(preset("tiny"), seed=0).eval()
    ids = torch.randint(4, 128, (1, 12), generator=gen(32))
    seg = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        joint = model(ids, segment_ids=seg)
        halves = torch.cat([model(ids[:, :5]), model(ids[:, 5:])], dim=1)
        assert torch.allclose(joint, halves, atol=1e-5)
        # t = 1 masks everything: the split row's loss is the token-weighted mean of the halves' losses
        ones = torch.ones(1)
        full, _ = pretrain_loss(model, ids, 3, t=ones, segment_ids=seg)
        first, _ = pretrain_loss(model, ids[:, :5], 3, t=ones)
        second, _ = pretrain_loss(model, ids[:, 5:], 3, t=ones)
    assert full.item() == pytest.approx((5 * first.item() + 7 * second.item()) / 12, rel=1e-5)


def test_random_truncate():
    ids = torch.arange(20).view(2, 10)
    assert random_truncate(ids, 0.0, generator=gen(33)) is ids
    lengths = set()
    generator = gen(34)
    for _ in range(300):
        cut = random_truncate(ids, 1.0, generator=generator)
        assert torch.equal(cut, ids[:, : cut.shape[1]])
        lengths.add(cut.shape[1])
    assert lengths == set(range(1, 11))
    generator = gen(35)
    shorter = sum(random_truncate(ids, 0.3, generator=generator).shape[1] < 10 for _ in range(4000))
    expected = 0.3 * 0.9  # cut, to a length below 10
    assert abs(shorter / 4000 - expected) < 5 * math.sqrt(expected * (1 - expected) / 4000)


# --------------------------------------------------------------------------------------------------- SFT pairs
def test_sft_pairs_never_masks_the_prompt_and_matches_hand_computation():
    b, length, vocab, mask_id, eos, eps = 2, 7, 6, 5, 4, 1e-3
    model = FixedLogits(torch.randn(b, length, vocab, generator=gen(40)))
    ids = torch.tensor([[1, 2, 3, 0, 1, eos, eos],     # prompt 3, response 2 + EOS padding
                        [2, 2, 1, 1, 3, 0, eos]])      # prompt 2
    prompt_lengths = torch.tensor([3, 2])
    generator = gen(41)
    for _ in range(50):
        sft_pairs_loss(model, ids, prompt_lengths, mask_id, generator=generator)
        noisy = model.inputs[-1]
        assert (noisy[0, :3] == ids[0, :3]).all() and (noisy[1, :2] == ids[1, :2]).all()
    seen = torch.stack(model.inputs) == mask_id
    assert seen[:, 0, 3:].any(dim=0).all() and seen[:, 1, 2:].any(dim=0).all()  # every response token gets masked

    t = torch.tensor([1.0, 0.6])
    loss, _ = sft_pairs_loss(model, ids, prompt_lengths, mask_id, eps=eps, generator=gen(42), t=t)
    noisy = model.inputs[-1]
    assert (noisy[0, 3:] == mask_id).all()  # p = 1: the whole answer, EOS padding included
    expected = 0.0
    for r in range(b):
        p = (1 - eps) * float(t[r]) + eps
        answer = length - int(prompt_lengths[r])
        row = sum(-log_softmax(model.logits[r, i].detach())[ids[r, i]] / p
                  for i in range(length) if noisy[r, i] == mask_id)
        expected += row / answer
    assert loss.item() == pytest.approx(expected / b, rel=1e-6)


def test_clean_prefix_keeps_leading_response_tokens_and_normalises_by_what_remains():
    b, length, vocab, mask_id, eos, eps = 2, 8, 6, 5, 4, 1e-3
    model = FixedLogits(torch.randn(b, length, vocab, generator=gen(43)))
    ids = torch.tensor([[1, 2, 3, 0, 1, 2, eos, eos],   # prompt 3
                        [2, 2, 1, 1, 3, 0, 1, eos]])    # prompt 2
    prompt_lengths, prefix = torch.tensor([3, 2]), torch.tensor([2, 0])
    t = torch.tensor([1.0, 1.0])  # p = 1: every maskable token masked, so the mask is known exactly
    loss, stats = sft_pairs_loss(model, ids, prompt_lengths, mask_id, eps=eps, t=t, clean_prefix=prefix,
                                 generator=gen(44))
    noisy = model.inputs[-1]
    assert noisy[0].tolist() == [1, 2, 3, 0, 1] + [mask_id] * 3   # prompt + 2 clean response tokens
    assert noisy[1].tolist() == [2, 2] + [mask_id] * 6
    expected = 0.0
    for r, start in ((0, 5), (1, 2)):
        row = sum(-log_softmax(model.logits[r, i].detach())[ids[r, i]] for i in range(start, length))
        expected += row / (length - start)
    assert loss.item() == pytest.approx(expected / b, rel=1e-6)
    assert int(stats["answer_tokens"]) == 3 + 6


def test_random_clean_prefix_is_uniform_within_the_response_and_respects_prob():
    prompt_lengths = torch.tensor([2, 6] * 2000)
    prefix = random_clean_prefix(prompt_lengths, 10, 1.0, generator=gen(45))
    for prompt, answer in ((2, 8), (6, 4)):
        values = prefix[prompt_lengths == prompt]
        assert values.min() == 0 and values.max() == answer - 1   # never the whole response
        counts = torch.bincount(values, minlength=answer).float()
        expected = len(values) / answer
        assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()
    assert (random_clean_prefix(prompt_lengths, 10, 0.0, generator=gen(46)) == 0).all()
    chosen = (random_clean_prefix(prompt_lengths, 10, 0.3, generator=gen(47)) > 0).float().mean().item()
    # a chosen row draws 0 with probability 1/answer, so the visible rate is 0.3 * (1 - mean 1/answer)
    assert abs(chosen - 0.3 * (1 - (1 / 8 + 1 / 4) / 2)) < 0.03


def test_clean_prefix_block_noises_only_the_block_and_masks_the_future_without_loss():
    b, length, vocab, mask_id, eos, eps = 2, 9, 6, 5, 4, 1e-3
    model = FixedLogits(torch.randn(b, length, vocab, generator=gen(60)))
    ids = torch.tensor([[1, 2, 3, 0, 1, 2, 3, eos, eos],   # prompt 3, clean prefix 1, block 3 -> positions 4..6
                        [2, 2, 1, 1, 3, 0, 1, 2, eos]])    # prompt 2, clean prefix 0, block 9: no future
    prompt_lengths, prefix, block = torch.tensor([3, 2]), torch.tensor([1, 0]), torch.tensor([3, 9])
    t = torch.tensor([1.0, 0.5])
    loss, stats = sft_pairs_loss(model, ids, prompt_lengths, mask_id, eps=eps, t=t, clean_prefix=prefix,
                                 block=block, generator=gen(61))
    noisy = model.inputs[-1]
    assert noisy[0].tolist() == [1, 2, 3, 0] + [mask_id] * 5   # the block (p = 1) and the future (outright)
    assert (noisy[1, :2] == ids[1, :2]).all()
    p1 = (1 - eps) * 0.5 + eps
    row0 = sum(-log_softmax(model.logits[0, i].detach())[ids[0, i]] for i in range(4, 7)) / 3  # the block only
    row1 = sum(-log_softmax(model.logits[1, i].detach())[ids[1, i]] / p1
               for i in range(2, length) if noisy[1, i] == mask_id) / (length - 2)
    assert loss.item() == pytest.approx((row0 + row1) / b, rel=1e-6)
    assert int(stats["answer_tokens"]) == 3 + 7


def test_random_block_is_uniform_on_one_to_max():
    sizes = random_block(6000, 4, generator=gen(62))
    counts = torch.bincount(sizes, minlength=5)
    assert counts[0] == 0 and sizes.max() == 4
    assert ((counts[1:].float() - 1500).abs() < 5 * math.sqrt(1500)).all()


def test_sft_pairs_objective_blocks_only_the_chosen_rows():
    rows, length, prompt = 2000, 12, 2
    model = FixedLogits(torch.randn(rows, length, 6, generator=gen(63)))
    batch = {"input_ids": torch.randint(0, 4, (rows, length), generator=gen(64)),
             "prompt_lengths": torch.full((rows,), prompt)}

    def blocked_share(**kwargs) -> float:
        """Rows that look blocked: at most one visible token after the first mask (a block of <= 2 tokens, then
        the future masked outright)."""
        SFTPairsObjective(mask_id=5, **kwargs)(model, batch, gen(65))
        masked = model.inputs[-1][:, prompt:] == 5
        first = torch.where(masked.any(dim=1), masked.float().argmax(dim=1), torch.full((rows,), length))
        after = torch.arange(length - prompt)[None, :] > first[:, None]
        return (((~masked) & after).sum(dim=1) <= 1).float().mean().item()

    assert blocked_share(clean_prefix_prob=1.0, clean_prefix_block=2) == 1.0
    plain = blocked_share()   # unchosen rows: the whole response noised at rate t
    half = blocked_share(clean_prefix_prob=0.5, clean_prefix_block=2)
    assert plain < 0.6 and half == pytest.approx(0.5 + 0.5 * plain, abs=0.04)
    with pytest.raises(IlladaError, match="clean_prefix_block"):
        SFTPairsObjective(mask_id=5, clean_prefix_block=4)


def test_sft_pairs_objective_with_clean_prefix_reports_it_and_validates():
    model = FixedLogits(torch.randn(4, 8, 6, generator=gen(48)))
    batch = {"input_ids": torch.randint(0, 4, (4, 8), generator=gen(49)), "prompt_lengths": torch.tensor([2, 3, 2, 4])}
    _, stats = SFTPairsObjective(mask_id=5, clean_prefix_prob=1.0)(model, batch, gen(50))
    assert "clean_prefix_tokens" in stats
    with pytest.raises(IlladaError, match="clean_prefix_prob"):
        SFTPairsObjective(mask_id=5, clean_prefix_prob=1.5)


# ------------------------------------------------------------------------------------------------------ AR loss
def test_ar_loss_matches_naive_cross_entropy():
    model = build_model(preset("tiny", causal=True), seed=1).eval()
    ids = torch.randint(0, 128, (2, 9), generator=gen(50))
    seg = torch.tensor([[0] * 9, [0] * 4 + [1] * 5])
    with torch.no_grad():
        for segments in (None, seg):
            logits = model(ids, segment_ids=segments)
            terms = []
            for b in range(2):
                for i in range(8):
                    if segments is not None and segments[b, i] != segments[b, i + 1]:
                        continue  # the first token of a segment is not predicted
                    terms.append(-log_softmax(logits[b, i])[ids[b, i + 1]])
            loss, stats = ar_loss(model, ids, segments)
            assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
            assert stats["predicted_tokens"].item() == len(terms)
        assert len(terms) == 15
        naive = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
        assert ar_loss(model, ids)[0].item() == pytest.approx(naive.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------- objectives
def test_diffusion_objective_split_truncate_and_determinism():
    model = FixedLogits(torch.randn(4, 16, 8, generator=gen(60)))
    batch = {"input_ids": torch.randint(0, 7, (4, 16), generator=gen(61))}
    objective = DiffusionObjective(mask_id=7, split_prob=1.0)
    loss, stats = objective(model, batch, gen(62))
    seg = model.segments[-1]
    assert seg is not None and seg.any(dim=1).all() and stats["split_rows"].item() == 4
    assert objective(model, batch, gen(62))[0].item() == loss.item()
    DiffusionObjective(mask_id=7, split_prob=0.0)(model, batch, gen(62))
    assert model.segments[-1] is None
    generator = gen(63)
    cut = DiffusionObjective(mask_id=7, split_prob=0.0, truncate_prob=1.0)
    lengths = {cut(model, batch, generator)[1]["seq_len"].item() for _ in range(60)}
    assert len(lengths) > 5 and lengths <= set(range(1, 17))


def test_objectives_dispatch_and_validate():
    model = build_model(preset("tiny", causal=True), seed=2)
    batch = {"input_ids": torch.randint(4, 128, (2, 10), generator=gen(70))}
    loss, _ = AutoregressiveObjective()(model, batch, gen(71))
    assert loss.item() == pytest.approx(ar_loss(model, batch["input_ids"])[0].item())
    assert loss.requires_grad
    pairs = SFTPairsObjective(mask_id=3)
    with pytest.raises(IlladaError, match="prompt_lengths"):
        pairs(model, batch, gen(72))
    batch["prompt_lengths"] = torch.tensor([4, 6])
    loss, stats = pairs(model, batch, gen(72))
    assert math.isfinite(loss.item()) and stats["answer_tokens"].item() == 10
    for bad in (lambda: DiffusionObjective(mask_id=3, eps=0.0), lambda: DiffusionObjective(mask_id=3, split_prob=1.5),
                lambda: SFTPairsObjective(mask_id=3, eps=1.0), lambda: AutoregressiveObjective(split_prob=-0.1)):
        with pytest.raises(IlladaError):
            bad()



def test_ar_pairs_loss_is_next_token_ce_on_the_responses_only():
    from illada.diffusion.objective import AutoregressiveObjective

    config = preset("tiny", vocab_size=40, max_seq_len=16, causal=True, mask_token_id=39)
    model = build_model(config, seed=3).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 2, 2], [11, 12, 13, 14, 15, 16, 17]])
    prompt_lengths = torch.tensor([3, 5])
    with torch.no_grad():
        loss, stats = AutoregressiveObjective()(model, {"input_ids": ids, "prompt_lengths": prompt_lengths})
        logits = model(ids).float()
    terms = [-torch.log_softmax(logits[r, j - 1], -1)[ids[r, j]] for r in range(2)
             for j in range(int(prompt_lengths[r]), ids.shape[1])]  # each response token from its left context
    assert int(stats["predicted_tokens"]) == len(terms) == 4 + 2
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
