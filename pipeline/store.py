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

A run directory holds request text and often lives on shared storage, so it is its owner's:
created 0700, refused when another user owns it or others may write to it, and no artefact
is reached through a symbolic link. A served hand-off (`model/`) never outlives the inputs it
was made from: any stage that starts, and any reset, retires it first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import yaml
from filelock import FileLock, Timeout

from pipeline.atomic import (
    atomic_write_json,
    atomic_write_text,
    check_records,
    file_records,
    sha256_file,
    write_parquet,
)
from pipeline.config import Config, build_config, config_diff
from pipeline.errors import UserError

log = logging.getLogger("icu.store")

STAGES = ("ingest", "retrieve", "unlearn", "evaluate", "audit", "export")

# Every file one stage hands to another, by name; no stage spells another's paths.
ARTEFACTS = {
    "accepted": "requests/accepted.parquet",
    "rejected": "requests/rejected.parquet",
    "chain": "requests/chain.json",
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
    inputs (`key`) finished it, so a stopped or restarted stage redoes only what changed. The
    stamp records the file's sha256 too: an edited file is computed again, never trusted."""
    path, stamp = folder / f"{label}.parquet", folder / f"{label}.key"
    if path.is_file() and stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except ValueError:
            recorded = {}
        if recorded == {"key": key, "sha256": sha256_file(path)}:
            return pd.read_parquet(path)
        if recorded.get("key") == key:
            log.warning("%s: %s differs from the sha256 recorded when it was written; computing it again", label, path)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # a stamp names the parquet written after it, never an older one
    frame = compute()
    write_parquet(frame, path)
    atomic_write_json(stamp, {"key": key, "sha256": sha256_file(path)})
    return frame


class RunStore:
    """Reads and writes one run directory; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        claim(self.root)
        self._lock = FileLock(str(self.root / ".manifest.lock"), timeout=120)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def artefact(self, name: str) -> Path:
        """The path of a named artefact (its parent folder exists); refused when a symbolic link
        stands anywhere on the way to it inside the run."""
        path = self.root / ARTEFACTS[name]
        node = self.root
        for part in Path(ARTEFACTS[name]).parts:
            node = node / part
            if node.is_symlink():
                raise UserError(
                    f"{node} is a symbolic link, and a run directory holds none (it would be read or "
                    "written through); fix: remove it, and check who else can write to the run directory"
                )
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def retire_handoff(self) -> None:
        """Take the served hand-off away before anything it was made from changes: moved aside in
        one rename (no half folder is ever left to serve), then deleted; export writes it anew."""
        handoff = self.root / ARTEFACTS["handoff"]
        if os.path.lexists(handoff):
            aside = self.root / f".{handoff.name}.retired-{os.getpid()}"
            os.replace(handoff, aside)
            shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
            log.warning(
                "run: the earlier hand-off %s was removed (its inputs are being redone); the export stage "
                "writes it again",
                handoff,
            )
        if "export" in self.manifest()["stages"]:
            self.update(lambda m: m["stages"].pop("export", None))

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
            raise UserError(
                f"run {self.root} is in use by {who}; fix: wait for it to finish (or stop it), "
                "or choose another storage.name"
            ) from None
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
                raise UserError(
                    f"config differs from the run in {self.root}: {'; '.join(changed)}; fix: "
                    "resubmit the original config, choose a new storage.name, or pass "
                    "--restart-from STAGE to rerun from a stage with the new config"
                )
        if restart_from is not None:
            if restart_from not in STAGES:
                raise UserError(f"--restart-from: unknown stage {restart_from!r}; choose one of {', '.join(STAGES)}")
            self.reset(STAGES[STAGES.index(restart_from) :])
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
            log.warning("run: %s is unreadable (truncated or edited); every stage is checked again and reruns", path)
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
        self.retire_handoff()

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
        self.retire_handoff()

        def begin(manifest: dict[str, Any]) -> None:
            entry = manifest["stages"].get(name, {})
            manifest["stages"][name] = {
                "status": "running",
                "fingerprint": key,
                "started": _now(),
                "attempts": entry.get("attempts", 0) + 1,
            }

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
            entry.update(
                status="done",
                outputs=records,
                summary=result["summary"],
                ended=_now(),
                seconds=round(time.time() - started, 2),
            )
            entry.pop("progress", None)

        self.update(finish)


def claim(root: Path) -> None:
    """A new run directory is created 0700; an existing one must be this user's and closed to
    others' writes (a planted link or a swapped artefact could otherwise ship in a hand-off)."""
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:  # another process made it first: checked below like any existing one
            pass
        else:
            root.chmod(0o700)
            return
    st = root.stat()
    if st.st_uid != os.getuid():
        raise UserError(
            f"run directory {root} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); fix: choose "
            "another storage.name or storage.runs_dir (a run is written by the user who owns it)"
        )
    if st.st_mode & 0o022:
        raise UserError(
            f"run directory {root} can be written by others (mode {st.st_mode & 0o777:o}); fix: chmod 700 "
            f"{root} after checking nothing in it was changed, or start a new run"
        )


def _reason(exc: BaseException) -> str:
    """The one line the manifest (and `icu status`) keeps of a failure. Our own errors are
    written never to hold request text; a library's message might quote data, so only its type
    is kept (the traceback went to the process's stderr)."""
    if (
        isinstance(exc, UserError)
        or type(exc).__module__.split(".")[0] in ("pipeline", "retrieval")
        or type(exc) is RuntimeError
    ):
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    return f"{type(exc).__name__} (message withheld: it may quote request data; see the job's stderr)"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
