"""Score a model folder on the evaluation suites, data-parallel over model replicas.

The tasks of `pipeline.suites` are cut into units of UNIT_SIZE examples. A unit is the
unit of work of one replica and is always batched the same way, so per-sample results
do not depend on how many replicas ran (Ray Data actor pool) or on which one took it.
Results are long-format rows (suite, task, sample_id, metric, value); `summarize`
turns them into the paper's table numbers.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import cluster, metrics, modeling
from pipeline.atomic import atomic_write_json, write_parquet
from pipeline.iur import memorization, score_requests
from pipeline.store import RunStore, fingerprint, frame_once
from pipeline.suites import SPEAKERS, Task

log = logging.getLogger("icu.evaluate")
UNIT_SIZE = 16
REPLY_TOKENS = 32  # dialogue replies (pipeline/method.md)
COLUMNS = ["suite", "task", "sample_id", "metric", "value"]
OUTPUTS = ("metrics", "per_sample", "report")


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
    return [{"suite": t.suite, "task": t.name, "kind": t.kind, "examples": t.examples[s:s + unit_size]}
            for t in tasks for s in range(0, len(t.examples), unit_size)]


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
        return [{"suite": unit["suite"], "task": unit["task"], "sample_id": ex["id"], "metric": name,
                 "value": float(v)}
                for ex, scores in zip(unit["examples"], values) for name, v in scores.items()]

    @torch.no_grad()
    def _requests(self, examples: list[dict]) -> list[dict[str, float]]:
        """Erasure requests: IUR's scores (generation similarity, MA, EL, span) and membership scores."""
        o = self.opt
        return _scalars(score_requests(
            self.model, self.tok, [self.requests[ex["row"]] for ex in examples], prefix=o.prefix, suffix=o.suffix,
            num_beams=o.num_beams, el_n=o.el_n, el_range=o.el_range, batch_size=o.batch_size, scorer=self.bert, mia=True))

    def _memorization(self, examples: list[dict]) -> list[dict[str, float]]:
        """Unseen or kept text: MA, EL and span (the forgetting thresholds) and membership scores."""
        o, rows = self.opt, [ex["ids"] for ex in examples]
        return _scalars(memorization(self.model, rows, el_n=o.el_n, el_range=o.el_range, batch_size=o.batch_size,
                                     pad_id=self.tok.pad_token_id, prefix=o.prefix,
                                     texts=[self.tok.decode(r, skip_special_tokens=True) for r in rows]))

    def _ppl(self, examples: list[dict]) -> list[dict[str, float]]:
        rows = [ex["ids"] for ex in examples]
        losses = metrics.sequence_losses(self.model, rows, batch_size=self.opt.batch_size,
                                         pad_token_id=self.tok.pad_token_id)
        return [{"loss": float(loss), "tokens": len(r) - 1} for loss, r in zip(losses, rows)]

    def _choice(self, examples: list[dict]) -> list[dict[str, float]]:
        picks = metrics.multiple_choice_predictions(
            self.model, [ex["context"] for ex in examples], [ex["choices"] for ex in examples],
            batch_size=self.opt.batch_size, pad_token_id=self.tok.pad_token_id)
        return [{"correct": float(p == ex["label"])} for p, ex in zip(picks, examples)]

    def _lambada(self, examples: list[dict]) -> list[dict[str, float]]:
        hits = metrics.greedy_matches(self.model, [ex["context"] for ex in examples],
                                      [ex["target"] for ex in examples], batch_size=self.opt.batch_size,
                                      pad_token_id=self.tok.pad_token_id)
        return [{"correct": float(h)} for h in hits]

    def _dialogue(self, examples: list[dict]) -> list[dict[str, float]]:
        replies = metrics.greedy_continuations(
            self.model, [ex["context"] for ex in examples], [REPLY_TOKENS] * len(examples),
            batch_size=self.opt.batch_size, pad_token_id=self.tok.pad_token_id)
        return [{"f1": metrics.unigram_f1(cut_reply(self.tok.decode(r, skip_special_tokens=True)), ex["reference"])}
                for r, ex in zip(replies, examples)]


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


