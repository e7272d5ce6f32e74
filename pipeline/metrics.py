"""Evaluation metrics as pure functions of a causal LM and token ids (see pipeline/method.md, "Metrics").

Conventions shared by every function here:
- Batches are RIGHT-padded `input_ids` with an `attention_mask` marking real tokens; lists of
  token-id lists are padded here. Pad ids are never scored, so any valid id may fill them.
- The caller puts the model in eval mode (dropout would make greedy decoding random).
- `torch.no_grad`, not `inference_mode`: DeepSpeed ZeRO-3 gathers parameters in forward hooks,
  which fails on inference tensors.
- Greedy means plain argmax: no EOS stop, no repetition penalty or other processor from the
  model's `generation_config`. Batched, KV-cached generation equals the one-prompt-at-a-time
  definition except where two logits tie to float rounding (padding changes summation order).
"""

from __future__ import annotations

import math
import re
import string
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedModel

from pipeline.losses import MIN_K, tail_nll

PromptRange = Literal["icu", "ku"]
SyncCalls = Callable[[int], int]  # this rank's generate() call count -> the count every rank must make

# An id no vocabulary reaches: used as EOS/pad inside generate() so that generation never stops
# early and an EOS-like token is scored like any other.
_NEVER_GENERATED = 2**31 - 1
_PUNCTUATION = frozenset(string.punctuation)


# --- padding and batching -------------------------------------------------------------------


def pad_rows(
    seqs: Sequence[Sequence[int]], pad_token_id: int, left: bool = False, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for ragged sequences, padded on the left or the right.

    Empty rows become all-pad rows with a zero mask (width at least 1).
    """
    width = max([len(s) for s in seqs] + [1])
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


def _chunks(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def _unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]


# --- teacher-forced scoring -----------------------------------------------------------------


def _token_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits predicting each next token, the targets, and which targets are real tokens;
    `logits`: the model's logits for these ids, when a pass the caller made already has them.

    Upcast because bf16 log-softmax over a 50k+ vocabulary is too coarse for PPL and MIA.
    """
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if logits is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, :-1].float(), input_ids[:, 1:], attention_mask[:, 1:].bool()


