"""The unlearn stage: its key, the checkpoint stamp, the launch, and consolidation.

The workers (`pipeline.worker`, one process per rank) run under Ray Train on clusters or
under plain torchrun on GPU boxes without Ray; both resume from the run's last complete,
verified checkpoint, so a failure costs at most one epoch. When they finish, the final
sharded checkpoint is consolidated into a Hugging Face folder (`unlearned_model`) that
evaluation loads and export verifies.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoints, cluster, modeling
from pipeline.atomic import atomic_path, atomic_write_text, file_digest
from pipeline.config import Config
from pipeline.store import RunStore, fingerprint

log = logging.getLogger("icu.unlearn")

OUTPUTS = ("unlearn_result", "history", "epochs", "final_checkpoint", "unlearned_model", "probe")
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def key(cfg: Config, store: RunStore, resumable: bool = False) -> str:
    """What training and its stopping rule read: the model, the request rows and their
    neighbours (upstream keys), the unlearning settings, and only the evaluation fields the
    unseen-set thresholds are measured with (a report setting never retrains).

    `resumable`: the key the checkpoints are stamped with, without the settings that only say
    when to stop or what to keep (`max_epochs`, `keep_checkpoints`): epoch k's weights do not
    depend on them, so a run given more epochs continues from its last checkpoint.
    """
    e, r = cfg.evaluation, cfg.requests
    thresholds = dict(unseen=cfg.part("evaluation")[0]["unseen_path"], unseen_digest=file_digest(e.unseen_path), el_n=e.el_n,
                      el_range=e.el_range, cap=e.max_samples.get("unseen"), batch_size=e.batch_size,
                      max_tokens=cfg.max_tokens, prefix=r.prefix_tokens, suffix=r.suffix_tokens)
    model, unlearning = cfg.part("model", "unlearning")
    if resumable:
        unlearning = {k: v for k, v in unlearning.items() if k not in ("max_epochs", "keep_checkpoints")}
    return fingerprint("unlearn", model, unlearning, thresholds, cfg.retrieval.pairs_per_request,
                       file_digest(cfg.unlearning.ds_config), cfg.resources.num_workers,
                       store.key_of("ingest"), store.key_of("retrieve"))


def run(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Train to a stop (resuming from checkpoints of the same key), then consolidate."""
    stage_key = key(cfg, store, resumable=True)
    folder = store.artefact("checkpoints")
    stamp = folder / "fingerprint"
    if stamp.exists() and stamp.read_text() != stage_key:  # checkpoints of other inputs: start over
        log.info("unlearn: inputs changed since the last checkpoint; starting from epoch 0")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, stage_key)
    sealed = checkpoints.complete_tags(folder)
    if sealed:
        log.info("unlearn: resuming from checkpoint %s", sealed[0])
    (ray_train if cluster.use_ray(cfg) else torchrun)(cfg, store)
    summary = json.loads(store.artefact("unlearn_result").read_text())
    consolidate(store.artefact("checkpoints"), summary["final_tag"], cfg.model_dir, store.artefact("unlearned_model"),
                dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    return {k: v for k, v in summary.items() if k != "thresholds"}


def worker_env(cfg: Config) -> dict[str, str]:
    env = dict(WORKER_ENV, OMP_NUM_THREADS=str(max(1, int(cfg.resources.cpus_per_worker))))
    if not cfg.resources.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def ray_train(cfg: Config, store: RunStore) -> None:
    """Run the workers under Ray Train and wait for them; raise if the run failed."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.worker import train_worker

    cluster.ensure_ray()
    r = cfg.resources
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"run_dir": str(store.root)},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo", timeout_s=600),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker},
                                     placement_strategy=r.placement),
        run_config=RunConfig(name="unlearn", storage_path=str(store.artefact("ray_train")),
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             worker_runtime_env={"env_vars": worker_env(cfg)}),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"unlearning workers failed: {result.error}")


def torchrun(cfg: Config, store: RunStore) -> None:
    """Run the workers as local torchrun processes and wait for them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={cfg.resources.num_workers}", f"--max-restarts={cfg.resources.max_failures}",
           "-m", "pipeline.worker", str(store.root)]
    env = dict(os.environ, **worker_env(cfg))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun unlearning workers exited with code {proc.returncode}")


def consolidate(folder: Path, tag: str, base_dir: Path, out_dir: Path, *, dtype: str = "float32",
                trust_remote_code: bool = False) -> Path:
    """Write the weights of checkpoint `tag` as a model folder like `base_dir` (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = checkpoints.fp32_state_dict(folder, tag)
    config = AutoConfig.from_pretrained(base_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if _is_meta(model, k)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {tag} does not match {base_dir}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model = model.to(modeling.torch_dtype(dtype))
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        modeling.load_tokenizer(base_dir, trust_remote_code).save_pretrained(tmp)
        if (base_dir / "generation_config.json").is_file() and not (tmp / "generation_config.json").exists():
            shutil.copy(base_dir / "generation_config.json", tmp / "generation_config.json")
    log.info("unlearn: consolidated checkpoint %s into %s", tag, out_dir)
    return out_dir


def _is_meta(model: torch.nn.Module, name: str) -> bool:
    return model.get_parameter(name).is_meta if name in dict(model.named_parameters()) else True