def score_model(spec: dict[str, Any], units: list[dict[str, Any]], actors: int, use_ray: bool = True,
                desc: str = "evaluating") -> pd.DataFrame:
    """Score every unit with the model of `spec` on `actors` replicas (or in this process)."""
    bar = cluster.Progress(desc, len(units), "units")
    rows = []
    if not use_ray:
        scorer = _replica(spec)
        for unit in units:
            rows += scorer.score(unit)
            bar.update()
    else:
        for batch in cluster.actor_pool_map(EvalActor, spec, [{"unit": json.dumps(u)} for u in units], actors,
                                            spec["cpus"], 1 if spec["device"] == "cuda" else 0):
            for chunk in batch["rows"]:
                rows += json.loads(chunk)
                bar.update()
    bar.close()
    return rows_frame(rows)


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Result rows as the long-format frame, in a fixed order."""
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.sort_values(["suite", "task", "sample_id", "metric"], kind="stable", ignore_index=True)


def sharded(cfg, model_dir: Path) -> bool:
    """Whether a model is scored on ZeRO-3 workers (`evaluation.sharded`; auto: when one whole
    copy is larger than a worker holds, modeling.REPLICA_MAX_BYTES)."""
    mode = cfg.evaluation.sharded
    return mode == "always" or mode == "auto" and modeling.replica_bytes(
        model_dir, cfg.model.dtype, cfg.model.trust_remote_code) > modeling.REPLICA_MAX_BYTES


def model_spec(model_dir: str | Path, options: Options, *, dtype: str = "auto", trust_remote_code: bool = False,
               cpus: float = 1.0, use_gpu: bool = False, requests: str | Path | None = None) -> dict[str, Any]:
    """What a replica needs; `requests`: a parquet file of the requests' `input_ids` (the run's accepted
    requests), which the forget units name by row."""
    return {"model_dir": str(model_dir), "dtype": dtype, "trust_remote_code": trust_remote_code, "cpus": cpus,
            "device": "cuda" if use_gpu else "cpu", "options": options.__dict__,
            "requests": None if requests is None else str(requests)}


# --- aggregation -----------------------------------------------------------------------------

def summarize(frame: pd.DataFrame, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """The paper's table numbers for one model (percentages where the paper uses them).

    A forget row counts as below the thresholds when its MA and EL are at most the
    unseen-set means and no part of it is extractable for longer than a never-seen row
    (`thresholds` {"ma", "el", "span"}; the unlearning run's, or this model's). `whole`: the share
    of rows reproduced whole from their first prompt window on.
    """
    out: dict[str, Any] = {}
    by = {k: g for k, g in frame.groupby("task")}

    def mean(task: str, metric: str) -> float:
        values = by[task][by[task]["metric"] == metric]["value"]
        return float(values.mean())

    def means(task: str, names: tuple[str, ...]) -> dict[str, float]:
        return {m: mean(task, m) for m in names if (by[task]["metric"] == m).any()}

    if "forget" in by:
        out["forget"] = means("forget", ("el", "ma", "bertscore", "bleu", "span", "whole"))
        if thresholds:
            wide = by["forget"].pivot(index="sample_id", columns="metric", values="value")
            below = (wide["ma"] <= thresholds["ma"]) & (wide["el"] <= thresholds["el"])
            if "span" in wide:
                below &= wide["span"] <= thresholds.get("span", math.inf)
            out["forget"].update(below_thresholds=int(below.sum()), requests=int(len(wide)))
    if "pile_unseen" in by:
        out["unseen"] = means("pile_unseen", ("el", "ma", "span"))
        if "span" in out["unseen"]:
            out["unseen"]["span_max"] = float(by["pile_unseen"].query("metric == 'span'")["value"].max())
    if "keep" in by:
        out["keep"] = means("keep", ("el", "ma", "span", "whole"))
    if "forget" in by and "pile_unseen" in by:
        scores = {k: (_values(by["forget"], f"mia_{k}"), _values(by["pile_unseen"], f"mia_{k}"))
                  for k in ("loss", "zlib", "min_k")}
        out["mia_auc"] = {k: metrics.auc(*pair) for k, pair in scores.items()}
        out["mia_auc_se"] = {k: metrics.auc_se(*pair) for k, pair in scores.items() if min(map(len, pair)) >= 2}
    ppl = {t: _perplexity(g) for t, g in by.items() if t in ("pile", "wikitext")}
    if ppl:
        out["ppl"] = ppl
    for suite, metric in (("classification", "correct"), ("dialogue", "f1")):
        tasks = sorted(frame[frame["suite"] == suite]["task"].unique())
        if tasks:
            scores = {t: 100 * mean(t, metric) for t in tasks}
            out[suite] = dict(scores, average=float(np.mean(list(scores.values()))))
    return out


def privleak(unlearned: dict[str, Any], retrained: dict[str, Any]) -> dict[str, float]:
    """MUSE's PrivLeak per membership score: (AUC_unlearned - AUC_retrained) / AUC_retrained, the AUCs
    of the requests against the same never-seen rows. 0: the requests look to the unlearned model as
    they do to one that never saw them; negative: erased deeper than that (itself detectable)."""
    return {k: (unlearned["mia_auc"][k] - auc) / auc for k, auc in retrained["mia_auc"].items() if auc > 0}


def paired_change(before: pd.DataFrame, after: pd.DataFrame, suite: str, metric: str) -> dict[str, float] | None:
    """The change of a suite's task-averaged score (x100) from `before` to `after` on the same examples,
    with its standard error: per task, the mean and variance of the per-example differences; tasks
    weigh equally. Pairing is what makes a 2-point change measurable with a few dozen examples per
    task: only the examples whose answer flipped add variance."""
    def scores(frame: pd.DataFrame) -> pd.Series:
        rows = frame[(frame["suite"] == suite) & (frame["metric"] == metric)]
        return rows.set_index(["task", "sample_id"])["value"]

    diff = (scores(after) - scores(before)).dropna()
    if diff.empty:
        return None
    by_task = diff.groupby(level="task")
    means, variances, counts = by_task.mean(), by_task.var(ddof=1).fillna(0.0), by_task.size()
    se = math.sqrt(float((variances / counts).sum())) / len(means)
    return {"change": 100 * float(means.mean()), "se": 100 * se, "examples": int(counts.sum()), "tasks": len(means)}


def _values(group: pd.DataFrame, metric: str) -> list[float]:
    return group[group["metric"] == metric].sort_values("sample_id")["value"].tolist()


def _perplexity(group: pd.DataFrame) -> float:
    """exp of the mean chunk loss (pipeline/method.md), chunks weighted equally."""
    return math.exp(group[group["metric"] == "loss"]["value"].mean())


# --- the stage -------------------------------------------------------------------------------

def options(cfg) -> Options:
    e, r = cfg.evaluation, cfg.requests
    return Options(el_n=e.el_n, el_range=e.el_range, batch_size=e.batch_size, prefix=r.prefix_tokens,
                   suffix=r.suffix_tokens, num_beams=cfg.unlearning.num_beams)


def key(cfg, store: RunStore) -> str:
    """The evaluation settings and the unlearned model itself (the unlearn stage's recorded outputs,
    so scores kept from an earlier attempt are never reused for a retrained model)."""
    return fingerprint("evaluate", "whole rows", cfg.part("model", "requests", "evaluation"), cfg.max_tokens,
                       cfg.unlearning.num_beams,
                       store.key_of("ingest"), store.key_of("unlearn"), store.outputs_of("unlearn"))


def _tasks(cfg, tok, accepted: pd.DataFrame | None, keep: bool = True) -> list[Task]:
    """The suites' tasks, rows cut to the run's request length (the one the thresholds use)."""
    from pipeline import suites

    e, r = cfg.evaluation, cfg.requests
    return suites.build_tasks(
        e.suites, e.data_dir, tok, forget_rows=None if accepted is None else [list(map(int, x)) for x in
                                                                             accepted["input_ids"]],
        forget_ids=None if accepted is None else accepted["id"].tolist(), max_tokens=cfg.max_tokens,
        min_tokens=r.prefix_tokens + r.suffix_tokens, ppl_chunk=e.ppl_chunk, caps=e.max_samples,
        unseen_path=e.unseen_path, keep_path=e.keep_path if keep else None)


def run(cfg, store: RunStore) -> dict[str, Any]:
    """Before/after evaluation of a run: `metrics`, `per_sample`, `report` (+ plots).

    Each model's scores are kept in `eval_partial` once complete, so a stopped stage
    resumes with the model it had not finished.
    """
    from pipeline import report, sharded_eval

    accepted = pd.read_parquet(store.artefact("accepted"), columns=["id", "input_ids"])
    tok = modeling.load_tokenizer(cfg.model_dir, cfg.model.trust_remote_code)
    units = make_units(_tasks(cfg, tok, accepted))
    models = {"original": cfg.model_dir, "unlearned": store.artefact("unlearned_model")}
    # The original's scores do not depend on how it was unlearned: runs that differ only in
    # `unlearning` (e.g. bench/compare_methods.py) can share them; nor do the reference's.
    alone = fingerprint("evaluate-original", "whole rows", cfg.part("model", "requests", "evaluation"), cfg.max_tokens,
                        cfg.unlearning.num_beams, store.key_of("ingest"))
    keys = {"original": alone, "unlearned": key(cfg, store)}
    work = {"original": units, "unlearned": units}
    if cfg.evaluation.reference_model:  # only what PrivLeak and the kept rows' ceiling read
        models["retrained"], keys["retrained"] = Path(cfg.evaluation.reference_model), fingerprint("reference", alone)
        work["retrained"] = [u for u in units if u["suite"] in ("forget", "unseen", "keep")]
    frames = {}
    for label, model_dir in models.items():
        spec = model_spec(model_dir, options(cfg), dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                          cpus=cfg.resources.cpus_per_worker, use_gpu=cfg.resources.use_gpu,
                          requests=store.artefact("accepted"))
        frames[label] = frame_once(store.artefact("eval_partial"), keys[label], label, lambda: (
            sharded_eval.score(cfg, store, spec, work[label], label) if sharded(cfg, Path(model_dir)) else
            score_model(spec, work[label], cfg.resources.eval_actors, cluster.use_ray(cfg),
                        desc=f"evaluate: the {label} model")))
    unlearn = json.loads(store.artefact("unlearn_result").read_text())
    unseen = summarize(frames["original"]).get("unseen")
    thresholds = unlearn.get("thresholds") or unseen and dict(ma=unseen["ma"], el=unseen["el"],
                                                              span=unseen.get("span_max", math.inf))
    summaries = {label: summarize(frame, thresholds) for label, frame in frames.items()}
    if "retrained" in summaries:
        summaries["unlearned"]["privleak"] = privleak(summaries["unlearned"], summaries["retrained"])
    results = {
        "thresholds": thresholds,
        "models": summaries,
        "paired_change": {suite: change for suite, metric in (("classification", "correct"), ("dialogue", "f1"))
                          if (change := paired_change(frames["original"], frames["unlearned"], suite, metric))},
        "unlearn": {k: unlearn[k] for k in ("method", "epochs", "stop_reason", "forgotten", "requests",
                                            "neighbour_ma", "set_auc") if k in unlearn},
    }
    samples = pd.concat([f.assign(model=label) for label, f in frames.items()], ignore_index=True)
    write_parquet(samples, store.artefact("per_sample"))
    atomic_write_json(store.artefact("metrics"), results)
    report.write_report(store.artefact("report").parent, results, samples,
                        (store.artefact("history"), store.artefact("epochs")))
    log.info("evaluate: report at %s", store.artefact("report"))
    return report.headline(results)


def evaluate_folder(model_dir: Path, cfg, out: Path) -> dict[str, Any]:
    """Evaluate one model folder on its own (no run): metrics.json, per_sample.parquet, report.md."""
    from pipeline import report

    tok = modeling.load_tokenizer(model_dir, cfg.model.trust_remote_code)
    frame = score_model(model_spec(model_dir, options(cfg), dtype=cfg.model.dtype,
                                   trust_remote_code=cfg.model.trust_remote_code, cpus=cfg.resources.cpus_per_worker,
                                   use_gpu=cfg.resources.use_gpu), make_units(_tasks(cfg, tok, None, keep=False)),
                        cfg.resources.eval_actors, cluster.use_ray(cfg))
    results = {"thresholds": None, "models": {model_dir.name: summarize(frame)}, "unlearn": {}}
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(frame.assign(model=model_dir.name), out / "per_sample.parquet")
    atomic_write_json(out / "metrics.json", results)
    report.write_report(out, results, frame.assign(model=model_dir.name))
    return results
