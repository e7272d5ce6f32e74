"""Unlearning end to end on a tiny implanted model: forget 8 memorized sequences, keep 8.

Ray Train with 2 workers under ZeRO-3 (gloo, CPU) is the path users take; the same run
under torchrun must give the same weights, and a worker killed mid-run must resume from
its last checkpoint to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from implant import implant, windows, write_inputs
from pipeline import driver, modeling
from pipeline.metrics import memorization_accuracy, pad_rows
from pipeline.unlearn import consolidated_state_dict

from conftest import REPO, write_config

pytestmark = pytest.mark.slow

CONFIG = """
model: {{name: {model}}}
requests: {{path: {requests}, id_column: id, prefix_tokens: 20, suffix_tokens: 20, max_tokens: 64}}
retain: {{paths: [{retain}]}}
retrieval: {{k: 8, pairs_per_request: 8}}
unlearning: {{lr: 2.0e-4, max_epochs: 30, batch_size: 4}}
evaluation: {{data_dir: {data}, batch_size: 8, max_samples: {{unseen: 64, ppl: 4, classification: 8, dialogue: 4}}}}
resources: {{num_workers: 2, launcher: {launcher}, max_failures: 2}}
storage: {{runs_dir: {runs}, name: {name}}}
"""


@pytest.fixture(scope="module")
def implanted(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("implant")
    memorize, general = windows(shared_data)
    ma = implant(root / "model", memorize, general)
    assert ma > 0.9, f"the tiny model did not memorize its sequences (MA {ma:.3f})"
    requests, retain = write_inputs(root, memorize)
    return dict(root=root, memorize=memorize, requests=requests, retain=retain)


def _config(implanted, tmp: Path, name: str, launcher: str) -> Path:
    text = CONFIG.format(model=implanted["root"] / "model", requests=implanted["requests"],
                         retain=implanted["retain"], data=REPO.parent / "shared" / "data", runs=tmp / "runs",
                         name=name, launcher=launcher)
    return write_config(tmp, text, f"{name}.yaml")


def _unlearn(config: Path) -> tuple[Path, dict]:
    cfg, store = driver.open_run(str(config))
    driver.run_pipeline(cfg, store, until="unlearn")
    return store.root, json.loads((store.root / "unlearn" / "result.json").read_text())


def _ma(model, tok, texts: list[str]) -> torch.Tensor:
    ids, mask = pad_rows([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id)
    return memorization_accuracy(model, ids, mask)


@pytest.fixture(scope="module")
def ray_run(implanted, tmp_path_factory):
    """The reference run: Ray Train, 2 workers, uninterrupted."""
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        root, result = _unlearn(_config(implanted, tmp, "ray", "ray"))
    finally:
        ray.shutdown()
    return root, result


def test_implant_then_forget_with_ray_train(implanted, ray_run):
    root, result = ray_run
    thr = result["thresholds"]
    assert result["resumed_from"] == []
    assert result["stop_reason"] == "all_forgotten" and result["forgotten"] == 8 == result["requests"]
    history = pd.read_parquet(root / "unlearn" / "history.parquet")
    last = history[history.epoch == history.epoch.max()]
    assert last.forgotten.all() and (last.ma <= thr["ma"]).all() and (last.el <= thr["el"]).all()
    assert 0.15 < thr["ma"] < 0.5  # measured on unseen Pile text: a model that knows some English

    model_dir = implanted["root"] / "model"
    tok, before = modeling.load_tokenizer(model_dir), modeling.load_model(model_dir)
    after = modeling.load_model(model_dir)
    after.load_state_dict(consolidated_state_dict(root), strict=True)
    forget = [t[:48] if i % 2 else t for i, t in enumerate(implanted["memorize"][:8])]
    keep = implanted["memorize"][8:]
    assert (_ma(after, tok, forget) <= thr["ma"]).all()
    drop = _ma(before, tok, keep) - _ma(after, tok, keep)
    assert (drop <= 0.10).all(), f"retained sequences lost MA: {drop.tolist()}"

    # ZeRO-3: each of the 2 ranks held half the parameters, none held them all.
    part = result["partition"]
    assert len(part["held_per_rank"]) == 2 and sum(part["held_per_rank"]) >= part["total"]
    assert all(held <= part["total"] // 2 + 64 for held in part["held_per_rank"])


def test_torchrun_gives_the_ray_result(implanted, ray_run, tmp_path):
    root, result = _unlearn(_config(implanted, tmp_path, "torchrun", "torchrun"))
    _same_run(ray_run[0], root)
    assert result["epochs"] == ray_run[1]["epochs"]


def test_killed_worker_resumes_to_the_same_weights(implanted, ray_run, tmp_path):
    import ray

    config = _config(implanted, tmp_path, "killed", "ray")
    marker = tmp_path / "runs" / "killed" / "unlearn" / "checkpoints" / "latest_complete"
    killed: list[int] = []

    def kill_a_worker_after_epoch_2() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not (marker.exists() and marker.read_text() == "epoch-2"):
            time.sleep(0.05)
        for proc in psutil.process_iter(["cmdline"]):
            if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return

    killer = threading.Thread(target=kill_a_worker_after_epoch_2, daemon=True)
    killer.start()
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        root, result = _unlearn(config)
    finally:
        ray.shutdown()
    killer.join(timeout=1)
    assert killed, "no Ray Train worker was found to kill"
    assert result["resumed_from"][:1] == ["epoch-2"]  # Ray Train restarted the group from that checkpoint
    _same_run(ray_run[0], root)


def _same_run(a: Path, b: Path) -> None:
    """Equal final weights (max abs diff <= 1e-6) and the same per-epoch history, no epoch twice."""
    wa, wb = consolidated_state_dict(a), consolidated_state_dict(b)
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff <= 1e-6, f"final weights differ by {diff}"
    ha, hb = (pd.read_parquet(p / "unlearn" / "history.parquet") for p in (a, b))
    assert not hb.duplicated(["epoch", "request_id"]).any()
    assert sorted(hb.epoch.unique()) == list(range(hb.epoch.max() + 1))
    pd.testing.assert_frame_equal(ha, hb, check_exact=False, atol=1e-6)


def _continue_run(root: Path, until: str):
    """Run the finished unlearning run's later stages (their Ray Data pools need a local Ray)."""
    import ray

    cfg, store = driver.open_run(str(root / "config.yaml"))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        driver.run_pipeline(cfg, store, until=until)
    finally:
        ray.shutdown()
    return store


