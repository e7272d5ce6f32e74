"""pipeline.metrics against slow, obviously-right references written here.

Models are tiny and random; `initializer_range` is raised so that logits are spread out and
argmax decisions are not float-rounding ties between batched and one-at-a-time computation.
The "true" sequences are the models' own greedy outputs, partly perturbed, so MA and EL land
between 0 and 1 instead of at 0.
"""

from __future__ import annotations

import math
import string
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPTNeoConfig, GPTNeoForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline import metrics

VOCAB = 97
EOS = 2


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


def _gpt_neo() -> GPTNeoForCausalLM:
    torch.manual_seed(1)
    config = GPTNeoConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=EOS,
    )
    return GPTNeoForCausalLM(config).eval()


MODELS = {"llama": _llama(), "gpt_neo": _gpt_neo()}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return MODELS[request.param]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are overhead-bound: one thread is faster and kinder to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- slow references ----------------------------------------------------------------------


@torch.no_grad()
def next_logits(model, seq: list[int]) -> torch.Tensor:
    return model(torch.tensor([seq])).logits[0, -1]


def naive_greedy(model, prompt: list[int], length: int) -> list[int]:
    """No cache, no padding, no generate(): append the argmax `length` times."""
    seq = list(prompt)
    for _ in range(length):
        seq.append(int(next_logits(model, seq).argmax()))
    return seq[len(prompt) :]


def naive_beam(model, prompt: list[int], length: int, beams: int = 2) -> list[int]:
    """Textbook beam search over summed log-probs, no EOS, highest-scoring beam returned."""
    live = [(0.0, list(prompt))]
    for _ in range(length):
        grown = []
        for score, seq in live:
            top = F.log_softmax(next_logits(model, seq).float(), -1).topk(beams)
            grown += [(score + float(v), seq + [int(i)]) for v, i in zip(top.values, top.indices)]
        live = sorted(grown, key=lambda b: -b[0])[:beams]
    return live[0][1][len(prompt) :]


def naive_token_nll(model, seq: list[int]) -> list[float]:
    """-log p(x_t | x_<t) for t = 1..len-1, one forward per token."""
    return [float(-F.log_softmax(next_logits(model, seq[:t]), -1)[seq[t]]) for t in range(1, len(seq))]


def naive_el(model, seq: list[int], n: int, prompt_range: str) -> float:
    T = len(seq)
    start = 1 if prompt_range == "ku" else math.floor(0.75 * T + 0.5)
    scores = []
    for t in range(start, T):
        truth = seq[t:]
        if len(truth) < n:
            continue
        gen = naive_greedy(model, seq[:t], T - t)
        true_grams = [tuple(truth[j : j + n]) for j in range(len(truth) - n + 1)]
        gen_grams = [tuple(gen[j : j + n]) for j in range(len(gen) - n + 1)]
        scores.append(len([g for g in gen_grams if g in set(true_grams)]) / len(true_grams))
    return sum(scores) / len(scores) if scores else 0.0


