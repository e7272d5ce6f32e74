"""The demo's situation: a model fine-tuned on customer records, asked to erase some customers.

SmolLM2-135M has not memorized the paper's Pile forget sets (its MA there is barely above
its MA on unseen Pile text), so the demo first makes a model that has memorized something:
one short text record per made-up person from `pii_records/FakeNameGenerator.com_3000.csv`
(no real person), the default model fine-tuned on all of them until it reproduces them
(MA > 0.9). That "original" model is cached per machine, keyed by the records and the
recipe, so it is built once.

    python -m ray_jobs.customers OUT_DIR [--data DIR] [--customers 32] [--erase 8]

writes OUT_DIR/erase.jsonl (the erasure requests), OUT_DIR/keep.jsonl (the other
customers: retain pool and collateral-damage check), OUT_DIR/unseen.jsonl (as many
further people, never trained on: the evaluation's), OUT_DIR/strangers.jsonl (as many again,
the ones the unlearning checks compare the requests with), OUT_DIR/model (a link to the
cached fine-tuned model) and OUT_DIR/retrained (a link to the same base fine-tuned the same way on
the kept customers alone: what a perfect unlearner would give, the evaluation's gold reference).

The unseen records set the forgetting thresholds. Records share a template (", born",
"E-mail", a mail address spelled from the name), so a model predicts much of a record it
never saw: MA on unseen customers is far above MA on unseen Pile text, and a record is
forgotten when the model knows it no better than a stranger's, not a Pile page's.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock

from pipeline import modeling
from pipeline.errors import UserError
from pipeline.metrics import memorization_accuracy, pad_rows
from pipeline.atomic import atomic_path, atomic_write_text

log = logging.getLogger("icu.customers")
CSV = Path("pii_records") / "FakeNameGenerator.com_3000.csv"
# Only the upper half of the layers trains: backward stops there, so a step costs about half
# of full fine-tuning on a CPU, and 32 short records still memorize within a few dozen steps.
# A step is the full batch, its gradient accumulated over `chunk` records at a time (the logits of
# 128 records at once are 1.8 GB, and autograd keeps several copies).
RECIPE = dict(lr=1e-3, max_steps=60, check_every=5, target_ma=0.95, first_trained_layer=15, seed=0, chunk=32)


def records(data_dir: Path, n: int) -> list[dict[str, str]]:
    """The first n people of the CSV as {"id", "text"}: one sentence-like record each."""
    path = Path(data_dir) / CSV
    if not path.is_file():
        raise UserError(f"customer records: {path} not found; fix: pass --data pointing at the shared data folder")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = [r for _, r in zip(range(n), csv.DictReader(fh))]
    if len(rows) < n:
        raise UserError(f"customer records: {path} has {len(rows)} rows, {n} requested; fix: lower --customers")
    return [
        {
            "id": f"customer-{int(r['Number']):04d}",
            "text": (
                f"{r['GivenName']} {r['Surname']}, born {r['Birthday']}, {r['StreetAddress']}, {r['City']}. "
                f"E-mail {r['EmailAddress']}, phone +{r['TelephoneCountryCode']} {r['TelephoneNumber']}."
            ),
        }
        for r in rows
    ]


def original_model(texts: list[str]) -> Path:
    """The default model fine-tuned on `texts` until it reproduces them; cached per machine."""
    key = hashlib.sha256(json.dumps([texts, RECIPE], sort_keys=True).encode()).hexdigest()[:12]
    target = modeling.cache_dir() / "models" / f"smollm2-customers-{key}"
    if not (target / "config.json").is_file():
        with FileLock(str(target) + ".lock", timeout=3600):
            if not (target / "config.json").is_file():
                finetune(modeling.default_model_dir(), texts, target)
    return target


def finetune(base: Path, texts: list[str], target: Path) -> float:
    """Full-batch AdamW on the records until their mean MA reaches the recipe's target."""
    from tqdm import tqdm

    log.info(
        "fine-tuning SmolLM2-135M on %d customer records until it has memorized them (once per machine, cached in %s)",
        len(texts),
        target,
    )
    started = time.time()
    tok = modeling.load_tokenizer(base)
    model = modeling.load_model(base).train()
    for name, param in model.named_parameters():
        layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else None
        param.requires_grad = layer is not None and int(layer) >= RECIPE["first_trained_layer"]
    ids, mask = pad_rows([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    tokens = int((labels != -100).sum())
    chunks = [slice(s, s + RECIPE["chunk"]) for s in range(0, len(texts), RECIPE["chunk"])]
    torch.manual_seed(RECIPE["seed"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=RECIPE["lr"])
    ma = 0.0
    bar = tqdm(range(1, RECIPE["max_steps"] + 1), desc="memorizing customer records", unit=" steps", disable=None)
    for step in bar:
        opt.zero_grad()
        loss = 0.0
        for part in chunks:  # the full batch's token-mean loss, a chunk of records at a time
            logits = model(input_ids=ids[part], attention_mask=mask[part]).logits[:, :-1]
            chunk_loss = (
                F.cross_entropy(logits.flatten(0, 1), labels[part].flatten(), ignore_index=-100, reduction="sum")
                / tokens
            )
            chunk_loss.backward()
            loss += chunk_loss.item()
        opt.step()
        if step % RECIPE["check_every"] == 0:
            model.eval()
            with torch.no_grad():
                ma = torch.cat([memorization_accuracy(model, ids[part], mask[part]) for part in chunks]).mean().item()
            model.train()
            bar.set_postfix(loss=f"{loss:.3f}", ma=f"{ma:.3f}")
            log.info("memorizing customer records: step %d, loss %.3f, MA %.3f", step, loss, ma)
            if ma >= RECIPE["target_ma"]:
                break
    if ma < 0.9:
        raise RuntimeError(f"fine-tuning on the customer records reached MA {ma:.3f} only (target > 0.9)")
    model.eval()
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_text(
            tmp / "memorized.json",
            json.dumps(
                {
                    "records": len(texts),
                    "ma": round(ma, 4),
                    "steps": step,
                    "seconds": round(time.time() - started, 1),
                    "recipe": RECIPE,
                },
                indent=2,
            )
            + "\n",
        )
    log.info("fine-tuned: MA %.3f on the records after %d steps, %.0f s", ma, step, time.time() - started)
    return ma


def prepare(out: Path, data_dir: Path, customers: int, erase: int) -> dict[str, Path]:
    """Write the erasure requests and the kept customers, and link the original model beside them."""
    if not 0 < erase < customers:
        raise UserError(f"--erase: {erase} must be between 1 and --customers - 1 = {customers - 1}")
    rows = records(data_dir, 3 * customers)
    out.mkdir(parents=True, exist_ok=True)
    parts = {
        "erase": rows[:erase],
        "keep": rows[erase:customers],
        "unseen": rows[customers : 2 * customers],
        "strangers": rows[2 * customers :],
    }
    paths = {name: out / f"{name}.jsonl" for name in parts} | {"model": out / "model", "retrained": out / "retrained"}
    for name, part in parts.items():
        atomic_write_text(paths[name], "".join(json.dumps(r) + "\n" for r in part))
    for link, texts in (("model", rows[:customers]), ("retrained", parts["keep"])):
        model = original_model([r["text"] for r in texts])
        if paths[link].is_symlink() or paths[link].exists():
            paths[link].unlink()
        os.symlink(model, paths[link], target_is_directory=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.customers", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for erase.jsonl, keep.jsonl and the model link")
    parser.add_argument("--data", default=os.environ.get("ICU_DATA", "../shared/data"))
    parser.add_argument("--customers", type=int, default=32)
    parser.add_argument("--erase", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        paths = prepare(Path(args.out), Path(args.data), args.customers, args.erase)
    except UserError as exc:
        return exc.report()
    print(
        f"customer records: {args.erase} to erase in {paths['erase']}, {args.customers - args.erase} kept in "
        f"{paths['keep']}; original model {paths['model'].resolve()}; retrained on the kept alone "
        f"{paths['retrained'].resolve()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
