"""The trust boundary: what a run directory, a hand-off and the serve-check refuse to do for
someone else (pipeline/keys.py, store.claim, atomic.open_private, export.no_links, serving)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from conftest import REPO
from pipeline import keys, serving
from pipeline.atomic import atomic_write_text, open_private
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.store import RunStore, frame_once

RECORD = "Jane Roe, born 1980-01-02, 12 Elm Street, Springfield, jane@example.com, +1 555 0100"


# -- receipt hashes ------------------------------------------------------------------------


def test_a_receipt_hash_is_keyed_and_icu_hash_reproduces_it(tmp_path, capsys):
    record = tmp_path / "record.txt"
    record.write_text("  " + RECORD.replace(" ", "  ") + "\n")  # normalised like ingest's
    assert main(["hash", str(record)]) == 0
    printed = capsys.readouterr().out.strip()
    key = keys.receipt_key()
    assert printed == keys.keyed_hash(key, RECORD)
    assert printed != hashlib.sha256(RECORD.encode()).hexdigest()  # what anyone holding the record could compute
    assert keys.keyed_hash(b"x" * 32, RECORD) != printed
    assert len(keys.key_id(key)) == 16 and keys.key_id(key) not in key.decode()


def test_a_missing_key_is_generated_private_and_announced(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(keys.ENV_FILE)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with caplog.at_level(logging.INFO, logger="icu.keys"):
        key = keys.receipt_key()
    path = tmp_path / "config" / "icu" / "receipt.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip().encode() == key
    assert str(path) in caplog.text
    assert keys.receipt_key() == key  # found again, not regenerated


@pytest.mark.parametrize(
    "problem, message",
    [
        ("readable", "readable or writable by others"),
        ("short", "at least 32"),
        ("link", "not a regular file"),
        ("missing", "does not exist"),
        ("inside", "inside the run directory"),
    ],
)
def test_a_key_that_is_not_private_is_refused_in_one_line(tmp_path, monkeypatch, problem, message):
    path = tmp_path / ("run/receipt.key" if problem == "inside" else "receipt.key")
    path.parent.mkdir(exist_ok=True)
    path.write_text("short" if problem == "short" else "k" * 64)
    path.chmod(0o644 if problem == "readable" else 0o600)
    if problem == "link":
        path.rename(tmp_path / "real.key")
        path.symlink_to(tmp_path / "real.key")
    if problem == "missing":
        path.unlink()
    monkeypatch.setenv(keys.ENV_FILE, str(path))
    with pytest.raises(UserError, match=message) as err:
        keys.receipt_key(tmp_path / "run")
    assert "\n" not in str(err.value)


# -- the run directory ---------------------------------------------------------------------


def test_a_new_run_directory_is_private_and_a_foreign_one_is_refused(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "runs" / "mine")
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    atomic_write_text(store.path("note.txt"), "x")
    assert stat.S_IMODE(store.path("note.txt").stat().st_mode) == 0o600
    shared = tmp_path / "runs" / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UserError, match="can be written by others"):
        RunStore(shared)
    monkeypatch.setattr(os, "getuid", lambda: store.root.stat().st_uid + 1)
    with pytest.raises(UserError, match="not to you"):
        RunStore(store.root)


def test_a_planted_link_in_logs_is_refused_and_its_target_untouched(implanted, tmp_path, capsys):
    from implant import run_config

    config = run_config(implanted, tmp_path, "planted")
    root = tmp_path / "runs" / "planted"
    (root / "logs").mkdir(parents=True)
    root.chmod(0o700)
    target = tmp_path / "target.txt"
    target.write_text("keep")
    (root / "logs" / "driver.log").symlink_to(target)
    assert main(["ingest", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "driver.log is a symbolic link" in err[0], err
    assert target.read_text() == "keep" and not (root / "requests").exists()


def test_open_private_refuses_a_link_and_replaces_a_file(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "vllm.log"
    link.symlink_to(target)
    for append in (False, True):
        with pytest.raises(UserError, match="symbolic link"):
            open_private(link, append=append)
    assert target.read_text() == "keep"
    link.unlink()
    link.write_text("old")
    with open_private(link) as fh:
        fh.write(b"new")
    assert link.read_text() == "new" and stat.S_IMODE(link.stat().st_mode) == 0o600


def test_a_link_on_the_way_to_an_artefact_is_refused(tmp_path):
    store = RunStore(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store.path("logs").symlink_to(elsewhere)
    with pytest.raises(UserError, match="symbolic link"):
        store.artefact("logs")
    store.path("logs").unlink()
    (store.path("audit")).mkdir()
    store.path("audit", "partial").symlink_to(elsewhere)
    with pytest.raises(UserError, match="symbolic link"):
        store.artefact("audit_partial")
    assert not list(elsewhere.iterdir())


def test_an_edited_partial_file_is_computed_again(tmp_path, caplog):
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"leak": [True, False]})

    folder = tmp_path / "partial"
    first = frame_once(folder, "k1", "unlearned", compute)
    assert frame_once(folder, "k1", "unlearned", compute).equals(first) and len(calls) == 1
    pd.DataFrame({"leak": [False, False]}).to_parquet(folder / "unlearned.parquet")  # the edit an attacker makes
    with caplog.at_level(logging.WARNING):
        again = frame_once(folder, "k1", "unlearned", compute)
    assert again.equals(first) and len(calls) == 2 and "differs from the sha256 recorded" in caplog.text
    (folder / "unlearned.key").write_text("k1")  # an old-style stamp without a hash is not trusted either
    frame_once(folder, "k1", "unlearned", compute)
    assert len(calls) == 3


def test_a_stage_that_starts_retires_the_hand_off(tmp_path):
    store = RunStore(tmp_path / "run")
    handoff = store.artefact("handoff")
    handoff.mkdir()
    (handoff / "model.safetensors").write_bytes(b"old weights")
    with store.run_stage("export", "k", ()):
        pass
    assert store.stage("export")["status"] == "done"
    handoff.mkdir()
    with pytest.raises(RuntimeError):
        with store.run_stage("evaluate", "k", ()):
            raise RuntimeError("evaluation failed")
    assert not handoff.exists() and "export" not in store.manifest()["stages"]
    handoff.mkdir()
    store.reset(["unlearn"])
    assert not handoff.exists() and not list(store.root.glob(".model.retired-*"))


def test_export_refuses_a_link_in_the_folder_it_hands_off(tmp_path):
    from pipeline.export import no_links

    secret = tmp_path / "secret.txt"
    secret.write_text("someone else's file")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "notes.txt").symlink_to(secret)
    with pytest.raises(UserError, match="notes.txt is a symbolic link"):
        no_links(folder)
    (folder / "notes.txt").unlink()
    no_links(folder)
    assert secret.read_text() == "someone else's file"


# -- smaller points --------------------------------------------------------------------------


def test_a_header_less_file_is_not_quoted_in_an_error(tmp_path):
    from pipeline.suites import read_texts

    path = tmp_path / "keep.csv"
    path.write_text(f'"{RECORD}"\n"Someone Else, born 1970"\n')
    with pytest.raises(UserError) as err:
        read_texts(path)
    assert "Jane" not in str(err.value) and "no column 'text'" in str(err.value)


def test_the_model_card_config_carries_no_paths(implanted, tmp_path):
    from implant import run_config
    from pipeline.config import load_config

    (tmp_path / Path(implanted["retain"]).name).write_text("")
    os.environ["ICU_TEST_SECRET_DIR"] = str(tmp_path)
    try:
        cfg = load_config(
            str(
                run_config(
                    implanted,
                    tmp_path,
                    "card",
                    {"evaluation.keep_path": "${ICU_TEST_SECRET_DIR}/" + Path(implanted["retain"]).name},
                )
            )
        )
    finally:
        del os.environ["ICU_TEST_SECRET_DIR"]
    public = json.dumps(cfg.to_dict(paths=False))
    assert str(tmp_path) not in public and str(implanted["root"]) not in public and "<path>" in public
    assert str(tmp_path) in json.dumps(cfg.to_dict())  # the frozen run config keeps them


def test_gpu_check_installs_into_a_private_folder():
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    assert "/tmp/" not in script.replace("mktemp", "") and "mktemp -d" in script
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")]).returncode == 0


# -- the serve-check -----------------------------------------------------------------------


def _fake_vllm(tmp_path: Path, body: str) -> Path:
    """A stand-in for the serve venv's python: a script that ignores vLLM's arguments."""
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_a_socket_held_by_another_process_gets_no_prompt(tmp_path, monkeypatch):
    sockets = tmp_path / "sock"
    sockets.mkdir(mode=0o700)
    server = sockets / "vllm.sock"
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    foreign.bind(str(server))  # someone else listening where the check will look
    foreign.listen(1)
    foreign.settimeout(0.5)
    fake = _fake_vllm(tmp_path, "exec sleep 60")
    with pytest.raises(UserError, match="not the vLLM server this check started"):
        serving.start(str(fake), tmp_path, 64, tmp_path / "vllm.log", server)
    with pytest.raises(TimeoutError):
        foreign.accept()  # nothing connected to it: no health call, no prompt
    foreign.close()


def test_an_exception_during_start_up_leaves_no_server_process(tmp_path, monkeypatch):
    pids = tmp_path / "pids"
    fake = _fake_vllm(tmp_path, f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait")

    def interrupted(*args, **kwargs):
        deadline = time.time() + 30
        while not (pids.exists() and len(pids.read_text().split()) == 2):
            assert time.time() < deadline
            time.sleep(0.1)
        raise KeyboardInterrupt

    monkeypatch.setattr(serving, "wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        serving.start(str(fake), tmp_path, 64, tmp_path / "vllm.log", tmp_path / "vllm.sock")
    started = [int(p) for p in pids.read_text().split()]
    time.sleep(0.2)
    alive = [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {alive}"
