"""Unlearning end to end on a tiny implanted model: forget 8 memorized sequences, keep 8.

Ray Train with 2 workers under ZeRO-3 (gloo, CPU), spread over two Ray nodes, is the path
users take on a cluster; the same run under torchrun must give the same weights, and a
worker killed mid-run must resume from its last checkpoint to the same weights as an
uninterrupted run.
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

from pipeline import driver, modeling
from pipeline.errors import UserError
from pipeline.metrics import memorization_accuracy, pad_rows

from conftest import checkpoint_weights
from implant import run_config

pytestmark = pytest.mark.slow


def _unlearn(config: Path) -> tuple[Path, dict]:
    cfg, store = driver.open_run(str(config))
    driver.run_pipeline(cfg, store, until="unlearn")
    return store.root, json.loads((store.root / "unlearn" / "result.json").read_text())


def _ma(model, tok, texts: list[str]) -> torch.Tensor:
    ids, mask = pad_rows([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id)
    return memorization_accuracy(model, ids, mask)


@pytest.fixture(scope="module")
def ray_run(implanted, tmp_path_factory):
    """The reference run: Ray Train, uninterrupted, on a cluster of two 1-CPU nodes with the
    2 workers SPREAD over them (the single-node path is the killed-worker test's and the job tests')."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    config = run_config(implanted, tmp_path_factory.mktemp("ray"), "ray", {"resources.placement": "SPREAD"})
    ray.init(address=cluster.address)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        root, result = _unlearn(config)
    finally:
        ray.shutdown()
        cluster.shutdown()
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
    after.load_state_dict(checkpoint_weights(root / "unlearn" / "checkpoints", "final"), strict=True)
    forget = [t[:48] if i % 2 else t for i, t in enumerate(implanted["memorize"][:8])]
    keep = implanted["memorize"][8:]
    assert (_ma(after, tok, forget) <= thr["ma"]).all()
    drop = _ma(before, tok, keep) - _ma(after, tok, keep)
    assert (drop <= 0.10).all(), f"retained sequences lost MA: {drop.tolist()}"

    # ZeRO-3: each of the 2 ranks held half the parameters, none held them all.
    part = result["partition"]
    assert len(part["held_per_rank"]) == 2 and sum(part["held_per_rank"]) >= part["total"]
    assert all(held <= part["total"] // 2 + 64 for held in part["held_per_rank"])
    assert len(set(part["nodes"])) == 2, f"the two workers ran on one node: {part['nodes']}"


def test_torchrun_gives_the_ray_result(implanted, ray_run, tmp_path):
    root, result = _unlearn(run_config(implanted, tmp_path, "torchrun", {"resources.launcher": "torchrun"}))
    _same_run(ray_run[0], root)
    assert result["epochs"] == ray_run[1]["epochs"]


def test_killed_worker_resumes_to_the_same_weights(implanted, ray_run, tmp_path):
    import ray

    config = run_config(implanted, tmp_path, "killed")
    marker = tmp_path / "runs" / "killed" / "unlearn" / "checkpoints" / "epoch-2" / "files.json"  # sealed
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_train_worker_after, args=(marker, killed), daemon=True)
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


def test_a_lost_worker_group_ends_in_one_line_and_the_same_command_resumes(implanted, tmp_path, capfd):
    """With no retries left, a Ray Train worker killed after epoch 1 fails the stage with one line
    saying where a rerun resumes (the traceback goes to the run's log only); the rerun does."""
    import ray

    from pipeline.cli import main

    config = run_config(implanted, tmp_path, "lost", {"resources.max_failures": 0})
    marker = tmp_path / "runs" / "lost" / "unlearn" / "checkpoints" / "epoch-1" / "files.json"
    killer = threading.Thread(target=_kill_a_train_worker_after, args=(marker, []), daemon=True)
    killer.start()
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        capfd.readouterr()
        assert main(["unlearn", str(config)]) == 2
        err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("icu: error:")]
        assert len(err) == 1 and "unlearning workers failed" in err[0], err
        assert "rerunning the same command resumes from checkpoint epoch-" in err[0]
        log = tmp_path / "runs" / "lost" / "logs" / "workers-failure.log"
        assert str(log) in err[0] and "Traceback" in log.read_text()
        assert main(["unlearn", str(config)]) == 0
    finally:
        ray.shutdown()
    result = json.loads((tmp_path / "runs" / "lost" / "unlearn" / "result.json").read_text())
    assert result["resumed_from"] and result["resumed_from"][0].startswith("epoch-") and result["forgotten"] == 8


