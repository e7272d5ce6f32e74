"""Continual erasure (MUSE's sustainability test): customers erased in batches, one week after another,
each batch a full `icu run` chained through one erasure ledger, beside one batch of the same customers.

    python bench/sequential.py [--batches 4] [--size 8] [--no-single] [--runs runs/sequential]
        [--out bench/results/sequential.md]

Inputs (`ray_jobs.customers`, cached per machine): SmolLM2-135M fine-tuned on 64 made-up customers;
the first batches x size are erased, `size` a week, from the previous week's hand-off; the other 32
are kept; the same base fine-tuned on those 32 alone is the retrained reference (what a perfect
unlearner of all batches gives). A week's retain pool holds the customers not erased by then. Every
run is `ray_jobs/configs/demo.yaml` with only its paths (and `ledger:`) changed; finished runs are
skipped. The single run erases all of them at once from the original, with the same recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from pipeline.atomic import atomic_write_text  # noqa: E402
from pipeline.store import RunStore  # noqa: E402
from ray_jobs import customers  # noqa: E402
from scalability import _share, commit, perplexities, table, write_jsonl  # noqa: E402

RUNS = ROOT / "runs" / "sequential"  # --runs
KEPT = 32


def icu_run(runs: Path, name: str, config: dict) -> RunStore:
    """`icu run` of one config (written to RUNS/NAME.yaml); a finished run is skipped."""
    path = runs / f"{name}.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path)], cwd=ROOT)
    if proc.returncode not in (0, 3):  # 3: requests remembered (the table says so); with a ledger, export refuses
        raise SystemExit(f"{name}: icu run exited with {proc.returncode}")
    return RunStore(runs / name)


def config_for(
    runs: Path,
    name: str,
    inputs: dict,
    requests: Path,
    pool: Path,
    model: Path,
    ledger: Path | None,
    settings: dict[str, object],
) -> dict:
    """The demo's config with this run's paths and the bench's `--set` settings (dotted keys)."""
    config = yaml.safe_load((ROOT / "ray_jobs" / "configs" / "demo.yaml").read_text())
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if isinstance(node, str):  # `loss: icu_band` written as a name: the mapping form
                raise SystemExit(f"--set {key}: {part} is {node!r} in demo.yaml, not a mapping")
        node[leaf] = value
    config["model"]["name"] = str(model)
    config["requests"]["path"] = str(requests)
    config["retain"]["paths"][0] = str(pool)
    config["unlearning"]["check"]["strangers_path"] = str(inputs["strangers"])
    config["evaluation"].update(
        unseen_path=str(inputs["unseen"]), keep_path=str(inputs["keep"]), reference_model=str(inputs["retrained"])
    )
    config["storage"] = {"runs_dir": str(runs), "name": name}
    if ledger is not None:
        config["ledger"] = str(ledger)
    return config


def measure(label: str, store: RunStore, erased: int) -> dict:
    """One row: the run's hand-off against the first original (every request erased so far)."""
    m = json.loads(store.artefact("metrics").read_text())["models"]
    first, unl, ret = m.get("first_original", m["original"]), m["unlearned"], m["retrained"]
    result = json.loads(store.artefact("unlearn_result").read_text())
    receipt = json.loads((store.artefact("handoff") / "receipt.json").read_text())["requests"]
    earlier = [r for r in receipt if r.get("erased_in") is not None]
    history = pd.read_parquet(store.artefact("history"))
    carried = {r["request_id"] for r in earlier}
    back = history[history["request_id"].isin(carried) & ~history["forgotten"]]["request_id"].nunique()
    return {
        "run": label,
        "erased so far": erased,
        "forgotten whole (all so far)": f"{unl['forget']['below_thresholds']}/{erased}",
        "robust (every probe)": f"{sum(bool(r['robust']) for r in receipt if r['status'] != 'rejected')}/{erased}",
        "earlier still forgotten": f"{sum(r['status'] == 'forgotten' for r in earlier)}/{len(earlier)}"
        if earlier
        else "-",
        "earlier brought back, re-erased": back if earlier else "-",
        "LOSS / Min-K% AUC": f"{unl['mia_auc']['loss']:.3f} / {unl['mia_auc']['min_k']:.3f}",
        "PrivLeak (Min-K%)": f"{100 * unl['privleak']['min_k']:+.1f} %",
        "Pile / WikiText PPL vs first": perplexities(first, unl, ret),
        "kept MA % vs first": f"{100 * first['keep']['ma']:.1f} -> {100 * unl['keep']['ma']:.1f} "
        f"(retrained {100 * ret['keep']['ma']:.1f})",
        "kept whole vs first": f"{_share(first['keep']['whole'])} -> {_share(unl['keep']['whole'])} "
        f"(retrained {_share(ret['keep']['whole'])})",
        "epochs": result["epochs"],
        "unlearn s": round(store.stage("unlearn")["seconds"]),
        "run s": round(sum(s.get("seconds", 0) for s in store.manifest()["stages"].values())),
    }


