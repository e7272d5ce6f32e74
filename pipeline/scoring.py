"""Scoring units of examples with one model replica: what the evaluation's workers run.

The tasks of `pipeline.suites` are cut into units of UNIT_SIZE examples. A unit is the unit of
work of one replica and is always batched the same way, so per-sample results do not depend on
how many replicas ran (a Ray Data actor pool, `score_model`, or the ZeRO-3 ranks of
`pipeline.sharded_eval`) or on which one took it. Results are long-format rows (suite, task,
sample_id, metric, value). A request is named by its row in the run's accepted requests
(`model_spec(requests=...)`): its tokens never travel with a unit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import cluster, metrics, modeling
from pipeline.iur import memorization, score_requests
from pipeline.suites import SPEAKERS, Task

UNIT_SIZE = 16
REPLY_TOKENS = 32  # dialogue replies (pipeline/method.md)
COLUMNS = ["suite", "task", "sample_id", "metric", "value"]


@dataclass(frozen=True)
class Options:
    """How examples are scored; the same for every model of a run."""

    el_n: int = 10
    el_range: str = "icu"
    batch_size: int = 8
    prefix: int = 50
    suffix: int = 50
    num_beams: int = 2


def make_units(tasks: list[Task], unit_size: int = UNIT_SIZE) -> list[dict[str, Any]]:
    return [
        {"suite": t.suite, "task": t.name, "kind": t.kind, "examples": t.examples[s : s + unit_size]}
        for t in tasks
        for s in range(0, len(t.examples), unit_size)
    ]


class Scorer:
    """A model replica that scores units; the BERTScore encoder is loaded on first need (or given).
    `requests`: the accepted requests' token rows, which the forget units name by row."""

    def __init__(self, model, tokenizer, options: Options, bert=None, requests: list[list[int]] | None = None):
        self.model, self.tok, self.opt, self.requests = model, tokenizer, options, requests
        self._bert = bert

    @property
    def bert(self):
        if self._bert is None:
            from pipeline.similarity import BertScorer

            self._bert = BertScorer()
        return self._bert

    def score(self, unit: dict[str, Any]) -> list[dict[str, Any]]:
        values = getattr(self, f"_{unit['kind']}")(unit["examples"])
        return [
            {"suite": unit["suite"], "task": unit["task"], "sample_id": ex["id"], "metric": name, "value": float(v)}
            for ex, scores in zip(unit["examples"], values)
            for name, v in scores.items()
        ]

    @torch.no_grad()
    def _requests(self, examples: list[dict]) -> list[dict[str, float]]:
        """Erasure requests: IUR's scores (generation similarity, MA, EL, span) and membership scores."""
        o = self.opt
        return _scalars(
            score_requests(
                self.model,
                self.tok,
                [self.requests[ex["row"]] for ex in examples],
                prefix=o.prefix,
                suffix=o.suffix,
                num_beams=o.num_beams,
                el_n=o.el_n,
                el_range=o.el_range,
                batch_size=o.batch_size,
                scorer=self.bert,
                mia=True,
            )
        )

    def _memorization(self, examples: list[dict]) -> list[dict[str, float]]:
        """Unseen or kept text: MA, EL and span (the forgetting thresholds) and membership scores."""
        o, rows = self.opt, [ex["ids"] for ex in examples]
        return _scalars(
            memorization(
                self.model,
                rows,
                el_n=o.el_n,
                el_range=o.el_range,
                batch_size=o.batch_size,
                pad_id=self.tok.pad_token_id,
                prefix=o.prefix,
                texts=[self.tok.decode(r, skip_special_tokens=True) for r in rows],
            )
        )

    def _ppl(self, examples: list[dict]) -> list[dict[str, float]]:
        rows = [ex["ids"] for ex in examples]
        losses = metrics.sequence_losses(
            self.model, rows, batch_size=self.opt.batch_size, pad_token_id=self.tok.pad_token_id
        )
        return [{"loss": float(loss), "tokens": len(r) - 1} for loss, r in zip(losses, rows)]

    def _choice(self, examples: list[dict]) -> list[dict[str, float]]:
        picks = metrics.multiple_choice_predictions(
            self.model,
            [ex["context"] for ex in examples],
            [ex["choices"] for ex in examples],
            batch_size=self.opt.batch_size,
            pad_token_id=self.tok.pad_token_id,
        )
        return [{"correct": float(p == ex["label"])} for p, ex in zip(picks, examples)]

    def _lambada(self, examples: list[dict]) -> list[dict[str, float]]:
        hits = metrics.greedy_matches(
            self.model,
            [ex["context"] for ex in examples],
            [ex["target"] for ex in examples],
            batch_size=self.opt.batch_size,
            pad_token_id=self.tok.pad_token_id,
        )
        return [{"correct": float(h)} for h in hits]

    def _dialogue(self, examples: list[dict]) -> list[dict[str, float]]:
        replies = metrics.greedy_continuations(
            self.model,
            [ex["context"] for ex in examples],
            [REPLY_TOKENS] * len(examples),
            batch_size=self.opt.batch_size,
            pad_token_id=self.tok.pad_token_id,
        )
        return [
            {"f1": metrics.unigram_f1(cut_reply(self.tok.decode(r, skip_special_tokens=True)), ex["reference"])}
            for r, ex in zip(replies, examples)
        ]


