"""The run directory: the only contract between stages.

    runs/<name>/
      config.yaml     resolved config, frozen at first start; a resubmission must match it
      manifest.json   per stage: status, input fingerprint, outputs, timings, progress
      requests/ retrieval/ unlearn/ eval/ model/   one folder per stage

Every file is written atomically (temp file + fsync + rename), so a process killed
mid-write leaves the previous version, never half a file. Manifest updates are
read-modify-write under a file lock because several processes (Ray workers, a
resubmitted driver) may touch the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from filelock import FileLock

from pipeline.config import config_diff
from pipeline.errors import UserError

STAGES = ("ingest", "retrieve", "unlearn", "evaluate", "export")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, nothing between."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (file or folder) that replaces `path` on success.

    For writers that want a filename (parquet, save_pretrained, faiss): write to the
    yielded path; it is renamed over `path` only if the block finishes without error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)) / path.name
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_parquet(frame, path: str | os.PathLike) -> None:
    """A pandas frame as a parquet file, atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (relative names + contents), streamed."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A stable digest of JSON-able inputs: config sections, upstream fingerprints, file digests."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RunStore:
    """Reads and writes one run directory; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / ".manifest.lock"), timeout=120)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def stage_dir(self, stage: str) -> Path:
        folder = {"ingest": "requests", "retrieve": "retrieval", "evaluate": "eval"}.get(stage, stage)
        path = self.path(folder)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- config ---------------------------------------------------------------------
    def freeze_config(self, config: dict[str, Any], restart_from: str | None = None) -> None:
        """Record the resolved config at first start; refuse a different one on resubmission.

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

    # -- manifest -------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.path("manifest.json")
        if not path.exists():
            return {"stages": {}}
        return json.loads(path.read_text(encoding="utf-8"))

    def update(self, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply `fn` to the manifest under the lock and write it back atomically."""
        with self._lock:
            manifest = self.manifest()
            fn(manifest)
            atomic_write_json(self.path("manifest.json"), manifest)
            return manifest

    def stage(self, name: str) -> dict[str, Any]:
        return self.manifest()["stages"].get(name, {"status": "pending"})

    def is_done(self, name: str, input_fingerprint: str) -> bool:
        """Done with the same inputs, and every recorded output still on disk."""
        entry = self.stage(name)
        return (entry.get("status") == "done" and entry.get("fingerprint") == input_fingerprint
                and all(self.path(out).exists() for out in entry.get("outputs", [])))

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
    def run_stage(self, name: str, input_fingerprint: str) -> Iterator[dict[str, Any]]:
        """Mark a stage running; on success record its outputs (paths relative to the run)
        and timings, on error mark it failed with a one-line reason.

        The caller appends to the yielded dict's "outputs" list and may set "summary".
        """
        started = time.time()
        result: dict[str, Any] = {"outputs": [], "summary": {}}

        def begin(manifest: dict[str, Any]) -> None:
            entry = manifest["stages"].get(name, {})
            manifest["stages"][name] = {"status": "running", "fingerprint": input_fingerprint,
                                        "started": _now(), "attempts": entry.get("attempts", 0) + 1}

        self.update(begin)
        try:
            yield result
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            self.update(lambda m: m["stages"][name].update(status="failed", error=reason, ended=_now()))
            raise
        outputs = [str(Path(p).relative_to(self.root)) if Path(p).is_absolute() else str(p)
                   for p in result["outputs"]]

        def finish(manifest: dict[str, Any]) -> None:
            manifest["stages"][name].update(status="done", outputs=outputs, summary=result["summary"],
                                            ended=_now(), seconds=round(time.time() - started, 2))
            manifest["stages"][name].pop("progress", None)

        self.update(finish)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _fsync_tree(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        return
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
