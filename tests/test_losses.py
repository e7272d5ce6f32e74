"""Losses against naive per-row, per-position references (python loops, pads skipped)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import losses
from pipeline.losses import (
    GD,
    ICU,
    NPO,
    RMU,
    ICUBand,
    SimNPO,
    kl_to_reference,
    sequence_logprob,
    steering_direction,
    token_nll,
    unlearning_loss,
)

V = 7
TOL = 1e-5
ONE_FIXTURE = [HealthCheck.function_scoped_fixture]  # `chunks` sets one constant per test, not per example


@pytest.fixture(autouse=True, params=["whole tensor", "one chunk", "one position per chunk"])
def chunks(request, monkeypatch):
    """Every test runs with autograd through the whole logits, and chunked (`_ByPositions`) with
    the whole row in one chunk and with one position per chunk."""
    if request.param != "whole tensor":
        monkeypatch.setattr(losses, "WHOLE_ELEMENTS", 0)
    if request.param == "one position per chunk":
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 1)


def make_batch(lengths: list[int], T: int = 6, seed: int = 0, dtype=torch.float32, scale: float = 3.0):
    """Right-padded batch: random logits (leaf, requires grad), ids with garbage in pads, mask."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(len(lengths), T, V, generator=g, dtype=torch.float64)).to(dtype)
    ids = torch.randint(0, V, (len(lengths), T), generator=g)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    return logits.requires_grad_(), ids, mask


# ---- naive references: loops over rows and positions, pads skipped ----


def naive_token_terms(logits, ids, mask) -> list[list[torch.Tensor]]:
    """Per row, the -log softmax(logits[t])[ids[t+1]] of every position whose target is real."""
    rows = []
    for b in range(logits.shape[0]):
        terms = []
        for t in range(logits.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1]:
                probs = torch.softmax(logits[b, t].double(), dim=-1)
                terms.append(-torch.log(probs[ids[b, t + 1]]))
        rows.append(terms)
    return rows


def naive_kl_terms(logits, ref_logits, mask) -> list[list[torch.Tensor]]:
    rows = []
    for b in range(logits.shape[0]):
        terms = []
        for t in range(logits.shape[1]):
            if mask[b, t]:
                p = torch.softmax(logits[b, t].double(), dim=-1)
                q = torch.softmax(ref_logits[b, t].double(), dim=-1)
                terms.append(sum(q[v] * (torch.log(q[v]) - torch.log(p[v])) for v in range(V)))
        rows.append(terms)
    return rows


def row_means(rows) -> torch.Tensor:
    return torch.stack([sum(r) / len(r) if r else torch.zeros((), dtype=torch.float64) for r in rows])