def right_pad(rows: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch whose pad slots hold random tokens: only the mask may hide them."""
    width = max(map(len, rows))
    ids = torch.randint(0, VOCAB, (len(rows), width), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def memorized_rows(model, lengths: list[int], seed: int) -> list[list[int]]:
    """Self-generated sequences (fully 'memorized'), then more and more of each row randomised.

    Built with the code under test for speed; the tests compare against the references anyway.
    """
    gen = torch.Generator().manual_seed(seed)
    seeds = [torch.randint(0, VOCAB, (2,), generator=gen).tolist() for _ in lengths]
    tails = metrics.greedy_continuations(model, seeds, [T - 2 for T in lengths])
    rows = [s + t for s, t in zip(seeds, tails)]
    for i, (T, row) in enumerate(zip(lengths, rows)):
        for pos in torch.randperm(T, generator=gen)[: (i * T) // (2 * len(lengths))].tolist():
            row[pos] = int(torch.randint(0, VOCAB, (1,), generator=gen))
    return rows


# --- memorization accuracy and extraction likelihood ----------------------------------------


def test_memorization_accuracy_matches_per_position_argmax(model):
    full = memorized_rows(model, [40] * 5, seed=3)
    rows = [f[:T] for f, T in zip(full, [24, 40, 31, 2, 36])]
    # pad slots keep the rest of each memorized row: predictable tokens the mask must hide
    ids = torch.tensor(full)
    mask = torch.tensor([[int(t < len(r)) for t in range(40)] for r in rows])
    got = metrics.memorization_accuracy(model, ids, mask)
    want = [sum(int(next_logits(model, r[:t]).argmax()) == r[t] for t in range(1, len(r))) / (len(r) - 1) for r in rows]
    assert got.tolist() == want
    assert len(set(want)) >= 4 and max(want) > 0.9


@pytest.mark.parametrize("prompt_range,n,lengths", [("icu", 3, [24, 40, 33, 28, 37, 9]), ("ku", 3, [12, 17, 9, 14])])
def test_extraction_likelihood_matches_naive_definition(model, prompt_range, n, lengths):
    rows = memorized_rows(model, lengths, seed=5)
    ids, mask = right_pad(rows, seed=1)
    got = metrics.extraction_likelihood(model, ids, mask, n=n, prompt_range=prompt_range, batch_size=16)
    want = [naive_el(model, r, n, prompt_range) for r in rows]
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert len(set(want)) >= 3 and max(want) > 0.5 and min(want) < max(want)


def test_prefix_continuations_equal_one_prompt_at_a_time_generation(model):
    """Every prompt row[:t] (chained, decoded, or leaving the batch early; rows of different
    lengths decoded together) gets exactly the tokens naive greedy decoding of it alone gives."""
    rows = memorized_rows(model, [30, 26, 18], seed=11)
    starts = [list(range(1, len(row) - 1)) for row in rows[:2]] + [[]]
    got, calls = metrics.prefix_continuations(model, rows, starts, batch_size=7)
    for row, ts, gens in zip(rows, starts, got):
        assert gens == [naive_greedy(model, row[:t], len(row) - t) for t in ts]
    assert 1 < calls < sum(len(row) - t for row, ts in zip(rows, starts) for t in ts)  # work was saved


def test_memorization_reads_ma_el_and_membership_off_one_pass_per_batch(model):
    """`iur.memorization` with texts: each row's naive MA, EL and membership scores, and one
    full-length forward pass per batch of rows (the rest are one-token decoding steps)."""
    from pipeline import iur

    rows = memorized_rows(model, [24, 40, 33, 9, 30], seed=7)
    texts = ["".join(string.ascii_letters[t % 52] for t in r) for r in rows]
    widths = []
    forward = model.forward
    model.forward = lambda *a, **k: widths.append(k["input_ids"].shape[1]) or forward(*a, **k)
    try:
        got = iur.memorization(model, rows, el_n=3, el_range="icu", batch_size=3, pad_id=0, prefix=5, texts=texts)
    finally:
        del model.forward
    assert sum(w > 1 for w in widths) == 2  # batches of 3 and 2 rows
    for rec, row, text in zip(got, rows, texts):
        assert rec["ma"] == sum(int(next_logits(model, row[:t]).argmax()) == row[t] for t in range(1, len(row))) / (
            len(row) - 1
        )
        assert rec["el"] == pytest.approx(naive_el(model, row, 3, "icu"), abs=1e-12)
        # the span: the longest run greedy decoding reproduces first, from the row's text up to any t >= 5
        leading = [
            next(
                (i for i, (g, x) in enumerate(zip(naive_greedy(model, row[:t], len(row) - t), row[t:])) if g != x),
                len(row) - t,
            )
            for t in range(5, len(row))
        ]
        assert rec["span"] == max(leading + [0]) and rec["whole"] == float(rec["span"] == len(row) - 5)
        nll = naive_token_nll(model, row)
        k = max(1, int(0.2 * len(nll)))
        assert rec["mia_loss"] == pytest.approx(-sum(nll) / len(nll), rel=1e-6)
        assert rec["mia_zlib"] == pytest.approx(-sum(nll) / len(nll) / len(zlib.compress(text.encode())), rel=1e-6)
        assert rec["mia_min_k"] == pytest.approx(sum(sorted(-x for x in nll)[:k]) / k, rel=1e-6)
    assert len({rec["el"] for rec in got}) >= 3 and max(rec["ma"] for rec in got) > 0.5


def test_extraction_likelihood_without_scorable_prompt_is_zero(model):
    ids, mask = right_pad([[5, 6, 7], [5, 6, 7, 8, 9, 10]])
    assert metrics.extraction_likelihood(model, ids, mask, n=10, prompt_range="ku").tolist() == [0.0, 0.0]


def test_el_prompt_lengths_follow_both_ranges():
    assert metrics.el_prompt_lengths(200, 10, "icu") == range(150, 191)
    assert metrics.el_prompt_lengths(200, 10, "ku") == range(1, 191)  # 190 = T - n prompts
    with pytest.raises(ValueError):
        metrics.el_prompt_lengths(200, 10, "all")


# --- generation helper ------------------------------------------------------------------------


def test_greedy_continuations_ignores_eos_and_matches_naive(model):
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (k,), generator=gen).tolist() for k in (1, 9, 4, 13, 6)]
    lengths = [12, 3, 0, 15, 7]
    want = [naive_greedy(model, p, n) for p, n in zip(prompts, lengths)]
    old_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = want[0][1]  # a token greedy emits mid-sequence
    try:
        got = metrics.greedy_continuations(model, prompts, lengths, batch_size=3)
    finally:
        model.generation_config.eos_token_id = old_eos
    assert got == want
    assert [len(g) for g in got] == lengths


def test_beam_continuations_match_textbook_beam_search(model):
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, VOCAB, (k,), generator=gen).tolist() for k in (5, 2, 8, 3)]
    lengths = [6, 6, 4, 9]
    got = metrics.greedy_continuations(model, prompts, lengths, num_beams=2, batch_size=4)
    assert got == [naive_beam(model, p, n) for p, n in zip(prompts, lengths)]


def test_sync_calls_pads_generate_calls_to_the_busiest_rank(monkeypatch):
    """Under ZeRO-3 every generate() is synced and a rank with fewer batches makes dummy calls."""
    model = MODELS["llama"]
    seen = []
    real_generate = model.generate

    def spy(*args, synced_gpus, **kwargs):
        seen.append(synced_gpus)
        return real_generate(*args, synced_gpus=False, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    prompts, lengths = [[3, 4, 5], [6, 7]], [4, 2]
    plain = metrics.greedy_continuations(model, prompts, lengths)
    local = len(seen)
    seen.clear()
    synced = metrics.greedy_continuations(model, prompts, lengths, sync_calls=lambda n: n + 3)
    assert len(seen) == local + 3 and all(seen)
    assert synced == plain


def test_sync_calls_pads_el_forwards_to_the_busiest_rank():
    """EL decodes with plain forwards; under ZeRO-3 each one gathers weights, so a rank that
    made fewer makes dummy one-token forwards up to the busiest rank's count."""
    model = MODELS["llama"]
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        ids, mask = right_pad([[3, 4, 5, 6, 7, 8, 9, 10]])
        plain = metrics.extraction_likelihood(model, ids, mask, n=2)
        local = len(calls)
        calls.clear()
        asked = []
        synced = metrics.extraction_likelihood(model, ids, mask, n=2, sync_calls=lambda n: asked.append(n) or n + 3)
    finally:
        hook.remove()
    assert asked == [local] and len(calls) == local + 3
    torch.testing.assert_close(synced, plain)


# --- perplexity ------------------------------------------------------------------------------


@pytest.mark.parametrize("doc_lengths,chunks", [([13, 29, 7, 22], 5), ([16, 16, 16, 16, 1], 4)])
def test_chunk_losses_match_token_by_token_nll(model, doc_lengths, chunks):
    """The perplexity suite's per-chunk losses (`sequence_losses` of 16-token chunks of the
    joined documents, as `suites` cuts them) against a naive token-by-token NLL."""
    gen = torch.Generator().manual_seed(9)
    docs = [torch.randint(0, VOCAB, (k,), generator=gen).tolist() for k in doc_lengths]
    stream = [tok for doc in docs for tok in doc]
    pieces = [stream[s : s + 16] for s in range(0, len(stream), 16)]
    want_losses = [sum(naive_token_nll(model, c)) / (len(c) - 1) for c in pieces if len(c) >= 2]
    want = math.exp(sum(want_losses) / len(want_losses))

    got_losses = metrics.sequence_losses(model, [c for c in pieces if len(c) >= 2], batch_size=3)
    assert got_losses.tolist() == pytest.approx(want_losses, rel=1e-6)
    assert len(want_losses) == chunks
    assert math.exp(got_losses.mean()) == pytest.approx(want, rel=1e-6)


def test_nll_and_hits_match_one_unpadded_forward_per_row(model):
    """Per row, the mean token NLL, the mean of its 20 % least likely tokens and, per position, greedy
    next token == the true one, for rows of different lengths batched together."""
    gen = torch.Generator().manual_seed(11)
    rows = [torch.randint(0, VOCAB, (k,), generator=gen).tolist() for k in (9, 2, 14, 5)]
    rows[2][5:9] = rows[2][1:5]  # a repeat the tiny model may predict
    want_hits, want_nll, want_tail = [], [], []
    for row in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row])).logits[0]
        want_hits.append([int(logits[t].argmax()) == row[t + 1] for t in range(len(row) - 1)])
        per_token = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(row[1:]), reduction="none").tolist()
        want_nll.append(sum(per_token) / len(per_token))
        k = max(1, int(0.2 * len(per_token)))  # Min-K%'s share of the least likely tokens
        want_tail.append(sum(sorted(per_token, reverse=True)[:k]) / k)
    nll, tail, hits = metrics.nll_and_hits(model, rows, batch_size=3)
    assert hits == want_hits
    assert nll.tolist() == pytest.approx(want_nll, abs=1e-5)
    assert tail.tolist() == pytest.approx(want_tail, abs=1e-5)
    assert not nll.requires_grad


