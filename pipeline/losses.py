"""Unlearning objectives as pure tensor functions (no I/O, no distributed calls).

Conventions shared by every loss:
- `logits` are [B, T, V] causal-LM outputs for `ids` [B, T] with attention `mask` [B, T]
  (1 = real token, 0 = pad). Half-precision logits are upcast to float32 for the
  softmax; float32/float64 are used as given.
- Causal shift: logits[:, t] predicts ids[:, t + 1]. A prediction counts only when both
  the target token and the token it is predicted from are real, so right and left
  padding are both handled.
- Per-sequence values are token means (NLL, KL) or token sums (NPO's sequence log-prob).
- Batch reduction: mean over *active* rows of the per-sequence values. A row is active
  when it has at least one counted position. An inactive row (all-zero mask: the empty
  row a rank pads in when it has no live sample) adds exactly zero to the loss and to
  the gradient, and an all-inactive batch gives a loss of 0 that still backpropagates,
  so every rank can run backward.

A method is one record (`Method` in `METHODS`): its settings (a frozen dataclass, what YAML's
`unlearning.loss: {name: ..., <its fields>}` builds), its loss function of (`LossInputs`, settings),
and what the training step must feed it: a retain batch, the frozen model's logits (on which
rows), the band targets, a layer's activations. A term whose weight is 0 is skipped, so those
flags tell the step exactly which extra forward passes to run. Adding a method is its settings and
loss here, one `METHODS` line and, for a named recipe, one YAML file.

- icu: -uw * NLL(forget) + lw * NLL(neighbour) + kl * KL(p_ref || p_theta on neighbour).
  Forget row i and neighbour row i are a pair; the neighbour is passed as `retain_*`.
- icu_band: icu with a bounded forget term per request, uw * (mean_t push_t * relu(z_true - z_best_other
       + margin) + relu(low - NLL(forget)) + relu(NLL(forget) - high)), the middle term's gradient
       through the pushed tokens only: the tokens specific to the person (`forget_push`) are pushed
       just off the top and their NLL raised to the strangers' median (`forget_low`), and no further;
       a request erased past the strangers' edge (`forget_high`) is pulled back (pipeline/method.md,
       "Stopping at a stranger's level"). With `tail_band` the same two relu terms also act on the
       row's tail NLL (`tail_nll`: the mean of its least likely 20 %, minus Min-K% Prob) against
       `forget_tail_low` / `forget_tail_high`. All of them come from the loop.
       Its neighbour NLL is held, not taught: lw * relu(NLL_theta(x_n) - NLL_ref(x_n)), per row or
       (hold_tokens) per token.
- ga:  -NLL(forget)                                    (Knowledge Unlearning).
- gd:  -NLL(forget) + retain_weight * NLL(retain)       (gradient difference).
- npo: -(2 / beta) * logsigmoid(-beta * (logp_theta(x_f) - logp_ref(x_f)))
       [+ retain_weight * NLL(retain), i.e. NPO+RT, when retain_weight > 0: the default,
       as in open-unlearning; set retain_weight=0 for plain NPO].
- simnpo: -(2 / beta) * logsigmoid(beta * NLL(forget) - gamma) [+ retain_weight * NLL(retain)], NLL
       the token mean (Fan et al. 2024: reference-free, length-normalised).
- rmu: mean_t ||h(x_f) - c u||^2 + alpha * mean_t ||h(x_r) - h_ref(x_r)||^2 on the residual stream
       h after `layer` blocks, u a fixed random unit vector (Li et al. 2024, WMDP).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch import Tensor


@dataclass(frozen=True)
class Settings:
    """What every method's settings share: finite, non-negative numbers (those in `POSITIVE` > 0)."""

    POSITIVE: ClassVar[tuple[str, ...]] = ()

    def problems(self) -> list[str]:
        """'field: why' for each value out of range (the config names the key)."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            low_ok = value > 0 if f.name in self.POSITIVE else value >= 0
            if not (low_ok and math.isfinite(value)):
                out.append(
                    f"{f.name}: must be a finite number {'>' if f.name in self.POSITIVE else '>='} 0, got {value}"
                )
        return out


@dataclass(frozen=True)
class ICU(Settings):
    """The paper's objective, at the paper's weights."""

    uw: float = 1.0  # weight of the forget term (gradient ascent on the request)
    lw: float = 0.5  # weight of the neighbour NLL
    kl: float = 1.0  # weight of the neighbour KL to the frozen model
    general_lw: float | None = None  # NLL weight of the general retain rows (null: lw); the KL holds them too


@dataclass(frozen=True)
class ICUBand(ICU):
    """icu with the bounded forget term that stops each request at a stranger's level."""

    margin: float = 1.0  # logits by which a pushed token must trail the best other token
    # the hold per token, mean_t relu(NLL_theta,t - NLL_ref,t), instead of on the row's mean NLL: a
    # token that gets worse is not paid for by one that gets better
    hold_tokens: bool = False
    # the band on each request's tail NLL too (tail_nll, minus Min-K% Prob): raised to the strangers'
    # median while pushed, held in their middle half after (pipeline/method.md, "The tail band")
    tail_band: bool = False


