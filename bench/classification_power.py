"""Classification change of a finished run, with enough examples per task to tell 2 points apart.

    python bench/classification_power.py runs/demo [--per-task 48] [--out bench/results/classification_power.md]

The run's evaluate stage scores classification on `evaluation.max_samples.classification`
examples per task (8 in the demo: 56 examples, a standard error of about 3 points on the
paired change). This scores the same seven tasks (`pipeline.suites`) on `--per-task` examples
each, for the run's original model and its unlearned one (`unlearn/model`), on the run's
evaluation actors, and prints the per-task accuracies, the paired change with its standard
error (`pipeline.evaluate.paired_change`, the figure the report states) and what it cost.
One run; the cost is wall seconds on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import cluster, evaluate, modeling, scoring, suites  # noqa: E402
from pipeline.store import RunStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--per-task", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    store = RunStore(args.run_dir)
    cfg = store.load_config()
    tok = modeling.load_tokenizer(cfg.model_dir, cfg.model.trust_remote_code)
    tasks = suites.build_tasks(
        ["classification"],
        cfg.evaluation.data_dir,
        tok,
        forget_rows=None,
        forget_ids=None,
        unseen_path=None,
        max_tokens=cfg.max_tokens,
        min_tokens=0,
        ppl_chunk=cfg.evaluation.ppl_chunk,
        caps={"classification": args.per_task},
    )
    units = scoring.make_units(tasks)
    frames, seconds = {}, {}
    for label, model_dir in (("original", cfg.model_dir), ("unlearned", store.artefact("unlearned_model"))):
        spec = evaluate.spec(cfg, model_dir)
        start = time.time()
        frames[label] = scoring.score_model(
            spec, units, cfg.resources.eval_actors, cluster.use_ray(cfg), desc=f"classification: the {label} model"
        )
        seconds[label] = time.time() - start
    before, after = (evaluate.summarize(frames[k])["classification"] for k in ("original", "unlearned"))
    change = evaluate.paired_change(frames["original"], frames["unlearned"], "classification", "correct")
    lines = [
        f"# Classification change of {args.run_dir}, {args.per_task} examples per task",
        "",
        "| task | examples | original % | unlearned % |",
        "|---|---|---|---|",
    ]
    counts = frames["original"].groupby("task").size()
    lines += [f"| {t} | {counts[t]} | {before[t]:.1f} | {after[t]:.1f} |" for t in sorted(counts.index)]
    lines += [
        f"| average | {int(counts.sum())} | {before['average']:.1f} | {after['average']:.1f} |",
        "",
        f"Paired change {change['change']:+.1f} ± {change['se']:.1f} (standard error; {change['examples']} "
        f"examples over {change['tasks']} tasks).",
        f"Cost: {seconds['original']:.0f} s + {seconds['unlearned']:.0f} s wall on "
        f"{cfg.resources.eval_actors} evaluation actors, "
        f"{sum(seconds.values()) / change['examples']:.2f} s per example for both models.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