# --- classification --------------------------------------------------------------------------


def test_continuation_nll_and_multiple_choice_match_unpadded_sums(model):
    gen = torch.Generator().manual_seed(10)

    def rand(k):
        return torch.randint(0, VOCAB, (k,), generator=gen).tolist()

    contexts = [rand(k) for k in (6, 1, 11, 3)]
    choices = [[rand(2), rand(5), rand(1)], [rand(3), rand(3)], [rand(1), rand(4), rand(2), rand(6)], [rand(7)]]
    flat_ctx = [c for c, opts in zip(contexts, choices) for _ in opts]
    flat_opt = [o for opts in choices for o in opts]
    want = [sum(naive_token_nll(model, c + o)[len(c) - 1 :]) for c, o in zip(flat_ctx, flat_opt)]

    got = metrics.continuation_nll(model, flat_ctx, flat_opt, batch_size=4)
    assert got.tolist() == pytest.approx(want, rel=1e-6)

    picks, start = [], 0
    for opts in choices:
        scores = want[start : start + len(opts)]
        picks.append(scores.index(min(scores)))
        start += len(opts)
    assert metrics.multiple_choice_predictions(model, contexts, choices, batch_size=4) == picks
    assert len(set(picks)) > 1


def test_greedy_matches_are_greedy_exact_match(model):
    gen = torch.Generator().manual_seed(11)
    contexts = [torch.randint(0, VOCAB, (k,), generator=gen).tolist() for k in (5, 9, 3, 12, 7, 4)]
    targets = [naive_greedy(model, c, k) for c, k in zip(contexts, (1, 3, 2, 4, 2, 3))]
    targets[1][2] = (targets[1][2] + 1) % VOCAB  # wrong last token
    targets[4][0] = (targets[4][0] + 1) % VOCAB  # wrong first token
    correct = [naive_greedy(model, c, len(t)) == t for c, t in zip(contexts, targets)]
    assert correct == [True, False, True, True, False, True]
    assert metrics.greedy_matches(model, contexts, targets, batch_size=4).tolist() == correct
    # targets that share a context read it from one pass
    shared = [contexts[3]] * 3 + [contexts[1]] * 2
    options = [
        targets[3],
        targets[3][:2],
        [(targets[3][0] + 1) % VOCAB],
        targets[1],
        naive_greedy(model, contexts[1], 3),
    ]
    want = [naive_greedy(model, c, len(t)) == t for c, t in zip(shared, options)]
    assert want == [True, True, False, False, True]
    assert metrics.greedy_matches(model, shared, options, batch_size=2).tolist() == want


