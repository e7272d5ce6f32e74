"""Extraction probes as pure functions of a causal LM and token ids (pipeline/method.md, "Audit").

Each probe asks a model for a request's text in a way serving could: greedy from the
exact prefix (also at the served precisions, `pipeline.quantize`), N samples at
temperature 1, greedy from a shorter prompt, greedy after a few fine-tuning steps on
retained text. Every probe is judged by one criterion, `longest_span`: the longest run of
consecutive true tokens the model reproduced; a row leaks when that run is at least the
audit's `leak_tokens`.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import torch

from pipeline import metrics


def longest_span(generated: Sequence[int], truth: Sequence[int]) -> int:
    """Length of the longest contiguous run of `truth` that appears in `generated`."""
    span = Span(truth)
    for token in generated:
        span.add(token)
    return span.best


class Span:
    """`longest_span` of a continuation that grows a token at a time, and whether it can still reach
    a given length: the runs of `truth` that end at the last token, one per end position."""

    def __init__(self, truth: Sequence[int]):
        self.truth, self.runs, self.best = list(truth), [0] * (len(truth) + 1), 0

    def add(self, token: int) -> None:
        runs = [0] * (len(self.truth) + 1)
        for j, t in enumerate(self.truth, start=1):
            if token == t:
                runs[j] = self.runs[j - 1] + 1
        self.runs, self.best = runs, max(self.best, max(runs))

    def open(self, settle: int | None, left: int) -> bool:
        """False once `left` more tokens cannot make a run of `settle` (None: never settled); a
        continuation that reached it stays open, so a leak's span is measured to the end."""
        return settle is None or self.best >= settle or max(self.runs) + left >= settle


def settled(tokens: Sequence[int], truth: Sequence[int], settle: int | None) -> list[int]:
    """The part of a continuation of len(truth) tokens that a decoder stopping as soon as it can no
    longer reproduce `settle` consecutive true tokens (`Span.open`) produces: all of it without `settle`."""
    span = Span(truth)
    for n, token in enumerate(tokens, start=1):
        span.add(token)
        if not span.open(settle, len(truth) - n):
            return list(tokens[:n])
    return list(tokens)


def greedy_spans(
    model,
    rows: list[list[int]],
    cut: int,
    *,
    batch_size: int,
    pad_token_id: int,
    settle: int | None = None,
    end: int | None = None,
) -> list[int]:
    """Per row, the longer of: the greedy continuation of its first `cut` tokens up to `end` (the
    row's end by default) scored by `longest_span` against the true text, and the longest run
    greedy decoding reproduces from the row's own text up to any later position
    (`metrics.extractable_span`): the whole row from `cut` on is checked."""
    found = greedy_continuations(
        model, rows, [cut], batch_size=batch_size, pad_token_id=pad_token_id, settle=settle, end=end, spans_from=cut
    )
    return [max(longest_span(g, r[cut:]), s) for g, r, s in zip(found.conts[cut], rows, found.spans)]


class Greedy(NamedTuple):
    conts: dict[int, list[list[int]]]  # {cut: each row's greedy continuation of its first `cut` tokens}
    ma: list[float]  # each row's memorization accuracy
    spans: list[int]  # each row's `metrics.extractable_span` from `spans_from` on (0 without it)


@torch.no_grad()
def greedy_continuations(
    model,
    rows: list[list[int]],
    cuts: Sequence[int],
    *,
    batch_size: int,
    pad_token_id: int,
    settle: int | None = None,
    end: int | None = None,
    spans_from: int | None = None,
) -> Greedy:
    """The greedy continuation of each row's first `cut` tokens up to `end` (the row's end by
    default) for every cut, each row's MA and, with `spans_from`, its extractable span from that
    position on, from one teacher-forced pass per batch of rows.

    Greedy decoding reproduces a row for as long as the teacher-forced argmax is the next true
    token, so that pass alone gives each continuation up to and including its first wrong token
    (a fully memorized row needs no decoding at all), its MA, and the run it reproduces from its
    own text up to any position (the span). Only the rest is decoded, from the pass's own KV cache
    with the row's later true tokens masked out and each continuation at its own positions: one
    prefill serves every cut. With `settle`, a continuation stops once it can no longer reproduce
    `settle` consecutive true tokens (`Span.open`): whether it leaks at that criterion is exact,
    and so is its span when it does; a shorter span is the longest found so far.
    """
    if any(c < 1 for c in cuts):
        raise ValueError(f"greedy_continuations: every cut needs at least one prompt token, got {list(cuts)}")
    conts: dict[int, list[list[int]]] = {c: [[] for _ in rows] for c in cuts}
    ma, spans = [0.0] * len(rows), [0] * len(rows)
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        ids, mask = metrics.pad_rows(part, pad_token_id, device=model.device)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        pred = out.logits.argmax(-1).tolist()  # pred[k][t] follows part[k][:t + 1]
        jobs: list[tuple[int, int, list[int]]] = []  # (row in part, cut, continuation so far)
        windows = [row[:end] for row in part]  # what each continuation reproduces, at most
        for k, row in enumerate(part):
            hits = [pred[k][t] == row[t + 1] for t in range(len(row) - 1)]
            ma[start + k] = sum(hits) / max(len(hits), 1)
            if spans_from is not None:
                spans[start + k] = metrics.extractable_span(hits, spans_from)
            window = windows[k]
            for c in cuts:
                d = 0
                while c + d < len(window) and hits[c + d - 1]:
                    d += 1
                known = settled(
                    window[c : c + d] + ([pred[k][c + d - 1]] if c + d < len(window) else []), window[c:], settle
                )
                conts[c][start + k] = known
                if len(known) < len(window) - c:
                    jobs.append((k, c, known))
        for (k, c, _), gen in zip(jobs, _decode_from_pass(model, out.cache, mask, windows, jobs, settle)):
            conts[c][start + k] = gen
    return Greedy(conts, ma, spans)


