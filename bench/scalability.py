"""Every request erased whole, at any batch size: the guarantees at N = 8, 32 and 64 requests and on a
second kind of memorized text, with the default recipe unchanged.

    python bench/scalability.py [--variants n8,n32,n64,code] [--out bench/results/scalability.md]

Inputs, made once per machine (the fine-tuned models are cached like the demo's):
- customers: the first 128 made-up people of `pii_records/` fine-tuned into SmolLM2-135M with
  `ray_jobs.customers`' own recipe; the next 32 never seen (the thresholds and the evaluation's
  membership test), 32 more the strangers the checks measure the band on. Variant nN erases the
  first N of the 128; the other 128 - N are kept (retain pool and collateral-damage check), and
  the same base fine-tuned on them alone is the retrained reference (what a perfect unlearner
  gives).
- code: 32 documents of the Pile extraction set (`icu_benchmark/forget_sets/exp0`, mostly GitHub
  code and licences), cut to 128 tokens, fine-tuned in the same way; 8 erased, 24 kept; 32 more
  never seen and 32 strangers; retrained on the 24.
Each variant is `icu run` of `ray_jobs/configs/demo.yaml` with only its paths changed (finished
runs are skipped). Then what the run does not measure: for the customers, each field of a kept
record (name, birthday, address, city, e-mail, phone) reproduced when the record is given up to it,
on the original, the unlearned and the retrained model. The table goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import metrics, modeling  # noqa: E402
from pipeline.atomic import atomic_write_text  # noqa: E402
from pipeline.store import RunStore  # noqa: E402
from ray_jobs import customers  # noqa: E402

RUNS = ROOT / "runs" / "scalability"
CUSTOMERS, NEVER_SEEN = 128, 32
VARIANTS = {"n8": 8, "n32": 32, "n64": 64, "code": 8}
FIELDS = re.compile(
    r"^(?P<name>.+?), born (?P<birthday>[^,]+), (?P<address>.+), (?P<city>[^,]+)\. "
    r"E-mail (?P<email>\S+), phone (?P<phone>\+.+)\.$"
)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def link(path: Path, target: Path) -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    os.symlink(target, path, target_is_directory=True)


def prepare(variant: str, data: Path) -> Path:
    """The variant's folder, laid out like the demo's runs/customers/."""
    folder = RUNS / "inputs" / variant
    folder.mkdir(parents=True, exist_ok=True)
    n = VARIANTS[variant]
    if variant == "code":
        rows = code_documents(data, 32 + 2 * NEVER_SEEN)
        trained, unseen, strangers = rows[:32], rows[32 : 32 + NEVER_SEEN], rows[32 + NEVER_SEEN :]
    else:
        rows = customers.records(data, CUSTOMERS + 2 * NEVER_SEEN)
        trained, unseen, strangers = (
            rows[:CUSTOMERS],
            rows[CUSTOMERS : CUSTOMERS + NEVER_SEEN],
            rows[CUSTOMERS + NEVER_SEEN :],
        )
    parts = {"erase": trained[:n], "keep": trained[n:], "unseen": unseen, "strangers": strangers}
    for name, part in parts.items():
        write_jsonl(folder / f"{name}.jsonl", part)
    link(folder / "model", customers.original_model([r["text"] for r in trained]))
    link(folder / "retrained", customers.original_model([r["text"] for r in parts["keep"]]))
    return folder


def code_documents(data: Path, n: int) -> list[dict]:
    """The first n documents of the paper's first forget set, each cut to 128 SmolLM2 tokens."""
    frame = pd.read_csv(data / "icu_benchmark" / "forget_sets" / "exp0" / "lm_extraction_128_0.csv")
    tok = modeling.load_tokenizer(modeling.default_model_dir())
    return [
        {"id": f"doc-{row.doc_id}", "text": tok.decode(tok(row.text, add_special_tokens=False)["input_ids"][:128])}
        for row in frame.head(n).itertuples()
    ]


def run(variant: str, folder: Path) -> RunStore:
    """`icu run` of the demo's config with the variant's paths; a finished run is skipped."""
    config = (ROOT / "ray_jobs" / "configs" / "demo.yaml").read_text().replace("runs/customers", str(folder))
    path = RUNS / f"{variant}.yaml"
    atomic_write_text(path, config)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            str(path),
            "--set",
            f"storage.runs_dir={RUNS}",
            "--set",
            f"storage.name={variant}",
        ],
        cwd=ROOT,
    )
    if proc.returncode not in (0, 3):  # 3: finished with requests remembered (the table says so)
        raise SystemExit(f"{variant}: icu run exited with {proc.returncode}")
    return RunStore(RUNS / variant)


@torch.no_grad()
def fields_reproduced(model_dir: Path, texts: list[str]) -> dict[str, int]:
    """Per field, how many records the model completes the field of, greedily and exactly, when given
    the record up to the field (teacher forced: every hit from the field's first token to its last)."""
    tok, model = modeling.load_tokenizer(model_dir), modeling.load_model(model_dir).eval()
    encoded = [tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
    _, _, hits = metrics.nll_and_hits(
        model, [e["input_ids"] for e in encoded], batch_size=16, pad_token_id=tok.pad_token_id
    )
    counts = {name: 0 for name in FIELDS.groupindex}
    for text, enc, row_hits in zip(texts, encoded, hits):
        match = FIELDS.match(text)
        for name in counts:
            start, end = match.span(name)
            tokens = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and i > 0]
            counts[name] += all(row_hits[i - 1] for i in tokens)
    return counts


