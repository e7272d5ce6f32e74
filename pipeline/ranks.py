"""Ranks: launching a distributed job's workers, and what every rank does first.

`launch` runs a module's workers on `resources.num_workers` ranks, under Ray Train on a cluster or
under plain torchrun (GPU boxes without Ray), and turns a failure they do not retry into one line.
`start_rank` is every rank's first step (accelerator, logging, the process group); `main` is the
torchrun entry of a worker module; `deepspeed_config` completes a rank's DeepSpeed JSON from the run
config. The unlearning loop (`pipeline.worker`) and the sharded evaluation (`pipeline.sharded_eval`)
both run through here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pipeline import checkpoints, cluster
from pipeline.atomic import open_private
from pipeline.config import Config, ResourcesConfig
from pipeline.errors import UserError
from pipeline.store import RunStore

# PYTHONWARNINGS: DeepSpeed calls torch's all_gather_into_tensor / reduce_scatter_tensor, which
# warn (FutureWarning, deprecated) on every call: hundreds of lines in a short run's log.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore::FutureWarning:torch.distributed.c10d_logger",
}


def worker_env(r: ResourcesConfig) -> dict[str, str]:
    """The workers' environment. MALLOC_MMAP_THRESHOLD_ (`resources.malloc_mmap_threshold`):
    glibc otherwise raises its threshold after each large free, and the gathered ZeRO-3
    parameters and logits freed every step then stay in the process's heap."""
    env = dict(WORKER_ENV, OMP_NUM_THREADS=str(max(1, int(r.cpus_per_worker))))
    if r.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(r.malloc_mmap_threshold)
    if not r.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def launch(cfg: Config, store: RunStore, module: str, args: list[str], name: str) -> None:
    """Run `module`'s workers (`train_worker(config)` under Ray Train, or `python -m module *args`
    under torchrun, config["args"] = args either way) on `resources.num_workers` ranks; wait.
    A failure the launcher does not retry ends in one line (`failure_line`); its traceback goes to
    the run's log."""
    try:
        (ray_train if cluster.use_ray(cfg) else torchrun)(cfg, store, module, args, name)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:
        logfile = store.artefact("logs") / "workers-failure.log"
        with open_private(logfile, append=True) as fh:
            fh.write(f"--- {name} ---\n{''.join(traceback.format_exception(exc))}\n".encode())
        raise UserError(failure_line(exc, name, store, logfile)) from None


def failure_line(exc: BaseException, name: str, store: RunStore, logfile: Path) -> str:
    """What a person needs when the workers fail: the cause (with the node's memory when Ray killed a
    worker for it), where a rerun of the same command resumes, and the fix."""
    text = "".join(traceback.format_exception(exc))
    memory = re.search(r"was ([\d.]+)GB used / ([\d.]+)GB limit", text)
    tags = checkpoints.complete_tags(store.artefact("checkpoints")) if name == "unlearning" else []
    resume = (
        f"rerunning the same command resumes from checkpoint {tags[0]}"
        if tags
        else "rerunning the same command starts them again"
        + (" (no checkpoint was complete yet)" if name == "unlearning" else "")
    )
    if memory or "OutOfMemoryError" in text or "SIGKILL" in text or "exit code -9" in text:
        used = f" ({memory[1]} GB used of a {memory[2]} GB limit)" if memory else ""
        return (
            f"{name} workers failed: a worker was killed for memory: the node ran out of it{used}; {resume}; fix: "
            f"free memory on the node, or lower resources.num_workers or unlearning.optim.batch_size (the traceback: "
            f"{logfile})"
        )
    return (
        f"{name} workers failed ({type(exc).__name__}); {resume}; fix: see the error above it in the log and the "
        f"traceback in {logfile}"
    )


def ray_train(cfg: Config, store: RunStore, module: str, args: list[str], name: str) -> None:
    """Run the workers under Ray Train and wait for them; raise if the run failed."""
    import importlib

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cluster.ensure_ray()
    r = cfg.resources
    trainer = TorchTrainer(
        importlib.import_module(module).train_worker,
        train_loop_config={"args": args},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo", timeout_s=600),
        scaling_config=ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.use_gpu,
            resources_per_worker={"CPU": r.cpus_per_worker},
            placement_strategy=r.placement,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(store.artefact("ray_train")),
            failure_config=FailureConfig(max_failures=r.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg.resources)},
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"{name} workers failed: {result.error}")


