"""Run store: atomic writes survive a kill, configs are frozen, stages record their state."""

import json
import subprocess
import sys
import textwrap

import pytest

from pipeline.errors import UserError
from pipeline.store import RunStore, atomic_path, atomic_write_json, fingerprint

from conftest import REPO


def test_kill_between_write_and_rename_leaves_old_manifest(tmp_path):
    store = RunStore(tmp_path / "run")
    store.update(lambda m: m["stages"].update(ingest={"status": "done"}))
    before = store.path("manifest.json").read_bytes()
    # The child replaces os.replace with a SIGKILL of itself: it dies after writing and
    # fsyncing the temp file, before the rename that would publish it.
    child = textwrap.dedent(f"""
        import os, signal
        from pipeline.store import RunStore
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        RunStore({str(tmp_path / "run")!r}).update(lambda m: m["stages"].update(retrieve={{"status": "done"}}))
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert store.path("manifest.json").read_bytes() == before
    assert store.stage("retrieve") == {"status": "pending"}
    leftovers = [p for p in store.root.iterdir() if p.name.startswith(".manifest.json.tmp-")]
    assert leftovers, "the child should have died with its temp file written"
    assert json.loads(before) == store.manifest()


def test_atomic_path_publishes_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    folder = tmp_path / "model"
    for content in ("v1", "v2"):
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(content)
    assert (folder / "weights").read_text() == "v2"


def test_resubmission_with_changed_config_is_refused(tmp_path):
    store = RunStore(tmp_path / "run")
    config = {"unlearning": {"lr": 5e-5, "method": "icu"}, "model": {"name": "default"}}
    store.freeze_config(config)
    store.freeze_config(config)  # same config: accepted
    changed = {"unlearning": {"lr": 1e-4, "method": "icu"}, "model": {"name": "default"}}
    with pytest.raises(UserError, match=r"unlearning\.lr \(5e-05 -> 0\.0001\).*--restart-from"):
        store.freeze_config(changed)
    assert store.config() == config


def test_restart_from_resets_that_stage_and_later(tmp_path):
    store = RunStore(tmp_path / "run")
    store.freeze_config({"unlearning": {"lr": 1.0}})
    for stage in ("ingest", "retrieve", "unlearn"):
        with store.run_stage(stage, "fp"):
            pass
    store.freeze_config({"unlearning": {"lr": 2.0}}, restart_from="retrieve")
    assert store.stage("ingest")["status"] == "done"
    assert store.stage("retrieve")["status"] == "pending"
    assert store.stage("unlearn")["status"] == "pending"
    assert store.config() == {"unlearning": {"lr": 2.0}}


def test_run_stage_records_outputs_failures_and_completion(tmp_path):
    store = RunStore(tmp_path / "run")
    out = store.stage_dir("ingest") / "accepted.parquet"
    with store.run_stage("ingest", "abc") as result:
        out.write_text("x")
        result["outputs"].append(out)
        result["summary"] = {"accepted": 1}
    entry = store.stage("ingest")
    assert entry["status"] == "done" and entry["outputs"] == ["requests/accepted.parquet"]
    assert store.is_done("ingest", "abc") and not store.is_done("ingest", "other")
    out.unlink()
    assert not store.is_done("ingest", "abc"), "a missing output means the stage must rerun"
    with pytest.raises(ValueError):
        with store.run_stage("retrieve", "def"):
            raise ValueError("boom\nsecond line")
    assert store.stage("retrieve")["status"] == "failed"
    assert store.stage("retrieve")["error"] == "ValueError: boom"


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_atomic_write_json_roundtrip(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"k": [1, 2]}