def _decode_from_pass(
    model, cache, mask: torch.Tensor, part: list[list[int]], jobs: list[tuple[int, int, list[int]]], settle: int | None
) -> list[list[int]]:
    """Each job's continuation decoded greedily to its row's end (or until settled). Job (k, c,
    known): row k's cached true tokens before c + len(known) - 1 are its context (the rest of the
    row is masked out), the last known token is fed at that position, and so on."""
    gens = [list(known) for _, _, known in jobs]
    need = [len(part[k]) - c for k, c, _ in jobs]
    spans = [Span(part[k][c:]) for k, c, _ in jobs]
    for span, gen in zip(spans, gens):
        for token in gen:
            span.add(token)
    alive = [j for j in range(len(jobs)) if spans[j].open(settle, need[j] - len(gens[j]))]
    if not alive:
        return gens
    device, width = model.device, mask.shape[1]
    context = torch.tensor([c + len(known) - 1 for _, c, known in jobs], device=device)[alive]
    cache.reorder_cache(torch.tensor([jobs[j][0] for j in alive], device=device))
    attend = (torch.arange(width, device=device)[None] < context[:, None]).long()
    step = 0
    while alive:
        attend = torch.cat([attend, attend.new_ones(len(alive), 1)], dim=1)
        tokens = torch.tensor([[gens[j][-1]] for j in alive], device=device)
        out = model(
            input_ids=tokens, attention_mask=attend, position_ids=(context + step)[:, None], cache=cache, use_cache=True
        )
        for j, token in zip(alive, out.logits[:, -1].argmax(-1).tolist()):
            gens[j].append(token)
            spans[j].add(token)
        step += 1
        keep = [
            i for i, j in enumerate(alive) if len(gens[j]) < need[j] and spans[j].open(settle, need[j] - len(gens[j]))
        ]
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=device, dtype=torch.long)
            out.cache.reorder_cache(index)
            attend, context, alive = attend[index], context[index], [alive[i] for i in keep]
        cache = out.cache
    return gens


def window_cuts(length: int, prefix: int, window: int) -> list[int]:
    """Where a row of `length` tokens is cut for probes that decode a `window` of tokens: every
    `window` tokens from `prefix` on, the last cut moved back so its window ends at the row's end.
    ceil((length - prefix) / window) cuts, whose windows cover every token after the first prompt."""
    if length <= prefix + window:
        return [prefix]
    cuts = list(range(prefix, length - window, window))
    return cuts + [length - window]


def prompt_lengths(prefix: int, fractions: Sequence[float]) -> list[int]:
    """Prompt lengths for the given fractions of the prefix (at least one token each)."""
    return [max(1, round(prefix * f)) for f in fractions]