def torchrun(cfg: Config, store: RunStore, module: str, args: list[str], name: str) -> None:
    """Run the workers as local torchrun processes and wait for them."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.resources.num_workers}",
        f"--max-restarts={cfg.resources.max_failures}",
        "-m",
        module,
        *args,
    ]
    env = dict(os.environ, **worker_env(cfg.resources))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {name} workers exited with code {proc.returncode}")


def zero_sizes(hidden: int) -> dict[str, int]:
    """What "auto" ZeRO-3 sizes become. The first three are those transformers' Trainer derives
    from the hidden size; the last two bound the gathered parameters kept alive for reuse to
    about one layer (DeepSpeed's default, 1e9 elements, keeps a whole model of up to a billion
    parameters gathered on every rank)."""
    return {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
        "stage3_max_live_parameters": 10 * hidden * hidden,
        "stage3_max_reuse_distance": 10 * hidden * hidden,
    }


def deepspeed_config(cfg: Config, world: int, hidden: int, with_optimizer: bool = True) -> dict:
    """The JSON config from `unlearning.ds_config`, completed from the run config.

    Batch size, clipping, optimizer (torch AdamW on CPU: nothing JIT-compiled) and the
    warmup schedule come from the run config unless the JSON sets them itself.
    """
    u, o = cfg.unlearning, cfg.unlearning.optim
    ds = json.loads(Path(u.ds_config).read_text())
    zero = ds.setdefault("zero_optimization", {})
    for key, size in zero_sizes(hidden).items():
        if zero.get(key) == "auto":
            zero[key] = size
    ds.update(
        train_micro_batch_size_per_gpu=o.batch_size,
        gradient_accumulation_steps=1,
        train_batch_size=o.batch_size * world,
    )
    if ds.get("gradient_clipping", "auto") == "auto":  # "auto" (the HF convention) = take the run config's
        ds["gradient_clipping"] = o.grad_clip
    if with_optimizer:
        # on CPU torch's AdamW, fused: one pass over each partition (0.05 s a step for 67M parameters
        # on one core, 0.48 s unfused)
        cpu = not torch.cuda.is_available()
        ds.setdefault(
            "optimizer",
            {
                "type": "AdamW",
                "params": {
                    "lr": o.lr,
                    "weight_decay": o.weight_decay,
                    "torch_adam": cpu,
                    **({"fused": True} if cpu else {}),
                },
            },
        )
        if o.warmup_steps > 0:
            ds.setdefault(
                "scheduler",
                {
                    "type": "WarmupLR",
                    "params": {
                        "warmup_min_lr": 0.0,
                        "warmup_max_lr": o.lr,
                        "warmup_num_steps": o.warmup_steps,
                        "warmup_type": "linear",
                    },
                },
            )
    else:
        ds.pop("optimizer", None)
        ds.pop("scheduler", None)
    return ds


def start_rank() -> None:
    """What every rank of a ZeRO-3 job needs first: the accelerator, logging, the process group."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not logging.getLogger().handlers:  # a Ray Train worker: its stderr reaches the job's log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _init_distributed()


def _init_distributed() -> None:
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        # DeepSpeed's CPU shared-memory all-reduce serves only its inference all_reduce, which
        # ZeRO-3 never calls, and it is JIT-compiled on a machine's first run (30 s, the demo's).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=600))


def _max_over_ranks(count: int) -> int:
    """The largest `count` over all ranks (ZeRO-3 generate() calls must pair up across ranks)."""
    value = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _node_id() -> str:
    """The Ray node this rank runs on (the host name under torchrun)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    import socket

    return socket.gethostname()


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def main(entry: Callable[[dict], None], usage: str, nargs: int, argv: list[str] | None = None) -> int:
    """The torchrun entry of a worker module: `entry({"args": argv})` on this rank, a UserError as its one
    line (exit 2), then the process group taken down."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != nargs:
        print(f"usage: torchrun --nproc_per_node N -m {usage}", file=sys.stderr)
        return 2
    try:
        entry({"args": args})
    except UserError as exc:  # e.g. a checkpoint refused by the weights-only load: one line, not a traceback
        return exc.report()
    dist.barrier()
    dist.destroy_process_group()
    return 0
