"""`icu`: run the unlearning pipeline, one stage, or show a run's status.

    icu run CONFIG [--restart-from STAGE] [--set key=value ...]
    icu ingest|retrieve|unlearn|evaluate|audit|export CONFIG [--restart-from STAGE] [--set key=value ...]
        (runs earlier stages first when needed)
    icu evaluate --model PATH [--suites ppl,classification] [--out DIR] [--set key=value ...]
    icu status RUN_DIR
    icu ledger PATH        (verify an erasure ledger; one line per run and the requests it erased)
    icu hash [FILE]        (a request's keyed content hash, as receipts hold it; FILE or stdin)

Bad input is reported as one line on stderr with exit code 2, never a traceback. A run that
finishes with accepted requests still remembered exits 3, naming them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline import driver, evaluate, keys, ledger, modeling
from pipeline.config import SUITES, build_config, load_config, set_dotted
from pipeline.errors import UserError
from pipeline.report import paper_table
from pipeline.store import STAGES

REMEMBERED_EXIT = 3  # the run finished, but some accepted requests are still remembered
SHOWN_IDS = 20  # request ids named on that line; the receipt lists all of them

EPILOG = """examples:
  icu run ray_jobs/configs/demo.yaml           whole pipeline, skipping completed stages
  icu run demo.yaml --set unlearning.optim.lr=1e-5 --restart-from unlearn
  icu ingest ray_jobs/configs/demo.yaml        validate erasure requests only
  icu retrieve ray_jobs/configs/demo.yaml      retain neighbours (runs after ingest)
  icu evaluate ray_jobs/configs/demo.yaml      before/after metrics and eval/report.md
  icu evaluate --model runs/demo/unlearn/model --suites ppl,classification
                                               any model folder on its own
  icu audit ray_jobs/configs/demo.yaml         extraction probes (4-bit, sampling, ...) and audit/report.md
  icu status runs/demo                         per-stage state and where it resumes
  icu ledger /shared/icu-ledger                verify the erasure ledger and list its runs
  icu hash record.txt                          the keyed content hash a receipt lists for that text