@dataclass(frozen=True)
class GA(Settings):
    """Gradient ascent alone: no settings."""


@dataclass(frozen=True)
class GD(Settings):
    retain_weight: float = 1.0  # weight of the retain NLL


@dataclass(frozen=True)
class NPO(Settings):
    POSITIVE: ClassVar[tuple[str, ...]] = ("beta",)
    beta: float = 0.1  # on the summed log-ratio to the frozen model
    retain_weight: float = 1.0  # weight of the retain NLL (0: plain NPO)


@dataclass(frozen=True)
class SimNPO(Settings):
    POSITIVE: ClassVar[tuple[str, ...]] = ("beta",)
    beta: float = 4.5  # on the token-mean NLL
    gamma: float = 0.0  # the margin subtracted inside the sigmoid
    retain_weight: float = 1.0  # weight of the retain NLL


@dataclass(frozen=True)
class RMU(Settings):
    """Representation misdirection (Li et al. 2024, WMDP): the forget rows' residual stream after
    `layer` blocks steered to a fixed random direction, the retain rows' kept where the frozen model
    has it."""

    POSITIVE: ClassVar[tuple[str, ...]] = ("steering_coeff",)
    layer: int = 7  # blocks before the activations steered (the paper's 7 of 32)
    steering_coeff: float = 6.5  # the norm the forget activations are steered to
    alpha: float = 1200.0  # weight of the retain activations' distance
    seed: int = 0  # of the random direction (the same on every rank)


@dataclass(frozen=True)
class LossInputs:
    """Everything a loss may read; optional fields are required only by some methods."""

    forget_logits: Tensor
    forget_ids: Tensor
    forget_mask: Tensor
    retain_logits: Tensor | None = None
    retain_ids: Tensor | None = None
    retain_mask: Tensor | None = None
    ref_retain_logits: Tensor | None = None
    ref_forget_logits: Tensor | None = None
    forget_push: Tensor | None = None  # [B, T-1] icu_band: 1 = push the prediction of ids[:, t+1]
    forget_low: Tensor | None = None  # [B] icu_band: the token-mean NLL a pushed row is raised to
    forget_high: Tensor | None = None  # [B] icu_band: the token-mean NLL a row is pulled back to
    forget_tail_low: Tensor | None = None  # [B] icu_band: the tail NLL (tail_nll) a pushed row is raised to
    forget_tail_high: Tensor | None = None  # [B] icu_band: the tail NLL a row is pulled back to
    retain_general: Tensor | None = None  # [R] bool: general retain rows (not a request's neighbour)
    forget_hidden: Tensor | None = None  # [B, T, D] rmu: the trained model's activations at its layer
    retain_hidden: Tensor | None = None
    ref_retain_hidden: Tensor | None = None  # [R, T, D] the frozen model's, on the retain rows


