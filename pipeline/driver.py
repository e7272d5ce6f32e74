"""The pipeline driver: open a run, then run each stage unless it is already complete.

A stage is skipped when the manifest says it finished with the same input fingerprint
and its outputs are still on disk; otherwise it reruns and overwrites its own folder.
The same driver backs `icu run`, `icu <stage>` and the Ray job entrypoints.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from pipeline import modeling
from pipeline.config import Config, load_config
from pipeline.errors import UserError
from pipeline.store import STAGES, RunStore, file_digest, fingerprint

log = logging.getLogger("icu")


def open_run(config_path: str, overrides: dict[str, Any] | None = None,
             restart_from: str | None = None) -> tuple[Config, RunStore]:
    """Load and validate the config, then freeze it in the run directory (or check it matches)."""
    cfg = load_config(config_path, overrides)
    store = RunStore(cfg.run_dir)
    store.freeze_config(cfg.to_dict(), restart_from=restart_from)
    _log_to_run(store)
    return cfg, store


def run_ingest(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Validate the erasure requests into requests/accepted.parquet and rejected.parquet."""
    from pipeline.requests import ingest

    model_dir = modeling.resolve_model_dir(cfg.model.name)
    # every later stage's key includes this one: the weights' signature reaches them all
    key = fingerprint("ingest", cfg.requests, cfg.model, modeling.weights_signature(model_dir),
                      file_digest(cfg.requests.path))
    if store.is_done("ingest", key):
        return _skipped(store, "ingest")
    tokenizer = modeling.load_tokenizer(model_dir, cfg.model.trust_remote_code)
    max_len = modeling.context_length(model_dir)
    if cfg.requests.max_tokens is not None:
        max_len = min(max_len, cfg.requests.max_tokens)
    with store.run_stage("ingest", key) as result:
        out = store.stage_dir("ingest")
        counts = ingest(cfg.requests, tokenizer, max_len, out)
        result["outputs"] += [out / "accepted.parquet", out / "rejected.parquet"]
        result["summary"] = counts
    reasons = ", ".join(f"{k}={v}" for k, v in counts["reasons"].items()) or "none"
    log.info("ingest: %d rows read, %d accepted, %d rejected (%s)", counts["rows"], counts["accepted"],
             counts["rejected"], reasons)
    return counts