def _scalars(records: list[dict]) -> list[dict[str, float]]:
    """The per-row scores the evaluation keeps (a row's per-position hits and its NLL, which the
    membership LOSS score already is, are the check's)."""
    return [{k: v for k, v in r.items() if k not in ("hits", "nll")} for r in records]


def cut_reply(text: str) -> str:
    """The generated reply up to the next speaker tag."""
    cut = min([i for i in (text.find(tag) for tag in SPEAKERS) if i >= 0] + [len(text)])
    return text[:cut].strip()


class EvalActor:
    """Ray Data `map_batches` callable: one replica; units (JSON) in, result rows (JSON) out."""

    def __init__(self, spec: dict[str, Any]):
        torch.set_num_threads(max(1, int(spec["cpus"])))  # Ray pins OMP threads to 1 otherwise
        self.scorer = _replica(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"rows": np.array([json.dumps(self.scorer.score(json.loads(u))) for u in batch["unit"]])}


def _replica(spec: dict[str, Any]) -> Scorer:
    model_dir = Path(spec["model_dir"])
    tok = modeling.load_tokenizer(model_dir, spec["trust_remote_code"])
    model = modeling.load_model(model_dir, spec["dtype"], spec["trust_remote_code"]).to(spec["device"])
    return Scorer(model, tok, Options(**spec["options"]), requests=request_rows(spec))


def request_rows(spec: dict[str, Any]) -> list[list[int]] | None:
    """The token rows of the requests file a spec names (`model_spec(requests=...)`), in its order."""
    if not spec.get("requests"):
        return None
    return [list(map(int, r)) for r in pd.read_parquet(spec["requests"], columns=["input_ids"])["input_ids"]]


def score_model(
    spec: dict[str, Any], units: list[dict[str, Any]], actors: int, use_ray: bool = True, desc: str = "evaluating"
) -> pd.DataFrame:
    """Score every unit with the model of `spec` on `actors` replicas (or in this process)."""
    bar = cluster.Progress(desc, len(units), "units")
    rows = []
    if not use_ray:
        scorer = _replica(spec)
        for unit in units:
            rows += scorer.score(unit)
            bar.update()
    else:
        for batch in cluster.actor_pool_map(
            EvalActor,
            spec,
            [{"unit": json.dumps(u)} for u in units],
            actors,
            spec["cpus"],
            1 if spec["device"] == "cuda" else 0,
        ):
            for chunk in batch["rows"]:
                rows += json.loads(chunk)
                bar.update()
    bar.close()
    return rows_frame(rows)


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Result rows as the long-format frame, in a fixed order."""
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.sort_values(["suite", "task", "sample_id", "metric"], kind="stable", ignore_index=True)


def model_spec(
    model_dir: str | Path,
    options: Options,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    cpus: float = 1.0,
    use_gpu: bool = False,
    requests: str | Path | None = None,
) -> dict[str, Any]:
    """What a replica needs; `requests`: a parquet file of the requests' `input_ids` (the run's accepted
    requests), which the forget units name by row."""
    return {
        "model_dir": str(model_dir),
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "cpus": cpus,
        "device": "cuda" if use_gpu else "cpu",
        "options": options.__dict__,
        "requests": None if requests is None else str(requests),
    }
