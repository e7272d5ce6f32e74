"""One LoRA training step of `Worker` on 2 ZeRO-3 ranks, recorded for tests/test_adapter.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/lora_step.py RUN_DIR OUT.pt

A first step moves the adapters off their start (B = 0, where the adapted and the frozen model
agree). For the second, each rank records what the loss saw (the row tensors) and its value,
and rank 0 the adapters' weights before it and their full (all-rank averaged, unclipped)
gradient just before the optimizer step.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from pipeline import ranks
from pipeline import worker as loop


def main(run_dir: str, out: str) -> None:
    ranks._init_distributed()
    w = loop.Worker(run_dir)
    w.build_engines()
    seen: dict = {}
    real_loss = loop.unlearning_loss

    def recording_loss(name, settings, **kwargs):
        seen.update({k: v.detach().clone() for k, v in kwargs.items() if k.endswith(("_ids", "_mask"))})
        loss, parts = real_loss(name, settings, **kwargs)
        seen["loss"] = loss.item()
        return loss, parts

    grads, real_step = {}, w.engine.step

    def recording_step():
        for name, p in w.engine.module.named_parameters():
            if p.requires_grad:
                grads[name] = safe_get_full_grad(p).clone()
        real_step()

    u = w.cfg.unlearning.optim
    first, second = loop.epoch_batches(
        list(range(len(w.pairs.pair_request))), 1, u.seed, w.rank, w.world, u.batch_size
    )[:2]
    w.step(first)
    before = {n: safe_get_full_fp32_param(p).clone() for n, p in w.engine.module.named_parameters() if p.requires_grad}
    loop.unlearning_loss, w.engine.step = recording_loss, recording_step
    w.step(second)
    per_rank: list = [None] * w.world
    dist.all_gather_object(per_rank, seen)
    if w.rank == 0:
        torch.save(
            {
                "ranks": per_rank,
                "grads": grads,
                "before": before,
                "ref_is_engine": w.ref is None,
                "models_loaded": w.models_loaded,
            },
            out,
        )
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
