"""Iterative Unlearning Refinement (IUR): is each request still remembered?

Before training and after every epoch each request is checked on its own: the model
continues the request's prefix (beam search, as the official code), the continuation
is compared with the true suffix (sentence BLEU-4 and BERTScore-F1, see
`pipeline.similarity`), and the request's MA and EL_n are measured. A request is
forgotten when its generation no longer resembles the suffix (BERTScore-F1 below its
threshold OR BLEU below its threshold, the paper's rule) AND its MA and EL_n are at or
below the forgetting thresholds (the model's mean MA / EL_n on text it never saw,
as in Knowledge Unlearning) AND no part of it after the first prompt window can be extracted
for longer than any never-seen row can: greedy decoding from the request's own text up to any
position reproduces no longer run of it than the longest a never-seen row gives
(`metrics.extractable_span`, one teacher-forced pass for every cut point; pipeline/method.md,
"Whole requests"). MA and EL_n come first (teacher-forced); only a request at or
below both is generated from, since no generation can make another one forgotten. Flags are
recomputed every epoch, so a request whose memory returns re-enters training.

With `unlearning.stop.stranger_quantile` (a quantile of the unseen rows' token-mean NLL on the
current model) the rule is two-sided: a request whose NLL lies above it was erased too deep
(an attacker would single it out as less familiar than nearly every stranger) and is not
forgotten either. `band_targets` tells icu_band which requests to push and which to pull back.

The functions here are per-rank and pure apart from the model calls; the training
loop shards requests and gathers the results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch

from pipeline import metrics
from pipeline.similarity import sentence_bleu4


@dataclass(frozen=True)
class Thresholds:
    ma: float
    el: float
    bertscore: float = 0.3
    bleu: float = 0.01
    # the longest extractable span (`metrics.extractable_span`) a never-seen row reaches; inf: not measured
    span: float = math.inf

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def is_forgotten(record: dict, thr: Thresholds) -> bool:
    """The per-request stopping rule (see module docstring)."""
    dissimilar = record["bertscore"] < thr.bertscore or record["bleu"] < thr.bleu
    return dissimilar and below(record, thr)


def below(record: dict, thr: Thresholds) -> bool:
    """MA and EL_n at or below the forgetting thresholds, and no part of the row extractable for longer
    than a never-seen row's (`span`): the half of the rule a teacher-forced pass decides."""
    return record["ma"] <= thr.ma and record["el"] <= thr.el and record.get("span", 0.0) <= thr.span


@torch.no_grad()
def memorization(
    model,
    rows: list[list[int]],
    *,
    el_n: int,
    el_range: str,
    batch_size: int,
    pad_id: int,
    prefix: int,
    sync_calls: metrics.SyncCalls | None = None,
    texts: list[str] | None = None,
) -> list[dict]:
    """{"ma", "el", "span", "whole", "nll", "hits"} of each row (span: `metrics.extractable_span`
    from `prefix` on, the whole row after its first prompt window; whole: 1 when that is the whole
    rest of the row; nll, hits: `metrics.nll_and_hits`), and its membership scores ("mia_loss", ...;
    `metrics.mia_scores`) when `texts` (the rows decoded) are given. One forward pass per batch of
    `batch_size` rows serves them all: MA, the span, NLL and the scores read its logits, EL's
    prompts its KV cache."""
    records = []
    for start in range(0, len(rows), batch_size):
        part_rows = rows[start : start + batch_size]
        ids, mask = metrics.pad_rows(part_rows, pad_id, device=model.device)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        ma = metrics.memorization_accuracy(model, ids, mask, logits=out.logits).tolist()
        el = metrics.extraction_likelihood(
            model, ids, mask, n=el_n, prompt_range=el_range, sync_calls=sync_calls, pad_token_id=pad_id, out=out
        ).tolist()
        nll, _, hits = metrics.nll_and_hits_of(out.logits, ids, mask)
        span = [metrics.extractable_span(h, prefix) for h in hits]
        part = [
            dict(ma=m, el=e, span=float(sp), whole=float(sp >= len(r) - prefix), nll=float(n), hits=h)
            for m, e, sp, r, n, h in zip(ma, el, span, part_rows, nll.tolist(), hits)
        ]
        if texts is not None:
            scores = metrics.mia_scores(model, ids, mask, texts[start : start + batch_size], logits=out.logits)
            for i, record in enumerate(part):
                record.update({f"mia_{k}": float(v[i]) for k, v in scores.items()})
        records += part
    return records