def test_an_out_of_memory_kill_is_named_with_the_node_s_memory(tmp_path):
    from pipeline.store import RunStore
    from pipeline.ranks import failure_line

    store = RunStore(tmp_path / "run")
    (store.artefact("checkpoints") / "epoch-6").mkdir(parents=True)
    (store.artefact("checkpoints") / "epoch-6" / "files.json").write_text("{}")
    oom = RuntimeError(
        "Training failed due to worker errors: ray.exceptions.OutOfMemoryError: Task was killed due to "
        "the node running low on memory. Memory on the node (IP: 10.0.0.1, ID: ab) was 22.81GB used / "
        "23.00GB limit (0.992)"
    )
    line = failure_line(oom, "unlearning", store, tmp_path / "log")
    assert "killed for memory" in line and "22.81 GB used of a 23.00 GB limit" in line and "\n" not in line
    assert "resumes from checkpoint epoch-6" in line and "resources.num_workers" in line
    other = failure_line(ValueError("bad"), "evaluation (original)", store, tmp_path / "log")
    assert other.startswith("evaluation (original) workers failed (ValueError)") and "checkpoint" not in other


def _kill_a_train_worker_after(marker: Path, killed: list[int]) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and not marker.exists():
        time.sleep(0.05)
    for proc in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)
            return


def test_requests_left_remembered_fail_the_run_and_more_epochs_resume_it(implanted, ray_run, tmp_path, capfd):
    """stop: each with too few epochs: exit code 3 naming the remembered ids (after writing the
    results); given more epochs the same run continues from its last checkpoint to the weights of
    a run that had them from the start."""
    from pipeline.cli import REMEMBERED_EXIT, main

    config = run_config(
        implanted, tmp_path, "short", {"resources.launcher": "torchrun", "unlearning.stop.max_epochs": 1}
    )
    capfd.readouterr()
    assert main(["unlearn", str(config)]) == REMEMBERED_EXIT
    err = capfd.readouterr().err
    root = tmp_path / "runs" / "short"
    result = json.loads((root / "unlearn" / "result.json").read_text())
    history = pd.read_parquet(root / "unlearn" / "history.parquet")
    last = history[history.epoch == 1]
    assert result["stop_reason"] == "max_epochs" and result["remembered"] == last[~last.forgotten].request_id.tolist()
    assert result["remembered"], "one epoch at this lr should leave some requests remembered"
    assert f"icu: {len(result['remembered'])} accepted requests are still remembered" in err
    assert ", ".join(result["remembered"]) in err and "--restart-from unlearn" in err

    assert main(["unlearn", str(config), "--restart-from", "unlearn", "--set", "unlearning.stop.max_epochs=30"]) == 0
    result = json.loads((root / "unlearn" / "result.json").read_text())
    assert result["resumed_from"] == ["epoch-1"] and result["remembered"] == []
    _same_run(ray_run[0], root)


