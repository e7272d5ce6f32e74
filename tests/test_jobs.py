"""The product as users run it: Ray jobs submitted with the real `ray job submit` CLI.

A Ray head with its dashboard on 127.0.0.1 runs for this module. One job runs the whole
pipeline uninterrupted on the tiny implanted model (the reference); a second run of the
same config is stopped with `ray job stop` during retrieval, during unlearning and during
evaluation, resubmitted each time, and must end with the reference's weights and receipt.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SHARED_DATA
from pipeline.checkpoints import complete_tags
from pipeline.config import PROBES
from pipeline.store import STAGES
from implant import run_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


class Head:
    """A `ray start --head` on 127.0.0.1 with the dashboard (the job server)."""

    def __init__(self, tmp: Path):
        self.temp = Path(tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp"))  # short: Ray's socket paths
        self.address = f"http://127.0.0.1:{_free_port()}"
        env = _env()
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={_free_port()}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.address.rsplit(':', 1)[1]}",
                "--num-cpus=2",
                f"--temp-dir={self.temp}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=open(tmp / "ray-head.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 180
        while self.ray("job", "list", check=False).returncode != 0:
            assert self.proc.poll() is None and time.time() < deadline, (
                f"the Ray head did not come up: {(tmp / 'ray-head.log').read_text()[-2000:]}"
            )
            time.sleep(2)
        os.environ["RAY_AUTH_MODE"] = "disabled"  # for the SDK client in this process, as for the CLI
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(self.address)

    def ray(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "ray"), *args]
        if args[0] == "job":
            cmd.insert(3, f"--address={self.address}")
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert not check or proc.returncode == 0, f"{' '.join(args)} failed: {proc.stdout}{proc.stderr}"
        return proc

    def submit(self, config: Path, *extra: str) -> str:
        """`ray job submit --no-wait` of the whole pipeline; returns the submission id."""
        job = f"icu-{uuid.uuid4().hex[:8]}"
        self.ray(
            "job",
            "submit",
            "--no-wait",
            f"--submission-id={job}",
            f"--working-dir={REPO}",
            "--entrypoint-num-cpus=0",
            "--",
            sys.executable,
            "-m",
            "ray_jobs.run",
            str(config),
            *extra,
        )
        return job

    def status(self, job: str) -> str:
        return str(self.client.get_job_status(job).value)

    def wait(self, job: str, timeout: float = 900) -> str:
        deadline = time.time() + timeout
        while (state := self.status(job)) in ("RUNNING", "PENDING"):
            assert time.time() < deadline, f"job {job} still {state} after {timeout} s"
            time.sleep(3)
        return state

    def logs(self, job: str) -> str:
        return self.client.get_job_logs(job)

    def stop_when(self, job: str, ready, what: str) -> None:
        """`ray job stop` as soon as `ready()` holds; the job must end STOPPED."""
        deadline = time.time() + 600
        while not ready():
            assert self.status(job) in ("RUNNING", "PENDING"), f"job ended before {what}: {self.logs(job)[-3000:]}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)
        self.ray("job", "stop", job)
        assert self.wait(job) == "STOPPED"

    def close(self) -> None:
        os.environ.pop("RAY_AUTH_MODE", None)
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """The CLI's environment. Token auth off: Ray 2.60 turns it on for a head started where a
    token file exists (~/.ray/auth_token, left by any earlier local cluster)."""
    return dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        HF_HUB_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
    )


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = Head(tmp_path_factory.mktemp("ray-head"))
    yield h
    h.close()


def _config(implanted, tmp: Path, name: str, overrides: dict | None = None) -> Path:
    """The implanted run, with a retain pool cut into enough shards (160 items in 40) to stop retrieval in."""
    extraction = SHARED_DATA / "icu_benchmark" / "forget_sets" / "exp1" / "lm_extraction_128_1.csv"
    return run_config(
        implanted,
        tmp,
        name,
        {
            "retain.paths": [str(implanted["retain"]), str(extraction)],
            "retain.max_items": 160,
            "retrieval.shard_rows": 4,
            "unlearning.optim.lr": 1.0e-3,
            "evaluation.keep_path": str(implanted["retain"]),
            # relearning at this unlearning lr scrambles even the original (3/8 leak after it): 3e-4 keeps 8/8
            "audit.relearn_lr": 3.0e-4,
            "audit.relearn_steps": 4,
            **(overrides or {}),
        },
    )


@pytest.fixture(scope="module")
def reference(head, implanted, tmp_path_factory):
    """The whole pipeline as one uninterrupted job."""
    tmp = tmp_path_factory.mktemp("reference")
    config = _config(implanted, tmp, "reference")
    tmp_before = set(Path(tempfile.gettempdir()).iterdir())
    job = head.submit(config)
    state = head.wait(job)
    assert state == "SUCCEEDED", head.logs(job)[-5000:]
    return dict(config=config, root=tmp / "runs" / "reference", job=job, tmp_before=tmp_before)


def _manifest(root: Path) -> dict:
    path = root / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def _running(root: Path, stage: str) -> bool:
    return _manifest(root)["stages"].get(stage, {}).get("status") == "running"


def test_whole_run_as_a_job(head, reference):
    status = subprocess.run(
        [str(BIN / "icu"), "status", str(reference["root"])], capture_output=True, text=True, env=_env(), check=True
    ).stdout
    assert "all stages done" in status and status.count(" done ") == len(STAGES), status


def test_request_text_stays_inside_the_run_directory(head, reference, implanted):
    """After a whole run as a Ray job, no file outside the run directory holds request text:
    not the Ray session (job logs, worker logs, spilled objects), the Hugging Face and icu
    caches, or what the job left in /tmp. Inside the run it is only in the request-derived artefacts."""
    from pipeline import modeling

    texts = [t[:40].encode() for t in implanted["memorize"][:8]]
    assert not any(t.decode() in head.logs(reference["job"]) for t in texts)
    left_in_tmp = [
        p
        for p in Path(tempfile.gettempdir()).iterdir()
        if p not in reference["tmp_before"] and not p.name.startswith("pytest-of-")
    ]
    roots = [head.temp, Path.home() / ".cache" / "huggingface", modeling.cache_dir(), *left_in_tmp]
    files = [
        p
        for root in roots
        if root.exists()
        for p in ([root] if root.is_file() else root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    ]
    leaks = [p for p in files if any(t in p.read_bytes() for t in texts)]
    assert not leaks, f"request text outside the run directory: {leaks[:5]}"
    inside = {
        str(p.relative_to(reference["root"]))
        for p in reference["root"].rglob("*")
        if p.is_file() and any(t in p.read_bytes() for t in texts)
    }
    assert inside <= {"requests/accepted.parquet", "retrieval/neighbours.parquet"}, inside
    # Nor its tokens: evaluation units name a request by its row, so Ray's object store (which spills
    # to the session folder) never holds its token ids, as JSON or as raw int64s.
    tok = modeling.load_tokenizer(implanted["root"] / "model")
    token_rows = [tok(t, add_special_tokens=False)["input_ids"][:16] for t in implanted["memorize"][:8]]
    patterns = [", ".join(map(str, r)).encode() for r in token_rows] + [
        b"".join(int(i).to_bytes(8, "little") for i in r) for r in token_rows
    ]
    spilled = [
        p
        for p in head.temp.rglob("*")
        if p.is_file() and not p.is_symlink() and any(t in p.read_bytes() for t in patterns)
    ]
    assert not spilled, f"request tokens in the Ray session: {spilled[:5]}"
    # The model card shows the run config without the operator's paths.
    card = (reference["root"] / "model" / "README.md").read_text()
    assert "<path>" in card and str(reference["root"].parent) not in card and str(implanted["root"]) not in card


def test_evaluate_reports_before_and_after(reference):
    """The exported weights are the engine's; the original remembers the requests and the
    unlearned model does not; the report renders."""
    from pipeline import modeling
    from conftest import checkpoint_weights

    root = reference["root"]
    result = json.loads((root / "unlearn" / "result.json").read_text())
    exported = modeling.load_model(root / "unlearn" / "model")
    final = checkpoint_weights(root / "unlearn" / "checkpoints", "final")
    assert max((p - final[k]).abs().max().item() for k, p in exported.state_dict().items() if k in final) == 0
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    before, after = metrics["models"]["original"], metrics["models"]["unlearned"]
    assert metrics["thresholds"] == result["thresholds"]
    assert before["forget"]["below_thresholds"] == 0 and after["forget"]["below_thresholds"] == 8
    assert after["forget"]["ma"] < before["forget"]["ma"] - 0.5
    assert after["mia_auc"]["loss"] < before["mia_auc"]["loss"]
    # Utility on a real model is the demo's business: this tiny model was fine-tuned on WikiText
    # windows, and the unlearning lr here is harsh (measured at 2e-4: WikiText PPL 27.6 -> 246).
    assert all(0 < m["ppl"][name] < float("inf") for m in (before, after) for name in ("pile", "wikitext"))
    print(f"\ntiny implanted model before/after: {before}\n{after}")
    samples = pd.read_parquet(root / "eval" / "per_sample.parquet")
    assert set(samples["model"]) == {"original", "unlearned"}
    report = (root / "eval" / "report.md").read_text()
    assert "| unlearned |" in report and "forget_distributions.png" in report
    assert all(
        (root / "eval" / png).stat().st_size > 5000
        for png in ("forget_distributions.png", "forgotten_per_epoch.png", "loss_curves.png")
    )


def test_the_audit_finds_in_the_original_what_the_hand_off_no_longer_gives(reference):
    """Every probe extracts the requests and the kept rows from the original; none but relearning
    extracts a request from the hand-off, some kept rows still come out of it whole, and the
    never-seen rows never do (the criterion's false positives)."""
    rows = pd.read_parquet(reference["root"] / "audit" / "rows.parquet")
    leaks = rows.groupby(["model", "group", "probe"])["leak"].sum()
    print("\n" + (reference["root"] / "audit" / "report.md").read_text())
    assert all(leaks["original", g, p] >= 7 for p in PROBES for g in ("erased", "kept")), leaks
    assert all(leaks["unlearned", "erased", p] == 0 for p in PROBES if p != "relearn"), leaks
    assert leaks["unlearned", "kept", "greedy"] >= 3  # kept MA ~91 %: a 12-byte run breaks at one wrong byte
    assert not rows[rows["group"] == "unseen"]["leak"].any()
    evaluated = pd.read_parquet(reference["root"] / "eval" / "per_sample.parquet")
    kept = set(evaluated.loc[evaluated["task"] == "keep", "sample_id"])
    assert set(rows.loc[rows["group"] == "kept", "row_id"]) == kept  # one name per kept row, both stages
    receipt = json.loads((reference["root"] / "model" / "receipt.json").read_text())["requests"]
    assert all(isinstance(r["robust"], bool) and r["audit_greedy"] is not None for r in receipt)


def test_export_hands_off_a_verified_folder_and_a_receipt(reference, implanted, tmp_path):
    import hashlib
    import shutil

    from transformers import AutoModelForCausalLM

    from pipeline import export, modeling

    root = reference["root"]
    model_dir = root / "model"
    receipt = json.loads((model_dir / "receipt.json").read_text())
    # Content hashes are keyed: no one holding a request's text can confirm it without the operator's key.
    from pipeline import keys

    key = keys.receipt_key()
    texts = {
        json.loads(line)["id"]: json.loads(line)["text"] for line in implanted["requests"].read_text().splitlines()
    }
    for row in (r for r in receipt["requests"] if r["status"] != "rejected"):
        plain = hashlib.sha256(keys.normalise(texts[row["request_id"]]).encode()).hexdigest()
        assert row["content_hash"] == keys.keyed_hash(key, texts[row["request_id"]]) != plain
    assert keys.key_id(key) in receipt["content_hash"]
    ingest = _manifest(root)["stages"]["ingest"]["summary"]
    assert len(receipt["requests"]) == ingest["rows"] == ingest["accepted"] + ingest["rejected"]
    assert receipt["counts"]["forgotten"] == 8
    assert all(r["epoch_forgotten"] is not None and r["ma_after"] <= r["ma_threshold"] for r in receipt["requests"])
    for line in (model_dir / "checksums.sha256").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((model_dir / name).read_bytes()).hexdigest() == digest
    assert "| unlearned |" in (model_dir / "README.md").read_text()
    served = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    tok = modeling.load_tokenizer(model_dir)
    out = served.generate(**tok("The", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 1
    texts = [t[:40] for t in implanted["memorize"][:8]]
    for path in model_dir.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            assert not any(t in path.read_text(errors="ignore") for t in texts), f"request text found in {path}"
    # A folder whose weights drifted from the engine's fails verification.
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    model = AutoModelForCausalLM.from_pretrained(bad)
    with torch.no_grad():
        next(model.parameters()).add_(1e-2)
    model.save_pretrained(bad)
    with pytest.raises(RuntimeError, match="verification failed"):
        export.verify(bad, torch.load(root / "unlearn" / "probe.pt", weights_only=True))


def _copy_of(reference, tmp_path):
    import shutil

    from pipeline.store import RunStore

    run = tmp_path / "run"
    shutil.copytree(reference["root"], run, symlinks=True)
    store = RunStore(run)
    return store, store.load_config()


def test_export_fails_closed_and_leaves_nothing_to_serve(reference, tmp_path):
    """A missing audit verdict or a link planted in the unlearned folder refuses the export, and
    the earlier hand-off is gone, not left to be served."""
    from pipeline import driver
    from pipeline.errors import UserError

    store, cfg = _copy_of(reference, tmp_path)
    rows = pd.read_parquet(store.artefact("audit_rows"))
    victim = rows[rows["group"] == "erased"]["row_id"].iloc[0]
    drop = (rows["model"] == "unlearned") & (rows["row_id"] == victim) & (rows["probe"] == "int4")
    rows[~drop].to_parquet(store.artefact("audit_rows"))
    assert store.artefact("handoff").is_dir()
    store.update(lambda m: m["stages"]["export"].update(fingerprint="other inputs"))  # so the export reruns
    with pytest.raises(UserError, match=rf"no verdict for 1 accepted requests: {victim} \(int4\)"):
        driver.run_stage(cfg, store, "export")
    assert not store.artefact("handoff").exists() and store.stage("export")["status"] == "failed"

    rows.to_parquet(store.artefact("audit_rows"))
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the hand-off")
    (store.artefact("unlearned_model") / "notes.txt").symlink_to(secret)
    with pytest.raises(UserError, match="notes.txt is a symbolic link"):
        driver.run_stage(cfg, store, "export")
    assert not store.artefact("handoff").exists() and secret.read_text() == "not for the hand-off"
    (store.artefact("unlearned_model") / "notes.txt").unlink()
    driver.run_stage(cfg, store, "export")
    assert (store.artefact("handoff") / "receipt.json").is_file()


def test_an_edited_audit_partial_is_probed_again(reference, tmp_path):
    """Whoever can write to audit/partial/ cannot change a verdict: the edited file no longer matches
    the sha256 recorded with it, so the unlearned model is probed again and the receipt tells the truth."""
    from pipeline import driver

    store, cfg = _copy_of(reference, tmp_path)
    part = store.artefact("audit_partial") / "unlearned.parquet"
    truth = pd.read_parquet(part)
    forged = truth.copy()
    forged.loc[forged["group"] == "kept", "leak"] = ~forged.loc[forged["group"] == "kept", "leak"]
    forged.to_parquet(part)
    store.reset(["audit", "export"])
    driver.run_stage(cfg, store, "audit")
    result = json.loads(store.artefact("audit").read_text())
    assert result["reused"] == ["original"]
    pd.testing.assert_frame_equal(pd.read_parquet(part), truth)


def test_consolidation_and_export_write_one_shard_at_a_time(reference, implanted, tmp_path):
    """The final checkpoint consolidated in small shards (with the index from_pretrained reads) is
    the same model; export.dtype bfloat16 re-encodes it shard by shard to the rounded weights."""
    import math

    from transformers import AutoModelForCausalLM

    from pipeline import export, shards, unlearn

    root = reference["root"]
    small = unlearn.consolidate(
        root / "unlearn" / "checkpoints", "final", implanted["root"] / "model", tmp_path / "small", max_bytes=60_000
    )
    files = sorted(small.glob("*.safetensors"))
    sizes = {n: shape.numel() * 4 for n, (shape, _) in shards.specs(small).items()}
    assert len(files) >= 4 and (small / shards.INDEX).is_file()
    assert all(f.stat().st_size <= max(60_000, max(sizes.values())) + 4096 for f in files)  # + header
    whole = AutoModelForCausalLM.from_pretrained(root / "unlearn" / "model", local_files_only=True).state_dict()
    parts = AutoModelForCausalLM.from_pretrained(small, local_files_only=True).state_dict()
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)

    half = tmp_path / "bf16"
    half.mkdir()
    export.reencode(small, half, torch.bfloat16, max_bytes=40_000)
    served = AutoModelForCausalLM.from_pretrained(half, local_files_only=True)
    planned = shards.plan({k: (shape, torch.bfloat16) for k, (shape, _) in shards.specs(small).items()}, 40_000)
    assert served.dtype == torch.bfloat16 and sorted(p.name for p in half.glob("*.safetensors")) == sorted(planned)
    assert all(torch.equal(t, whole[k].to(torch.bfloat16)) for k, t in served.state_dict().items())
    probe = torch.load(root / "unlearn" / "probe.pt", weights_only=True)
    assert 0 < export.verify(half, probe, torch.bfloat16, tolerance=math.inf) < math.inf


def test_stopped_jobs_resume_to_the_uninterrupted_result(head, reference, implanted, tmp_path):
    config = _config(implanted, tmp_path, "stopped")
    root = tmp_path / "runs" / "stopped"
    logs = []

    # 1. Stop during retrieval, once some embedding shards have landed; they are not embedded again.
    job = head.submit(config)
    pool = root / "retrieval" / "pool"
    # an emb file counts once its record (emb-N.json) is written
    head.stop_when(job, lambda: _running(root, "retrieve") and any(pool.glob("emb-*.json")), "an embedding shard")
    assert _manifest(root)["stages"]["retrieve"]["status"] != "done"
    landed = {p.name: p.stat().st_mtime_ns for p in (r.with_suffix(".npy") for r in pool.glob("emb-*.json"))}
    logs.append(head.logs(job))

    # 2. Resubmit; stop during unlearning after a checkpoint; the next job says where it resumes.
    job = head.submit(config)
    folder = root / "unlearn" / "checkpoints"
    head.stop_when(job, lambda: bool(complete_tags(folder)), "an epoch checkpoint")
    assert _manifest(root)["stages"]["unlearn"]["status"] != "done"
    assert {p.name: p.stat().st_mtime_ns for p in pool.glob("emb-*.npy") if p.name in landed} == landed
    logs.append(head.logs(job))
    tag = complete_tags(folder)[0]

    # 3. Resubmit; stop during evaluation once the original model's scores are kept.
    job = head.submit(config)
    kept = root / "eval" / "partial" / "original.parquet"
    head.stop_when(
        job, lambda: _running(root, "evaluate") and kept.with_suffix(".key").exists(), "the original model's scores"
    )
    logs.append(log := head.logs(job))
    assert f"resuming from checkpoint {tag}" in log
    kept_at = kept.stat().st_mtime_ns

    # 4. Resubmit to the end.
    job = head.submit(config)
    assert head.wait(job) == "SUCCEEDED", head.logs(job)[-5000:]
    logs.append(head.logs(job))
    assert kept.stat().st_mtime_ns == kept_at, "the original model was scored again"

    ref, got = reference["root"] / "model", root / "model"
    wa, wb = load_file(ref / "model.safetensors"), load_file(got / "model.safetensors")
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff <= 1e-6, f"final weights differ from the uninterrupted run's by {diff}"
    ra, rb = (json.loads((p / "receipt.json").read_text()) for p in (ref, got))
    assert ra["counts"] == rb["counts"]
    for a, b in zip(ra["requests"], rb["requests"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], abs=1e-6), key
            else:
                assert a[key] == b[key], key
    ma, mb = (json.loads((r / "eval" / "metrics.json").read_text())["models"] for r in (reference["root"], root))
    assert ma["unlearned"]["forget"] == pytest.approx(mb["unlearned"]["forget"], abs=1e-6)

    # Request text appears in no log: the run's, the jobs', or anything under Ray's session logs.
    texts = [t[:40] for t in implanted["memorize"][:8]]
    files = [
        *root.joinpath("logs").rglob("*"),
        *reference["root"].joinpath("logs").rglob("*"),
        *head.temp.joinpath("session_latest", "logs").rglob("*"),
    ]
    for name, content in [
        *((str(p), p.read_text(errors="ignore")) for p in files if p.is_file()),
        *(("job log", log) for log in logs),
    ]:
        assert not any(t in content for t in texts), f"request text found in {name}"


def test_changed_learning_rate_is_refused(head, reference, implanted, tmp_path):
    changed = _config(
        implanted,
        tmp_path,
        "reference",
        {"unlearning.optim.lr": 2.0e-3, "storage.runs_dir": str(reference["root"].parent)},
    )
    job = head.submit(changed)
    assert head.wait(job) == "FAILED"
    log = head.logs(job)
    errors = [line for line in log.splitlines() if line.startswith("icu: error:")]
    assert len(errors) == 1 and "unlearning.optim.lr" in errors[0] and "--restart-from" in errors[0], log
    assert "Traceback" not in log


def test_run_dir_inside_the_uploaded_copy_is_refused(head, implanted, tmp_path):
    """A relative runs_dir would land in Ray's temporary copy of the project and vanish."""
    config = _config(implanted, tmp_path, "relative", {"storage.runs_dir": "runs"})
    job = head.submit(config)
    assert head.wait(job) == "FAILED"
    log = head.logs(job)
    assert "storage.runs_dir" in log and "--base-dir" in log and "Traceback" not in log
    # With --base-dir the same relative path resolves where the user submitted from.
    job = head.submit(config, "--base-dir", str(tmp_path))
    head.stop_when(job, lambda: (tmp_path / "runs" / "relative" / "config.yaml").exists(), "the run directory")


def test_a_report_setting_reruns_evaluation_only(reference, tmp_path, caplog):
    """A finished run, then `--restart-from evaluate` with an evaluation setting changed:
    unlearning is skipped and its checkpoints are untouched (a copy of the reference run)."""
    import shutil

    from pipeline.cli import main

    root = tmp_path / "runs" / "reference"
    shutil.copytree(reference["root"], root, symlinks=True)
    config = tmp_path / "reference.yaml"
    config.write_text(reference["config"].read_text().replace(str(reference["root"].parent), str(tmp_path / "runs")))
    checkpoints = {p: p.stat().st_mtime_ns for p in (root / "unlearn" / "checkpoints").rglob("*") if p.is_file()}
    with caplog.at_level("INFO"):
        assert (
            main(
                [
                    "run",
                    str(config),
                    "--restart-from",
                    "evaluate",
                    "--set",
                    "evaluation.max_samples.ppl=1",
                    "--set",
                    "resources.launcher=torchrun",
                ]
            )
            == 0
        )
    assert "unlearn: already complete with the same inputs; skipped" in caplog.text
    assert "evaluate: finished" in caplog.text and "export: finished" in caplog.text
    assert {
        p: p.stat().st_mtime_ns for p in (root / "unlearn" / "checkpoints").rglob("*") if p.is_file()
    } == checkpoints
    assert _manifest(root)["stages"]["evaluate"]["status"] == "done"
