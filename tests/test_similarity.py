"""BLEU against hand-computed values; BERTScore against a looped greedy matching."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from pipeline.similarity import BertScorer, greedy_f1, sentence_bleu4


# ---- BLEU ----


def test_bleu_identical_is_one_and_case_insensitive():
    assert sentence_bleu4("The cat sat on the mat", "the CAT sat on THE mat") == pytest.approx(1.0)


def test_bleu_brevity_penalty_by_hand():
    # every n-gram matches; c = 6 < r = 7 -> BP = exp(1 - 7/6)
    assert sentence_bleu4("the cat sat on the mat today", "the cat sat on the mat") == pytest.approx(
        math.exp(1 - 7 / 6), rel=1e-12
    )


def test_bleu_partial_match_by_hand():
    # ref a b c d e f g, hyp a b c d x f g: p1 = 6/7, p2 = 4/6, p3 = 2/5, p4 = 1/4; c = r -> BP = 1
    assert sentence_bleu4("a b c d e f g", "a b c d x f g") == pytest.approx((2 / 35) ** 0.25, rel=1e-12)


def test_bleu_clips_repeated_ngrams_by_hand():
    # ref a a b c d, hyp a a a b c d: p1 = 5/6 (a clipped to 2), p2 = 4/5, p3 = 3/4, p4 = 2/3; c > r -> BP = 1
    assert sentence_bleu4("a a b c d", "a a a b c d") == pytest.approx((1 / 3) ** 0.25, rel=1e-12)


def test_bleu_no_4gram_match_is_nltk_method0_tiny_value():
    """nltk's no-smoothing default replaces a zero precision by sys.float_info.min: ~0, not exactly 0."""
    assert sentence_bleu4("a b c", "a b c") == pytest.approx(sys.float_info.min**0.25, rel=1e-9)
    score = sentence_bleu4("a b c d", "d c b a")  # unigrams only
    assert score == pytest.approx(math.exp(0.75 * math.log(sys.float_info.min)), rel=1e-9)
    assert 0.0 < score < 1e-200


def test_bleu_zero_without_unigram_overlap_or_hypothesis():
    assert sentence_bleu4("the cat sat", "dogs bark loudly") == 0.0
    assert sentence_bleu4("the cat sat", "") == 0.0
    assert sentence_bleu4("", "the cat") == 0.0


# ---- BERTScore ----


@pytest.fixture(scope="module")
def scorer() -> BertScorer:
    return BertScorer()


REFS = [
    "The company reported record profits in the third quarter, beating analyst expectations.",
    "The quick brown fox jumps over the lazy dog.",
    "He was born in 1952 in a small town in Ohio and later moved to Chicago.",
    "Rain",
]
PARAPHRASES = [
    "Profits at the firm hit a record high in Q3, above what analysts expected.",
    "A fast brown fox leaps over a lazy dog.",
    "Born in a small Ohio town in 1952, he later relocated to Chicago.",
    "Rainfall",
]
UNRELATED = [
    "I like to eat bananas on sunny days with my grandmother.",
    "Quantum chromodynamics describes the strong interaction between quarks.",
    "Press the red button twice to reset the router.",
    "Violin",
]


def looped_f1(cand: torch.Tensor, cand_mask: torch.Tensor, ref: torch.Tensor, ref_mask: torch.Tensor) -> list[float]:
    """Greedy matching written out: best cosine per token, averaged, then the harmonic mean."""
    scores = []
    for b in range(cand.shape[0]):
        c = [cand[b, i] for i in range(cand.shape[1]) if cand_mask[b, i]]
        r = [ref[b, j] for j in range(ref.shape[1]) if ref_mask[b, j]]
        if not c or not r:
            scores.append(0.0)
            continue
        cos = [[float(torch.dot(x, y) / (x.norm() * y.norm())) for y in r] for x in c]
        precision = sum(max(row) for row in cos) / len(c)
        recall = sum(max(cos[i][j] for i in range(len(c))) for j in range(len(r))) / len(r)
        scores.append(2 * precision * recall / (precision + recall))
    return scores


def test_greedy_f1_matches_loops_on_random_embeddings():
    g = torch.Generator().manual_seed(0)
    cand = torch.nn.functional.normalize(torch.randn(4, 5, 8, generator=g), dim=-1)
    ref = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=g), dim=-1)
    cand_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    ref_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    expected = looped_f1(cand, cand_mask, ref, ref_mask)
    assert np.allclose(greedy_f1(cand, cand_mask, ref, ref_mask).numpy(), expected, atol=1e-6)


def test_greedy_f1_matches_loops_on_model_embeddings(scorer: BertScorer):
    cand, cand_mask = scorer.embed(PARAPHRASES + UNRELATED)
    ref, ref_mask = scorer.embed(REFS + REFS)
    expected = looped_f1(cand, cand_mask, ref, ref_mask)
    assert np.allclose(greedy_f1(cand, cand_mask, ref, ref_mask).numpy(), expected, atol=1e-6)
    assert np.allclose(scorer.f1(REFS + REFS, PARAPHRASES + UNRELATED), expected, atol=1e-6)


def test_special_tokens_and_pads_are_not_scored(scorer: BertScorer):
    _, mask = scorer.embed(["Rain", "one two three four"])
    assert mask.sum(1).tolist() == [1, 4]


def test_identical_texts_score_one(scorer: BertScorer):
    assert np.allclose(scorer.f1(REFS, REFS), 1.0, atol=1e-5)


def test_paraphrases_beat_unrelated_texts(scorer: BertScorer):
    assert (scorer.f1(REFS, PARAPHRASES) > scorer.f1(REFS, UNRELATED)).all()


def test_batching_and_padding_do_not_change_scores(scorer: BertScorer):
    candidates = PARAPHRASES[:2] + UNRELATED[2:]  # lengths differ, so batches carry pads
    together = scorer.f1(REFS, candidates)
    scorer.batch_size = 1
    try:
        one_by_one = scorer.f1(REFS, candidates)
    finally:
        scorer.batch_size = 32
    assert np.allclose(together, one_by_one, atol=1e-5)


def test_empty_candidate_scores_zero(scorer: BertScorer):
    assert scorer.f1(["some reference text", "another"], ["", "another"]).tolist() == pytest.approx([0.0, 1.0])
    assert scorer.f1([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 references but 1 candidates"):
        scorer.f1(["a", "b"], ["a"])
