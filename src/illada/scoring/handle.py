"""Text-level scoring on a loaded model (`illada.load(...)`): what `DiffusionLM.score` / `.loglikelihood` call."""
from __future__ import annotations

from typing import Sequence

from illada.errors import IlladaError
from illada.scoring.confidence import confidence_scores_greedy
from illada.scoring.likelihood import check_one_token, mc_loglikelihood, next_token_logprobs

METHODS = ("confidence", "mc", "exact")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as the tokenizer splits their concatenation.

    Trailing whitespace of the context moves to the continuation (BPE attaches a space to the next word), then
    the concatenation is encoded and cut after the context's tokens, so the continuation gets the tokens it would
    have in running text; if the context's tokens are not a prefix, the two are encoded separately.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode(stripped) if stripped else []
    whole = tokenizer.encode(stripped + continuation)
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return context_ids, whole[len(context_ids):]
    return context_ids, tokenizer.encode(continuation)


def score_pairs(lm, pairs: Sequence[tuple[str, str]], *, method: str = "confidence", mc_num: int = 128,
                batch_size: int = 16, cfg_scale: float = 0.0, seed: int = 0,
                add_bos: bool | None = None, append_eos: bool | None = None) -> tuple[list[float], list[bool]]:
    """(scores, is_greedy) of (context, continuation) text pairs by `method`:

    - "confidence": iLLaDA's ranking score (BOS + context + candidate + EOS; is_greedy from its reveal order);
    - "mc": Monte Carlo lower bound on log p (mc_num samples; is_greedy always False: not computed);
    - "exact": log p of a one-token continuation (is_greedy: the token is the argmax).
    `add_bos` None: a BOS is prepended for "confidence" (reference §6.2) and not for the likelihoods.
    `append_eos` (the likelihoods; "confidence" always appends one): one EOS after the continuation, so with
    `add_bos` the input is BOS + context + [MASK]... + EOS as in the published iLLaDA MMLU/CMMLU eval.
    A context longer than the model's window is cut from the left (its oldest tokens go).
    """
    if method not in METHODS:
        raise IlladaError(f"unknown scoring method {method!r}; choose from {', '.join(METHODS)}")
    with_bos = method == "confidence" if add_bos is None else add_bos
    bos = [lm.special.bos] if with_bos and lm.special.bos is not None else []
    encoded = [encode_pair(lm.tokenizer, ctx, cont) for ctx, cont in pairs]
    # like lm-evaluation-harness: a context too long for the model loses its oldest tokens (the BOS stays)
    eos = lm.special.eos if append_eos and method != "confidence" else None
    if append_eos and method != "confidence" and eos is None:
        raise IlladaError("append_eos: the model has no EOS token")
    extra = 1 if method == "confidence" or eos is not None else 0  # the appended EOS
    limit = lm.config.max_seq_len
    contexts = [bos + c[max(0, len(bos) + len(c) + len(r) + extra - limit):] for c, r in encoded]
    continuations = [r for _, r in encoded]
    for (ctx, cont), ids in zip(pairs, continuations):
        if not ids:
            raise IlladaError(f"continuation {cont!r} encodes to no tokens")
    mask_id = lm.mask_token_id
    if method == "confidence":
        return confidence_scores_greedy(lm.model, list(zip(contexts, continuations)), mask_id=mask_id,
                                        eos_id=lm.special.eos, batch_size=batch_size)
    if method == "exact":
        check_one_token(continuations)
        # one pass per distinct context: the candidates of a question share it, and so does is_greedy
        table = next_token_logprobs(lm.model, contexts, batch_size=batch_size, mask_id=mask_id, eos_id=eos)
        rows = [table[tuple(c)] for c in contexts]
        return ([float(row[r[0]]) for row, r in zip(rows, continuations)],
                [int(row.argmax()) == r[0] for row, r in zip(rows, continuations)])
    values = mc_loglikelihood(lm.model, contexts, continuations, mc_num=mc_num, batch_size=batch_size,
                              cfg_scale=cfg_scale, mask_id=mask_id, seed=seed, eos_id=eos)
    return list(values), [False] * len(values)


def score(lm, context: str, choices: Sequence[str], *, method: str = "confidence", mc_num: int = 128,
          batch_size: int = 16, cfg_scale: float = 0.0, seed: int = 0, add_bos: bool | None = None) -> list[float]:
    """One score per choice for the continuation of `context` (higher is better); see `score_pairs` for methods."""
    if isinstance(choices, str) or not choices:
        raise IlladaError("choices must be a non-empty list of strings")
    scores, _ = score_pairs(lm, [(context, c) for c in choices], method=method, mc_num=mc_num,
                            batch_size=batch_size, cfg_scale=cfg_scale, seed=seed, add_bos=add_bos)
    return scores


def loglikelihood(lm, context: str, continuation: str | Sequence[str], *, mc_num: int = 128, batch_size: int = 16,
                  cfg_scale: float = 0.0, seed: int = 0, add_bos: bool = False) -> float | list[float]:
    """Monte Carlo lower bound on log p(continuation | context) in nats (exact for one-token continuations);
    a list of continuations gives a list."""
    single = isinstance(continuation, str)
    items = [continuation] if single else list(continuation)
    values, _ = score_pairs(lm, [(context, c) for c in items], method="mc", mc_num=mc_num, batch_size=batch_size,
                            cfg_scale=cfg_scale, seed=seed, add_bos=add_bos)
    return values[0] if single else values
