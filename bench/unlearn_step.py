"""Unlearning loop cost: our ICU step vs a bare DeepSpeed ZeRO-3 step, and one IUR check vs one epoch.

Run under torchrun on a run directory whose retrieve stage is done (e.g. after
`icu retrieve ray_jobs/configs/demo.yaml`):

    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/unlearn_step.py runs/demo [--steps 5]

Both loops use the same engine, the same batches (request rows + their neighbours, as
the loop pairs them) and the same number of steps, in one run:
- bare: `loss = engine(ids, labels=ids).loss; engine.backward(loss); engine.step()` on
  the same rows (one forward, no reference model, no bookkeeping);
- ours: `Worker.step` (ICU: forward + frozen ZeRO-3 reference forward + the loss split).
So the ratio shows what ICU's extra reference forward and our bookkeeping cost on top
of plain DeepSpeed. The IUR check is timed over all requests and compared with one
training epoch over all pairs (the time an epoch costs at this batch size).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.metrics import pad_rows  # noqa: E402
from pipeline.unlearn import Worker, _init_distributed, epoch_batches  # noqa: E402


def timed_steps(fn, batches, steps: int) -> float:
    fn(batches[0])  # warm-up (first-call allocations, DeepSpeed traces)
    dist.barrier()
    start = time.perf_counter()
    for i in range(steps):
        fn(batches[(i + 1) % len(batches)])
    dist.barrier()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    _init_distributed()
    torch.manual_seed(0)
    from pipeline.similarity import BertScorer

    scorer = BertScorer()
    worker = Worker(args.run_dir)
    worker.build_engines()
    u, p = worker.cfg.unlearning, worker.pairs
    batches = epoch_batches(list(range(len(p.pair_request))), 1, u.seed, worker.rank, worker.world, u.batch_size)
    pad = worker.tok.pad_token_id

    def bare(batch) -> None:
        rows = [p.requests[p.pair_request[k]] for k in batch if k is not None]
        rows += [p.pair_neighbour[k] for k in batch if k is not None]
        ids, mask = pad_rows(rows, pad, device=worker.device)
        loss = worker.engine(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        worker.engine.backward(loss)
        worker.engine.step()

    bare_s = timed_steps(bare, batches, args.steps)
    ours_s = timed_steps(worker.step, batches, args.steps)
    state = worker.resume()
    thr = worker.thresholds(state)
    start = time.perf_counter()
    worker.check(0, thr, scorer)
    check_s = time.perf_counter() - start
    if worker.rank == 0:
        rows = sum(len(b) for b in batches) * worker.world
        print(f"model {worker.model_dir.name}, {worker.world} ranks, batch {u.batch_size} pairs/rank, "
              f"{len(p.pair_request)} pairs ({rows} rows per epoch incl. padding), {len(batches)} steps/epoch")
        print(f"bare ZeRO-3 step {bare_s:.3f}s, ICU step {ours_s:.3f}s")
        print(f"RESULT ICU step / bare step = {ours_s / bare_s:.2f}x (includes ICU's reference-model forward)")
        print(f"RESULT one IUR check ({len(p.requests)} requests) = {check_s:.1f}s = "
              f"{check_s / (ours_s * len(batches)):.2f}x one training epoch ({ours_s * len(batches):.1f}s)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
