"""The demo, shortened for CI: the default model fine-tuned on 8 customer records, 2 erased.

The same `ray_jobs/configs/demo.yaml` as `make demo`, with the inputs prepared by
`ray_jobs.customers` for 8 customers instead of 32, 8 epochs at most (the recommended recipe's
small steps took 6 here, one step an epoch), small evaluation samples (classification and
dialogue left out: the full demo runs them), and an audit of greedy decoding and 4-bit weights
only (55 of its 85 s went to the other probes; the tiny model's run in test_jobs.py runs every
probe, and `make demo` runs them on this model).
The fine-tuned model is cached per machine like the full demo's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.store import STAGES, RunStore
from ray_jobs import customers

from conftest import REPO, write_config

SERVE_PYTHON = REPO / ".venv-serve" / "bin" / "python"

SHORT = {
    "unlearning.stop.max_epochs": 8,
    "retain.max_items": 64,
    "resources.eval_actors": 1,
    "resources.embed_actors": 1,
    "evaluation.suites": ["forget", "unseen", "ppl", "mia"],
    "evaluation.max_samples": {"unseen": 8, "ppl": 1},
    "audit.probes": ["greedy", "int4"],
}


def test_customer_records_are_split_and_checked(shared_data, tmp_path):
    rows = customers.records(shared_data, 32)
    assert len({r["id"] for r in rows}) == len({r["text"] for r in rows}) == 32
    assert rows == customers.records(shared_data, 32)  # the same people every time
    assert all("E-mail" in r["text"] and "phone" in r["text"] for r in rows)
    with pytest.raises(UserError, match="--erase"):
        customers.prepare(tmp_path, shared_data, customers=8, erase=8)
    with pytest.raises(UserError, match="not found"):
        customers.records(tmp_path, 8)


@pytest.fixture(scope="module")
def short_run(shared_data, tmp_path_factory):
    """The shortened demo, run once as `icu run` on local Ray: (its run store, the prepared customers'
    paths, what it printed)."""
    tmp = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the demo's relative paths are relative to the project root
        paths = customers.prepare(tmp / "customers", shared_data, customers=8, erase=2)
    text = (REPO / "ray_jobs" / "configs" / "demo.yaml").read_text().replace("runs/customers", str(tmp / "customers"))
    config = write_config(tmp, text, "demo.yaml")
    sets = [
        f"--set={key}={json.dumps(value)}"
        for key, value in dict(SHORT, **{"storage.runs_dir": str(tmp / "runs")}).items()
    ]
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(config), *sets],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    logs = [p for p in ray_tmp.rglob("worker-*") if p.is_file()]
    spam = [
        f"{p.name}: {line}"
        for p in logs
        for line in p.read_text(errors="replace").splitlines()
        if "Failed to query Ray Train" in line or "FutureWarning: `torch.distributed" in line
    ]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not spam, f"{len(spam)} lines of Ray Train / torch.distributed warnings in the workers' logs: {spam[:3]}"
    return RunStore(tmp / "runs" / "demo"), paths, output


def test_a_successful_run_prints_no_error_traceback_or_warning(short_run):
    """Quiet success: nothing from our code or the libraries we configure (FAISS's loader, Ray,
    DeepSpeed) reads as a failure in the output of a run that succeeded."""
    alarming = [
        line
        for line in short_run[2].splitlines()
        if re.search(r"Traceback|\bError\b|[Ee]rror:|warning", line, flags=re.IGNORECASE)
    ]
    assert not alarming, "\n".join(alarming[:20])


@pytest.mark.slow
def test_shortened_demo(short_run):
    store, paths, _ = short_run
    memorized = json.loads((paths["model"] / "memorized.json").read_text())
    assert memorized["ma"] > 0.9
    assert all(store.stage(s)["status"] == "done" for s in STAGES)
    receipt = json.loads((store.root / "model" / "receipt.json").read_text())
    assert len(receipt["requests"]) == 2
    for row in receipt["requests"]:  # forgotten with its epoch, or not forgotten with the reason
        assert row["epoch_forgotten"] is not None or row["reason"], row
    audited = json.loads((store.root / "audit" / "audit.json").read_text())["table"]
    assert audited["greedy"]["original"]["erased"] == [2, 2] and audited["greedy"]["original"]["kept"][0] >= 5
    unlearned = json.loads((store.root / "unlearn" / "result.json").read_text())
    # the neighbours' MA (recover_within) and the set's AUC against strangers: measured at every check
    assert len(unlearned["neighbour_ma"]) == len(unlearned["set_auc"]) == unlearned["epochs"] + 1
    people = {
        name: {json.loads(line)["id"] for line in (paths["erase"].parent / f"{name}.jsonl").open()}
        for name in ("erase", "keep", "unseen", "strangers")
    }
    assert [len(p) for p in people.values()] == [2, 6, 8, 8] and len(set().union(*people.values())) == 24
    metrics = json.loads((store.root / "eval" / "metrics.json").read_text())["models"]
    before, after = metrics["original"], metrics["unlearned"]
    assert before["forget"]["ma"] > 0.9 and before["keep"]["ma"] > 0.9  # the fine-tuned model knows them all
    assert after["forget"]["ma"] < before["forget"]["ma"]
    reference = metrics["retrained"]  # the perfect unlearner's perplexity beside the original's and ours
    assert set(reference["ppl"]) == set(before["ppl"]) == {"pile", "wikitext"}
    auc = reference["mia_auc"]["min_k"]
    assert after["privleak"]["min_k"] == pytest.approx((after["mia_auc"]["min_k"] - auc) / auc)
    print(
        f"\nshortened demo: forget MA {before['forget']['ma']:.3f} -> {after['forget']['ma']:.3f}, kept customers' "
        f"MA {before['keep']['ma']:.3f} -> {after['keep']['ma']:.3f}, Pile PPL {before['ppl']['pile']:.2f} -> "
        f"{after['ppl']['pile']:.2f}, receipt {receipt['counts']}"
    )


@pytest.mark.slow
@pytest.mark.skipif(not SERVE_PYTHON.is_file(), reason="vLLM's venv is not built here (make serve-venv)")
def test_vllm_serves_what_the_audit_scored(short_run, monkeypatch):
    """The shortened demo's hand-off served by vLLM (CPU build, fp32): greedy completions token
    for token, logprobs within 1e-4, the erased requests' spans as the audit recorded them.
    (The byte-level tiny model cannot be served: vLLM's CPU attention has no head_dim 16.)"""
    from pipeline import serving

    monkeypatch.chdir(REPO)
    frame = serving.check(short_run[0].root, str(SERVE_PYTHON))
    print("\n" + frame.to_string())
    assert serving.passed(frame) and frame["recorded_span"].notna().sum() == 2
