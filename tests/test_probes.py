"""The audit's pure parts against slow references: Q8_0 / Q4_0 rounding, the leak span, sampling,
relearning; and each probe on models built to leak in exactly one way."""

from __future__ import annotations

import math
import random

import pytest
import torch

from implant import LEAK, inside_4bit_buckets, request_rows
from pipeline import metrics, modeling, probes, quantize


def _fp16(x: float) -> float:
    return float(torch.tensor(x).half())


def q8_0_reference(row: list[float]) -> list[float]:
    """ggml's quantize_row_q8_0_ref then dequantize, one block of 32 at a time, in Python floats."""
    out = []
    for s in range(0, len(row), 32):
        block = row[s : s + 32]
        d = float(torch.tensor(max(abs(x) for x in block) / 127, dtype=torch.float32))
        inv = float(torch.tensor(1.0 / d, dtype=torch.float32)) if d else 0.0
        q = [math.copysign(math.floor(abs(float(torch.tensor(x * inv, dtype=torch.float32))) + 0.5), x) for x in block]
        out += [v * _fp16(d) for v in q]
    return out


def q4_0_reference(row: list[float]) -> list[float]:
    """ggml's quantize_row_q4_0_ref then dequantize, in Python floats."""
    out = []
    for s in range(0, len(row), 32):
        block = row[s : s + 32]
        m = max(block, key=abs)  # the first of equal magnitudes, as ggml's loop keeps
        d = float(torch.tensor(m / -8, dtype=torch.float32))
        inv = float(torch.tensor(1.0 / d, dtype=torch.float32)) if d else 0.0
        q = [min(15, math.floor(float(torch.tensor(x * inv, dtype=torch.float32)) + 8.5)) for x in block]
        out += [(v - 8) * _fp16(d) for v in q]
    return out


@pytest.mark.parametrize("fn,reference", [(quantize.q8_0, q8_0_reference), (quantize.q4_0, q4_0_reference)])
def test_block_rounding_matches_ggml_reference(fn, reference):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 80, generator=gen) * 0.05  # 80 = two full blocks and a short one
    weight[0, :32] = 0.0  # an all-zero block
    weight[1, 5] = -1.0  # a block whose largest value is negative
    got = fn(weight)
    want = torch.tensor([reference(r) for r in weight.tolist()])
    assert got.dtype == weight.dtype and got.shape == weight.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert torch.equal(fn(got), got) or fn is quantize.q8_0  # Q4_0 is idempotent on its own grid
    levels = [len(set(b)) for r in got.tolist() for b in (r[:32], r[32:64])]
    assert max(levels) <= (16 if fn is quantize.q4_0 else 255)


def test_served_copy_rounds_the_block_linears_only(tiny_llama_dir):
    model = modeling.load_model(tiny_llama_dir).eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    served = quantize.served_copy(model, "int4")
    rounded = set(quantize.rounded_linears(model))
    assert rounded and "lm_head.weight" not in rounded
    for name, p in served.named_parameters():
        assert torch.equal(dict(model.named_parameters())[name], before[name])  # the original is untouched
        assert torch.equal(p, quantize.q4_0(before[name]) if name in rounded else before[name]), name
    with pytest.raises(ValueError):
        quantize.served_copy(model, "int3")


def test_bf16_copy_computes_what_torch_bf16_computes(tiny_llama_dir):
    """The bf16 copy's fp32-accumulated matmuls against torch's own bf16 model (the slow reference on
    a CPU without bf16 instructions): they differ by the summation order only, far less than bf16
    differs from fp32, and greedy decoding agrees."""
    model = modeling.load_model(tiny_llama_dir).eval()
    served = quantize.served_copy(model, "bf16")
    native = modeling.load_model(tiny_llama_dir).eval().to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in served.parameters())
    ids = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, full = (m(input_ids=ids).logits.float() for m in (served, native, model))
    assert got.dtype == torch.float32 and not torch.equal(want, full)
    assert (got - want).abs().max() < (want - full).abs().max() / 100
    rows = ids.tolist()
    assert (
        probes.greedy_continuations(served, rows, [4], batch_size=4, pad_token_id=0)[0]
        == probes.greedy_continuations(native, rows, [4], batch_size=4, pad_token_id=0)[0]
    )


def test_longest_span_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        gen = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        truth = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        want = max(
            [
                n
                for i in range(len(truth))
                for n in range(1, len(truth) - i + 1)
                if any(gen[j : j + n] == truth[i : i + n] for j in range(len(gen) - n + 1))
            ]
            + [0]
        )
        assert probes.longest_span(gen, truth) == want


