"""Evaluation metrics as pure functions: language-model scores and the BioASQ factoid measures.

Language-model scores from summed negative log-likelihoods (nats):
- cross-entropy = nats / scored tokens, perplexity = exp(cross-entropy);
- bits per byte = nats / ln 2 / UTF-8 bytes of the scored text. Tokenizers cut text
  differently, so per-token numbers of models with different tokenizers do not compare;
  per byte they do.

BioASQ factoid measures (BioASQ Evaluation-Measures; DESIGN.md section 4): up to 5
ranked candidate answers per question, compared lowercased for exact string equality
with any gold synonym. Like the official evaluator (which lowercases both sides when it
reads them and then compares with `equals`), no whitespace is stripped here.
- strict accuracy: the first candidate matches;
- lenient accuracy: any of the first 5 matches;
- MRR: 1 / rank of the first matching candidate among the first 5, else 0;
each averaged over the factoid questions.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["MAX_CANDIDATES", "normalise_answer", "first_match_rank", "factoid_scores", "lm_scores"]

MAX_CANDIDATES = 5


def normalise_answer(text: str) -> str:
    """What the official evaluator compares: the answer lowercased, nothing else."""
    return text.lower()


def first_match_rank(candidates: Sequence[str], gold: Sequence[str]) -> int | None:
    """1-based rank of the first of the top-5 candidates equal to a gold synonym, else None."""
    wanted = {normalise_answer(g) for g in gold}
    for rank, candidate in enumerate(candidates[:MAX_CANDIDATES], start=1):
        if normalise_answer(candidate) in wanted:
            return rank
    return None


def factoid_scores(candidates: Sequence[Sequence[str]], golds: Sequence[Sequence[str]]) -> dict:
    """strict_accuracy, lenient_accuracy, mrr (fractions in [0, 1]) and the question count."""
    if len(candidates) != len(golds):
        raise ValueError(f"{len(candidates)} candidate lists for {len(golds)} questions")
    if not golds:
        raise ValueError("no factoid questions to score")
    ranks = [first_match_rank(c, g) for c, g in zip(candidates, golds)]
    count = len(ranks)
    return {
        "strict_accuracy": sum(r == 1 for r in ranks) / count,
        "lenient_accuracy": sum(r is not None for r in ranks) / count,
        "mrr": sum(1.0 / r for r in ranks if r is not None) / count,
        "questions": count,
    }


def lm_scores(nats: float, tokens: int, n_bytes: int) -> dict:
    """cross_entropy (nats/token), perplexity and bits_per_byte from a total NLL."""
    if tokens <= 0 or n_bytes <= 0:
        raise ValueError(f"nothing scored ({tokens} tokens, {n_bytes} bytes)")
    cross_entropy = nats / tokens
    return {
        "cross_entropy": cross_entropy,
        "perplexity": math.exp(min(cross_entropy, 700.0)),
        "bits_per_byte": nats / math.log(2) / n_bytes,
        "tokens": int(tokens),
        "bytes": int(n_bytes),
    }
