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

import torch

from pipeline import metrics


def longest_span(generated: Sequence[int], truth: Sequence[int]) -> int:
    """Length of the longest contiguous run of `truth` that appears in `generated`."""
    best, previous = 0, [0] * (len(truth) + 1)
    for g in generated:
        current = [0] * (len(truth) + 1)
        for j, t in enumerate(truth, start=1):
            if g == t:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def greedy_spans(model, rows: list[list[int]], cut: int, *, batch_size: int, pad_token_id: int) -> list[int]:
    """Greedy continuation of each row's first `cut` tokens to the row's length, scored by
    `longest_span` against the row's true rest."""
    gens = metrics.greedy_continuations(model, [r[:cut] for r in rows], [len(r) - cut for r in rows],
                                        batch_size=batch_size, pad_token_id=pad_token_id)
    return [longest_span(g, r[cut:]) for g, r in zip(gens, rows)]


def prompt_lengths(prefix: int, fractions: Sequence[float]) -> list[int]:
    """Prompt lengths for the given fractions of the prefix (at least one token each)."""
    return [max(1, round(prefix * f)) for f in fractions]


def _noise(seed: int, key: int, sample: int, step: int, vocab: int) -> torch.Tensor:
    """Gumbel noise for one (row, sample, step), a function of these numbers alone, so a row's
    samples do not depend on which rows share its batch."""
    digest = hashlib.sha256(f"{seed}:{key}:{sample}:{step}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    uniform = torch.rand(vocab, generator=gen, dtype=torch.float64).clamp(1e-300, 1.0)
    return -torch.log(-torch.log(uniform))


@torch.no_grad()
def sampled_continuations(model, prompts: Sequence[Sequence[int]], length: int, samples: int, *,
                          temperature: float = 1.0, seed: int = 0, keys: Sequence[int] | None = None,
                          batch_size: int = 16) -> list[list[list[int]]]:
    """`samples` continuations of `length` tokens per prompt, drawn from softmax(logits / T)
    (Gumbel-max: argmax of logits / T + Gumbel noise keyed by (seed, keys[i], sample, step)),
    no top-k / top-p. Prompts of one length share KV-cached batches without padding."""
    keys = list(range(len(prompts))) if keys is None else list(keys)
    jobs = [(i, s) for i in range(len(prompts)) for s in range(samples)]
    jobs.sort(key=lambda job: len(prompts[job[0]]))
    out: list[list[list[int]]] = [[[] for _ in range(samples)] for _ in prompts]
    batch: list[tuple[int, int]] = []
    for job in jobs + [None]:
        if batch and (job is None or len(batch) == batch_size or len(prompts[job[0]]) != len(prompts[batch[0][0]])):
            for (i, s), tokens in zip(batch, _sample_batch(model, [prompts[i] for i, _ in batch],
                                                           [(keys[i], s) for i, s in batch], length,
                                                           temperature, seed)):
                out[i][s] = tokens
            batch = []
        if job is not None:
            batch.append(job)
    return out


def _sample_batch(model, prompts: list[Sequence[int]], keys: list[tuple[int, int]], length: int,
                  temperature: float, seed: int) -> list[list[int]]:
    # each distinct prompt is run once and its KV cache shared by its samples
    distinct = {tuple(p): None for p in prompts}
    index = {p: k for k, p in enumerate(distinct)}
    out = model(input_ids=torch.tensor(list(distinct), device=model.device), use_cache=True)
    rows = torch.tensor([index[tuple(p)] for p in prompts], device=model.device)
    cache, logits = out.cache, out.logits[rows, -1]
    cache.reorder_cache(rows)
    tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(length):
        picks = [_pick(logits[i], temperature, seed, key, sample, step) for i, (key, sample) in enumerate(keys)]
        for row, tok in zip(tokens, picks):
            row.append(tok)
        if step + 1 < length:
            out = model(input_ids=torch.tensor(picks, device=model.device)[:, None], cache=cache,
                        use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
    return tokens


def _pick(logits: torch.Tensor, temperature: float, seed: int, key: int, sample: int, step: int) -> int:
    scores = logits.double().cpu() / temperature + _noise(seed, key, sample, step, logits.shape[-1])
    return int(scores.argmax())


def relearned_copy(model, rows: Sequence[Sequence[int]], *, steps: int, lr: float, batch_size: int,
                   pad_token_id: int, seed: int = 0) -> torch.nn.Module:
    """A copy of `model` after `steps` AdamW steps of next-token NLL on `rows` (batches drawn
    in a seeded order, cycling through the rows); `model` is unchanged."""
    tuned = copy.deepcopy(model).train().requires_grad_(True)
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
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