def batch_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the rows that had any term (the module's active-row convention)."""
    return sum(values) / len(values) if values else torch.zeros((), dtype=torch.float64)


def naive_mean_nll(logits, ids, mask):
    return batch_mean([sum(r) / len(r) for r in naive_token_terms(logits, ids, mask) if r])


def naive_mean_kl(logits, ref_logits, mask):
    return batch_mean([sum(r) / len(r) for r in naive_kl_terms(logits, ref_logits, mask) if r])


def naive_npo(logits, ref_logits, ids, mask, beta):
    per_row = []
    for terms, ref_terms in zip(naive_token_terms(logits, ids, mask), naive_token_terms(ref_logits, ids, mask)):
        if terms:
            log_ratio = -sum(terms) + sum(ref_terms).detach()
            per_row.append(-(2 / beta) * torch.nn.functional.logsigmoid(-beta * log_ratio))
    return batch_mean(per_row)


def naive_simnpo(logits, ids, mask, beta, gamma):
    """-(2/beta) log sigmoid(-(beta/|y|) log p(y) - gamma) per row with a prediction, written
    from the paper's formula: log p(y) is the sum of the token log-probs, |y| their count."""
    per_row = []
    for terms in naive_token_terms(logits, ids, mask):
        if terms:
            log_p = -sum(terms)
            per_row.append(-(2 / beta) * torch.nn.functional.logsigmoid(-(beta / len(terms)) * log_p - gamma))
    return batch_mean(per_row)


def naive_band(logits, ids, mask, push, low, high, margin, tail_low, tail_high, tail_band):
    """icu_band's forget term, per row with a prediction: the mean over its positions of
    push_t * relu(z_true - max over other tokens + margin); how far its token-mean NLL, and its tail
    (the mean of its max(1, floor(n / 5)) largest token NLLs), lie below `low` and `tail_low` (if any
    position is pushed; gradient through the pushed positions only); how far they lie above `high` and
    `tail_high`; the tail's two only with `tail_band`. Averaged over those rows."""
    per_row = []
    for b, terms in enumerate(naive_token_terms(logits, ids, mask)):
        if terms:
            gaps, raised = [], []
            for k, t in enumerate(range(len(terms))):
                z, y = logits[b, t].double(), int(ids[b, t + 1])
                best_other = torch.cat([z[:y], z[y + 1 :]]).max()
                gaps.append(push[b, t] * torch.clamp(z[y] - best_other + margin, min=0))
                raised.append(terms[k] if push[b, t] else terms[k].detach())
            nll, pushed = sum(terms) / len(terms), sum(raised) / len(terms)
            k = max(1, len(terms) // 5)
            tail = sum(sorted(raised, key=lambda t: float(t.detach()), reverse=True)[:k]) / k
            whole_tail = sum(sorted(terms, key=lambda t: float(t.detach()), reverse=True)[:k]) / k
            above = torch.clamp(nll - high[b].double(), min=0)
            below = torch.clamp(low[b].double() - pushed, min=0)
            if tail_band:
                above = above + torch.clamp(whole_tail - tail_high[b].double(), min=0)
                below = below + torch.clamp(tail_low[b].double() - tail, min=0)
            below = below if any(push[b, : len(terms)]) else 0.0
            per_row.append(sum(gaps) / len(terms) + below + above)
    return batch_mean(per_row)


def assert_close_with_grads(ours: torch.Tensor, naive: torch.Tensor, leaves: list[torch.Tensor]) -> None:
    assert torch.allclose(ours.double(), naive, atol=TOL, rtol=0), (ours, naive)
    grads_ours = torch.autograd.grad(ours.sum(), leaves, retain_graph=True, allow_unused=True)
    grads_naive = torch.autograd.grad(naive.sum(), leaves, allow_unused=True)
    for a, b in zip(grads_ours, grads_naive):
        if a is None or b is None:  # a leaf the loss does not read (ga's retain batch)
            assert a is None and b is None
            continue
        assert torch.allclose(a.double(), b.double(), atol=TOL, rtol=0)


LENGTHS = [6, 4, 2, 0, 5]


# ---- per-sequence functions ----


def test_token_nll_matches_naive():
    logits, ids, mask = make_batch(LENGTHS)
    assert_close_with_grads(token_nll(logits, ids, mask), row_means(naive_token_terms(logits, ids, mask)), [logits])


def test_tail_nll_matches_naive():
    """Minus Min-K% Prob (k = 20 %): the mean of each row's floor(n / 5) (at least 1) largest token NLLs,
    the gradient through those tokens only; 0 for a row with no prediction."""
    logits, ids, mask = make_batch([12, 6, 4, 2, 0], T=12)
    naive = []
    for terms in naive_token_terms(logits, ids, mask):
        k = max(1, len(terms) // 5)
        top = sorted(terms, key=lambda t: float(t.detach()), reverse=True)[:k]
        naive.append(sum(top) / k if terms else torch.zeros((), dtype=torch.float64))
    assert_close_with_grads(losses.tail_nll(*losses._shifted_nll(logits, ids, mask)), torch.stack(naive), [logits])


def test_sequence_logprob_matches_naive():
    logits, ids, mask = make_batch(LENGTHS)
    naive = torch.stack(
        [-sum(r) if r else torch.zeros((), dtype=torch.float64) for r in naive_token_terms(logits, ids, mask)]
    )
    assert_close_with_grads(sequence_logprob(logits, ids, mask), naive, [logits])


def test_kl_matches_naive():
    logits, _, mask = make_batch(LENGTHS, seed=1)
    ref, _, _ = make_batch(LENGTHS, seed=2)
    ref = ref.detach()
    assert_close_with_grads(kl_to_reference(logits, ref, mask), row_means(naive_kl_terms(logits, ref, mask)), [logits])


def test_token_nll_value_by_hand_with_math_log():
    logits, ids, mask = make_batch([3], T=4, seed=5)
    expected = 0.0
    for t in (0, 1):
        z = [math.exp(x) for x in logits[0, t].tolist()]
        expected -= math.log(z[ids[0, t + 1]] / sum(z))
    assert token_nll(logits, ids, mask).item() == pytest.approx(expected / 2, abs=TOL)


def test_pad_labels_of_minus_100_are_ignored():
    logits, ids, mask = make_batch(LENGTHS)
    assert torch.equal(token_nll(logits, ids.masked_fill(mask == 0, -100), mask), token_nll(logits, ids, mask))


def test_left_padding_equals_right_padding():
    logits, ids, mask = make_batch([4], T=6)
    left = (logits.roll(2, dims=1), ids.roll(2, dims=1), mask.roll(2, dims=1))
    assert torch.allclose(token_nll(*left), token_nll(logits, ids, mask), atol=1e-6)


def test_kl_nonnegative_and_zero_at_reference():
    logits, _, mask = make_batch(LENGTHS, seed=3)
    ref, _, _ = make_batch(LENGTHS, seed=4)
    assert (kl_to_reference(logits, ref, mask) >= 0).all()
    assert (kl_to_reference(logits, logits.detach(), mask) == 0).all()


def test_official_cross_entropy_form_has_the_same_gradient_on_unpadded_rows():
    """Official ICU: -(p_ref * log p_theta).sum(-1).mean(); it differs from KL by the constant entropy."""
    logits, _, mask = make_batch([6, 6, 6], seed=6)
    ref, _, _ = make_batch([6, 6, 6], seed=7)
    ref = ref.detach()
    official = -(torch.softmax(ref, -1) * torch.log_softmax(logits, -1)).sum(-1).mean()
    ours = losses._mean_kl(logits, ref, mask)
    (g_official,) = torch.autograd.grad(official, logits)
    (g_ours,) = torch.autograd.grad(ours, logits)
    assert torch.allclose(g_official, g_ours, atol=1e-6)


def test_bf16_logits_are_computed_in_float32():
    logits, ids, mask = make_batch(LENGTHS, dtype=torch.bfloat16)
    out = token_nll(logits, ids, mask)
    assert out.dtype == torch.float32
    assert torch.allclose(out, token_nll(logits.float(), ids, mask), atol=1e-6)
    kl = kl_to_reference(logits, logits.detach().roll(1, dims=0), mask)
    assert kl.dtype == torch.float32 and torch.isfinite(kl).all()


@settings(max_examples=20, deadline=None, suppress_health_check=ONE_FIXTURE)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 30.0), n=st.integers(1, 6))
def test_kl_property_nonnegative(seed: int, scale: float, n: int):
    logits, _, mask = make_batch([n, 6], seed=seed, scale=scale)
    ref, _, _ = make_batch([n, 6], seed=seed + 1, scale=scale)
    assert (kl_to_reference(logits, ref, mask) >= -1e-6).all()


@settings(max_examples=15, deadline=None, suppress_health_check=ONE_FIXTURE)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 5), extra=st.integers(1, 4))
def test_property_pad_content_is_irrelevant(seed: int, n: int, extra: int):
    """Whatever the logits and ids at pad positions, per-sequence values do not change."""
    logits, ids, mask = make_batch([n], T=5, seed=seed)
    noise, noise_ids, _ = make_batch([n], T=5 + extra, seed=seed + 1, scale=50.0)
    long_logits = noise.detach().clone()
    long_logits[:, :5] = logits.detach()
    long_ids = noise_ids.clone()
    long_ids[:, :5] = ids
    long_mask = torch.cat([mask, torch.zeros(1, extra, dtype=mask.dtype)], dim=1)
    assert torch.allclose(token_nll(long_logits, long_ids, long_mask), token_nll(logits, ids, mask), atol=1e-6)
    ref = logits.detach().flip(-1)
    long_ref = long_logits.flip(-1)
    assert torch.allclose(
        kl_to_reference(long_logits, long_ref, long_mask), kl_to_reference(logits, ref, mask), atol=1e-6
    )