def _token_nll(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of x_t given x_<t, shape [B, T-1] (0 on pads), and the valid mask."""
    logits, targets, valid = _token_logits(model, input_ids, attention_mask, logits)
    return _masked_nll(logits, targets, valid), valid


def _masked_nll(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").masked_fill(~valid, 0.0)


@torch.no_grad()
def memorization_accuracy(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, logits: torch.Tensor | None = None
) -> torch.Tensor:
    """MA per row: share of t in 1..T_i-1 with argmax p(.|x_<t) == x_t, from one forward pass
    (or the `logits` of one the caller made).

    Teacher forcing gives exactly the reference's 199 one-token generate() calls. Rows with
    fewer than two tokens score 0.
    """
    logits, targets, valid = _token_logits(model, input_ids, attention_mask, logits)
    hits = (logits.argmax(-1) == targets) & valid
    return (hits.sum(-1).double() / valid.sum(-1).clamp_min(1)).cpu()


# --- generation -----------------------------------------------------------------------------


def _generation_config(max_new_tokens: int, num_beams: int) -> GenerationConfig:
    """Pure greedy/beam decoding of exactly `max_new_tokens` tokens.

    generate() fills every field left None from the model's own generation_config, so each
    knob that could alter argmax decoding (sampling, penalties, EOS) is set explicitly.
    """
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_length=0,
        do_sample=False,
        num_beams=num_beams,
        num_return_sequences=1,
        length_penalty=1.0,
        early_stopping=False,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        use_cache=True,
        eos_token_id=_NEVER_GENERATED,
        pad_token_id=_NEVER_GENERATED,
    )


def _generation_batches(
    order: Sequence[int], lengths: Sequence[int], batch_size: int, same_length: bool
) -> Iterator[list[int]]:
    """Consecutive runs of `order`, cut at batch_size and, if asked, wherever the length changes."""
    batch: list[int] = []
    for k in order:
        if batch and (len(batch) == batch_size or (same_length and lengths[k] != lengths[batch[0]])):
            yield batch
            batch = []
        batch.append(k)
    if batch:
        yield batch


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    num_beams: int = 1,
    batch_size: int = 64,
    sync_calls: SyncCalls | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """Exactly lengths[k] greedy (or beam-search) tokens after each prompt, in input order.

    Jobs are sorted by (length, prompt length) and run in left-padded, KV-cached batches, so
    similar jobs share a generate() call and padding waste stays small. Greedy decoding is
    prefix-consistent, so a batch generates its longest length and shorter jobs are cut;
    beam search is not, so its batches hold one length only.
    Under ZeRO-3 every rank must make the same number of generate() calls, each with
    `synced_gpus=True` (its forwards gather the sharded weights collectively). The caller
    then passes `sync_calls`: given this rank's call count, it returns the largest over
    all ranks (an all-reduce the training loop owns); short ranks make 1-token dummy calls.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_continuations: every prompt needs at least one token")
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(
        (k for k, n in enumerate(lengths) if n > 0), key=lambda k: (lengths[k], len(prompts[k])), reverse=True
    )
    synced = sync_calls is not None
    groups = list(_generation_batches(order, lengths, batch_size, same_length=num_beams > 1))
    for group in groups:
        ids, mask = pad_rows([prompts[k] for k in group], pad_token_id, left=True, device=model.device)
        longest = max(lengths[k] for k in group)
        new = model.generate(
            input_ids=ids,
            attention_mask=mask,
            synced_gpus=synced,
            generation_config=_generation_config(longest, num_beams),
        )
        for k, row in zip(group, new[:, ids.shape[1] :].tolist()):
            out[k] = row[: lengths[k]]
    for _ in range(sync_calls(len(groups)) - len(groups) if synced else 0):
        ids, mask = pad_rows([[pad_token_id]], pad_token_id, device=model.device)
        model.generate(input_ids=ids, attention_mask=mask, synced_gpus=True, generation_config=_generation_config(1, 1))
    return out


# --- extraction likelihood ------------------------------------------------------------------


def el_prompt_lengths(seq_len: int, n: int, prompt_range: PromptRange) -> range:
    """Prompt lengths t scored by EL_n for a sequence of `seq_len` tokens.

    "ku": t = 1..T-1 (Knowledge Unlearning); "icu": t = round(0.75 T)..T-1 (the ICU code's
    150..199 at T=200), rounding halves up. Prompts whose true continuation has fewer than n
    tokens have no n-gram and are left out, so t stops at T-n.
    """
    if prompt_range not in ("icu", "ku"):
        raise ValueError(f"prompt_range must be 'icu' or 'ku', got {prompt_range!r}")
    start = 1 if prompt_range == "ku" else max(1, (3 * seq_len + 2) // 4)
    return range(start, seq_len - n + 1)


def _ngram_hit_rate(generated: Sequence[int], truth: Sequence[int], n: int) -> float:
    """Generated n-grams (with multiplicity) found in the SET of true n-grams, over the count of
    true n-grams: the Knowledge Unlearning code's definition, not a clipped BLEU precision."""
    true_grams = {tuple(truth[j : j + n]) for j in range(len(truth) - n + 1)}
    hits = sum(tuple(generated[j : j + n]) in true_grams for j in range(len(generated) - n + 1))
    return hits / (len(truth) - n + 1)


def extraction_likelihood(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n: int = 10,
    prompt_range: PromptRange = "icu",
    *,
    batch_size: int = 64,
    sync_calls: SyncCalls | None = None,
    pad_token_id: int = 0,
    out=None,
) -> torch.Tensor:
    """EL_n per row: mean over prompt lengths t of the n-gram hit rate of the greedy
    (T_i - t)-token continuation of x_<t against x_>=t (0.0 when no t qualifies).

    A row's prompts are prefixes of each other, so `prefix_continuations` prefills them
    all with one forward pass over the batch of rows (or reads `out`, see there).
    """
    rows = _unpad(input_ids, attention_mask)
    starts = [list(el_prompt_lengths(len(row), n, prompt_range)) for row in rows]
    conts, calls = prefix_continuations(model, rows, starts, batch_size=batch_size, pad_token_id=pad_token_id, out=out)
    scores = []
    for row, ts, gens in zip(rows, starts, conts):
        hits = [_ngram_hit_rate(gen, row[t:], n) for t, gen in zip(ts, gens)]
        scores.append(sum(hits) / len(hits) if hits else 0.0)
    if sync_calls is not None:
        _dummy_forwards(model, sync_calls(calls) - calls, pad_token_id)
    return torch.tensor(scores, dtype=torch.float64)


@torch.no_grad()
def prefix_continuations(
    model: PreTrainedModel,
    rows: Sequence[Sequence[int]],
    starts: Sequence[Sequence[int]],
    *,
    batch_size: int = 64,
    pad_token_id: int = 0,
    out=None,
) -> tuple[list[list[list[int]]], int]:
    """For each row r and t in starts[r], the greedy continuation of rows[r][:t] to the row's
    length; and the number of forward calls made. Equal to generating from each prompt on
    its own (up to float summation order), at a fraction of the cost:
    - one forward pass over the rows gives every prompt's first token (its logits at t-1)
      and its KV cache (the row's first t entries);
    - greedy decoding is deterministic, so when the first token of prompt t is the true
      x_t, prompt t continues exactly like prompt t+1: [x_t] + continuation(t+1). Only the
      other prompts are decoded (few of them on memorized text);
    - those decode in batches (across rows) laid out like left-padded generation: a
      prompt's cached entries end at the batch's longest prompt, the masked gap comes first
      (so sliding-window attention sees true distances), new tokens take positions t,
      t+1, ..., and a prompt leaves the batch once it has its T - t tokens.
    `out`: the model's output (logits and KV cache) for the whole rows, right-padded in one batch,
    when the caller made that pass anyway (MA reads the same logits): under causal attention its
    first t entries are prompt t's own, so the first pass is not made again (and not counted).
    """
    todo = [r for r, ts in enumerate(starts) if ts]
    if any(min(starts[r]) < 1 or max(starts[r]) >= len(rows[r]) for r in todo):
        raise ValueError("prefix_continuations: need 1 <= t < len(row) for every start")
    if not todo:
        return [[] for _ in rows], 0
    slot, calls = {r: r for r in todo}, 0
    if out is None:
        ids, mask = pad_rows([rows[r][: max(starts[r])] for r in todo], pad_token_id, device=model.device)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        slot, calls = {r: j for j, r in enumerate(todo)}, 1
    pred = out.logits.argmax(-1).tolist()
    first = {r: pred[slot[r]] for r in todo}
    cache = [(layer.keys, layer.values) for layer in out.cache.layers]
    chained = [(r, t) for r in todo for t in starts[r] if t + 1 in set(starts[r]) and first[r][t - 1] == rows[r][t]]
    jobs = sorted(
        {(r, t) for r in todo for t in starts[r]} - set(chained), key=lambda job: (len(rows[job[0]]) - job[1], job)
    )  # shortest first: batches shrink sooner
    conts = {}
    for batch in _chunks(jobs, batch_size):
        needs = [len(rows[r]) - t for r, t in batch]
        conts.update(
            zip(
                batch,
                _decode_batch(
                    model,
                    cache,
                    [slot[r] for r, _ in batch],
                    [t for _, t in batch],
                    [first[r][t - 1] for r, t in batch],
                    needs,
                ),
            )
        )
        calls += max(needs) - 1
    for r, t in sorted(chained, key=lambda job: -job[1]):
        conts[(r, t)] = [rows[r][t]] + conts[(r, t + 1)]
    return [[conts[(r, t)] for t in starts[r]] for r in range(len(rows))], calls


def _decode_batch(
    model: PreTrainedModel,
    cache: list[tuple[torch.Tensor, torch.Tensor]],
    slots: list[int],
    starts: list[int],
    firsts: list[int],
    needs: list[int],
) -> list[list[int]]:
    """needs[i] greedy tokens after prompt i: the first `starts[i]` cache entries of row `slots[i]`,
    whose next token is firsts[i]."""
    from transformers import DynamicCache

    device, width = model.device, max(starts)
    kv = DynamicCache()
    for i, (k, v) in enumerate(cache):
        kv.update(_left_aligned(k, slots, starts, width), _left_aligned(v, slots, starts, width), i)
    t = torch.tensor(starts, device=device)
    mask = (torch.arange(width, device=device) >= width - t[:, None]).long()
    tokens = [[f] for f in firsts]
    live = list(range(len(starts)))  # the prompts still in the cache, in cache order
    for step in range(1, max(needs)):
        keep = [j for j, i in enumerate(live) if len(tokens[i]) < needs[i]]
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            kv.batch_select_indices(index)
            mask, t, live = mask[index], t[index], [live[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        last = torch.tensor([tokens[i][-1] for i in live], device=device)[:, None]
        logits = model(
            input_ids=last, attention_mask=mask, position_ids=(t + step - 1)[:, None], cache=kv, use_cache=True
        ).logits
        for i, tok in zip(live, logits[:, -1].argmax(-1).tolist()):
            tokens[i].append(tok)
    return tokens


def _left_aligned(states: torch.Tensor, slots: list[int], starts: list[int], width: int) -> torch.Tensor:
    """[len(starts), heads, width, dim]: prompt i's first starts[i] entries of row slots[i], at the right end."""
    out = states.new_zeros(len(starts), states.shape[1], width, states.shape[3])
    for i, (row, t) in enumerate(zip(slots, starts)):
        out[i, :, width - t :] = states[row, :, :t]
    return out


def _dummy_forwards(model: PreTrainedModel, count: int, pad_token_id: int) -> None:
    """One-token forwards that keep this rank's ZeRO-3 parameter gathers in step with busier ranks."""
    for _ in range(count):
        model(input_ids=torch.tensor([[pad_token_id]], device=model.device))


# --- perplexity -----------------------------------------------------------------------------


@torch.no_grad()
def nll_and_hits(
    model: PreTrainedModel, rows: Sequence[Sequence[int]], *, batch_size: int = 8, pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[list[bool]]]:
    """From one forward pass per batch: each row's mean token NLL (float64 [N], as `sequence_losses`),
    its `losses.tail_nll` and, per position t = 0..len-2, whether the greedy prediction from x_<=t is
    x_{t+1} (the positions MA averages over). IUR needs them for the requests and the strangers at
    every check."""
    if any(len(r) < 2 for r in rows):
        raise ValueError("sequence losses: every row needs at least 2 tokens")
    losses, tails, hits = [], [], []
    for group in _chunks(range(len(rows)), batch_size):
        ids, mask = pad_rows([rows[k] for k in group], pad_token_id, left=False, device=model.device)
        nll, tail, row_hits = nll_and_hits_of(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        losses.append(nll)
        tails.append(tail)
        hits += row_hits
    empty = torch.empty(0, dtype=torch.float64)
    return (torch.cat(losses) if losses else empty), (torch.cat(tails) if tails else empty), hits


def nll_and_hits_of(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[list[bool]]]:
    """`nll_and_hits` of one right-padded batch, read off the logits of a pass already made."""
    logits, targets, valid = logits[:, :-1].float(), input_ids[:, 1:], attention_mask[:, 1:].bool()
    per_token = _masked_nll(logits, targets, valid)
    nll = per_token.sum(-1).double() / valid.sum(-1).clamp_min(1)
    correct = ((logits.argmax(-1) == targets) & valid).cpu()
    hits = [correct[i, :n].tolist() for i, n in enumerate(valid.sum(-1).tolist())]
    return nll.cpu(), tail_nll(per_token.double(), valid).cpu(), hits


def extractable_span(hits: Sequence[bool], prefix: int) -> int:
    """The longest run of a row's true tokens that greedy decoding reproduces when prompted with the
    row's own text up to any position from `prefix` on (`hits` as `nll_and_hits` gives them: hits[t]
    = the prediction from x_<=t is x_{t+1}). From the true text up to t, greedy decoding reproduces
    exactly the run of consecutive hits that starts at hits[t - 1], so one teacher-forced pass
    answers the question for every cut point of the row at once."""
    best = run = 0
    for hit in hits[max(prefix - 1, 0) :]:
        run = run + 1 if hit else 0
        best = max(best, run)
    return best


def sequence_losses(
    model: PreTrainedModel, rows: Sequence[Sequence[int]], *, batch_size: int = 8, pad_token_id: int = 0
) -> torch.Tensor:
    """Mean token NLL of each row (every row needs at least 2 tokens), float64 [N]."""
    return nll_and_hits(model, rows, batch_size=batch_size, pad_token_id=pad_token_id)[0]


# --- classification -------------------------------------------------------------------------


@torch.no_grad()
def _score_continuations(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of each continuation given its context, and whether every continuation token
    is the teacher-forced argmax (i.e. greedy decoding would reproduce it exactly).

    Rows that share a context (a question's answer options) read it from one pass: a 185-token
    question with five 10-token options costs 235 tokens instead of 975.
    """
    if any(len(c) == 0 for c in contexts) or any(len(c) == 0 for c in continuations):
        raise ValueError("contexts and continuations need at least one token each")
    nll_sum = torch.zeros(len(contexts), dtype=torch.float64)
    greedy = torch.zeros(len(contexts), dtype=torch.bool)
    sharing: dict[tuple[int, ...], list[int]] = {}
    for k, ctx in enumerate(contexts):
        sharing.setdefault(tuple(ctx), []).append(k)
    alone = [k for rows in sharing.values() if len(rows) == 1 for k in rows]
    seqs = {k: list(contexts[k]) + list(continuations[k]) for k in alone}
    for group in _chunks(sorted(alone, key=lambda k: len(seqs[k]), reverse=True), batch_size):
        ids, mask = pad_rows([seqs[k] for k in group], pad_token_id, left=False, device=model.device)
        logits, targets, _ = _token_logits(model, ids, mask)
        # target position p predicts token p+1: the continuation is predicted from len(ctx)-1 on
        pos = torch.arange(targets.shape[1], device=targets.device)
        first = torch.tensor([len(contexts[k]) - 1 for k in group], device=targets.device)
        end = torch.tensor([len(seqs[k]) - 1 for k in group], device=targets.device)
        span = (pos >= first[:, None]) & (pos < end[:, None])
        nll_sum[group], greedy[group] = _span_scores(logits, targets, span)
    for ctx, rows in sharing.items():
        if len(rows) > 1:
            for group in _chunks(rows, batch_size):
                logits, targets, span = _after_shared(model, ctx, [continuations[k] for k in group], pad_token_id)
                nll_sum[group], greedy[group] = _span_scores(logits, targets, span)
    return nll_sum, greedy


def _after_shared(
    model: PreTrainedModel, context: Sequence[int], continuations: list[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits predicting each continuation token, the tokens, which are real) for continuations
    of one context: the context once, with a KV cache every continuation then reads."""
    device = model.device
    out = model(input_ids=torch.tensor([list(context)], device=device), use_cache=True)
    ids, mask = pad_rows(continuations, pad_token_id, left=False, device=device)
    out.cache.reorder_cache(torch.zeros(len(continuations), dtype=torch.long, device=device))
    attend = torch.cat([mask.new_ones(len(continuations), len(context)), mask], dim=1)
    positions = (len(context) + torch.arange(ids.shape[1], device=device)).expand(len(continuations), -1)
    later = model(input_ids=ids, attention_mask=attend, position_ids=positions, cache=out.cache).logits
    first = out.logits[:, -1:].expand(len(continuations), -1, -1)
    return torch.cat([first, later[:, :-1]], dim=1).float(), ids, mask.bool()


def _span_scores(logits: torch.Tensor, targets: torch.Tensor, span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL over the span and whether every span token is the argmax, per row."""
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    hit = logits.argmax(-1) == targets
    return (nll.double() * span).sum(-1).cpu(), (hit | ~span).all(-1).cpu()


def continuation_nll(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    pad_token_id: int = 0,
) -> torch.Tensor:
    """Summed NLL (nats) of each continuation given its context, float64 [N]."""
    return _score_continuations(model, contexts, continuations, batch_size, pad_token_id)[0]


def multiple_choice_predictions(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    *,
    batch_size: int = 16,
    pad_token_id: int = 0,
) -> list[int]:
    """Index of the lowest summed-NLL choice per example (the first one on ties)."""
    flat_ctx = [ctx for ctx, opts in zip(contexts, choices) for _ in opts]
    flat_opt = [opt for opts in choices for opt in opts]
    nll = continuation_nll(model, flat_ctx, flat_opt, batch_size=batch_size, pad_token_id=pad_token_id).tolist()
    picks, start = [], 0
    for opts in choices:
        scores = nll[start : start + len(opts)]
        picks.append(scores.index(min(scores)))
        start += len(opts)
    return picks


def greedy_matches(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    pad_token_id: int = 0,
) -> torch.Tensor:
    """Whether the greedy len(target)-token continuation of each context equals its target.

    Greedy decoding reproduces the target iff each target token is the argmax given the
    context and the target tokens before it, so one teacher-forced pass decides it.
    """
    return _score_continuations(model, contexts, targets, batch_size, pad_token_id)[1]


# --- dialogue -------------------------------------------------------------------------------


def _normalize_answer(text: str) -> list[str]:
    """SQuAD/ParlAI normalisation (as in the Knowledge Unlearning code): lower-case, drop
    punctuation and the articles a/an/the, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def unigram_f1(prediction: str, reference: str) -> float:
    """Unigram F1 with multiset overlap; 0.0 when nothing overlaps (including both empty)."""
    pred, ref = _normalize_answer(prediction), _normalize_answer(reference)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# --- membership inference -------------------------------------------------------------------


@torch.no_grad()
def mia_scores(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    texts: Sequence[str],
    *,
    min_k: float = MIN_K,
    logits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Membership scores per row, every one oriented so that HIGHER = more likely a member.

    - "loss":  -mean token NLL (Yeom et al.).
    - "zlib":  -mean token NLL / len(zlib.compress(text.encode("utf-8"))) bytes (Carlini et
               al. 2021 divide the log-perplexity, i.e. the MEAN NLL, by the zlib length).
    - "min_k": mean log-prob of the max(1, floor(min_k * n)) least likely tokens (Min-K% Prob,
               Shi et al. 2024), n = number of predicted tokens of the row.
    `texts[i]` is the decoded text of row i (for the zlib length only). `logits`: the model's
    logits for these ids, when the caller's own pass has them.
    """
    nll, valid = _token_nll(model, input_ids, attention_mask, logits)
    count = valid.sum(-1)
    if bool((count == 0).any()):
        raise ValueError("mia_scores: every row needs at least 2 tokens")
    mean_nll = nll.sum(-1).double() / count
    zlib_len = torch.tensor(
        [len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float64, device=mean_nll.device
    )
    min_k_score = -tail_nll(nll.double(), valid, min_k)
    return {"loss": (-mean_nll).cpu(), "zlib": (-mean_nll / zlib_len).cpu(), "min_k": min_k_score.cpu()}


def auc(member_scores: Sequence[float] | torch.Tensor, nonmember_scores: Sequence[float] | torch.Tensor) -> float:
    """ROC AUC of separating members (higher scores) from non-members, exactly:
    P(member > non-member) + 1/2 P(tie), the Mann-Whitney U over all pairs."""
    members = torch.as_tensor(member_scores, dtype=torch.float64).flatten()
    others = torch.as_tensor(nonmember_scores, dtype=torch.float64).flatten().sort().values
    if members.numel() == 0 or others.numel() == 0:
        raise ValueError("auc: need at least one member and one non-member score")
    below = torch.searchsorted(others, members, right=False).sum().item()
    at_or_below = torch.searchsorted(others, members, right=True).sum().item()
    return (below + at_or_below) / (2 * members.numel() * others.numel())


def auc_se(member_scores: Sequence[float] | torch.Tensor, nonmember_scores: Sequence[float] | torch.Tensor) -> float:
    """DeLong's standard error of `auc`: from each row's placement (the share of the other group it
    beats, ties half), var(member placements)/m + var(non-member placements)/n. With 8 erased rows
    against 32 strangers it is about 0.1: the figure's precision, stated beside it."""
    members = torch.as_tensor(member_scores, dtype=torch.float64).flatten()
    others = torch.as_tensor(nonmember_scores, dtype=torch.float64).flatten()
    if members.numel() < 2 or others.numel() < 2:
        raise ValueError("auc_se: need at least two member and two non-member scores")
    beats = (members[:, None] > others[None, :]).double() + 0.5 * (members[:, None] == others[None, :]).double()
    return math.sqrt(beats.mean(1).var().item() / members.numel() + beats.mean(0).var().item() / others.numel())
