"""Iterative Unlearning Refinement (IUR): is each request still remembered?

Before training and after every epoch each request is checked on its own: the model
continues the request's prefix (beam search, as the official code), the continuation
is compared with the true suffix (sentence BLEU-4 and BERTScore-F1, see
`pipeline.similarity`), and the request's MA and EL_n are measured. A request is
forgotten when its generation no longer resembles the suffix (BERTScore-F1 below its
threshold OR BLEU below its threshold, the paper's rule) AND its MA and EL_n are at or
below the forgetting thresholds (the model's mean MA / EL_n on text it never saw,
as in Knowledge Unlearning). Flags are recomputed every epoch, so a request whose
memory returns re-enters training.

The functions here are per-rank and pure apart from the model calls; the training
loop shards requests and gathers the results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pipeline import metrics
from pipeline.similarity import sentence_bleu4


@dataclass(frozen=True)
class Thresholds:
    ma: float
    el: float
    bertscore: float = 0.3
    bleu: float = 0.01

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def is_forgotten(bleu: float, bertscore: float, ma: float, el: float, thr: Thresholds) -> bool:
    """The per-request stopping rule (see module docstring)."""
    dissimilar = bertscore < thr.bertscore or bleu < thr.bleu
    return dissimilar and ma <= thr.ma and el <= thr.el


@torch.no_grad()
def memorization(model, rows: list[list[int]], *, el_n: int, el_range: str, batch_size: int,
                 pad_id: int, sync_calls: metrics.SyncCalls | None = None) -> tuple[list[float], list[float]]:
    """(MA, EL_n) of each row, in batches of `batch_size` rows."""
    ma, el = [], []
    for start in range(0, len(rows), batch_size):
        ids, mask = metrics.pad_rows(rows[start:start + batch_size], pad_id, device=model.device)
        ma += metrics.memorization_accuracy(model, ids, mask).tolist()
        el += metrics.extraction_likelihood(model, ids, mask, n=el_n, prompt_range=el_range,
                                            sync_calls=sync_calls, pad_token_id=pad_id).tolist()
    return ma, el


@torch.no_grad()
def score_requests(model, tokenizer, rows: list[list[int]], *, prefix: int, suffix: int, num_beams: int,
                   el_n: int, el_range: str, batch_size: int, scorer,
                   sync_calls: metrics.SyncCalls | None = None) -> list[dict]:
    """bleu, bertscore (the generated suffix vs the true one), ma and el of each row."""
    pad_id = tokenizer.pad_token_id
    generated = metrics.greedy_continuations(
        model, [r[:prefix] for r in rows], [len(r[prefix:prefix + suffix]) for r in rows],
        num_beams=num_beams, batch_size=batch_size, sync_calls=sync_calls, pad_token_id=pad_id)
    truths = [tokenizer.decode(r[prefix:prefix + suffix], skip_special_tokens=True) for r in rows]
    guesses = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    bleu = [sentence_bleu4(t, g) for t, g in zip(truths, guesses)]
    bert = scorer.f1(truths, guesses).tolist() if rows else []
    ma, el = memorization(model, rows, el_n=el_n, el_range=el_range, batch_size=batch_size, pad_id=pad_id,
                          sync_calls=sync_calls)
    return [dict(bleu=b, bertscore=s, ma=m, el=e) for b, s, m, e in zip(bleu, bert, ma, el)]


def check_requests(model, tokenizer, rows: list[list[int]], *, thresholds: Thresholds, **kwargs) -> list[dict]:
    """One IUR record per row: `score_requests`' scores and whether the row counts as forgotten."""
    return [dict(rec, forgotten=is_forgotten(rec["bleu"], rec["bertscore"], rec["ma"], rec["el"], thresholds))
            for rec in score_requests(model, tokenizer, rows, **kwargs)]
