"""The run directory: the only contract between stages.

    runs/<name>/
      config.yaml     resolved config, frozen at first start; a resubmission must match it
      manifest.json   per stage: status, input key, outputs (size + sha256 per file), timings
      requests/ retrieval/ unlearn/ eval/ audit/ model/   the stages' artefacts (`ARTEFACTS`)

A stage counts as done only when the manifest says so with the same input key *and* its
outputs still match what was recorded when it finished; anything else reruns it, and the
reason is logged in one line. One process at a time writes a run: `lock()` holds an OS
file lock (released when the process dies) and names its holder to anyone refused.
Manifest updates are read-modify-write under a second lock, because the workers of the
holding process (Ray actors, torchrun ranks) report progress into it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from filelock import FileLock, Timeout

from pipeline.atomic import atomic_write_json, atomic_write_text, check_records, file_records
from pipeline.config import Config, build_config, config_diff
from pipeline.errors import UserError

log = logging.getLogger("icu.store")

STAGES = ("ingest", "retrieve", "unlearn", "evaluate", "audit", "export")

# Every file one stage hands to another, by name; no stage spells another's paths.
ARTEFACTS = {
    "accepted": "requests/accepted.parquet",
    "rejected": "requests/rejected.parquet",
    "pool": "retrieval/pool",
    "neighbours": "retrieval/neighbours.parquet",
    "retain_items": "retrieval/retain_items.parquet",
    "general_items": "retrieval/general_items.parquet",
    "retrieval_stats": "retrieval/stats.json",
    "checkpoints": "unlearn/checkpoints",
    "final_checkpoint": "unlearn/checkpoints/final",
    "ray_train": "unlearn/ray",
    "unlearn_result": "unlearn/result.json",
    "history": "unlearn/history.parquet",
    "epochs": "unlearn/epochs.parquet",
    "probe": "unlearn/probe.pt",
    "unlearned_model": "unlearn/model",
    "eval_partial": "eval/partial",
    "metrics": "eval/metrics.json",
    "per_sample": "eval/per_sample.parquet",
    "report": "eval/report.md",
    "audit": "audit/audit.json",
    "audit_rows": "audit/rows.parquet",
    "audit_report": "audit/report.md",
    "audit_partial": "audit/partial",
    "handoff": "model",
    "logs": "logs",
}
# Hashed once when written; on every later look only names and sizes are compared.
LARGE = {"final_checkpoint", "unlearned_model"}

_HELD: dict[str, FileLock] = {}  # run locks this process holds (a process may reopen its own run)


def fingerprint(*parts: Any) -> str:
    """A stable digest of JSON-able inputs: config sections, upstream keys, file digests."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def frame_once(folder: Path, key: str, label: str, compute: Callable[[], Any]) -> Any:
    """One model's part of a stage (a DataFrame): read back when an earlier attempt with the same
    inputs (`key`) finished it, so a stopped or restarted stage redoes only what changed."""
    import pandas as pd

    from pipeline.atomic import write_parquet

    path, stamp = folder / f"{label}.parquet", folder / f"{label}.key"
    if path.exists() and stamp.exists() and stamp.read_text() == key:
        return pd.read_parquet(path)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # a stamp names the parquet written after it, never an older one
    frame = compute()
    write_parquet(frame, path)
    stamp.write_text(key)
    return frame