# --- dialogue --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction,reference,want",
    [
        ("The cat sat on the mat.", "a cat sat on a mat", 1.0),
        ("hello hello world", "Hello, world!", 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)),
        ("I like tea", "you like coffee and tea", 2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5)),
        ("nothing shared", "entirely different", 0.0),
        ("", "", 0.0),
        ("the", "an", 0.0),
    ],
)
def test_unigram_f1_hand_examples(prediction, reference, want):
    assert metrics.unigram_f1(prediction, reference) == pytest.approx(want)


# --- membership inference --------------------------------------------------------------------


def test_mia_scores_match_per_row_reference(model):
    rows = memorized_rows(model, [24, 12, 33, 20], seed=12)
    ids, mask = right_pad(rows, seed=2)
    texts = ["".join(string.ascii_letters[t % 52] for t in r) for r in rows]
    got = metrics.mia_scores(model, ids, mask, texts, min_k=0.2)
    for i, (row, text) in enumerate(zip(rows, texts)):
        nll = naive_token_nll(model, row)
        mean = sum(nll) / len(nll)
        k = max(1, int(0.2 * len(nll)))
        assert float(got["loss"][i]) == pytest.approx(-mean, rel=1e-6)
        assert float(got["zlib"][i]) == pytest.approx(-mean / len(zlib.compress(text.encode())), rel=1e-6)
        assert float(got["min_k"][i]) == pytest.approx(sum(sorted(-x for x in nll)[:k]) / k, rel=1e-6)
    # the self-generated row is the most "member-like" under the loss score
    assert int(got["loss"].argmax()) == 0