def test_looks_between_checks_forget_and_resume_to_the_uninterrupted_result(implanted, tmp_path):
    """unlearning.check.every: the requests trained in every 2 steps are looked at before the epoch
    goes on; the run forgets every request, and a run stopped after an epoch and given more epochs
    (its last looks and lr factor restored from the checkpoint) ends with the same weights."""
    from pipeline.cli import main

    looked = {"resources.launcher": "torchrun", "unlearning.check.every": 2, "unlearning.optim.lr_backoff": 0.5}
    root, result = _unlearn(run_config(implanted, tmp_path, "looked", looked))
    assert result["stop_reason"] == "all_forgotten" and result["forgotten"] == 8
    epochs = pd.read_parquet(root / "unlearn" / "epochs.parquet")
    assert (epochs["looks"] == (epochs["steps"] + 1) // 2 - 1).all() and epochs["looks"].sum() > 0
    config = run_config(implanted, tmp_path, "stopped", dict(looked, **{"unlearning.stop.max_epochs": 1}))
    assert main(["unlearn", str(config)]) == 3
    assert main(["unlearn", str(config), "--restart-from", "unlearn", "--set", "unlearning.stop.max_epochs=30"]) == 0
    _same_run(root, tmp_path / "runs" / "stopped")


def _same_run(a: Path, b: Path) -> None:
    """Equal final weights (max abs diff <= 1e-6) and the same per-epoch history, no epoch twice."""
    wa, wb = (checkpoint_weights(p / "unlearn" / "checkpoints", "final") for p in (a, b))
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff <= 1e-6, f"final weights differ by {diff}"
    ha, hb = (pd.read_parquet(p / "unlearn" / "history.parquet") for p in (a, b))
    assert not hb.duplicated(["epoch", "request_id"]).any()
    assert sorted(hb.epoch.unique()) == list(range(hb.epoch.max() + 1))
    pd.testing.assert_frame_equal(ha, hb, check_exact=False, atol=1e-6)


class _Evil:
    """A pickle that runs a shell command when loaded (what a crafted checkpoint file does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(tag: Path, marker: Path) -> None:
    torch.save({"module": _Evil(marker)}, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")


def test_a_crafted_checkpoint_is_refused_on_export_and_on_resume(implanted, ray_run, tmp_path, capfd):
    """Anyone who can write the run directory can rewrite a checkpoint (and its files.json):
    consolidation and resumption load weights only, refuse the pickle in one line, run nothing."""
    import shutil

    from pipeline import checkpoints, unlearn
    from pipeline.cli import main
    from pipeline.errors import UserError

    marker = tmp_path / "pwned"
    run = tmp_path / "runs" / "ray"
    shutil.copytree(ray_run[0], run, symlinks=True, ignore=shutil.ignore_patterns("ray"))
    folder = run / "unlearn" / "checkpoints"
    _plant(folder / "final", marker)
    with pytest.raises(UserError, match=r"checkpoint .*final: refused to load .*GLOBAL posix.system.*fix:"):
        unlearn.consolidate(folder, "final", implanted["root"] / "model", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()

    newest = checkpoints.complete_tags(folder)[0]
    _plant(folder / newest, marker)
    checkpoints.seal(
        folder, newest, checkpoints.hash_share(folder, newest, 0, 1)
    )  # the attacker rewrites the hashes too
    config = run_config(implanted, tmp_path, "ray", {"resources.launcher": "torchrun", "resources.max_failures": 0})
    capfd.readouterr()
    assert main(["run", str(config), "--restart-from", "unlearn"]) == 2
    err = capfd.readouterr().err
    assert f"icu: error: checkpoint {folder / newest}: refused to load" in err, err[-3000:]
    assert "icu: error: unlearning workers failed (RuntimeError)" in err
    assert not marker.exists()


@pytest.mark.parametrize("recipe", ["icu_paper", "rmu"])
def test_the_named_recipes_run(implanted, tmp_path, recipe):
    """The paper's recipe and the RMU baseline run through the real loop (ZeRO-3, 2 torchrun ranks):
    RMU's activations reach its loss from both engines; the paper's rule is the set-level stop."""
    own = {"recipe": recipe, "optim": {"batch_size": 4}, "stop": {"max_epochs": 2}}
    if recipe == "rmu":  # the tiny model has 2 blocks, not the paper's 7 and more
        own["loss"] = {"layer": 1}
        with pytest.raises(UserError, match="unlearning.loss.layer: 7, but the model has 2 blocks"):
            _unlearn(
                run_config(
                    implanted, tmp_path, "deep", {"unlearning": dict(own, loss={}), "resources.launcher": "torchrun"}
                )
            )
    config = run_config(implanted, tmp_path, recipe, {"unlearning": own, "resources.launcher": "torchrun"})
    root, result = _unlearn(config)
    epochs = pd.read_parquet(root / "unlearn" / "epochs.parquet")
    assert result["method"] == {"icu_paper": "icu", "rmu": "rmu"}[recipe] and 1 <= result["epochs"] <= 2
    if recipe == "rmu":
        assert (epochs["mean_forget_distance"] > 0).all() and "mean_retain_distance" in epochs
    else:
        assert result["stop_reason"] in ("set_thresholds", "all_forgotten", "max_epochs") and "mean_kl" in epochs