# ---- methods ----

CUSTOM = {
    "icu": ICU(uw=0.7, lw=0.3, kl=1.5),
    "icu_band": ICUBand(uw=0.7, lw=0.3, kl=1.5, margin=2.0, hold_tokens=True, tail_band=True),
    "ga": losses.GA(),
    "gd": GD(retain_weight=0.4),
    "npo": NPO(beta=0.2, retain_weight=0.4),
    "simnpo": SimNPO(beta=2.5, gamma=0.7, retain_weight=0.4),
}


def method_inputs(forget_lengths=LENGTHS, retain_lengths=(6, 3, 5, 0, 6)):
    """Inputs every method can read. For icu_band, row 0 is pushed, row 1 pulled back (its NLL lies
    above `high`), row 2 neither (forgotten), the others pushed or not by turns."""
    forget_logits, forget_ids, forget_mask = make_batch(list(forget_lengths), seed=10)
    with torch.no_grad():  # the model "still predicts" the true token at every other position
        for t in range(0, forget_ids.shape[1] - 1, 2):
            forget_logits[torch.arange(len(forget_ids)), t, forget_ids[:, t + 1]] += 10.0
    retain_logits, retain_ids, retain_mask = make_batch(list(retain_lengths), seed=11)
    nll = losses.token_nll(forget_logits, forget_ids, forget_mask).detach()
    rows, width = forget_ids.shape[0], forget_ids.shape[1] - 1
    pushed_rows = torch.tensor([True, False, False, True, True] * rows)[:rows]
    push = (pushed_rows[:, None] & (torch.arange(width) % 3 != 1)).float()  # some positions of pushed rows
    low = nll + torch.tensor([0.5, 0.5, 0.5, -0.5, 0.3] * rows)[:rows]  # row 3: already above its low
    high = torch.where(torch.tensor([False, True, False, False, True] * rows)[:rows], nll - 0.5, math.inf)
    tail = losses.tail_nll(*losses._shifted_nll(forget_logits, forget_ids, forget_mask)).detach()
    tail_low = tail + torch.tensor([1.0, 0.5, -1.0, 0.5, -0.2] * rows)[:rows]  # rows 2, 4: tails above theirs
    tail_high = torch.where(torch.tensor([False, False, True, False, True] * rows)[:rows], tail - 0.3, math.inf)
    return dict(
        forget_push=push,
        forget_low=low,
        forget_high=high,
        forget_tail_low=tail_low,
        forget_tail_high=tail_high,
        forget_logits=forget_logits,
        forget_ids=forget_ids,
        forget_mask=forget_mask,
        retain_logits=retain_logits,
        retain_ids=retain_ids,
        retain_mask=retain_mask,
        ref_retain_logits=make_batch(list(retain_lengths), seed=12)[0].detach(),
        ref_forget_logits=make_batch(list(forget_lengths), seed=13)[0].detach(),
    )


