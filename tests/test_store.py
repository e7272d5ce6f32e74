"""Run store: atomic writes survive a kill, configs are frozen, stages record their state."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from pipeline.atomic import atomic_path, atomic_write_json
from pipeline.errors import UserError
from pipeline.store import RunStore, fingerprint, frame_once

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
        with store.run_stage(stage, "fp", ()):
            pass
    store.freeze_config({"unlearning": {"lr": 2.0}}, restart_from="retrieve")
    assert store.stage("ingest")["status"] == "done"
    assert store.stage("retrieve")["status"] == "pending"
    assert store.stage("unlearn")["status"] == "pending"
    assert store.config() == {"unlearning": {"lr": 2.0}}


def test_run_stage_records_outputs_failures_and_completion(tmp_path):
    store = RunStore(tmp_path / "run")
    out = store.artefact("accepted")
    with store.run_stage("ingest", "abc", ("accepted",)) as result:
        out.write_text("x")
        result["summary"] = {"accepted": 1}
    entry = store.stage("ingest")
    assert entry["status"] == "done"
    assert entry["outputs"] == {"accepted": {".": [1, hashlib.sha256(b"x").hexdigest()]}}
    assert store.is_done("ingest", "abc") and store.why_not_done("ingest", "other") == "inputs changed"
    out.write_text("y")  # same size, other bytes
    assert "content differs" in store.why_not_done("ingest", "abc")
    out.write_text("")
    assert "size 0 != 1" in store.why_not_done("ingest", "abc")
    out.unlink()
    assert store.why_not_done("ingest", "abc") == "output requests/accepted.parquet missing"
    with pytest.raises(ValueError):
        with store.run_stage("retrieve", "def", ()):
            raise ValueError("boom\nsecond line")
    assert store.stage("retrieve")["status"] == "failed"
    # a library's message may quote request data: the manifest keeps its type only; ours in full
    assert store.stage("retrieve")["error"].startswith("ValueError (message withheld")
    with pytest.raises(UserError):
        with store.run_stage("retrieve", "def", ()):
            raise UserError("retain.paths: empty\nsecond line")
    assert store.stage("retrieve")["error"] == "UserError: retain.paths: empty"


def test_large_outputs_are_checked_by_size(tmp_path):
    """A checkpoint is hashed once when written; later looks compare names and sizes."""
    store = RunStore(tmp_path / "run")
    folder = store.artefact("final_checkpoint")
    folder.mkdir()
    (folder / "shard").write_bytes(b"abc")
    with store.run_stage("unlearn", "k", ("final_checkpoint",)):
        pass
    assert store.stage("unlearn")["outputs"]["final_checkpoint"]["shard"][1] == hashlib.sha256(b"abc").hexdigest()
    (folder / "shard").write_bytes(b"xyz")
    assert store.is_done("unlearn", "k")
    (folder / "extra").write_bytes(b"")
    assert "unexpected ['extra']" in store.why_not_done("unlearn", "k")


def test_a_truncated_manifest_means_every_stage_reruns(tmp_path):
    store = RunStore(tmp_path / "run")
    with store.run_stage("ingest", "k", ()):
        pass
    path = store.path("manifest.json")
    path.write_bytes(path.read_bytes()[:20])
    assert store.why_not_done("ingest", "k") == "not run yet"
    store.progress("ingest", 1, 2)  # the next update writes a whole manifest again
    assert json.loads(path.read_text())["stages"]["ingest"]["progress"]["done"] == 1


def test_a_locked_run_refuses_a_second_process(tmp_path):
    """One process holds the run; another is refused with one line naming the holder; after
    the holder exits (even killed) the run is free again."""
    store = RunStore(tmp_path / "run")
    store.lock()
    store.lock()  # the holder may reopen its own run
    child = textwrap.dedent(f"""
        import sys
        from pipeline.errors import UserError
        from pipeline.store import RunStore
        try:
            RunStore({str(tmp_path / "run")!r}).lock()
        except UserError as exc:
            sys.exit(exc.report())
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"in use by pid {os.getpid()}" in proc.stderr and "fix:" in proc.stderr
    store.unlock()
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_atomic_write_json_roundtrip(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"k": [1, 2]}


def test_a_second_icu_on_a_running_run_is_refused(tmp_path):
    """`icu` in another process while this one holds the run: one line naming the holder,
    exit 2, and the manifest untouched (nothing marked done with the other's key)."""
    from pipeline import driver

    from conftest import write_config

    requests = tmp_path / "r.jsonl"
    requests.write_text('{"text": "' + "a long enough request text " * 8 + '"}\n')
    config = write_config(
        tmp_path,
        f"model: {{name: tiny-llama}}\nrequests: {{path: {requests}, prefix_tokens: 8, "
        f"suffix_tokens: 8}}\nstorage: {{runs_dir: {tmp_path}/runs}}\n",
    )
    cfg, store = driver.open_run(str(config))
    before = store.path("manifest.json").read_bytes()
    other = config.with_name("other.yaml")
    other.write_text(
        config.read_text()
        .replace("prefix_tokens: 8", "prefix_tokens: 9")
        .replace(f"runs_dir: {tmp_path}/runs", f"runs_dir: {tmp_path}/runs, name: run")
    )
    try:
        for cmd in (["ingest", str(config)], ["run", str(other), "--restart-from", "ingest"]):
            proc = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", *cmd], cwd=REPO, capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 2, proc.stderr
            assert (
                proc.stderr.strip()
                .splitlines()[-1]
                .startswith(f"icu: error: run {store.root} is in use by pid {os.getpid()}")
            ), proc.stderr
            assert store.path("manifest.json").read_bytes() == before
    finally:
        store.unlock()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ingest", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def test_a_models_part_is_read_back_only_for_the_same_inputs(tmp_path):
    calls = []

    def compute(value):
        return lambda: calls.append(value) or pd.DataFrame({"value": [value]})

    partial = tmp_path / "partial"
    assert frame_once(partial, "a", "original", compute(1))["value"].tolist() == [1]
    assert frame_once(partial, "a", "original", compute(2))["value"].tolist() == [1]  # kept
    assert frame_once(partial, "b", "original", compute(3))["value"].tolist() == [3]  # other inputs
    (partial / "original.key").unlink()  # stopped between the scores and their stamp
    assert frame_once(partial, "b", "original", compute(4))["value"].tolist() == [4]
    assert frame_once(partial, "b", "unlearned", compute(5))["value"].tolist() == [5]
    assert calls == [1, 3, 4, 5]