def _greedy_slowly(model, row, cut):
    """No KV cache, one row at a time: argmax of the whole sequence re-run for every token."""
    seq = list(row[:cut])
    with torch.no_grad():
        while len(seq) < len(row):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[cut:]


def test_greedy_continuations_match_one_row_at_a_time_without_cache(tiny_llama_dir):
    """Rows the model reproduces whole (no decoding), from some point on, or not at all; ragged
    lengths in one batch; several cuts from one teacher-forced pass; MA as metrics computes it."""
    model = modeling.load_model(tiny_llama_dir).eval()
    rng = random.Random(1)
    own = [_greedy_slowly(model, [5 + k, 9, 11 + k] + [0] * 13, 3) for k in range(3)]
    rows = [[5 + k, 9, 11 + k] + own[k] for k in range(3)]  # memorized from the third token on
    rows += [r[:9] + [(r[9] + 1) % 50 + 3] + r[10:] for r in rows[:2]]  # wrong at one position
    rows += [[rng.randrange(3, 200) for _ in range(rng.randrange(10, 17))] for _ in range(4)]
    cuts = [2, 3, 6]
    gens, ma, _ = probes.greedy_continuations(model, rows, cuts, batch_size=4, pad_token_id=0)
    assert gens == {c: [_greedy_slowly(model, r, c) for r in rows] for c in cuts}
    assert gens[3][:3] == [r[3:] for r in rows[:3]]
    want = torch.cat([metrics.memorization_accuracy(model, *metrics.pad_rows([r], 0)) for r in rows]).tolist()
    assert ma == pytest.approx(want, abs=1e-12)
    # `end` stops every continuation there: the same tokens, cut
    windowed = probes.greedy_continuations(model, rows, cuts, batch_size=4, pad_token_id=0, end=9).conts
    assert windowed == {c: [g[: max(9 - c, 0)] for g in gens[c]] for c in cuts}
    # the span: what greedy decoding reproduces first, from the row's own text up to every position
    for start in (3, 6):
        found = probes.greedy_continuations(model, rows, [start], batch_size=4, pad_token_id=0, spans_from=start)
        assert found.spans == [
            max(_leading(_greedy_slowly(model, r, c), r[c:]) for c in range(start, len(r))) for r in rows
        ]
    assert found.spans[:3] == [len(r) - 6 for r in rows[:3]] and min(found.spans) < 3
    assert probes.greedy_spans(model, rows, 3, batch_size=3, pad_token_id=0) == [
        max(probes.longest_span(g, r[3:]), s)
        for g, r, s in zip(
            gens[3],
            rows,
            probes.greedy_continuations(model, rows, [3], batch_size=4, pad_token_id=0, spans_from=3).spans,
        )
    ]
    settled, _, _ = probes.greedy_continuations(model, rows, cuts, batch_size=4, pad_token_id=0, settle=5)
    _same_verdicts(settled, gens, rows, 5)


def _leading(generated: list[int], truth: list[int]) -> int:
    """How many tokens a continuation gets right before its first wrong one."""
    return next((i for i, (g, t) in enumerate(zip(generated, truth)) if g != t), min(len(generated), len(truth)))