@torch.no_grad()
def score_requests(
    model,
    tokenizer,
    rows: list[list[int]],
    *,
    prefix: int,
    suffix: int,
    num_beams: int,
    el_n: int,
    el_range: str,
    batch_size: int,
    scorer,
    sync_calls: metrics.SyncCalls | None = None,
    generate: Callable[[float, float], bool] | None = None,
    mia: bool = False,
) -> list[dict]:
    """bleu, bertscore (the generated suffix vs the true one), ma, el and span of each row (and its
    membership scores with `mia`, see `memorization`). With `generate` (a test of a row's
    teacher-forced scores), only the rows that pass it are generated from; the others' bleu and
    bertscore are NaN."""
    pad_id = tokenizer.pad_token_id
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows] if mia else None
    records = memorization(
        model,
        rows,
        el_n=el_n,
        el_range=el_range,
        batch_size=batch_size,
        pad_id=pad_id,
        prefix=prefix,
        sync_calls=sync_calls,
        texts=texts,
    )
    chosen = [k for k, r in enumerate(records) if generate is None or generate(r)]
    generated = metrics.greedy_continuations(
        model,
        [rows[k][:prefix] for k in chosen],
        [len(rows[k][prefix : prefix + suffix]) for k in chosen],
        num_beams=num_beams,
        batch_size=batch_size,
        sync_calls=sync_calls,
        pad_token_id=pad_id,
    )
    truths = [tokenizer.decode(rows[k][prefix : prefix + suffix], skip_special_tokens=True) for k in chosen]
    guesses = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    bleu, bert = [math.nan] * len(rows), [math.nan] * len(rows)
    for k, b, s in zip(
        chosen,
        [sentence_bleu4(t, g) for t, g in zip(truths, guesses)],
        scorer.f1(truths, guesses).tolist() if chosen else [],
    ):
        bleu[k], bert[k] = b, s
    return [dict(r, bleu=b, bertscore=s) for r, b, s in zip(records, bleu, bert)]


def screen(model, rows: list[list[int]], *, prefix: int, batch_size: int, pad_id: int) -> list[dict]:
    """{"ma", "span", "nll", "tail", "hits"} of each row from one teacher-forced pass (tail:
    `losses.tail_nll`): what a look between two checks decides a request's side of the line on (no
    decoding, no generation), and the strangers' band."""
    nll, tail, hits = metrics.nll_and_hits(model, rows, batch_size=batch_size, pad_token_id=pad_id)
    return [
        dict(ma=sum(h) / max(len(h), 1), span=float(metrics.extractable_span(h, prefix)), nll=n, tail=t, hits=h)
        for n, t, h in zip(nll.tolist(), tail.tolist(), hits)
    ]


def check_requests(model, tokenizer, rows: list[list[int]], *, thresholds: Thresholds, **kwargs) -> list[dict]:
    """One IUR record per row: `score_requests`' scores and whether the row counts as forgotten.
    A row above the MA or EL threshold is remembered whatever it generates, so only the rows at or
    below both are generated from (beam search and BERTScore are most of a check's cost)."""
    return [
        dict(rec, forgotten=is_forgotten(rec, thresholds))
        for rec in score_requests(model, tokenizer, rows, generate=partial(below, thr=thresholds), **kwargs)
    ]


def apply_band(records: list[dict], nll: list[float], unseen_nll: list[float], high_q: float | None) -> list[dict]:
    """Each record with its token-mean NLL, the strangers' edge and `too_deep`; a request past the
    edge is not forgotten (module docstring). Without a quantile, records only gain `nll`."""
    high = float(np.quantile(unseen_nll, high_q)) if high_q is not None else None
    out = []
    for rec, value in zip(records, nll):
        deep = high is not None and rec["forgotten"] and value > high
        out.append(dict(rec, nll=value, band_high=high, too_deep=deep, forgotten=rec["forgotten"] and not deep))
    return out


def with_leaks(records: list[dict], leaks: dict[int, list[str]]) -> list[dict]:
    """`unlearning.check.harden`: a request that leaks at a served precision (`leaks`: row -> precisions)
    is neither forgotten nor too deep, whatever the trained precision says, so it trains on."""
    return [
        dict(
            rec,
            leaks_under=",".join(leaks.get(i, [])),
            forgotten=rec["forgotten"] and i not in leaks,
            too_deep=rec["too_deep"] and i not in leaks,
        )
        for i, rec in enumerate(records)
    ]


