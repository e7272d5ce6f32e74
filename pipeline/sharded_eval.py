"""Evaluation on ZeRO-3 workers, for a model whose whole copy does not fit one worker.

Every rank loads the model sharded (1/world of its parameters each) and scores the *same*
units in the same order. ZeRO-3 gathers each layer from all ranks for every forward, so all
ranks must make the same calls; giving them the same work makes that so with no bookkeeping
(and generate() under ZeRO-3 keeps the ranks stepping together). Rank 0 writes the rows. The
throughput is one replica's: what this buys is memory, not speed. Per-sample values are the
replica path's up to float rounding (the same `Scorer`, the same batches).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import torch.distributed as dist

from pipeline import cluster, modeling, ranks
from pipeline.atomic import atomic_write_json, write_parquet
from pipeline.scoring import Options, Scorer, request_rows, rows_frame
from pipeline.store import RunStore


def score(cfg, store: RunStore, spec: dict, units: list[dict], label: str) -> pd.DataFrame:
    """Driver side: hand the units to the workers, wait, read back rank 0's rows."""
    folder = store.artefact("eval_partial")
    folder.mkdir(parents=True, exist_ok=True)
    job, out = folder / f"{label}-sharded.json", folder / f"{label}-sharded.parquet"
    atomic_write_json(job, {"spec": spec, "units": units, "label": label})
    try:
        ranks.launch(
            cfg, store, "pipeline.sharded_eval", [str(store.root), str(job), str(out)], f"evaluation ({label})"
        )
        return pd.read_parquet(out)
    finally:  # nothing of the job is left behind
        job.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def train_worker(config: dict) -> None:
    """One rank (Ray Train's train_loop_per_worker, or torchrun via main()); args = RUN_DIR JOB OUT."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.similarity import BertScorer  # sentence-transformers: loaded where it is used

    run_dir, job, out = config["args"]
    ranks.start_rank()
    cfg = RunStore(run_dir).load_config()
    work = json.loads(Path(job).read_text())
    spec = work["spec"]
    model_dir = Path(spec["model_dir"])
    bert = BertScorer()  # before the ZeRO-3 config goes live: a model made under it would be sharded
    ds = ranks.deepspeed_config(cfg, dist.get_world_size(), modeling.hidden_size(model_dir), with_optimizer=False)
    live = HfDeepSpeedConfig(ds)  # noqa: F841 (from_pretrained shards under it while it lives)
    model = modeling.load_model(model_dir, spec["dtype"], spec["trust_remote_code"])
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    scorer = Scorer(
        engine.module.eval(),
        modeling.load_tokenizer(model_dir, spec["trust_remote_code"]),
        Options(**spec["options"]),
        bert,
        requests=request_rows(spec),
    )
    first = dist.get_rank() == 0
    bar = (
        cluster.Progress(f"evaluate: the {work['label']} model (sharded)", len(work["units"]), "units")
        if first
        else None
    )
    rows = []
    for unit in work["units"]:
        rows += scorer.score(unit)
        if bar:
            bar.update()
    if first:
        bar.close()
        write_parquet(rows_frame(rows), out)
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    return ranks.main(train_worker, "pipeline.sharded_eval RUN_DIR JOB OUT", 3, argv)


if __name__ == "__main__":
    sys.exit(main())