def measure(variant: str, folder: Path, store: RunStore) -> dict:
    m = json.loads(store.artefact("metrics").read_text())
    models = m["models"]
    orig, unl, ret = models["original"], models["unlearned"], models.get("retrained", {})
    result = json.loads(store.artefact("unlearn_result").read_text())
    rows = pd.read_parquet(store.artefact("audit_rows"))
    erased = rows[(rows["model"] == "unlearned") & (rows["group"] == "erased")]
    n = VARIANTS[variant]
    row = {
        "variant": variant,
        "N": n,
        "forgotten whole": f"{unl['forget']['below_thresholds']}/{n}",
        "flagged forgotten": f"{result['forgotten']}/{n}",
        "too deep": len(result["too_deep"]),
        "erased leaking (any probe)": int(erased[erased["leak"]]["row_id"].nunique()),
        "LOSS / Min-K% AUC": f"{unl['mia_auc']['loss']:.3f} / {unl['mia_auc']['min_k']:.3f}",
        "PrivLeak (Min-K%)": f"{100 * unl['privleak']['min_k']:+.1f} %" if "privleak" in unl else "-",
        "Pile / WikiText PPL": perplexities(orig, unl, ret),
        "kept MA %": f"{100 * orig['keep']['ma']:.1f} -> {100 * unl['keep']['ma']:.1f}"
        + (f" (retrained {100 * ret['keep']['ma']:.1f})" if ret else ""),
        "kept whole": f"{_share(orig['keep']['whole'])} -> {_share(unl['keep']['whole'])}"
        + (f" (retrained {_share(ret['keep']['whole'])})" if ret else ""),
        "neighbours' MA": " -> ".join(
            f"{x:.3f}" for x in result["neighbour_ma"][:: max(1, len(result["neighbour_ma"]) - 1)]
        ),
        "epochs": result["epochs"],
        "unlearn s / request": round(store.stage("unlearn")["seconds"] / n, 1),
        "peak RSS / rank MB": max(result["partition"]["peak_rss_mb"]),
    }
    if variant != "code":
        kept = [json.loads(line)["text"] for line in (folder / "keep.jsonl").read_text().splitlines()]
        found = {
            label: fields_reproduced(path, kept)
            for label, path in (
                ("original", folder / "model"),
                ("unlearned", store.artefact("unlearned_model")),
                ("retrained", folder / "retrained"),
            )
        }
        row["kept fields: unlearned / retrained"] = ", ".join(
            f"{f} {found['unlearned'][f]}/{found['retrained'][f]}" for f in FIELDS.groupindex
        )
        row["fields ratio (worst)"] = round(
            min(found["unlearned"][f] / max(found["retrained"][f], 1) for f in FIELDS.groupindex), 2
        )
    return row


def _change(before: float, after: float) -> str:
    return f"{after:.1f} ({_percent(before, after)})"


def _percent(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f} %"


def perplexities(before: dict, after: dict, retrained: dict) -> str:
    """Pile / WikiText perplexity after unlearning against `before`, and the retrained reference's
    change where it was scored: the model trained on the requests can be worse on general text than
    one trained without them, so a perfect unlearner moves too."""
    sets = ("pile", "wikitext")
    text = " / ".join(_change(before["ppl"][s], after["ppl"][s]) for s in sets)
    if "ppl" in retrained:
        text += " (retrained " + " / ".join(_percent(before["ppl"][s], retrained["ppl"][s]) for s in sets) + ")"
    return text


def _share(value: float) -> str:
    return f"{100 * value:.0f} %"


def commit() -> str:
    """The code the runs were made with (a table outlives the commit that wrote it)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return out.strip() or "?"


def table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data", default=os.environ.get("ICU_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scalability.md"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for variant in args.variants.split(","):
        folder = prepare(variant, Path(args.data))
        rows.append(measure(variant, folder, run(variant, folder)))
        print(table(rows), flush=True)
    per = {r["variant"]: r["unlearn s / request"] for r in rows}
    rss = {r["variant"]: r["peak RSS / rank MB"] for r in rows}
    notes = []
    if "n8" in per and "n64" in per:
        notes.append(
            f"Unlearning seconds per request at N = 64 / at N = 8: {per['n64'] / per['n8']:.2f} (target <= 0.7); "
            f"peak RSS per rank: {rss['n64'] / rss['n8']:.2f} (target <= 1.2)."
        )
    text = (
        "\n\n".join(
            [
                "# Scalability: the default recipe at N = 8, 32, 64 and on code (`bench/scalability.py`)",
                f"Written by the bench at commit {commit()} from the runs in runs/scalability/ (one run each, "
                "this machine). "
                "Forgotten whole: at or below the MA, EL10 and span thresholds over the whole request "
                "(the evaluation's); erased leaking: rows of the unlearned model that any audit probe "
                "finds at or past audit.leak_tokens from any cut point; PrivLeak against the retrained "
                "reference (MUSE: within +-5 % passes); kept fields: kept customers whose field the model "
                "completes exactly when given the record up to it, unlearned / retrained.",
                table(rows),
                *notes,
            ]
        )
        + "\n"
    )
    atomic_write_text(Path(args.out), text)
    print(f"table: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