def uniforms(seed: int, keys: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """One uniform in [0, 1) per (row key, sample, step), a function of these numbers alone, so
    a row's samples do not depend on which rows share its batch."""
    out = []
    for key, sample, step in keys:
        digest = hashlib.sha256(f"{seed}:{key}:{sample}:{step}".encode()).digest()
        out.append((int.from_bytes(digest[:8], "little") >> 11) / 2.0**53)
    return torch.tensor(out, dtype=torch.float64)


def pick(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws from softmax(logits / T), one per row of `logits` [n, V] and `u` [n]: the
    first token whose cumulative probability exceeds u (float64, no top-k / top-p)."""
    cdf = torch.softmax(logits.double().cpu() / temperature, -1).cumsum(-1)
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return tokens.clamp_max(logits.shape[-1] - 1)


@torch.no_grad()
def sampled_continuations(
    model,
    prompts: Sequence[Sequence[int]],
    length: int,
    samples: int,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    keys: Sequence[int] | None = None,
    batch_size: int = 16,
    truths: Sequence[Sequence[int]] | None = None,
    settle: int | None = None,
) -> list[list[list[int]]]:
    """`samples` continuations of `length` tokens per prompt, drawn from softmax(logits / T) with
    `pick` and the uniforms keyed by (seed, keys[i], sample, step). Jobs (prompt, sample) run
    `batch_size` at a time, prompts of one length per batch. With `settle` (and each prompt's true
    continuation in `truths`), a sample stops once it can no longer reproduce `settle` consecutive
    true tokens, as in `greedy_continuations`."""
    if settle is not None and truths is None:
        raise ValueError("sampled_continuations: settle needs the prompts' true continuations (truths)")
    keys = list(range(len(prompts))) if keys is None else list(keys)
    jobs = [(i, s) for i in range(len(prompts)) for s in range(samples)]
    jobs.sort(key=lambda job: len(prompts[job[0]]))
    out: list[list[list[int]]] = [[[] for _ in range(samples)] for _ in prompts]
    batch: list[tuple[int, int]] = []
    for job in jobs + [None]:
        if batch and (job is None or len(batch) == batch_size or len(prompts[job[0]]) != len(prompts[batch[0][0]])):
            spans = [Span(truths[i]) if truths is not None else Span([]) for i, _ in batch]
            for (i, s), tokens in zip(
                batch,
                _sample_batch(
                    model,
                    [prompts[i] for i, _ in batch],
                    [(keys[i], s) for i, s in batch],
                    length,
                    temperature,
                    seed,
                    spans,
                    settle,
                ),
            ):
                out[i][s] = tokens
            batch = []
        if job is not None:
            batch.append(job)
    return out


def _sample_batch(
    model,
    prompts: list[Sequence[int]],
    keys: list[tuple[int, int]],
    length: int,
    temperature: float,
    seed: int,
    spans: list[Span],
    settle: int | None,
) -> list[list[int]]:
    """Jobs with the same prompt and the same tokens so far have the same next-token
    distribution, so the model runs once per distinct history (a memorized row's samples
    agree for most of their length) and the KV cache holds one row per history."""
    distinct = {tuple(p): k for k, p in enumerate({tuple(p): None for p in prompts})}
    node = [distinct[tuple(p)] for p in prompts]  # each alive job's history
    out = model(input_ids=torch.tensor(list(distinct), device=model.device), use_cache=True)
    cache, logits = out.cache, out.logits[:, -1]
    tokens: list[list[int]] = [[] for _ in prompts]
    alive = list(range(len(prompts)))
    for step in range(length):
        u = uniforms(seed, [(*keys[j], step) for j in alive])
        picks = pick(logits[torch.tensor(node, device=logits.device)], temperature, u).tolist()
        for j, token in zip(alive, picks):
            tokens[j].append(token)
            spans[j].add(token)
        keep = [i for i, j in enumerate(alive) if spans[j].open(settle, length - step - 1)]
        if step + 1 == length or not keep:
            break
        node, picks, alive = [node[i] for i in keep], [picks[i] for i in keep], [alive[i] for i in keep]
        children = {(n, t): None for n, t in zip(node, picks)}
        index = {child: k for k, child in enumerate(children)}
        node = [index[(n, t)] for n, t in zip(node, picks)]
        cache.reorder_cache(torch.tensor([n for n, _ in children], device=model.device))
        out = model(
            input_ids=torch.tensor([[t] for _, t in children], device=model.device), cache=cache, use_cache=True
        )
        cache, logits = out.cache, out.logits[:, -1]
    return tokens


def relearned_copy(
    model, rows: Sequence[Sequence[int]], *, steps: int, lr: float, batch_size: int, pad_token_id: int, seed: int = 0
) -> torch.nn.Module:
    """A copy of `model` after `steps` AdamW steps of next-token NLL on `rows` (batches drawn
    in a seeded order, cycling through the rows); `model` is unchanged."""
    tuned = copy.deepcopy(model).train().requires_grad_(True)
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0, fused=tuned.device.type == "cpu" or None)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    for step in range(steps):
        pick = [order[(step * batch_size + j) % len(order)] for j in range(min(batch_size, len(order)))]
        ids, mask = metrics.pad_rows([rows[k] for k in pick], pad_token_id, device=tuned.device)
        labels = ids.masked_fill(mask == 0, -100)
        loss = tuned(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tuned.eval().requires_grad_(False)
