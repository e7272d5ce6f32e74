"""Unlearning loop cost: our ICU loop vs a bare hand-written ICU step on DeepSpeed ZeRO-3, and IUR vs an epoch.

Run under torchrun on a run directory whose retrieve stage is done (e.g. after
`icu retrieve ray_jobs/configs/demo.yaml`):

    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/unlearn_step.py runs/demo [--steps 5]

One run, one engine, the same batches (the pairs `epoch_batches` deals this rank for
epochs 1, 2, ...), interleaved epoch by epoch so that load drift hits all variants alike:
- bare ICU: the batch's real rows only (requests + their neighbours), one plain
  `engine(...)` forward, the frozen reference forward on the neighbour rows, the ICU loss
  from `pipeline.losses`, backward, step. No sampler padding, no bookkeeping.
- ours: `Worker.train_epoch` (sampler, padding rows, tqdm, loss sums); time per step =
  epoch wall time / its steps.
- live rows only: `Worker.step` on the batch's real pairs (the sampler's empty padding
  rows dropped), to show how much of the gap those rows are (information only);
- plain LM: `engine(ids, labels=ids).loss` on the same real rows (information only: no
  reference model, so not what ICU can be compared with).
The target is ours / bare ICU <= 1.10. The IUR check (`Worker.check`, all requests,
sharded across ranks, generating from the replica as `Worker.run` does) is compared with
one training epoch of our loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.losses import unlearning_loss  # noqa: E402
from pipeline.metrics import pad_rows  # noqa: E402
from pipeline.iur import Thresholds  # noqa: E402
from pipeline.ranks import _init_distributed  # noqa: E402
from pipeline.worker import LoopState, Look, Worker, epoch_batches  # noqa: E402


def timed(fn) -> float:
    """Wall seconds of fn() across all ranks (barrier before and after)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed per variant (whole epochs)")
    args = parser.parse_args()
    _init_distributed()
    torch.manual_seed(0)
    from pipeline.similarity import BertScorer

    worker = Worker(args.run_dir)
    worker.scorer = BertScorer()
    worker.replica = worker._replica()  # as Worker.setup: before the engines (a live ZeRO-3 config would shard it)
    worker.build_engines()
    engine, ref, p, u = worker.engine, worker.ref, worker.pairs, worker.cfg.unlearning.optim
    assert worker.cfg.unlearning.loss.name == "icu" and ref is not None, "this bench compares ICU steps (icu, kl > 0)"
    pad, dev = worker.tok.pad_token_id, worker.device

    def real_rows(batch):
        keep = [k for k in batch if k is not None]
        return [p.requests[p.pair_request[k]] for k in keep], [p.pair_neighbour[k] for k in keep]

    def bare_icu(batch) -> None:
        forget, neighbour = real_rows(batch)
        ids, mask = pad_rows(forget + neighbour, pad, device=dev)
        logits = engine(input_ids=ids, attention_mask=mask).logits
        n = len(forget)
        with torch.no_grad():
            ref_logits = ref(input_ids=ids[n:], attention_mask=mask[n:]).logits
        loss, _ = unlearning_loss(
            "icu",
            worker.settings,
            forget_logits=logits[:n],
            forget_ids=ids[:n],
            forget_mask=mask[:n],
            retain_logits=logits[n:],
            retain_ids=ids[n:],
            retain_mask=mask[n:],
            ref_retain_logits=ref_logits,
        )
        engine.backward(loss)
        engine.step()

    def plain_lm(batch) -> None:
        forget, neighbour = real_rows(batch)
        ids, mask = pad_rows(forget + neighbour, pad, device=dev)
        engine.backward(engine(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss)
        engine.step()

    every = list(range(len(p.pair_request)))
    first = epoch_batches(every, 1, u.seed, worker.rank, worker.world, u.batch_size)
    bare_icu(first[0])  # warm-up: first-call allocations, DeepSpeed's module tracing
    worker.step(first[0])
    times: dict[str, list[float]] = {"bare": [], "ours": [], "live": [], "lm": []}
    steps, epoch, epoch_s = 0, 0, []
    while steps < args.steps:
        epoch += 1
        batches = epoch_batches(every, epoch, u.seed, worker.rank, worker.world, u.batch_size)
        times["bare"].append(timed(lambda: [bare_icu(b) for b in batches]))
        everyone = Look([dict(forgotten=False, too_deep=False) for _ in p.requests])
        epoch_s.append(timed(lambda: worker.train_epoch(LoopState(epoch=epoch - 1), everyone)))
        times["ours"].append(epoch_s[-1])
        times["live"].append(timed(lambda: [worker.step([k for k in b if k is not None] or [None]) for b in batches]))
        times["lm"].append(timed(lambda: [plain_lm(b) for b in batches]))
        steps += len(batches)
    per_step = {k: sum(v) / steps for k, v in times.items()}

    # IUR: thresholds fixed (measuring them on unseen text is a once-per-run cost, not a check's).
    c = worker.cfg.unlearning.check
    worker.thr = Thresholds(ma=0.0, el=0.0, bertscore=c.bertscore_threshold, bleu=c.bleu_threshold)
    check_s = timed(lambda: worker.check(epoch))
    one_epoch = statistics.mean(epoch_s)
    if worker.rank == 0:
        real = sum(len(real_rows(b)[0]) for b in batches)
        slots = sum(len(b) for b in batches)
        print(
            f"model {worker.model_dir.name}, {worker.world} ranks, batch {u.batch_size} pairs/rank, "
            f"{len(p.pair_request)} pairs, {len(batches)} steps/epoch, {real}/{slots} pair slots real on rank 0 "
            f"(the rest are the sampler's empty padding rows); {steps} steps timed per variant"
        )
        print(
            f"per step: bare ICU {per_step['bare']:.3f}s, ours (train_epoch) {per_step['ours']:.3f}s, "
            f"Worker.step on live rows only {per_step['live']:.3f}s, plain LM {per_step['lm']:.3f}s"
        )
        print(f"RESULT ours / bare ICU step = {per_step['ours'] / per_step['bare']:.2f}x (target <= 1.10)")
        print(
            f"RESULT one IUR check ({len(p.requests)} requests) = {check_s:.1f}s = "
            f"{check_s / one_epoch:.2f}x one training epoch ({one_epoch:.1f}s)"
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