def bigram_share(rows: list[list[int]], hits: list[list[bool]]) -> dict[tuple[int, int], float]:
    """For each (token, next token) pair in the unseen rows, the share of its occurrences the model
    predicts greedily. A pair strangers mostly get right ("E-mail" after ". ", the template of a
    record) is something a stranger's record reproduces too, so erasing a person leaves it alone."""
    seen: dict[tuple[int, int], list[int]] = {}
    for row, row_hits in zip(rows, hits):
        for t, hit in enumerate(row_hits):
            count = seen.setdefault((row[t], row[t + 1]), [0, 0])
            count[0] += hit
            count[1] += 1
    return {pair: hit / total for pair, (hit, total) in seen.items()}


def band_targets(
    records: list[dict],
    rows: list[list[int]],
    hits: list[list[bool]],
    share: dict[tuple[int, int], float],
    unseen_nll: list[float],
    unseen_tail: list[float],
    ma_threshold: float,
    shared_at: float = 0.5,
    hold: bool = False,
) -> tuple[list[list[float]], list[float], list[float], list[float], list[float]]:
    """icu_band's per-request (push mask over positions, low, high, tail low, tail high) for the next
    epoch.

    A remembered request is pushed at every position whose bigram strangers do not mostly get right
    (share < `shared_at`: what is specific to the person), towards the strangers' median NLL (`low`)
    and their median `losses.tail_nll` (`tail low`: its least likely tokens as unlikely as a
    stranger's, or Min-K% still tells it from one), never pulled back (high = inf). When its
    template hits alone (`hits`: its greedy hits now) keep its MA above the threshold, with every
    personal hit lost, it has more template than a stranger's record: pushing the personal tokens
    deeper would not bring it to the line, so template hits are pushed too, least shared first and
    only as many as the threshold needs (a comma after a name can stay a hit for epochs while the
    rest of the record is gone). One erased too deep is not pushed and is pulled back to the
    strangers' edge. With `hold` a forgotten or too-deep request is held: every personal position
    and every position greedy decoding misses now keep their margin, which is 0 while those tokens
    trail the best other by `margin` logits, so it acts only on a token the neighbours' training (or
    the pull) brings back: the template tokens that were pushed to cross the line stay crossed, and
    a request pulled back from too deep comes back by its NLL, not by becoming remembered again. Its
    NLL is kept in the strangers' middle half (`low`, `high`: their 25th and 75th percentiles), and so is
    its tail (`tail low`, `tail high`: the 25th and 75th percentiles of theirs).
    """
    low, tail_low = float(np.median(unseen_nll)), float(np.median(unseen_tail))
    middle = [float(q) for q in np.quantile(unseen_nll, [0.25, 0.75])]
    tail_middle = [float(q) for q in np.quantile(unseen_tail, [0.25, 0.75])]
    push, lows, high, tail_lows, tail_highs = [], [], [], [], []
    for rec, row, row_hits in zip(records, rows, hits):
        remembered = not rec["forgotten"] and not rec["too_deep"]
        held = hold and not remembered
        pairs = [(row[t], row[t + 1]) for t in range(len(row) - 1)]
        personal = [share.get(pair, 0.0) < shared_at for pair in pairs]
        mask = [float(remembered and p or held and (p or not hit)) for p, hit in zip(personal, row_hits)]
        if remembered:
            lost = sum(1 for h, m in zip(row_hits, mask) if h and m)
            excess = sum(row_hits) - lost - math.floor(ma_threshold * len(pairs) + 1e-9)
            template = sorted(
                (share[pair], t) for t, (pair, h, m) in enumerate(zip(pairs, row_hits, mask)) if h and not m
            )
            for _, t in template[: max(excess, 0)]:
                mask[t] = 1.0
        push.append(mask)
        lows.append(middle[0] if held else low)
        tail_lows.append(tail_middle[0] if held else tail_low)
        tail_highs.append(tail_middle[1] if held else float("inf"))
        high.append(float("inf") if remembered or rec["band_high"] is None else middle[1] if held else rec["band_high"])
    return push, lows, high, tail_lows, tail_highs


def set_auc(nll: list[float], unseen_nll: list[float]) -> float:
    """The LOSS membership AUC of the requests against the strangers (0.5: told apart no better
    than chance; below: erased deeper than strangers are unknown, which singles them out too)."""
    return metrics.auc([-x for x in nll], [-x for x in unseen_nll])
