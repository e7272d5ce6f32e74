"""The evaluate stage: the original and the unlearned model (and the retrained reference) on the
evaluation suites, before / after, with the paper's table (`summarize`) and the report.

Each model is scored on a Ray Data pool of whole replicas (`pipeline.scoring.score_model`), or on
the ZeRO-3 ranks when one replica does not fit a worker (`pipeline.sharded_eval`); both run the
same `Scorer` on the same units.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import cluster, ledger, metrics, modeling, report, sharded_eval, suites
from pipeline.atomic import atomic_write_json, write_parquet
from pipeline.scoring import Options, make_units, model_spec, score_model
from pipeline.store import RunStore, fingerprint, frame_once

log = logging.getLogger("icu.evaluate")
OUTPUTS = ("metrics", "per_sample", "report")


def sharded(cfg, model_dir: Path) -> bool:
    """Whether a model is scored on ZeRO-3 workers (`evaluation.sharded`; auto: when one whole
    copy is larger than a worker holds, modeling.REPLICA_MAX_BYTES)."""
    mode = cfg.evaluation.sharded
    return (
        mode == "always"
        or mode == "auto"
        and modeling.replica_bytes(model_dir, cfg.model.dtype, cfg.model.trust_remote_code) > modeling.REPLICA_MAX_BYTES
    )


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
        scores = {
            k: (_values(by["forget"], f"mia_{k}"), _values(by["pile_unseen"], f"mia_{k}"))
            for k in ("loss", "zlib", "min_k")
        }
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


# what the retrained reference is scored on: what PrivLeak reads (forget, unseen) and the ceilings of
# what unlearning can keep (the kept rows, perplexity)
REFERENCE_SUITES = ("forget", "unseen", "keep", "ppl")


def options(cfg) -> Options:
    e, r = cfg.evaluation, cfg.requests
    return Options(
        el_n=e.el_n,
        el_range=e.el_range,
        batch_size=e.batch_size,
        prefix=r.prefix_tokens,
        suffix=r.suffix_tokens,
        num_beams=cfg.unlearning.check.num_beams,
    )


def spec(cfg, model_dir, requests=None) -> dict[str, Any]:
    """What an evaluation replica of `model_dir` needs, from the run's config."""
    return model_spec(
        model_dir,
        options(cfg),
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        cpus=cfg.resources.cpus_per_worker,
        use_gpu=cfg.resources.use_gpu,
        requests=requests,
    )


def key(cfg, store: RunStore) -> str:
    """The evaluation settings and the unlearned model itself (the unlearn stage's recorded outputs,
    so scores kept from an earlier attempt are never reused for a retrained model)."""
    return fingerprint("evaluate", *_scoring(cfg, store), store.key_of("unlearn"), store.outputs_of("unlearn"))


def _scoring(cfg, store: RunStore) -> list:
    """What every model's scores read: the settings, the request length and the accepted requests."""
    return [
        "whole rows",
        cfg.part("model", "requests", "evaluation"),
        cfg.max_tokens,
        cfg.unlearning.check.num_beams,
        store.key_of("ingest"),
    ]


def _tasks(cfg, tok, accepted: pd.DataFrame | None, keep: bool = True) -> list[suites.Task]:
    """The suites' tasks, rows cut to the run's request length (the one the thresholds use)."""
    e, r = cfg.evaluation, cfg.requests
    return suites.build_tasks(
        e.suites,
        e.data_dir,
        tok,
        forget_rows=None if accepted is None else [list(map(int, x)) for x in accepted["input_ids"]],
        forget_ids=None if accepted is None else accepted["id"].tolist(),
        max_tokens=cfg.max_tokens,
        min_tokens=r.prefix_tokens + r.suffix_tokens,
        ppl_chunk=e.ppl_chunk,
        caps=e.max_samples,
        unseen_path=e.unseen_path,
        keep_path=e.keep_path if keep else None,
    )