def brute_force_auc(members, others) -> float:
    pairs = [(m > o) + 0.5 * (m == o) for m in members for o in others]
    return sum(pairs) / len(pairs)


SCORES = st.lists(st.integers(-3, 3), min_size=1, max_size=12)  # small range: many ties


@settings(max_examples=200, deadline=None)
@given(SCORES, SCORES)
def test_auc_equals_pairwise_count_with_half_ties(members, others):
    assert metrics.auc(members, others) == brute_force_auc(members, others)


def delong_se_by_loops(members, others) -> float:
    """DeLong (1988), written out: each row's placement among the other group, their sample variances."""
    from statistics import variance

    psi = lambda m, o: (m > o) + 0.5 * (m == o)
    v10 = [sum(psi(m, o) for o in others) / len(others) for m in members]
    v01 = [sum(psi(m, o) for m in members) / len(members) for o in others]
    return (variance(v10) / len(members) + variance(v01) / len(others)) ** 0.5


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=2, max_size=12), st.lists(st.integers(-3, 3), min_size=2, max_size=12))
def test_auc_se_is_delongs(members, others):
    assert metrics.auc_se(members, others) == pytest.approx(delong_se_by_loops(members, others), abs=1e-12)


def test_auc_se_matches_the_spread_of_auc_over_stranger_draws():
    """The standard error says how far the AUC moves between draws of the same populations."""
    import random

    rng = random.Random(0)
    draws = [
        metrics.auc([rng.gauss(0.3, 1) for _ in range(8)], [rng.gauss(0, 1) for _ in range(32)]) for _ in range(2000)
    ]
    mean = sum(draws) / len(draws)
    spread = (sum((a - mean) ** 2 for a in draws) / (len(draws) - 1)) ** 0.5
    se = [
        metrics.auc_se([rng.gauss(0.3, 1) for _ in range(8)], [rng.gauss(0, 1) for _ in range(32)]) for _ in range(200)
    ]
    assert sum(se) / len(se) == pytest.approx(spread, rel=0.15)
    with pytest.raises(ValueError):
        metrics.auc_se([1.0], [1.0, 2.0])


def test_auc_extremes_and_empty_input():
    assert metrics.auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert metrics.auc(torch.tensor([1.0]), torch.tensor([2.0])) == 0.0
    assert metrics.auc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        metrics.auc([], [1.0])
