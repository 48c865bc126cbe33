"""Scoring continuations with a masked diffusion LM (reference §6): the Monte Carlo likelihood bound, exact
one-token likelihoods, iLLaDA's confidence score, and the corpus-level ELBO / perplexity bound.

Token-level functions take the bare model; `score` / `loglikelihood` take a loaded handle and text.
"""
from illada.scoring.confidence import confidence_score, confidence_scores_greedy
from illada.scoring.handle import METHODS, encode_pair, loglikelihood, score, score_pairs
from illada.scoring.likelihood import (CorpusElbo, corpus_elbo, mc_loglikelihood, next_token_logprobs,
                                       token_loglikelihood)

__all__ = [
    "METHODS", "CorpusElbo", "confidence_score", "confidence_scores_greedy", "corpus_elbo", "encode_pair",
    "loglikelihood", "mc_loglikelihood", "next_token_logprobs", "score", "score_pairs", "token_loglikelihood",
]