def naive_held(x: dict, weights: list[float], per_token: bool = False) -> torch.Tensor:
    """icu_band's retain NLL term: per row, its weight x max(0, its NLL now - its NLL under the frozen
    model) (brought back to where the original had it, never below), or with per_token the mean over
    its tokens of each token's max(0, now - frozen); mean over rows with a prediction."""
    now = naive_token_terms(x["retain_logits"], x["retain_ids"], x["retain_mask"])
    ref = naive_token_terms(x["ref_retain_logits"], x["retain_ids"], x["retain_mask"])

    def shortfall(a, b):
        if per_token:
            return sum(torch.clamp(t - r.detach(), min=0) for t, r in zip(a, b)) / len(a)
        return torch.clamp(sum(a) / len(a) - (sum(b) / len(b)).detach(), min=0)

    return batch_mean([k * shortfall(a, b) for k, a, b in zip(weights, now, ref) if a])


def naive_method(name: str, w, x: dict) -> torch.Tensor:
    forget = naive_mean_nll(x["forget_logits"], x["forget_ids"], x["forget_mask"])
    retain = naive_mean_nll(x["retain_logits"], x["retain_ids"], x["retain_mask"])
    if name == "icu":
        kl = naive_mean_kl(x["retain_logits"], x["ref_retain_logits"], x["retain_mask"])
        return -w.uw * forget + w.lw * retain + w.kl * kl
    if name == "ga":
        return -forget
    if name == "gd":
        return -forget + w.retain_weight * retain
    if name == "icu_band":
        kl = naive_mean_kl(x["retain_logits"], x["ref_retain_logits"], x["retain_mask"])
        band = naive_band(
            x["forget_logits"],
            x["forget_ids"],
            x["forget_mask"],
            x["forget_push"],
            x["forget_low"],
            x["forget_high"],
            w.margin,
            x["forget_tail_low"],
            x["forget_tail_high"],
            w.tail_band,
        )
        return w.uw * band + naive_held(x, [w.lw] * len(x["retain_ids"]), w.hold_tokens) + w.kl * kl
    if name == "simnpo":
        simnpo = naive_simnpo(x["forget_logits"], x["forget_ids"], x["forget_mask"], w.beta, w.gamma)
        return simnpo + w.retain_weight * retain
    npo = naive_npo(x["forget_logits"], x["ref_forget_logits"], x["forget_ids"], x["forget_mask"], w.beta)
    return npo + w.retain_weight * retain


@pytest.mark.parametrize("custom", [False, True], ids=["defaults", "custom"])
@pytest.mark.parametrize("name", ["icu", "icu_band", "ga", "gd", "npo", "simnpo"])
def test_methods_match_naive(name: str, custom: bool):
    x = method_inputs()
    weights = CUSTOM[name] if custom else losses.method(name).settings()
    loss, parts = unlearning_loss(name, weights, **x)
    assert_close_with_grads(loss, naive_method(name, weights, x), [x["forget_logits"], x["retain_logits"]])
    assert parts["loss"] == pytest.approx(loss.item())
    assert all(isinstance(v, float) for v in parts.values())