def _upcast(logits: Tensor) -> Tensor:
    """float32 for half types (bf16 softmax loses digits); otherwise the tensor itself, no copy."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


CHUNK_ELEMENTS = 1 << 22  # logits elements (16 MB in float32) per chunk of positions
# up to this many logits elements (256 MB in float32) autograd runs through the whole tensor: its
# few copies cost less than the recompute (demo: an epoch 43.0 -> 40.6 s, peak RSS +0.1 GB a rank)
WHOLE_ELEMENTS = 1 << 26


class _ByPositions(torch.autograd.Function):
    """Per-position terms [B, T] of the logits [B, T, V], computed a chunk of positions at a time.

    `terms(z, *aux)` maps a chunk of logits [B, c, V] and of the per-position inputs [B, c, ...]
    to a tuple of [B, c] values, each position on its own. Autograd through the whole [B, T, V]
    would keep several copies of it alive for backward (log-softmax, softmax, the gathers' and
    top-k's scattered gradients); here forward keeps only its inputs, and backward recomputes
    one chunk at a time and writes its gradient into a single [B, T, V] buffer.
    """

    @staticmethod
    def forward(ctx, terms, logits, *aux):
        width = max(1, CHUNK_ELEMENTS // max(1, logits.shape[0] * logits.shape[-1]))
        ctx.terms, ctx.width = terms, width
        ctx.save_for_backward(logits, *aux)
        chunks = [
            terms(logits[:, s : s + width], *(a[:, s : s + width] for a in aux))
            for s in range(0, logits.shape[1], width)
        ]
        return tuple(torch.cat(parts, dim=1) for parts in zip(*chunks))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        logits, *aux = ctx.saved_tensors
        out, width = torch.empty_like(logits), ctx.width
        for s in range(0, logits.shape[1], width):
            z = logits[:, s : s + width].detach().requires_grad_()
            with torch.enable_grad():
                values = ctx.terms(z, *(a[:, s : s + width] for a in aux))
                total = sum((v * g[:, s : s + width]).sum() for v, g in zip(values, grads))
            out[:, s : s + width] = torch.autograd.grad(total, z)[0]
        return None, out, *(None for _ in aux)


def _by_positions(terms, logits: Tensor, *aux: Tensor) -> tuple[Tensor, ...]:
    """`terms` of the whole logits when they are small (`WHOLE_ELEMENTS`), else `_ByPositions`."""
    if logits.numel() <= WHOLE_ELEMENTS:
        return terms(logits, *aux)
    return _ByPositions.apply(terms, logits, *aux)


def _predicted(mask: Tensor) -> Tensor:
    """[B, T-1] positions whose target ids[:, t+1] and context token ids[:, t] are both real."""
    return mask[:, 1:].bool() & mask[:, :-1].bool()


def _next_tokens(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per position t of [B, T]: the target ids[:, t+1] (0 where not counted; pads may hold -100)
    and whether it counts. The last position predicts nothing, so the logits need no slicing."""
    valid = F.pad(_predicted(mask), (0, 1), value=False)
    targets = F.pad(ids[:, 1:], (0, 1), value=0).masked_fill(~valid, 0)
    return targets, valid


def _nll_terms(z: Tensor, targets: Tensor, valid: Tensor) -> tuple[Tensor]:
    """logsumexp - gathered logit: no log-softmax copy of the chunk."""
    z = _upcast(z)
    nll = torch.logsumexp(z, dim=-1) - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (torch.where(valid, nll, 0.0),)


def _band_terms(z: Tensor, targets: Tensor, valid: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """icu_band's per-position NLL and margin relu(z_true - z_best_other + margin).

    The margin is zero once another token leads by `margin` logits: unlike -NLL it stops as soon
    as greedy decoding no longer produces the token, and its gradient does not vanish on
    confidently memorized tokens (where d NLL / d z_true = p_true - 1 is near 0).
    """
    (nll,) = _nll_terms(z, targets, valid)
    z = _upcast(z)
    true = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    top2 = z.topk(2, dim=-1)
    best_other = torch.where(top2.indices[..., 0] == targets, top2.values[..., 1], top2.values[..., 0])
    return nll, torch.where(valid, F.relu(true - best_other + margin), 0.0)


def _kl_terms(z: Tensor, ref: Tensor, valid: Tensor) -> tuple[Tensor]:
    """KL(p_ref || p_theta) per position, as sum_v p_ref (log p_ref - log p_theta): one sum, not the
    difference of two large ones (a chunk's temporaries are small, so no einsum trick is needed)."""
    logp = F.log_softmax(_upcast(z), dim=-1)
    with torch.no_grad():
        ref_logp = F.log_softmax(_upcast(ref), dim=-1)
    return (torch.where(valid, (ref_logp.exp() * (ref_logp - logp)).sum(-1), 0.0),)


def _shifted_nll(logits: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position NLL [B, T-1] of ids[:, 1:] (0 where not counted) and the counted positions."""
    targets, valid = _next_tokens(ids, mask)
    (nll,) = _by_positions(_nll_terms, logits, targets, valid)
    return nll[:, :-1], valid[:, :-1]


MIN_K = 0.2  # Min-K% Prob's share of a row's least likely tokens (Shi et al. 2024's default)


def tail_nll(nll: Tensor, valid: Tensor, share: float = MIN_K) -> Tensor:
    """[B] the mean of each row's max(1, floor(share * n)) largest per-token NLLs [B, T] among its n
    counted positions (`valid`): minus Min-K% Prob. It tells a row a model has met from one it has not
    where the mean NLL cannot: the names and numbers a stranger's record makes it guess. Differentiable
    through the tokens chosen; 0 for a row with nothing counted."""
    k = (valid.sum(-1) * share).floor().long().clamp(min=1)
    highest = nll.masked_fill(~valid, 0.0).sort(-1, descending=True).values  # NLL >= 0: pads sort last
    take = torch.arange(highest.shape[-1], device=highest.device) < k[:, None]
    return torch.where(take, highest, 0.0).sum(-1) / k


def token_nll(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """[B] token-mean causal-LM cross-entropy per sequence; 0 for rows with nothing to predict."""
    nll, valid = _shifted_nll(logits, ids, mask)
    return nll.sum(1) / valid.sum(1).clamp(min=1)


def sequence_logprob(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """[B] sum of token log-probs of ids[:, 1:] over counted positions (NPO's log p(x))."""
    nll, _ = _shifted_nll(logits, ids, mask)
    return -nll.sum(1)


def kl_to_reference(logits: Tensor, ref_logits: Tensor, mask: Tensor) -> Tensor:
    """[B] token-mean KL(p_ref || p_theta) over the real positions of each row.

    Every real position counts (no shift: no labels are involved). The reference side
    carries no gradient.
    """
    valid = mask.bool()
    (kl,) = _by_positions(_kl_terms, logits, ref_logits.detach(), valid)
    return kl.sum(1) / valid.sum(1).clamp(min=1)


def _row_mean(values: Tensor, active: Tensor) -> Tensor:
    """Mean of values [B] over active rows; 0 (still in the graph) when none is active."""
    return torch.where(active, values, 0.0).sum() / active.sum().clamp(min=1)


def _mean_nll(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Batch NLL: mean over active rows of the per-sequence token means."""
    return _row_mean(token_nll(logits, ids, mask), _predicted(mask).any(1))


def _mean_kl(logits: Tensor, ref_logits: Tensor, mask: Tensor) -> Tensor:
    return _row_mean(kl_to_reference(logits, ref_logits, mask), mask.bool().any(1))


Parts = dict[str, Tensor]


def _forget_nll(x: LossInputs) -> Tensor:
    return _mean_nll(x.forget_logits, x.forget_ids, x.forget_mask)


def _retain_nll(x: LossInputs) -> Tensor:
    return _mean_nll(x.retain_logits, x.retain_ids, x.retain_mask)


def _icu(x: LossInputs, p: ICU) -> tuple[Tensor, Parts]:
    parts = {"forget_nll": _forget_nll(x)}
    return _neighbour_terms(-p.uw * parts["forget_nll"], parts, x, p)


def _icu_band(x: LossInputs, p: ICUBand) -> tuple[Tensor, Parts]:
    targets, valid = _next_tokens(x.forget_ids, x.forget_mask)
    terms = _by_positions(partial(_band_terms, margin=p.margin), x.forget_logits, targets, valid)
    (per_token, margins), valid = (t[:, :-1] for t in terms), valid[:, :-1]
    count = valid.sum(1).clamp(min=1)
    push = x.forget_push.bool() & valid
    nll = per_token.sum(1) / count
    margin = torch.where(push, margins, 0.0).sum(1) / count
    pushed = torch.where(push, per_token, per_token.detach())  # each token's NLL, the gradient through pushed ones
    short, deep = F.relu(x.forget_low - pushed.sum(1) / count), F.relu(nll - x.forget_high)
    if p.tail_band:
        short = short + F.relu(x.forget_tail_low - tail_nll(pushed, valid))
        deep = deep + F.relu(tail_nll(per_token, valid) - x.forget_tail_high)
    outside = margin + push.any(1) * short + deep
    active = valid.any(1)
    parts = {"forget_nll": _row_mean(nll.detach(), active), "band_gap": _row_mean(outside, active)}
    return _neighbour_terms(p.uw * parts["band_gap"], parts, x, p, hold="token" if p.hold_tokens else "row")


def _neighbour_terms(
    loss: Tensor, parts: Parts, x: LossInputs, p: ICU, hold: str | None = None
) -> tuple[Tensor, Parts]:
    """ICU's retain side: lw * NLL(neighbours) + kl * KL(p_ref || p_theta on neighbours); general
    rows (`retain_general`) weigh `general_lw` instead of lw in the NLL mean. With `hold` (icu_band:
    "row" or "token", see `_held`) the NLL term is relu(NLL_theta - NLL_ref): it brings a retained
    row back to the frozen model's NLL and no further, so it holds what the model knew and never
    teaches it text it had not memorized (with the plain NLL, general text paired as neighbours was
    learnt: its MA 0.41 -> 0.57)."""
    general = p.lw if p.general_lw is None else p.general_lw
    if p.lw > 0 or general > 0:
        per_row = token_nll(x.retain_logits, x.retain_ids, x.retain_mask)
        active = _predicted(x.retain_mask).any(1)
        weight = torch.full_like(per_row, p.lw)
        if x.retain_general is not None:
            weight = torch.where(x.retain_general, general, weight)
        parts["neighbour_nll"] = _row_mean(per_row.detach(), active)
        term = per_row
        if hold:
            term = _held(x, per_row, per_token=hold == "token")
        loss = loss + _row_mean(weight * term, active)
    if p.kl > 0:
        parts["kl"] = _mean_kl(x.retain_logits, x.ref_retain_logits, x.retain_mask)
        loss = loss + p.kl * parts["kl"]
    return loss, parts


def _held(x: LossInputs, per_row: Tensor, per_token: bool) -> Tensor:
    """[B] how far each retained row has fallen behind the frozen model: relu of the row's mean NLL
    minus the reference's, or (per_token) the mean over its tokens of each token's shortfall."""
    if not per_token:
        with torch.no_grad():
            ref_row = token_nll(x.ref_retain_logits, x.retain_ids, x.retain_mask)
        return F.relu(per_row - ref_row)
    now, valid = _shifted_nll(x.retain_logits, x.retain_ids, x.retain_mask)
    with torch.no_grad():
        ref, _ = _shifted_nll(x.ref_retain_logits, x.retain_ids, x.retain_mask)
    return torch.where(valid, F.relu(now - ref), 0.0).sum(1) / valid.sum(1).clamp(min=1)


def _ga(x: LossInputs, p: Settings) -> tuple[Tensor, Parts]:
    parts = {"forget_nll": _forget_nll(x)}
    return -parts["forget_nll"], parts


def _with_retain(loss: Tensor, parts: Parts, x: LossInputs, p: GD | NPO | SimNPO) -> tuple[Tensor, Parts]:
    """Adds retain_weight * NLL(retain) when the weight is positive (gd, NPO+RT)."""
    if p.retain_weight > 0:
        parts["retain_nll"] = _retain_nll(x)
        loss = loss + p.retain_weight * parts["retain_nll"]
    return loss, parts


def _gd(x: LossInputs, p: GD) -> tuple[Tensor, Parts]:
    return _with_retain(*_ga(x, p), x, p)


def _npo(x: LossInputs, p: NPO) -> tuple[Tensor, Parts]:
    logp = sequence_logprob(x.forget_logits, x.forget_ids, x.forget_mask)
    with torch.no_grad():
        ref_logp = sequence_logprob(x.ref_forget_logits, x.forget_ids, x.forget_mask)
    per_row = -(2.0 / p.beta) * F.logsigmoid(-p.beta * (logp - ref_logp))
    active = _predicted(x.forget_mask).any(1)
    parts = {"npo": _row_mean(per_row, active)}
    return _with_retain(parts["npo"], parts, x, p)


def _simnpo(x: LossInputs, p: SimNPO) -> tuple[Tensor, Parts]:
    """SimNPO: NPO without the reference model, on the length-normalised log-likelihood,
    -(2 / beta) * logsigmoid(-(beta / |y|) * log p_theta(y) - gamma) per request."""
    per_row = -(2.0 / p.beta) * F.logsigmoid(p.beta * token_nll(x.forget_logits, x.forget_ids, x.forget_mask) - p.gamma)
    parts = {"simnpo": _row_mean(per_row, _predicted(x.forget_mask).any(1))}
    return _with_retain(parts["simnpo"], parts, x, p)


def steering_direction(size: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """RMU's fixed random direction: uniform in [0, 1)^size from `seed`, unit length."""
    u = torch.rand(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm()).to(dtype)


def _mean_sq_distance(h: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over active rows of the token-mean squared distance ||h_t - target_t||^2 (real tokens)."""
    valid = mask.bool()
    per_token = ((_upcast(h) - _upcast(target)) ** 2).sum(-1)
    per_row = torch.where(valid, per_token, 0.0).sum(1) / valid.sum(1).clamp(min=1)
    return _row_mean(per_row, valid.any(1))


def _rmu(x: LossInputs, p: RMU) -> tuple[Tensor, Parts]:
    u = steering_direction(x.forget_hidden.shape[-1], p.seed).to(x.forget_hidden.device)
    parts = {
        "forget_distance": _mean_sq_distance(x.forget_hidden, p.steering_coeff * u, x.forget_mask),
        "retain_distance": _mean_sq_distance(x.retain_hidden, x.ref_retain_hidden.detach(), x.retain_mask),
    }
    return parts["forget_distance"] + p.alpha * parts["retain_distance"], parts


@dataclass(frozen=True)
class Method:
    """One unlearning method: its settings, its loss and what the training step must feed it.

    `retain(p)`: whether the loss reads a retain/neighbour batch (`retain_*`).
    `reference(p)`: which rows the frozen original model must see ("retain", "forget")
    or None; the step runs that extra forward pass only then.
    `band`: the loss reads each forget row's `forget_push` / `forget_low` / `forget_high` /
    `forget_tail_low` / `forget_tail_high`, so it
    can also pull back a request erased past the strangers' level.
    `layer(p)`: the residual stream after how many blocks the loss reads (`*_hidden`), or None.
    """

    settings: type[Settings]
    loss: Callable[[LossInputs, Any], tuple[Tensor, Parts]]
    retain: Callable[[Any], bool]
    reference: Callable[[Any], str | None]
    band: bool = False
    layer: Callable[[Any], int | None] = lambda p: None


def _holds_neighbours(p: ICU) -> bool:
    return p.lw > 0 or p.kl > 0 or bool(p.general_lw)


METHODS: dict[str, Method] = {
    "icu": Method(ICU, _icu, retain=_holds_neighbours, reference=lambda p: "retain" if p.kl > 0 else None),
    "icu_band": Method(
        ICUBand,
        _icu_band,
        retain=_holds_neighbours,
        reference=lambda p: "retain" if _holds_neighbours(p) else None,
        band=True,
    ),
    "ga": Method(GA, _ga, retain=lambda p: False, reference=lambda p: None),
    "gd": Method(GD, _gd, retain=lambda p: p.retain_weight > 0, reference=lambda p: None),
    "npo": Method(NPO, _npo, retain=lambda p: p.retain_weight > 0, reference=lambda p: "forget"),
    "simnpo": Method(SimNPO, _simnpo, retain=lambda p: p.retain_weight > 0, reference=lambda p: None),
    "rmu": Method(RMU, _rmu, retain=lambda p: True, reference=lambda p: "retain", layer=lambda p: p.layer),
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def _check_inputs(m: Method, x: LossInputs, settings: Settings) -> None:
    required = ["retain_logits", "retain_ids", "retain_mask"] if m.retain(settings) else []
    if m.reference(settings):
        required.append(f"ref_{m.reference(settings)}_logits")
    if m.band:
        required += ["forget_push", "forget_low", "forget_high", "forget_tail_low", "forget_tail_high"]
    if m.layer(settings) is not None:
        required = [k for k in required if k != "ref_retain_logits"] + [
            "forget_hidden",
            "retain_hidden",
            "ref_retain_hidden",
        ]
    missing = [key for key in required if getattr(x, key) is None]
    if missing:
        raise ValueError(f"this method with {settings} needs {', '.join(missing)}")


def unlearning_loss(
    name: str, settings: Settings | None = None, **inputs: Tensor | None
) -> tuple[Tensor, dict[str, float]]:
    """The scalar training loss of method `name` with its `settings` (its defaults when None) on the
    `LossInputs` fields given, and its detached parts (plus "loss") for logging."""
    m = method(name)
    settings = m.settings() if settings is None else settings
    x = LossInputs(**inputs)
    _check_inputs(m, x, settings)
    loss, parts = m.loss(x, settings)
    return loss, {"loss": loss.item(), **{key: value.item() for key, value in parts.items()}}
