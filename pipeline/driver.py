"""The pipeline driver: open a run, then a loop over the stages.

Each stage module (`ingest`, `retrieve`, `unlearn`, `evaluate`, `audit`, `export`) exposes the same
interface: `key(cfg, store)` (the digest of every input it reads), `run(cfg, store)` (does
the work, returns a summary) and `OUTPUTS` (the named artefacts it hands on). A stage is
skipped when the run store says it is done with that key and its outputs still match
their recorded sha256; otherwise it reruns, and the log says why in one line. The same
driver backs `icu run`, `icu <stage>` and the Ray job entrypoints.
"""

from __future__ import annotations

import importlib
import io
import logging
import time
from pathlib import Path
from typing import Any

from pipeline import ledger, modeling
from pipeline.atomic import open_private
from pipeline.config import Config, load_config
from pipeline.store import STAGES, RunStore

log = logging.getLogger("icu")


def open_run(
    config_path: str, overrides: dict[str, Any] | None = None, restart_from: str | None = None
) -> tuple[Config, RunStore]:
    """Load and validate the config, lock the run, freeze the config (or check it matches)
    and resolve the model folder and request length once for every stage and worker."""
    cfg = load_config(config_path, overrides)
    if restart_from and cfg.ledger.path:  # before anything is reset: the hand-off the ledger names stays
        ledger.refuse_restart(cfg)
    store = RunStore(cfg.run_dir)
    store.lock()
    try:
        store.freeze_config(cfg.to_dict(), restart_from=restart_from)
        _log_to_run(store)
        modeling.resolve(cfg)
        store.record_resolution(cfg)
    except BaseException:
        store.unlock()
        raise
    return cfg, store


def stage_module(name: str):
    return importlib.import_module(f"pipeline.{name}")


def run_stage(cfg: Config, store: RunStore, name: str) -> dict[str, Any]:
    """Run one stage unless it is done with the same inputs and intact outputs."""
    stage = stage_module(name)
    key = stage.key(cfg, store)
    why = store.why_not_done(name, key)
    if why is None:
        log.info("%s: already complete with the same inputs; skipped", name)
        return store.stage(name).get("summary", {})
    if why.startswith("output"):
        log.warning("%s: %s; rerunning the stage", name, why)
    started = time.time()
    with store.run_stage(name, key, stage.OUTPUTS) as result:
        result["summary"] = stage.run(cfg, store)
    log.info("%s: finished in %.1f s", name, time.time() - started)
    return result["summary"]


def run_pipeline(cfg: Config, store: RunStore, until: str | None = None) -> dict[str, dict[str, Any]]:
    """Every stage in order (up to and including `until`); returns each stage's summary.

    Completed stages are skipped, so `icu retrieve` on a fresh run ingests first.
    """
    return {name: run_stage(cfg, store, name) for name in (STAGES[: STAGES.index(until) + 1] if until else STAGES)}


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
        lines.append(f"  {stage:<9} {state:<8} {detail}")
    lines.append(f"  resumes at: {resume}" if resume else "  all stages done")
    return lines


def _short(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)))


class PrivateFileHandler(logging.FileHandler):
    """A log file appended through `open_private`: a symbolic link planted at its name is refused."""

    def _open(self):
        return io.TextIOWrapper(
            open_private(self.baseFilename, append=True),
            encoding=self.encoding or "utf-8",
            errors=self.errors,
            line_buffering=True,
        )


def _log_to_run(store: RunStore) -> None:
    """Append this process's log to the run's logs/ folder (ids and counts only, never text)."""
    logs = store.artefact("logs")
    logs.mkdir(exist_ok=True)
    root = logging.getLogger("icu")
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    target = str(logs / "driver.log")
    if not any(getattr(h, "baseFilename", None) == target for h in root.handlers):
        handler = PrivateFileHandler(target, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
