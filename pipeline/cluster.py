"""Ray in one place: whether a run uses it, how it starts, and the one actor-pool map.

Policy: a run uses Ray exactly when `resources.launcher` is "ray" (clusters, and `icu run`
on a laptop, which starts a local Ray). With "torchrun" (GPU boxes without Ray) every
stage runs in-process or under torchrun and Ray is never imported.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Iterator

from pipeline.config import Config

log = logging.getLogger("icu.cluster")


def use_ray(cfg: Config) -> bool:
    return cfg.resources.launcher == "ray"


def ensure_ray() -> None:
    """Connect to the cluster this job runs on (RAY_ADDRESS), or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray 2.60 warns at every start that token authentication is on (it is, where a token exists):
    # a notice, not a problem, and authentication stays as Ray chose
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"worker_process_setup_hook": "pipeline.cluster.quiet_local_workers"},
        )


def quiet_local_workers() -> None:
    """Run in every worker of a local Ray. Ray Train's PlacementGroupCleaner asks the state API
    every second whether the training controller lives; without the dashboard (left out of a
    local Ray) it cannot, and warns each time. It guards against a controller that dies while its
    cluster lives on, and a local Ray ends with its driver: nothing is lost by silencing it."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def actor_pool_map(
    actor: type, spec: dict[str, Any], items: list[dict[str, Any]], actors: int, cpus: float, gpus: int
) -> Iterator[dict[str, Any]]:
    """Ray Data: `actor(spec)` on a pool of `actors`, one item per call; yields output batches.

    One item per block and per call: Ray's readers would merge small inputs into one block
    and starve the pool. Ray Data's own progress bars only on a terminal: elsewhere (a job
    log) it prints a block of lines every few seconds; `Progress` prints one line per update.
    """
    import ray
    from ray.data import DataContext

    ensure_ray()
    if not sys.stdout.isatty():  # where Ray Data would log its block of progress lines
        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled" notice
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs={"spec": spec},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


class Progress:
    """A tqdm bar on a terminal; elsewhere (job logs, CI) one log line per update, at most
    every `every` seconds, and always the last."""

    def __init__(
        self, desc: str, total: int, unit: str, on_update: Callable[[int], None] | None = None, every: float = 10.0
    ):
        from tqdm import tqdm

        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.done, self.on_update, self.last = 0, on_update, 0.0
        self.bar = tqdm(total=total, desc=desc, unit=f" {unit}") if sys.stderr.isatty() else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done == self.total or time.time() - self.last >= self.every:
            self.last = time.time()
            log.info("%s: %d/%d %s", self.desc, self.done, self.total, self.unit)
        if self.on_update:
            self.on_update(self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