def run_retrieve(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Find each accepted request's retain neighbours (retrieval/neighbours.parquet)."""
    from pipeline import retrieve

    if not cfg.retain.paths:
        raise UserError("retain.paths: empty, but ICU needs retain text to pair with every request; fix: "
                        "list retain files (jsonl, csv, parquet, a saved dataset or a folder of .txt files)")
    pool_key = fingerprint("pool", *retrieve.pool_fingerprint_parts(cfg))
    key = fingerprint("retrieve", pool_key, cfg.retrieval, store.stage("ingest").get("fingerprint"))
    if store.is_done("retrieve", key):
        return _skipped(store, "retrieve")
    with store.run_stage("retrieve", key) as result:
        counts = retrieve.build_pool(cfg, store, pool_key)
        summary = retrieve.find_request_neighbours(cfg, store, counts)
        out = store.stage_dir("retrieve")
        result["outputs"] += [out / "neighbours.parquet", out / "retain_items.parquet", out / "stats.json"]
        result["summary"] = summary
    log.info("retrieve: %d requests, pool %d items, %s index; %d pool items excluded by the leak guard, "
             "%d requests short of k", summary["requests"], summary["pool_items"], summary["index"],
             summary["excluded_by_leak_guard"], summary["short_of_k"])
    return summary


def run_unlearn(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Unlearn the accepted requests with the configured launcher (Ray Train or torchrun)."""
    import json
    import shutil

    from pipeline import export, launch

    upstream = [store.stage(s).get("fingerprint") for s in ("ingest", "retrieve")]
    key = fingerprint("unlearn", cfg.model, cfg.requests, cfg.retrieval, cfg.unlearning, cfg.evaluation,
                      cfg.resources.num_workers, upstream)
    if store.is_done("unlearn", key):
        return _skipped(store, "unlearn")
    out = store.stage_dir("unlearn")
    stamp = out / "checkpoints" / "fingerprint"
    if stamp.exists() and stamp.read_text() != key:  # checkpoints of other inputs: start over
        log.info("unlearn: inputs changed since the last checkpoint; starting from epoch 0")
        shutil.rmtree(out / "checkpoints")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)
    if (out / "checkpoints" / "latest_complete").exists():
        log.info("unlearn: resuming from checkpoint %s", (out / "checkpoints" / "latest_complete").read_text())
    with store.run_stage("unlearn", key) as result:
        (launch.ray_train if cfg.resources.launcher == "ray" else launch.torchrun)(cfg, store)
        summary = json.loads((out / "result.json").read_text())
        export.consolidate(out / "checkpoints", summary["final_tag"], modeling.resolve_model_dir(cfg.model.name),
                           out / "model", dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        result["outputs"] += [out / "result.json", out / "history.parquet", out / "checkpoints" / "final",
                              out / "model", out / "probe.pt"]
        result["summary"] = {k: v for k, v in summary.items() if k != "thresholds"}
    return summary


def run_evaluate(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Score the original and the unlearned model on the suites; write metrics, samples and report."""
    from pipeline import evaluate

    upstream = [store.stage(s).get("fingerprint") for s in ("ingest", "unlearn")]
    key = fingerprint("evaluate", cfg.model, cfg.requests, cfg.evaluation, cfg.unlearning.num_beams, upstream)
    if store.is_done("evaluate", key):
        return _skipped(store, "evaluate")
    with store.run_stage("evaluate", key) as result:
        summary = evaluate.evaluate_run(cfg, store, key)
        out = store.stage_dir("evaluate")
        result["outputs"] += [out / "metrics.json", out / "per_sample.parquet", out / "report.md"]
        result["summary"] = summary
    log.info("evaluate: report at %s", store.path("eval", "report.md"))
    return summary


def run_export(cfg: Config, store: RunStore) -> dict[str, Any]:
    """The serving hand-off: verified model folder, model card, checksums and erasure receipt in model/."""
    from pipeline import export

    upstream = [store.stage(s).get("fingerprint") for s in ("ingest", "unlearn", "evaluate")]
    key = fingerprint("export", cfg.model, upstream)
    if store.is_done("export", key):
        return _skipped(store, "export")
    with store.run_stage("export", key) as result:
        summary = export.export_run(cfg, store)
        result["outputs"] += [store.path("model")]
        result["summary"] = summary
    log.info("export: model folder, model card and receipt at %s", store.path("model"))
    return summary


STAGE_RUNNERS: dict[str, Callable[[Config, RunStore], dict[str, Any]]] = {
    "ingest": run_ingest, "retrieve": run_retrieve, "unlearn": run_unlearn, "evaluate": run_evaluate,
    "export": run_export}


def run_pipeline(cfg: Config, store: RunStore, until: str | None = None) -> dict[str, dict[str, Any]]:
    """Run every implemented stage in order (up to and including `until`); returns each stage's summary.

    Completed stages are skipped, so `icu retrieve` on a fresh run ingests first.
    """
    summaries = {}
    for stage in STAGES[:STAGES.index(until) + 1] if until else STAGES:
        if stage in STAGE_RUNNERS:
            started = time.time()
            summaries[stage] = STAGE_RUNNERS[stage](cfg, store)
            log.info("%s: finished in %.1f s", stage, time.time() - started)
    return summaries


def status_lines(run_dir: str | Path) -> list[str]:
    """One line per stage: state, timing or progress, and where a stopped run resumes."""
    store = RunStore(run_dir)
    stages = store.manifest()["stages"]
    lines = [f"run {Path(run_dir).resolve()}"]
    resume = None
    for stage in STAGES:
        entry = stages.get(stage, {"status": "pending"})
        state = entry["status"]
        detail = ""
        if state == "done":
            detail = f"{entry.get('seconds', 0):.1f} s  {_short(entry.get('summary', {}))}"
        elif "progress" in entry:
            p = entry["progress"]
            detail = f"{p['done']}/{p['total']} {p.get('note', '')}".strip()
        elif state == "failed":
            detail = entry.get("error", "")
        if state != "done" and resume is None:
            resume = stage
        impl = "" if stage in STAGE_RUNNERS else "  (not implemented yet)"
        lines.append(f"  {stage:<9} {state:<8} {detail}{impl}")
    lines.append(f"  resumes at: {resume}" if resume else "  all stages done")
    return lines


def _skipped(store: RunStore, stage: str) -> dict[str, Any]:
    log.info("%s: already complete with the same inputs; skipped", stage)
    return store.stage(stage).get("summary", {})


def _short(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)))


def _log_to_run(store: RunStore) -> None:
    """Append this process's log to the run's logs/ folder (ids and counts only, never text)."""
    logs = store.path("logs")
    logs.mkdir(exist_ok=True)
    root = logging.getLogger("icu")
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    target = str(logs / "driver.log")
    if not any(getattr(h, "baseFilename", None) == target for h in root.handlers):
        handler = logging.FileHandler(target, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