@pytest.mark.parametrize("general_lw", [0.0, 0.9, None])
@pytest.mark.parametrize("name", ["icu", "icu_band"])
def test_general_rows_weigh_general_lw_in_the_retain_nll(name: str, general_lw):
    """Neighbour rows weigh lw and general rows general_lw (None: lw) in the mean over active retain
    rows; the KL holds every retain row alike."""
    x = method_inputs()
    general = torch.tensor([False, False, True, True, True])  # row 3 is empty: it counts for nothing
    w = dataclasses.replace(CUSTOM[name], general_lw=general_lw)
    loss, parts = unlearning_loss(name, w, **x, retain_general=general)
    terms = naive_token_terms(x["retain_logits"], x["retain_ids"], x["retain_mask"])
    weight = [(w.lw if general_lw is None else general_lw) if g else w.lw for g in general.tolist()]
    if name == "icu_band":
        tokens = w.hold_tokens
        want = naive_method(name, w, x) - naive_held(x, [w.lw] * len(weight), tokens) + naive_held(x, weight, tokens)
    else:
        retain = batch_mean([k * sum(r) / len(r) for k, r in zip(weight, terms) if r])
        want = (
            naive_method(name, w, x)
            - w.lw * naive_mean_nll(x["retain_logits"], x["retain_ids"], x["retain_mask"])
            + retain
        )
    assert_close_with_grads(loss, want, [x["forget_logits"], x["retain_logits"]])
    assert parts["neighbour_nll"] == pytest.approx(
        float(naive_mean_nll(x["retain_logits"], x["retain_ids"], x["retain_mask"])), rel=1e-5
    )


# The implementation before the loss was chunked: plain autograd through whole [B, T, V] tensors.


def whole_shifted_nll(logits, ids, mask):
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    z = logits[:, :-1]
    targets = ids[:, 1:].masked_fill(~valid, 0).unsqueeze(-1)
    return torch.where(valid, torch.logsumexp(z, -1) - z.gather(-1, targets).squeeze(-1), 0.0), valid


def whole_kl(logits, ref, mask):
    logp = torch.log_softmax(logits, -1)
    with torch.no_grad():
        ref_logp = torch.log_softmax(ref, -1)
        ref_p = ref_logp.exp()
        ref_neg_entropy = torch.einsum("btv,btv->bt", ref_p, ref_logp)
    kl = ref_neg_entropy - torch.einsum("btv,btv->bt", ref_p, logp)
    valid = mask.bool()
    return torch.where(valid, kl, 0.0).sum(1) / valid.sum(1).clamp(min=1)


def whole_margins(logits, ids, valid, margin):
    z = logits[:, :-1]
    targets = ids[:, 1:].masked_fill(~valid, 0).unsqueeze(-1)
    true = z.gather(-1, targets).squeeze(-1)
    top2 = z.topk(2, dim=-1)
    other = torch.where(top2.indices[..., 0] == targets.squeeze(-1), top2.values[..., 1], top2.values[..., 0])
    return torch.relu(true - other + margin)


