"""BioASQ factoid measures and LM scores against hand-computed values."""
import json
import math
from pathlib import Path

import pytest

from biomamba_jax.evaluation.metrics import factoid_scores, first_match_rank, lm_scores

CASES = json.loads((Path(__file__).parent / "fixtures" / "bioasq" / "metrics_cases.json").read_text())


def test_factoid_scores_match_hand_computed_values():
    cases = CASES["cases"]
    assert [first_match_rank(c["candidates"], c["gold"]) for c in cases] == [c["rank"] for c in cases]
    scores = factoid_scores([c["candidates"] for c in cases], [c["gold"] for c in cases])
    for key, value in CASES["expected"].items():
        assert scores[key] == pytest.approx(value), key


def test_factoid_scores_reject_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="candidate lists"):
        factoid_scores([["a"]], [])
    with pytest.raises(ValueError, match="no factoid questions"):
        factoid_scores([], [])


def test_lm_scores_cross_entropy_perplexity_bits_per_byte():
    scores = lm_scores(nats=12.0, tokens=6, n_bytes=10)
    assert scores["cross_entropy"] == pytest.approx(2.0)
    assert scores["perplexity"] == pytest.approx(math.exp(2.0))
    assert scores["bits_per_byte"] == pytest.approx(12.0 / math.log(2) / 10)