class RunStore:
    """Reads and writes one run directory; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / ".manifest.lock"), timeout=120)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def artefact(self, name: str) -> Path:
        """The path of a named artefact (its parent folder exists)."""
        path = self.root / ARTEFACTS[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- the run lock ---------------------------------------------------------------
    def lock(self) -> None:
        """Hold this run for this process until it exits; refuse if another process holds it."""
        key = str(self.root.resolve())
        if key in _HELD:
            return
        lock = FileLock(str(self.root / ".run.lock"), timeout=0)
        holder = self.root / ".run.holder"
        try:
            lock.acquire()
        except Timeout:
            who = holder.read_text(encoding="utf-8").strip() if holder.exists() else "another process"
            raise UserError(f"run {self.root} is in use by {who}; fix: wait for it to finish (or stop it), "
                            "or choose another storage.name") from None
        _HELD[key] = lock
        atomic_write_text(holder, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}")

    def unlock(self) -> None:
        """Release the run lock this process holds (a no-op otherwise)."""
        lock = _HELD.pop(str(self.root.resolve()), None)
        if lock is not None:
            (self.root / ".run.holder").unlink(missing_ok=True)
            lock.release()

    # -- config ---------------------------------------------------------------------
    def freeze_config(self, config: dict[str, Any], restart_from: str | None = None) -> None:
        """Record the config at first start; refuse a different one on resubmission.

        `restart_from` accepts the new config and marks that stage and all later ones
        pending, so they rerun with it.
        """
        target = self.path("config.yaml")
        if target.exists():
            old = yaml.safe_load(target.read_text(encoding="utf-8"))
            changed = config_diff(old, config)
            if changed and restart_from is None:
                raise UserError(f"config differs from the run in {self.root}: {'; '.join(changed)}; fix: "
                                "resubmit the original config, choose a new storage.name, or pass "
                                "--restart-from STAGE to rerun from a stage with the new config")
        if restart_from is not None:
            if restart_from not in STAGES:
                raise UserError(f"--restart-from: unknown stage {restart_from!r}; choose one of "
                                f"{', '.join(STAGES)}")
            self.reset(STAGES[STAGES.index(restart_from):])
        atomic_write_text(target, yaml.safe_dump(config, sort_keys=False))

    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.path("config.yaml").read_text(encoding="utf-8"))

    def load_config(self) -> Config:
        """The frozen config, with the resolution `open_run` recorded (for worker processes)."""
        cfg = build_config(self.config())
        cfg.resolve(**self.manifest()["resolved"])
        return cfg

    def record_resolution(self, cfg: Config) -> None:
        self.update(lambda m: m.__setitem__("resolved", cfg.resolved_dict()))

    # -- manifest -------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.path("manifest.json")
        if not path.exists():
            return {"stages": {}}
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            assert isinstance(manifest.get("stages"), dict)
            return manifest
        except (ValueError, AssertionError, AttributeError):
            log.warning("run: %s is unreadable (truncated or edited); every stage is checked again and "
                        "reruns", path)
            return {"stages": {}}

    def update(self, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply `fn` to the manifest under the lock and write it back atomically."""
        with self._lock:
            manifest = self.manifest()
            fn(manifest)
            atomic_write_json(self.path("manifest.json"), manifest)
            return manifest

    def stage(self, name: str) -> dict[str, Any]:
        return self.manifest()["stages"].get(name, {"status": "pending"})

    def key_of(self, name: str) -> str | None:
        """The input key a finished upstream stage ran with (part of its dependants' keys)."""
        return self.stage(name).get("fingerprint")

    def outputs_of(self, name: str) -> str | None:
        """A digest of the outputs a finished stage recorded (sizes and sha256s): what it actually
        produced, which a rerun with the same inputs need not reproduce bit for bit."""
        outputs = self.stage(name).get("outputs")
        return None if outputs is None else fingerprint("outputs", outputs)

    def why_not_done(self, name: str, key: str) -> str | None:
        """None when the stage is done with inputs `key` and outputs as recorded; else why not."""
        entry = self.stage(name)
        if entry.get("status") != "done":
            return "not run yet" if entry.get("status") == "pending" else f"last attempt {entry['status']}"
        if entry.get("fingerprint") != key:
            return "inputs changed"
        for artefact, records in entry.get("outputs", {}).items():
            problem = check_records(self.root / ARTEFACTS[artefact], records, hash_files=artefact not in LARGE)
            if problem:
                return f"output {ARTEFACTS[artefact]} {problem}"
        return None

    def is_done(self, name: str, key: str) -> bool:
        return self.why_not_done(name, key) is None

    def reset(self, stages: tuple[str, ...] | list[str]) -> None:
        def clear(manifest: dict[str, Any]) -> None:
            for name in stages:
                manifest["stages"].pop(name, None)

        self.update(clear)

    def progress(self, name: str, done: int, total: int, note: str = "") -> None:
        def set_progress(manifest: dict[str, Any]) -> None:
            entry = manifest["stages"].setdefault(name, {"status": "running"})
            entry["progress"] = {"done": done, "total": total, "note": note, "at": _now()}

        self.update(set_progress)

    @contextlib.contextmanager
    def run_stage(self, name: str, key: str, outputs: tuple[str, ...]) -> Iterator[dict[str, Any]]:
        """Mark a stage running; on success record its named `outputs` (every file's size and
        sha256), its summary and timings; on error mark it failed with a one-line reason.

        The caller may set the yielded dict's "summary".
        """
        started = time.time()
        result: dict[str, Any] = {"summary": {}}

        def begin(manifest: dict[str, Any]) -> None:
            entry = manifest["stages"].get(name, {})
            manifest["stages"][name] = {"status": "running", "fingerprint": key, "started": _now(),
                                        "attempts": entry.get("attempts", 0) + 1}

        self.update(begin)
        try:
            yield result
        except BaseException as exc:
            reason = _reason(exc)
            self.update(lambda m: m["stages"][name].update(status="failed", error=reason, ended=_now()))
            raise
        records = {artefact: file_records(self.root / ARTEFACTS[artefact]) for artefact in outputs}

        def finish(manifest: dict[str, Any]) -> None:
            entry = manifest["stages"][name]
            if entry.get("fingerprint") != key:
                raise RuntimeError(f"{name}: the manifest was changed by another process while it ran")
            entry.update(status="done", outputs=records, summary=result["summary"], ended=_now(),
                         seconds=round(time.time() - started, 2))
            entry.pop("progress", None)

        self.update(finish)


def _reason(exc: BaseException) -> str:
    """The one line the manifest (and `icu status`) keeps of a failure. Our own errors are
    written never to hold request text; a library's message might quote data, so only its type
    is kept (the traceback went to the process's stderr)."""
    if isinstance(exc, UserError) or type(exc).__module__.split(".")[0] in ("pipeline", "retrieval") or \
            type(exc) is RuntimeError:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    return f"{type(exc).__name__} (message withheld: it may quote request data; see the job's stderr)"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