def whole_method(name: str, w, x: dict) -> torch.Tensor:
    """Today's methods, composed from the whole-tensor pieces above."""

    def mean_nll(logits, ids, mask):
        nll, valid = whole_shifted_nll(logits, ids, mask)
        return losses._row_mean(nll.sum(1) / valid.sum(1).clamp(min=1), valid.any(1))

    retain = mean_nll(x["retain_logits"], x["retain_ids"], x["retain_mask"])
    kl = losses._row_mean(
        whole_kl(x["retain_logits"], x["ref_retain_logits"], x["retain_mask"]), x["retain_mask"].bool().any(1)
    )
    if name == "icu":
        return -w.uw * mean_nll(x["forget_logits"], x["forget_ids"], x["forget_mask"]) + w.lw * retain + w.kl * kl
    per_token, valid = whole_shifted_nll(x["forget_logits"], x["forget_ids"], x["forget_mask"])
    count = valid.sum(1).clamp(min=1)
    push = x["forget_push"].bool() & valid
    nll = per_token.sum(1) / count
    margin = torch.where(push, whole_margins(x["forget_logits"], x["forget_ids"], valid, w.margin), 0.0).sum(1) / count
    pushed = torch.where(push, per_token, per_token.detach())
    k = (valid.sum(1) // 5).clamp(min=1)
    tail = torch.stack([row.sort(descending=True).values[:n].sum() / n for row, n in zip(pushed, k.tolist())])
    whole_tail = torch.stack([row.sort(descending=True).values[:n].sum() / n for row, n in zip(per_token, k.tolist())])
    short = torch.relu(x["forget_low"] - pushed.sum(1) / count) + w.tail_band * torch.relu(x["forget_tail_low"] - tail)
    deep = torch.relu(nll - x["forget_high"]) + w.tail_band * torch.relu(whole_tail - x["forget_tail_high"])
    outside = margin + push.any(1) * short + deep
    now, kept = whole_shifted_nll(x["retain_logits"], x["retain_ids"], x["retain_mask"])
    ref, _ = whole_shifted_nll(x["ref_retain_logits"], x["retain_ids"], x["retain_mask"])
    tokens = kept.sum(1).clamp(min=1)
    if w.hold_tokens:
        short = torch.where(kept, torch.relu(now - ref.detach()), 0.0).sum(1) / tokens
    else:
        short = torch.relu(now.sum(1) / tokens - ref.sum(1).detach() / tokens)
    held = losses._row_mean(short, kept.any(1))
    return w.uw * losses._row_mean(outside, valid.any(1)) + w.lw * held + w.kl * kl


@pytest.mark.parametrize("name", ["icu", "icu_band"])
def test_chunked_loss_equals_the_whole_tensor_loss(name: str):
    """At a realistic vocabulary: the same loss and gradients (1e-6) as autograd through whole
    [B, T, V] tensors (float64: in float32 the two differ by the old KL's rounding, ~1e-5 relative,
    as a difference of two sums of size ~20)."""
    g = torch.Generator().manual_seed(3)
    rows, T, vocab = 4, 23, 4099
    x = {}
    for side, seed in (("forget", 0), ("retain", 1)):
        x[f"{side}_logits"] = (4 * torch.randn(rows, T, vocab, generator=g, dtype=torch.float64)).requires_grad_()
        x[f"{side}_ids"] = torch.randint(0, vocab, (rows, T), generator=g)
        x[f"{side}_mask"] = (torch.arange(T) < torch.tensor([T, 17, 5, 1])[:, None]).long()
    x["ref_retain_logits"] = 4 * torch.randn(rows, T, vocab, generator=g, dtype=torch.float64)
    x["forget_push"] = (torch.rand(rows, T - 1, generator=g) < 0.6).float()
    x["forget_low"], x["forget_high"] = torch.tensor([9.0, 2.0, 9.5, 0.0]), torch.tensor([20.0, 20.0, 1.0, 20.0])
    x["forget_tail_low"], x["forget_tail_high"] = (
        torch.tensor([12.0, 3.0, 14.0, 0.0]),
        torch.tensor([30.0, 2.0, 30.0, 30.0]),
    )
    leaves = [x["forget_logits"], x["retain_logits"]]
    want = whole_method(name, CUSTOM[name], x)
    want_grads = torch.autograd.grad(want, leaves)
    loss, _ = unlearning_loss(name, CUSTOM[name], **x)
    assert abs(loss.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
    for ours, theirs in zip(torch.autograd.grad(loss, leaves), want_grads):
        assert (ours - theirs).abs().max() <= 1e-6 * max(1.0, theirs.abs().max().item())


def test_icu_parts_and_defaults():
    assert (ICU(), ICUBand(), NPO(), SimNPO()) == (
        ICU(uw=1.0, lw=0.5, kl=1.0),
        ICUBand(uw=1.0, lw=0.5, kl=1.0, margin=1.0),
        NPO(beta=0.1, retain_weight=1.0),
        SimNPO(beta=4.5, gamma=0.0, retain_weight=1.0),
    )
    loss, parts = unlearning_loss("icu", **method_inputs())
    assert set(parts) == {"loss", "forget_nll", "neighbour_nll", "kl"}
    assert loss.item() == pytest.approx(-parts["forget_nll"] + 0.5 * parts["neighbour_nll"] + parts["kl"], abs=1e-6)


def test_plain_npo_without_retain():
    x = method_inputs()
    w = NPO(retain_weight=0.0)
    assert not losses.method("npo").retain(w)
    loss, parts = unlearning_loss(
        "npo",
        w,
        forget_logits=x["forget_logits"],
        forget_ids=x["forget_ids"],
        forget_mask=x["forget_mask"],
        ref_forget_logits=x["ref_forget_logits"],
    )
    assert set(parts) == {"loss", "npo"}
    # NPO at the reference model is (2/beta) log 2 per sample
    at_ref, _ = unlearning_loss(
        "npo",
        w,
        forget_logits=x["forget_logits"],
        forget_ids=x["forget_ids"],
        forget_mask=x["forget_mask"],
        ref_forget_logits=x["forget_logits"].detach(),
    )
    assert at_ref.item() == pytest.approx(2 / 0.1 * math.log(2), abs=1e-4)


@pytest.mark.parametrize("name", ["icu", "icu_band", "ga", "gd", "npo", "simnpo"])
def test_empty_rows_add_nothing(name: str):
    """An all-zero-mask row: no NaN, zero gradient, and the loss of the batch without it."""
    x = method_inputs()
    loss, _ = unlearning_loss(name, CUSTOM[name], **x)
    grads = torch.autograd.grad(loss, [x["forget_logits"], x["retain_logits"]], allow_unused=True)
    grads = [g for g in grads if g is not None]
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert all((g[3] == 0).all() for g in grads)  # row 3 is empty in both batches
    keep = [0, 1, 2, 4]
    without = {k: v[keep].detach().requires_grad_(v.requires_grad) for k, v in x.items()}
    loss_without, _ = unlearning_loss(name, CUSTOM[name], **without)
    assert loss.item() == pytest.approx(loss_without.item(), abs=1e-6)


@pytest.mark.parametrize("name", ["icu", "icu_band", "ga", "gd", "npo", "simnpo"])
def test_all_empty_batch_is_zero_and_backpropagates(name: str):
    x = method_inputs(forget_lengths=[0, 0], retain_lengths=[0, 0])
    loss, parts = unlearning_loss(name, **x)
    assert loss.item() == 0.0 and all(v == 0.0 for v in parts.values())
    loss.backward()
    assert (x["forget_logits"].grad == 0).all()


def test_requirements_are_discoverable():
    table = {name: (m.reference(m.settings()), m.retain(m.settings())) for name, m in losses.METHODS.items()}
    assert table == {
        "icu": ("retain", True),
        "icu_band": ("retain", True),
        "ga": (None, False),
        "gd": (None, True),
        "npo": ("forget", True),
        "simnpo": (None, True),
        "rmu": ("retain", True),
    }
    assert [name for name, m in losses.METHODS.items() if m.band] == ["icu_band"]
    assert {name: m.layer(m.settings()) for name, m in losses.METHODS.items() if m.layer(m.settings()) is not None} == {
        "rmu": 7
    }
    assert losses.method("icu").reference(ICU(kl=0.0)) is None
    assert not losses.method("icu").retain(ICU(kl=0.0, lw=0.0))
    assert not losses.method("gd").retain(GD(retain_weight=0.0))


def test_icu_without_reference_when_kl_is_off():
    x = method_inputs()
    del x["ref_retain_logits"]
    _, parts = unlearning_loss("icu", ICU(kl=0.0), **x)
    assert "kl" not in parts


def test_unknown_method_names_the_valid_ones():
    x = method_inputs()
    for call in (lambda: unlearning_loss("xyz", **x), lambda: losses.method("xyz")):
        with pytest.raises(ValueError, match="xyz.*icu, icu_band, ga, gd, npo, simnpo, rmu"):
            call()


def test_icu_band_pushes_pulls_and_leaves_the_rest_alone():
    """Pushed positions within the margin: the true token's logit goes down, the best other's up,
    plus gradient ascent while the row is below `low`; unpushed positions of a pushed row: nothing;
    a row above `high`: descent on its NLL; a row neither pushed nor too deep: no gradient."""
    x = method_inputs(forget_lengths=[6, 6, 6], retain_lengths=[0, 0, 0])
    x["forget_low"] = torch.tensor([-1.0, 0.0, 0.0])  # row 0 is past its lows: only the margin acts
    x["forget_tail_low"] = torch.tensor([-1.0, 0.0, 0.0])
    x["forget_tail_high"] = torch.tensor([math.inf, math.inf, math.inf])
    loss, parts = unlearning_loss("icu_band", ICUBand(lw=0.0, kl=0.0, margin=1.0), **x)
    grad = torch.autograd.grad(loss, x["forget_logits"])[0]
    nll_grad = torch.autograd.grad(
        losses.token_nll(x["forget_logits"], x["forget_ids"], x["forget_mask"]).sum(), x["forget_logits"]
    )[0]
    logits, ids = x["forget_logits"].detach(), x["forget_ids"]
    moved = 0
    for t in range(5):
        z, y = logits[0, t], int(ids[0, t + 1])
        within = z[y] - torch.cat([z[:y], z[y + 1 :]]).max() + 1.0 > 0
        if x["forget_push"][0, t] and within:  # exactly two logits move, by 1 / (5 tokens * 3 rows)
            assert grad[0, t, y] == pytest.approx(1 / 15) and grad[0, t].abs().sum() == pytest.approx(2 / 15)
            moved += 1
        else:
            assert (grad[0, t] == 0).all()
    assert moved >= 2
    assert torch.allclose(grad[1], nll_grad[1] / 3)
    assert (grad[2] == 0).all()
    assert parts["band_gap"] > 0


def test_missing_inputs_are_named():
    x = method_inputs()
    with pytest.raises(ValueError, match="forget_push, forget_low, forget_high, forget_tail_low, forget_tail_high"):
        unlearning_loss(
            "icu_band",
            **{
                k: v
                for k, v in x.items()
                if not k.startswith("forget_") or k in ("forget_logits", "forget_ids", "forget_mask")
            },
        )
    with pytest.raises(ValueError, match="ref_forget_logits"):
        unlearning_loss("npo", **{k: v for k, v in x.items() if k != "ref_forget_logits"})
    with pytest.raises(ValueError, match="retain_logits"):
        unlearning_loss(
            "gd", forget_logits=x["forget_logits"], forget_ids=x["forget_ids"], forget_mask=x["forget_mask"]
        )


def test_icu_band_holds_retained_text_where_the_original_had_it_and_teaches_none():
    """The neighbour NLL of icu_band pulls a retained row back to the frozen model's NLL and stops
    there: a row the model predicts at least as well as the original gets no gradient (icu's plain
    NLL would keep teaching it), a row it predicts worse is pulled toward the original."""
    x = method_inputs()
    ref = x["retain_logits"].detach().clone()
    ref[0] -= 3.0 * F.one_hot(x["retain_ids"][0].roll(-1), ref.shape[-1])  # the original knew row 0 worse
    ref[1] += 3.0 * F.one_hot(x["retain_ids"][1].roll(-1), ref.shape[-1])  # ... and row 1 better
    x["ref_retain_logits"] = ref
    loss, _ = unlearning_loss("icu_band", ICUBand(uw=0.0, lw=1.0, kl=0.0), **x)
    grad = torch.autograd.grad(loss, x["retain_logits"])[0]
    assert grad[0].abs().max() == 0 and grad[1].abs().max() > 0
    icu, _ = unlearning_loss("icu", ICU(uw=0.0, lw=1.0, kl=0.0), **x)
    assert torch.autograd.grad(icu, x["retain_logits"])[0][0].abs().max() > 0
    # hold_tokens: row 0's first token now predicted worse than the original did (the row's mean
    # still better) is pulled back alone; the row's other tokens get no gradient
    first = x["retain_ids"][0, 1]
    ref[0, 0, first] += 6.0
    loss, _ = unlearning_loss("icu_band", ICUBand(uw=0.0, lw=1.0, kl=0.0), **x)
    assert torch.autograd.grad(loss, x["retain_logits"])[0][0].abs().max() == 0
    loss, _ = unlearning_loss("icu_band", ICUBand(uw=0.0, lw=1.0, kl=0.0, hold_tokens=True), **x)
    grad = torch.autograd.grad(loss, x["retain_logits"])[0][0]
    assert grad[0].abs().max() > 0 and grad[1:].abs().max() == 0


def naive_rmu(x: dict, p: RMU) -> torch.Tensor:
    """RMU written out per row and token: mean over a row's real tokens of ||h_t - c u||^2 for the
    forget rows, of ||h_t - h_ref_t||^2 for the retain rows; mean over rows with a real token."""
    u = steering_direction(x["forget_hidden"].shape[-1], p.seed, torch.float64)

    def side(hidden, target, mask):
        rows = []
        for b in range(hidden.shape[0]):
            real = [t for t in range(hidden.shape[1]) if mask[b, t]]
            if real:
                rows.append(
                    sum(sum((hidden[b, t, d] - target(b, t, d)) ** 2 for d in range(hidden.shape[2])) for t in real)
                    / len(real)
                )
        return batch_mean(rows)

    forget = side(x["forget_hidden"], lambda b, t, d: p.steering_coeff * u[d], x["forget_mask"])
    retain = side(x["retain_hidden"], lambda b, t, d: x["ref_retain_hidden"][b, t, d], x["retain_mask"])
    return forget + p.alpha * retain


def test_rmu_matches_naive():
    """RMU's loss and its gradients on the activations, against the loop above; the direction is a
    fixed unit vector of the seed alone."""
    x = method_inputs()
    g = torch.Generator().manual_seed(4)
    for side in ("forget", "retain"):
        rows, width = x[f"{side}_ids"].shape
        x[f"{side}_hidden"] = torch.randn(rows, width, 6, generator=g, dtype=torch.float64).requires_grad_()
    x["ref_retain_hidden"] = torch.randn(*x["retain_hidden"].shape, generator=g, dtype=torch.float64)
    p = RMU(layer=2, steering_coeff=3.0, alpha=2.0, seed=5)
    loss, parts = unlearning_loss("rmu", p, **x)
    assert set(parts) == {"loss", "forget_distance", "retain_distance"}
    assert_close_with_grads(loss, naive_rmu(x, p), [x["forget_hidden"], x["retain_hidden"]])
    u = steering_direction(6, 5)
    assert torch.equal(u, steering_direction(6, 5)) and abs(u.norm().item() - 1) < 1e-6 and (u >= 0).all()
    assert not torch.equal(u, steering_direction(6, 6))
    with pytest.raises(ValueError, match="forget_hidden"):
        unlearning_loss("rmu", p, **{k: v for k, v in x.items() if k != "forget_hidden"})