def run(cfg, store: RunStore) -> dict[str, Any]:
    """Before/after evaluation of a run: `metrics`, `per_sample`, `report` (+ plots).

    Each model's scores are kept in `eval_partial` once complete, so a stopped stage
    resumes with the model it had not finished.
    """
    accepted = pd.read_parquet(store.artefact("accepted"), columns=["id", "input_ids"])
    tok = modeling.load_tokenizer(cfg.model_dir, cfg.model.trust_remote_code)
    units = make_units(_tasks(cfg, tok, accepted))
    models = {"original": cfg.model_dir, "unlearned": store.artefact("unlearned_model")}
    # The original's scores do not depend on how it was unlearned: runs that differ only in
    # `unlearning` (e.g. bench/compare_methods.py) can share them; nor do the reference's.
    alone = fingerprint("evaluate-original", *_scoring(cfg, store))
    keys = {"original": alone, "unlearned": key(cfg, store)}
    work = {"original": units, "unlearned": units}
    if cfg.evaluation.reference_model:
        models["retrained"] = Path(cfg.evaluation.reference_model)
        keys["retrained"] = fingerprint("reference", REFERENCE_SUITES, alone)
        work["retrained"] = [u for u in units if u["suite"] in REFERENCE_SUITES]
    first = ledger.first_original(ledger.run_chain(store))
    if first is not None:  # a chained run: drift is measured against the ledger's first original too
        models["first_original"], keys["first_original"] = first, fingerprint("first original", alone)
        work["first_original"] = units
    frames = {}
    for label, model_dir in models.items():
        replica = spec(cfg, model_dir, requests=store.artefact("accepted"))
        frames[label] = frame_once(
            store.artefact("eval_partial"),
            keys[label],
            label,
            lambda: (
                sharded_eval.score(cfg, store, replica, work[label], label)
                if sharded(cfg, Path(model_dir))
                else score_model(
                    replica,
                    work[label],
                    cfg.resources.eval_actors,
                    cluster.use_ray(cfg),
                    desc=f"evaluate: the {label} model",
                )
            ),
        )
    unlearn = json.loads(store.artefact("unlearn_result").read_text())
    unseen = summarize(frames["original"]).get("unseen")
    thresholds = (
        unlearn.get("thresholds")
        or unseen
        and dict(ma=unseen["ma"], el=unseen["el"], span=unseen.get("span_max", math.inf))
    )
    summaries = {label: summarize(frame, thresholds) for label, frame in frames.items()}
    if "retrained" in summaries:
        summaries["unlearned"]["privleak"] = privleak(summaries["unlearned"], summaries["retrained"])
    results = {
        "thresholds": thresholds,
        "models": summaries,
        "paired_change": _changes(frames, "original"),
        "unlearn": {
            k: unlearn[k]
            for k in ("method", "epochs", "stop_reason", "forgotten", "requests", "neighbour_ma", "set_auc")
            if k in unlearn
        },
    }
    if first is not None:
        results["drift"] = _changes(frames, "first_original")
    samples = pd.concat([f.assign(model=label) for label, f in frames.items()], ignore_index=True)
    write_parquet(samples, store.artefact("per_sample"))
    atomic_write_json(store.artefact("metrics"), results)
    report.write_report(
        store.artefact("report").parent, results, samples, (store.artefact("history"), store.artefact("epochs"))
    )
    log.info("evaluate: report at %s", store.artefact("report"))
    return report.headline(results)


def _changes(frames: dict[str, pd.DataFrame], before: str) -> dict[str, dict[str, float]]:
    """The unlearned model minus `before` on the tasks scored per example (paired)."""
    return {
        suite: change
        for suite, metric in (("classification", "correct"), ("dialogue", "f1"))
        if (change := paired_change(frames[before], frames["unlearned"], suite, metric))
    }


def evaluate_folder(model_dir: Path, cfg, out: Path) -> dict[str, Any]:
    """Evaluate one model folder on its own (no run): metrics.json, per_sample.parquet, report.md."""
    tok = modeling.load_tokenizer(model_dir, cfg.model.trust_remote_code)
    frame = score_model(
        spec(cfg, model_dir),
        make_units(_tasks(cfg, tok, None, keep=False)),
        cfg.resources.eval_actors,
        cluster.use_ray(cfg),
    )
    results = {"thresholds": None, "models": {model_dir.name: summarize(frame)}, "unlearn": {}}
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(frame.assign(model=model_dir.name), out / "per_sample.parquet")
    atomic_write_json(out / "metrics.json", results)
    report.write_report(out, results, frame.assign(model=model_dir.name))
    return results