def test_evaluate_reports_before_and_after(implanted, ray_run):
    """The evaluate stage on the finished run: the exported weights are the engine's, the
    original remembers the requests and the unlearned model does not, and the report renders."""
    root, result = ray_run
    exported = modeling.load_model(root / "unlearn" / "model")
    final = consolidated_state_dict(root)
    assert max((p - final[k]).abs().max().item() for k, p in exported.state_dict().items() if k in final) == 0
    _continue_run(root, "evaluate")
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    before, after = metrics["models"]["original"], metrics["models"]["unlearned"]
    assert metrics["thresholds"] == result["thresholds"]
    assert before["forget"]["below_thresholds"] == 0 and after["forget"]["below_thresholds"] == 8
    assert after["forget"]["ma"] < before["forget"]["ma"] - 0.5
    assert after["mia_auc"]["loss"] < before["mia_auc"]["loss"]
    # Measured: WikiText PPL 27.6 -> 246 on this tiny model (it was fine-tuned on WikiText windows, and
    # lr 2e-4 over many epochs is harsh); utility on a real model is the demo's business, not this test's.
    assert all(0 < m["ppl"][name] < float("inf") for m in (before, after) for name in ("pile", "wikitext"))
    print(f"\ntiny implanted model before/after: {before}\n{after}")
    samples = pd.read_parquet(root / "eval" / "per_sample.parquet")
    assert set(samples["model"]) == {"original", "unlearned"}
    report = (root / "eval" / "report.md").read_text()
    assert "| unlearned |" in report and "forget_distributions.png" in report
    assert all((root / "eval" / png).stat().st_size > 5000 for png in
               ("forget_distributions.png", "forgotten_per_epoch.png", "loss_curves.png"))


def test_export_hands_off_a_verified_folder_and_a_receipt(implanted, ray_run, tmp_path):
    import hashlib
    import shutil

    from transformers import AutoModelForCausalLM

    from pipeline import export

    root, result = ray_run
    store = _continue_run(root, "export")
    model_dir = root / "model"
    receipt = json.loads((model_dir / "receipt.json").read_text())
    ingest = store.stage("ingest")["summary"]
    assert len(receipt["requests"]) == ingest["rows"] == ingest["accepted"] + ingest["rejected"]
    assert receipt["counts"]["forgotten"] == result["forgotten"] == 8
    assert all(r["epoch_forgotten"] is not None and r["ma_after"] <= r["ma_threshold"] for r in receipt["requests"])
    for line in (model_dir / "checksums.sha256").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((model_dir / name).read_bytes()).hexdigest() == digest
    assert "| unlearned |" in (model_dir / "README.md").read_text()
    served = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    tok = modeling.load_tokenizer(model_dir)
    out = served.generate(**tok("The", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 1
    # The request texts appear in no log and in nothing handed to serving.
    texts = [t[:40] for t in implanted["memorize"][:8]]
    for path in [*(root / "logs").rglob("*"), *model_dir.rglob("*")]:
        if path.is_file() and path.suffix != ".safetensors":
            content = path.read_text(errors="ignore")
            assert not any(t in content for t in texts), f"request text found in {path}"
    # A folder whose weights drifted from the engine's fails verification.
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    model = AutoModelForCausalLM.from_pretrained(bad)
    with torch.no_grad():
        next(model.parameters()).add_(1e-2)
    model.save_pretrained(bad)
    with pytest.raises(RuntimeError, match="verification failed"):
        export.verify(bad, torch.load(root / "unlearn" / "probe.pt", weights_only=True))


def test_two_node_cluster_with_spread_workers(implanted, ray_run, tmp_path):
    """Two Ray nodes of 1 CPU each; SPREAD puts one training worker on each; same result."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    config = _config(implanted, tmp_path, "spread", "ray")
    config.write_text(config.read_text().replace("max_failures: 2}", "max_failures: 2, placement: SPREAD}"))
    ray.init(address=cluster.address)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        root, result = _unlearn(config)
    finally:
        ray.shutdown()
        cluster.shutdown()
    nodes = result["partition"]["nodes"]
    assert len(set(nodes)) == 2, f"the two workers ran on one node: {nodes}"
    _same_run(ray_run[0], root)
