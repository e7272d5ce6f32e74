"""Start the unlearning workers: Ray Train (clusters) or torchrun (GPU boxes without Ray).

Both run `pipeline.unlearn.train_worker` on every rank. A restarted worker group (Ray
Train's FailureConfig, torchrun's --max-restarts) resumes from the run's last complete
checkpoint, so a failure costs at most one epoch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.store import RunStore

WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def worker_env(cfg: Config) -> dict[str, str]:
    env = dict(WORKER_ENV, OMP_NUM_THREADS=str(max(1, int(cfg.resources.cpus_per_worker))))
    if not cfg.resources.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster this job runs on (RAY_ADDRESS), or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=True)


def ray_train(cfg: Config, store: RunStore) -> None:
    """Run the workers under Ray Train and wait for them; raise if the run failed."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.unlearn import train_worker

    ensure_ray()
    r = cfg.resources
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"run_dir": str(store.root)},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo", timeout_s=600),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker},
                                     placement_strategy=r.placement),
        run_config=RunConfig(name="unlearn", storage_path=str(store.path("unlearn", "ray")),
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
           "-m", "pipeline.unlearn", str(store.root)]
    env = dict(os.environ, **worker_env(cfg))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun unlearning workers exited with code {proc.returncode}")
