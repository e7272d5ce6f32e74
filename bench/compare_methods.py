"""ICU vs gradient ascent vs gradient difference vs NPO, side by side, measured in one run.

    python bench/compare_methods.py [CONFIG] [--methods icu,ga,gd,npo,simnpo] [--out bench/results/compare_methods.md]

CONFIG defaults to the demo (prepare its inputs first: `python -m ray_jobs.customers
runs/customers`). Each method is a run of CONFIG with `unlearning.method` overridden, in its
own run directory `<name>-<method>`. Ingest and retrieval run once and are copied to the
others, so every method sees the same requests, neighbours and thresholds (the original
model's scores are shared the same way); each then runs to the same forgetting criterion (or
max_epochs), and the evaluate stage scores it. The table (the paper's columns plus epochs
and the unlearn stage's wall time) goes to --out. Finished runs are skipped, so a second
call only rewrites the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import driver  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.cluster import ensure_ray  # noqa: E402
from pipeline.report import TABLE, cell  # noqa: E402
from pipeline.store import RunStore  # noqa: E402

SHARED = ("ingest", "retrieve")


def share_upstream(src: RunStore, dst: RunStore) -> None:
    """Copy the finished ingest and retrieve stages (outputs and manifest entries) into dst,
    and the original model's evaluation scores (kept with the inputs they were scored on)."""
    for stage in SHARED:
        for artefact in driver.stage_module(stage).OUTPUTS:
            shutil.copy2(src.artefact(artefact), dst.artefact(artefact))
        entry = src.stage(stage)
        dst.update(lambda m, s=stage, e=entry: m["stages"].__setitem__(s, e))
    scores = dst.artefact("eval_partial")
    scores.mkdir(parents=True, exist_ok=True)
    for name in ("original.parquet", "original.key"):  # the key last: it vouches for the parquet
        shutil.copy2(src.artefact("eval_partial") / name, scores / name)


def run_method(config: str, method: str, base: RunStore | None) -> RunStore:
    """One method's run through evaluate."""
    name = f"{load_config(config).storage.name}-{method}"
    cfg, store = driver.open_run(config, {"unlearning.method": method, "storage.name": name})
    if base is not None:
        share_upstream(base, store)
    driver.run_pipeline(cfg, store, until="evaluate")
    return store


def measured(method: str, store: RunStore) -> tuple[str, dict, dict, float]:
    """(method, eval/metrics.json, unlearn/result.json, seconds of the unlearn stage) of a finished run."""
    return (method, json.loads(store.artefact("metrics").read_text()),
            json.loads(store.artefact("unlearn_result").read_text()), store.stage("unlearn")["seconds"])


def table(rows: list[tuple[str, dict, dict, float]]) -> str:
    """Markdown: the original model once, then one row per method."""
    columns = [c for c in TABLE if c[0] not in ("BLEU-4", "MIA AUC (Min-K%)")]
    head = ["Model"] + [c[0] for c in columns] + ["Epochs", "Unlearn s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    original = rows[0][1]["models"]["original"]
    lines.append("| " + " | ".join(["original"] + [cell(g, original, f) for _, g, f in columns] + ["0", "-"]) + " |")
    for method, metrics, unlearn, seconds in rows:
        m = metrics["models"]["unlearned"]
        cells = [method] + [cell(g, m, f) for _, g, f in columns] + [str(unlearn["epochs"]), f"{seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="ray_jobs/configs/demo.yaml")
    parser.add_argument("--methods", default="icu,ga,gd,npo,simnpo")
    parser.add_argument("--out", default="bench/results/compare_methods.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_ray()
    rows, base = [], None
    for method in args.methods.split(","):
        store = run_method(args.config, method, base)
        base = base or store
        rows.append(measured(method, store))
        print(f"{method}: unlearn {rows[-1][3]:.0f} s", flush=True)
    thr = rows[0][1]["thresholds"]
    text = (f"# Unlearning methods side by side\n\nConfig `{args.config}`, one machine, one run of this script. "
            f"Forgetting thresholds (original model on `evaluation.unseen_path`): MA {thr['ma']:.3f}, EL10 {thr['el']:.4f}. "
            "Unlearn s = wall time of the unlearn stage (IUR checks included).\n\n" + table(rows) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