"""


STAGE_HELP = {
    "ingest": "validate erasure requests into accepted/rejected parquet",
    "retrieve": "embed the retain pool and find each request's nearest retain neighbours",
    "unlearn": "unlearn the requests with ICU under DeepSpeed ZeRO-3 (Ray Train or torchrun)",
    "evaluate": "score the original and the unlearned model; write eval/metrics.json and report.md",
    "audit": "probe the original and the unlearned model for the requests' text (served precisions, sampling, "
    "shorter prompts, relearning); write audit/audit.json and report.md",
    "export": "verify the unlearned model folder and write it to model/ with a model card and erasure receipt",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icu",
        description="Remove memorized data from a causal LM with Iterative Contrastive "
        "Unlearning (arXiv:2407.20271). Every stage writes into runs/<name>/ and is skipped when "
        "already complete, so rerunning a command resumes it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {"run": "run the whole pipeline (completed stages are skipped)", **STAGE_HELP}
    for command, help_text in commands.items():
        parser_of = sub.add_parser(command, help=help_text)
        _config_args(parser_of)
        parser_of.add_argument(
            "--restart-from",
            choices=STAGES,
            help="rerun this stage and all later ones (required to change the config of an existing run)",
        )
    evaluate = sub.choices["evaluate"]
    evaluate.add_argument(
        "--model",
        help="evaluate this model folder on its own (CONFIG is then optional and only supplies evaluation settings)",
    )
    evaluate.add_argument("--suites", help=f"with --model: comma-separated subset of {','.join(SUITES)}")
    evaluate.add_argument("--out", help="with --model: output folder (default: runs/eval-<folder name>)")
    status = sub.add_parser("status", help="show each stage's state, progress and timings")
    status.add_argument("run_dir", help="a run directory, e.g. runs/demo")
    book = sub.add_parser("ledger", help="verify an erasure ledger (ledger.path) and list every run in it")
    book.add_argument("path", help="the ledger folder")
    hashed = sub.add_parser(
        "hash", help="print a text's content hash under the operator's receipt key (to find a request in a receipt)"
    )
    hashed.add_argument("file", nargs="?", default="-", help="a file holding the request's text (default: stdin)")
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?" if parser.prog.endswith("evaluate") else None,
        help="run config YAML (see ray_jobs/configs/)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. unlearning.optim.lr=1e-5 (repeatable)",
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. unlearning.optim.lr=1e-5")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(
                f"--set {key.strip()}: the value is not valid YAML; fix: quote it, e.g. "
                f"--set '{key.strip()}=\"...\"', or write a list as [a, b]"
            ) from None
    return overrides


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "status":
        if not os.path.isdir(args.run_dir):
            raise UserError(f"status: {args.run_dir} is not a run directory; fix: pass runs/<name>")
        print("\n".join(driver.status_lines(args.run_dir)))
        return 0
    if args.command == "hash":
        return print_hash(args.file)
    if args.command == "ledger":
        if not os.path.isdir(args.path):
            raise UserError(f"ledger: {args.path} is not a folder; fix: pass the folder ledger.path names")
        print("\n".join(ledger.lines(ledger.Ledger.open(args.path))))
        return 0
    if args.command == "evaluate" and args.model:
        return evaluate_folder(args)
    if args.config is None:
        raise UserError(f"{args.command}: a run config is required; fix: icu {args.command} CONFIG")
    cfg, store = driver.open_run(args.config, parse_overrides(args.set), getattr(args, "restart_from", None))
    try:
        if args.command == "run":
            driver.run_pipeline(cfg, store)
            print("\n".join(driver.status_lines(store.root)))
            print_results(store)
        else:
            driver.run_pipeline(cfg, store, until=args.command)
    finally:
        store.unlock()
    return remembered_exit(store)


def print_hash(source: str) -> int:
    """`icu hash`: the keyed content hash of one request's text, as ingest computed it."""
    try:
        text = sys.stdin.read() if source == "-" else open(source, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(
            f"hash: cannot read {source} as UTF-8 text ({type(exc).__name__}); fix: pass a text file"
        ) from None
    print(keys.keyed_hash(keys.receipt_key(), text))
    return 0


def remembered_exit(store) -> int:
    """REMEMBERED_EXIT, with one line naming them, when unlearning ended with requests still remembered
    (everything is written by then: the receipt lists them as not_forgotten); else 0."""
    path = store.artefact("unlearn_result")
    remembered = json.loads(path.read_text()).get("remembered", []) if path.exists() else []
    if not remembered:
        return 0
    named = ", ".join(remembered[:SHOWN_IDS]) + (
        f" and {len(remembered) - SHOWN_IDS} more" if len(remembered) > SHOWN_IDS else ""
    )
    print(
        f"icu: {len(remembered)} accepted requests are still remembered after unlearning: {named}; "
        "the receipt lists them as not_forgotten; fix: rerun with --restart-from unlearn --set "
        "unlearning.stop.max_epochs=<more> (training continues from its last checkpoint)",
        file=sys.stderr,
    )
    return REMEMBERED_EXIT


def print_results(store) -> None:
    """What a person wants at the end of a run: the before/after table and where everything is."""
    metrics = store.artefact("metrics")
    if metrics.exists():
        print("\n" + paper_table(json.loads(metrics.read_text())) + "\n")
    for name, path in (
        ("report", store.artefact("report")),
        ("audit", store.artefact("audit_report")),
        ("receipt", store.artefact("handoff") / "receipt.csv"),
        ("model", store.artefact("handoff")),
    ):
        if path.exists():
            print(f"{name + ':':<9}{path.resolve()}")


def evaluate_folder(args: argparse.Namespace) -> int:
    """`icu evaluate --model PATH`: score one model folder without a run."""

    overrides = parse_overrides(args.set)
    if args.suites:
        overrides["evaluation.suites"] = [s.strip() for s in args.suites.split(",") if s.strip()]
    overrides["model.name"] = args.model
    if args.config:
        cfg = load_config(args.config, overrides)
    else:  # no run: the request file is never read, any existing path satisfies the schema
        data: dict[str, Any] = {"requests": {"path": args.model}, "storage": {"name": "eval"}}
        for key, value in overrides.items():
            set_dotted(data, key, value)
        cfg = build_config(data)
    model_dir = modeling.resolve(cfg).model_dir
    if not set(cfg.evaluation.suites) - {"forget", "mia"}:
        raise UserError(
            "evaluate --model: the forget and mia suites need a run's requests; fix: choose from "
            "unseen, ppl, classification, dialogue"
        )
    cfg.evaluation.suites = [s for s in cfg.evaluation.suites if s not in ("forget", "mia")]
    out = Path(args.out or Path(cfg.storage.runs_dir) / f"eval-{model_dir.name}")
    results = evaluate.evaluate_folder(model_dir, cfg, out)
    print(paper_table(results))
    print(f"report: {out / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except UserError as exc:
        return exc.report()
    except KeyboardInterrupt:
        print("icu: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