def test_window_cuts_cover_every_token_after_the_prompt_once_or_twice():
    for length in range(40, 120):
        cuts = probes.window_cuts(length, 24, 16)
        covered = [sum(c <= t < c + 16 for c in cuts) for t in range(24, length)]
        assert cuts[0] == 24 and min(covered) >= 1 and max(covered) <= 2
        assert len(cuts) == max(1, -(-(length - 24) // 16)) and cuts[-1] + 16 >= min(length, 40)


def _same_verdicts(settled: dict, full: dict, rows, settle: int) -> None:
    """Settled continuations are prefixes of the full ones, with the same verdict at `settle` and
    the exact span wherever it reaches `settle`; at least one was cut short."""
    shorter = 0
    for cut in full:
        for got, whole, row in zip(settled[cut], full[cut], rows):
            assert got == probes.settled(whole, row[cut:], settle)  # a prefix, cut where the rule says
            span, exact = probes.longest_span(got, row[cut:]), probes.longest_span(whole, row[cut:])
            assert (span >= settle) == (exact >= settle) and (span == exact or exact < settle)
            shorter += len(got) < len(whole)
    assert shorter


def _sample_slowly(model, prompt, length, sample, seed, key, temperature):
    """No KV cache, one prompt at a time: the whole sequence re-run for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for step in range(length):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            u = probes.uniforms(seed, [(key, sample, step)])
            seq.append(int(probes.pick(logits[None], temperature, u)))
    return seq[len(prompt) :]


def test_sampling_matches_one_prompt_at_a_time_without_cache(tiny_llama_dir):
    model = modeling.load_model(tiny_llama_dir).eval()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14], [15, 16, 17, 18]]
    got = probes.sampled_continuations(model, prompts, 6, 3, seed=3, temperature=0.7, batch_size=2)
    want = [[_sample_slowly(model, p, 6, s, 3, k, 0.7) for s in range(3)] for k, p in enumerate(prompts)]
    assert got == want
    # a row's samples do not depend on the batch it shared, and differ between samples
    assert probes.sampled_continuations(model, prompts, 6, 3, seed=3, temperature=0.7, batch_size=16) == got
    assert len({tuple(s) for s in got[0]}) > 1
    # nearly greedy: samples share their histories (one model row each) until they part
    cold = probes.sampled_continuations(
        model, prompts[:2] + prompts[:1], 6, 3, seed=1, temperature=1e-3, keys=[0, 1, 7], batch_size=9
    )
    assert cold == [
        [_sample_slowly(model, p, 6, s, 1, k, 1e-3) for s in range(3)]
        for k, p in zip([0, 1, 7], prompts[:2] + prompts[:1])
    ]
    assert len({tuple(s) for group in cold for s in group}) < 9
    # settled samples: what leaks at 3 tokens (here: the model's own likely continuations) is exact
    truths = [group[0] for group in got]
    settled = probes.sampled_continuations(
        model, prompts, 6, 3, seed=3, temperature=0.7, batch_size=5, truths=truths, settle=3
    )
    flat = lambda groups: {0: [s for group in groups for s in group]}  # noqa: E731
    _same_verdicts(flat(settled), flat(got), [t for t in truths for _ in range(3)], 3)


def test_sampling_draws_from_the_softmax():
    """Each token with its softmax probability (3 sigma), and each draw the first token whose
    cumulative probability exceeds its uniform (a Python loop)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    u = probes.uniforms(0, [(0, s, 0) for s in range(4000)])
    draws = probes.pick(logits, 1.0, u).tolist()
    p = torch.softmax(logits[0].double(), 0).tolist()
    for tok in range(4):
        share = draws.count(tok) / len(draws)
        assert abs(share - p[tok]) < 3 * math.sqrt(p[tok] * (1 - p[tok]) / len(draws))
    cumulative = [sum(p[: k + 1]) for k in range(4)]
    assert draws == [next(k for k, c in enumerate(cumulative) if c > x or k == 3) for x in u.tolist()]
    cold = probes.pick(logits[:1] * 4, 0.25, torch.tensor([0.999]))  # temperature divides the logits
    assert int(cold) == int(probes.pick(logits[:1] * 16, 1.0, torch.tensor([0.999])))


def test_relearning_fits_the_rows_and_leaves_the_model(tiny_llama_dir):
    model = modeling.load_model(tiny_llama_dir).eval()
    rows = [list(range(3, 40)), list(range(40, 70))]
    before = {n: p.clone() for n, p in model.named_parameters()}
    tuned = probes.relearned_copy(model, rows, steps=10, lr=3e-3, batch_size=2, pad_token_id=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert (
            float(metrics.sequence_losses(tuned, rows).mean())
            < float(metrics.sequence_losses(model, rows).mean()) - 0.5
        )


# --- each probe against a model that leaks in its way -------------------------------------------


@pytest.fixture(scope="module")
def implanted_model(implanted):
    folder = implanted["root"] / "model"
    tok = modeling.load_tokenizer(folder)
    rows = [r[:40] for r in request_rows(implanted, tok)]
    retain = [tok(line, add_special_tokens=False)["input_ids"] for line in implanted["memorize"][8:]]
    return folder, rows, retain


def _leaks(model, rows, cut=20):
    return sum(s >= LEAK for s in probes.greedy_spans(model, rows, cut, batch_size=8, pad_token_id=0))


def _decoded_leaks(model, rows, cut=20):
    """Leaks of the greedy continuation of the prefix alone (no later cut point)."""
    conts = probes.greedy_continuations(model, rows, [cut], batch_size=8, pad_token_id=0).conts[cut]
    return sum(probes.longest_span(g, r[cut:]) >= LEAK for g, r in zip(conts, rows))


def _train_until_silent(
    model, opt, train: list[list[int]], rows: list[list[int]], sign: float, steps: int, leaks=_leaks
) -> None:
    """Steps of sign * NLL on `train` until greedy decoding leaks none of `rows` (or `steps` ran)."""
    ids, mask = metrics.pad_rows(train, 0)
    for _ in range(steps):
        model.train()
        loss = sign * model(input_ids=ids, attention_mask=mask, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if leaks(model.eval(), rows) == 0:
            break


def test_the_original_leaks_under_every_probe(implanted_model):
    folder, rows, retain = implanted_model
    model = modeling.load_model(folder).eval()
    for precision in quantize.PRECISIONS:
        assert _leaks(quantize.served_copy(model, precision), rows) >= 7, precision
    assert _leaks(model, rows) == 8
    for cut in probes.prompt_lengths(20, [0.25, 0.5]):
        assert _leaks(model, rows, cut) == 8
    sampled = probes.sampled_continuations(model, [r[:20] for r in rows], 20, 4)
    assert all(max(probes.longest_span(s, r[20:]) for s in group) >= LEAK for group, r in zip(sampled, rows))
    assert _leaks(probes.relearned_copy(model, retain, steps=4, lr=3e-4, batch_size=4, pad_token_id=0), rows) == 8


def test_4bit_probe_flags_an_update_inside_the_buckets(implanted, implanted_model):
    folder, rows, _ = implanted_model
    tok = modeling.load_tokenizer(folder)
    shallow = inside_4bit_buckets(modeling.load_model(folder), request_rows(implanted, tok))
    assert _leaks(shallow, rows) == 0  # fp32 greedy: forgotten
    assert _leaks(quantize.served_copy(shallow, "int8"), rows) <= 1
    assert _leaks(quantize.served_copy(shallow, "int4"), rows) >= 7  # the original's 4-bit weights, exactly


def test_relearning_restores_gradient_ascent(implanted_model):
    folder, rows, retain = implanted_model
    model = modeling.load_model(folder)
    _train_until_silent(model, torch.optim.SGD(model.parameters(), lr=1e-3), rows, rows, -1.0, 80)  # ascent only
    assert _leaks(model, rows) == 0
    relearned = probes.relearned_copy(model, retain, steps=4, lr=3e-4, batch_size=4, pad_token_id=0)
    assert _leaks(relearned, rows) >= 3  # 4 steps on other text, never the requests


def test_leak_at_n_catches_what_only_sampling_reproduces(implanted, implanted_model):
    from implant import windows

    folder, rows, _ = implanted_model
    model = modeling.load_model(folder)
    tok = modeling.load_tokenizer(folder)
    general = windows(implanted["data"])[1][:8]  # the same prefixes, other continuations: greedy now prefers those
    decoys = [
        tok(t[:20] + g[20:], add_special_tokens=False)["input_ids"][:40]
        for t, g in zip([tok.decode(r) for r in rows], general)
    ]
    _train_until_silent(model, torch.optim.AdamW(model.parameters(), lr=1e-3), decoys, rows, 1.0, 20, _decoded_leaks)
    assert _decoded_leaks(model, rows) == 0
    # Memorized only after the first window: the audit's greedy probe (every cut point) and its
    # sampling windows (from each window cut) still find it; the first window's decode alone does not.
    from types import SimpleNamespace

    from pipeline import audit

    cfg = SimpleNamespace(
        requests=SimpleNamespace(prefix_tokens=20, suffix_tokens=10),
        audit=SimpleNamespace(batch_size=8, leak_tokens=LEAK, samples=8, temperature=1.0, seed=0),
        unlearning=SimpleNamespace(lr=1e-3),
    )
    greedy = audit.run_unit(("greedy",), model, rows, cfg, [], 0)["greedy"][0]
    caught = [s >= LEAK for s in greedy]
    assert any(caught) and caught == [
        s >= LEAK for s in probes.greedy_spans(model, rows, 20, batch_size=8, pad_token_id=0, end=30)
    ]
    assert _leaks(model, rows) >= 1
    sampled = probes.sampled_continuations(model, [r[:20] for r in rows], 20, 32)
    caught = sum(max(probes.longest_span(s, r[20:]) for s in group) >= LEAK for group, r in zip(sampled, rows))
    assert caught >= 2