def _shown(path: Path) -> str:
    """A path relative to the project where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--weeks", type=int, help="run only the first WEEKS batches (the inputs are made for all)")
    parser.add_argument("--no-single", action="store_true", help="skip the one run erasing every batch at once")
    parser.add_argument("--data", default=os.environ.get("ICU_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sequential.md"))
    parser.add_argument("--runs", default=str(RUNS), help="the folder of the runs, the ledger and the inputs")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a setting every run gets on top of demo.yaml (dotted key, JSON value); the table's header names it",
    )
    args = parser.parse_args()
    settings = {key: json.loads(value) for key, _, value in (item.partition("=") for item in args.set)}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    total = args.batches * args.size
    runs = Path(args.runs).resolve()
    inputs = customers.prepare(runs / "inputs", Path(args.data), total + KEPT, total)
    erase = [json.loads(line) for line in inputs["erase"].read_text().splitlines()]
    keep = [json.loads(line) for line in inputs["keep"].read_text().splitlines()]
    rows, model = [], inputs["model"]
    for week in range(args.weeks or args.batches):
        batch = runs / "inputs" / f"week{week + 1}.jsonl"
        pool = runs / "inputs" / f"pool{week + 1}.jsonl"  # the customers nobody has asked to erase yet
        write_jsonl(batch, erase[week * args.size : (week + 1) * args.size])
        write_jsonl(pool, erase[(week + 1) * args.size :] + keep)
        name = f"week{week + 1}"
        store = icu_run(runs, name, config_for(runs, name, inputs, batch, pool, model, runs / "ledger", settings))
        rows.append(measure(name, store, (week + 1) * args.size))
        model = store.artefact("handoff")
        print(table(rows), flush=True)
    if not args.no_single:
        name = f"all{total}"
        store = icu_run(
            runs,
            name,
            config_for(runs, name, inputs, inputs["erase"], inputs["keep"], inputs["model"], None, settings),
        )
        rows.append(measure(f"one batch of {total}", store, total))
    variant = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in settings.items())
    text = "\n\n".join(
        [
            f"# Continual erasure: {len(rows) if args.no_single else len(rows) - 1} batches of {args.size}, one after "
            f"another (`bench/sequential.py`{', ' + variant if variant else ''})",
            f"Written by the bench at commit {commit()} from the runs in {_shown(runs)}/ (one run each, this "
            f"machine). SmolLM2-135M fine-tuned on {total + KEPT} made-up customers; week k erases {args.size} of them "
            "from week k-1's hand-off through one erasure ledger (`ledger:`), with `ray_jobs/configs/demo.yaml`'s "
            + (f"recipe but for {variant}" if variant else "recipe unchanged")
            + ("; the last row erases all of them in one run from the original" if not args.no_single else "")
            + ". Every figure is the "
            "run's hand-off against the first original model, over every request erased so far: forgotten whole "
            "(at or below the MA, EL10 and span thresholds over the whole request, the evaluation's); robust (no "
            "audit probe leaks from any cut point); earlier still forgotten (the receipt's requests from earlier "
            "weeks, checked again); brought back (earlier requests a check found remembered during the run, "
            "trained until forgotten again); AUC of all erased so far against never-seen customers; PrivLeak "
            f"against the same base trained on the {KEPT} kept customers alone (MUSE passes within +-5 %); kept: "
            f"the {KEPT} customers never erased.",
            table(rows),
        ]
    )
    atomic_write_text(Path(args.out), text + "\n")
    print(f"table: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
