"""eval/report.md: the paper-style table, per-task scores and plots a person can read."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.atomic import atomic_path, atomic_write_text

TABLE = [  # (column, how to read it from one model's summary, format)
    ("EL10 %", lambda m: 100 * m["forget"]["el"], "{:.1f}"),
    ("MA %", lambda m: 100 * m["forget"]["ma"], "{:.1f}"),
    ("BERTScore-F1", lambda m: m["forget"]["bertscore"], "{:.3f}"),
    ("BLEU-4", lambda m: m["forget"]["bleu"], "{:.3f}"),
    ("Span", lambda m: m["forget"]["span"], "{:.1f}"),
    ("Below thr.", lambda m: f"{m['forget']['below_thresholds']}/{m['forget']['requests']}", "{}"),
    ("Kept MA %", lambda m: 100 * m["keep"]["ma"], "{:.1f}"),
    ("Kept whole %", lambda m: 100 * m["keep"]["whole"], "{:.1f}"),
    ("Classification avg", lambda m: m["classification"]["average"], "{:.1f}"),
    ("Dialogue avg F1", lambda m: m["dialogue"]["average"], "{:.1f}"),
    ("Pile PPL", lambda m: m["ppl"]["pile"], "{:.2f}"),
    ("WikiText PPL", lambda m: m["ppl"]["wikitext"], "{:.2f}"),
    ("MIA AUC (LOSS)", lambda m: _with_se(m, "loss"), "{}"),
    ("MIA AUC (Min-K%)", lambda m: _with_se(m, "min_k"), "{}"),
    ("PrivLeak (Min-K%)", lambda m: 100 * m["privleak"]["min_k"], "{:+.1f} %"),
]


def _with_se(m: dict[str, Any], score: str) -> str:
    """An AUC with its standard error, where the summary has one."""
    se = m.get("mia_auc_se", {}).get(score)
    return f"{m['mia_auc'][score]:.3f}" + (f" ± {se:.3f}" if se is not None else "")


HEADLINE = ("EL10 %", "MA %", "Kept MA %", "Pile PPL")


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """A few numbers per model for the run manifest and `icu status`."""
    out = {}
    for label, m in results["models"].items():
        for name, get, _ in (c for c in TABLE if c[0] in HEADLINE):
            value = _try(get, m)
            if value is not None:
                out[f"{label} {name}"] = round(value, 2)
    return out


def paper_table(results: dict[str, Any]) -> str:
    """One row per model; columns a model lacks (a suite not run) are shown as '-'."""
    columns = [c for c in TABLE if any(_try(c[1], m) is not None for m in results["models"].values())]
    epochs = results.get("unlearn", {}).get("epochs")
    head = ["Model"] + [c[0] for c in columns] + (["Epochs"] if epochs is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in results["models"].items():
        cells = [label] + [cell(get, m, fmt) for _, get, fmt in columns]
        if epochs is not None:
            cells.append(str(epochs) if label == "unlearned" else "0" if label == "original" else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out: Path, results: dict[str, Any], samples: pd.DataFrame, training: tuple[Path, Path] | None = None
) -> Path:
    """report.md next to its PNG plots; `training`: the unlearn stage's (history, epochs) files."""
    parts = ["# Evaluation report", "", paper_table(results), ""]
    thr = results.get("thresholds")
    if thr:
        parts += [
            f"Forgetting thresholds (the original model's on unseen text, `evaluation.unseen_path`): mean MA "
            f"{thr['ma']:.3f}, mean EL10 {thr['el']:.4f}, longest extractable span {thr.get('span', math.inf):g} "
            "tokens. EL10 uses the ICU prompt range (t = 0.75T..T-1). Span: the longest run of a row's tokens "
            "greedy decoding reproduces from the row's own text up to any position after its first prompt window "
            "(the whole request is checked); Below thr. counts requests at or below all three. Kept whole: the "
            "kept rows the model reproduces whole from their first prompt window. BERTScore-F1 runs on "
            "all-MiniLM-L6-v2 token embeddings (bert-base-uncased is not available offline).",
            "",
        ]
    if "retrained" in results["models"]:
        parts += [
            "The retrained model (`evaluation.reference_model`: the same base trained without the requests) is "
            "what a perfect unlearner would give: PrivLeak is MUSE's (AUC unlearned - AUC retrained) / AUC "
            "retrained, requests against the never-seen rows (MUSE passes within ±5 %), and its kept rows and "
            "perplexity are what unlearning should end at (a model fine-tuned on the requests can be worse on "
            "general text than one fine-tuned without them).",
            "",
        ]
    u = results.get("unlearn") or {}
    if u:
        parts += [
            f"Unlearning: method {u.get('method')}, {u.get('forgotten')}/{u.get('requests')} requests flagged "
            f"forgotten by IUR after {u.get('epochs')} epochs (stopped: {u.get('stop_reason')}).",
            "",
        ]
        if u.get("neighbour_ma"):
            curve = ", ".join(f"{m:.3f}" for m in u["neighbour_ma"])
            parts += [
                f"Neighbours' MA at each check (`unlearning.stop.recover_within`; the first is the original's): "
                f"{curve}.",
                "",
            ]
        if u.get("set_auc"):
            curve = ", ".join(f"{a:.3f}" for a in u["set_auc"])
            parts += [
                f"The requests' LOSS membership AUC against the strangers the checks measure (`unlearning."
                f"check.strangers_path`; 0.5 = told apart no better than chance) at each check: {curve}.",
                "",
            ]
    if "first_original" in results["models"]:
        parts += [
            "A chained run (`ledger.path`): `original` is the hand-off this run started from, `first_original` the "
            "model the ledger's first run started from; the table shows the drift from both.",
            "",
        ]
        for suite, c in (results.get("drift") or {}).items():
            parts += [
                f"{suite.capitalize()}: unlearned minus the first original {c['change']:+.1f} points (standard "
                f"error {c['se']:.1f}, paired over {c['examples']} examples).",
                "",
            ]
    for suite, c in (results.get("paired_change") or {}).items():
        parts += [
            f"{suite.capitalize()}: unlearned minus original {c['change']:+.1f} points (standard error "
            f"{c['se']:.1f}; paired, the same {c['examples']} examples over {c['tasks']} tasks). "
            f"{_resolution(suite, c)}",
            "",
        ]
    parts += _task_tables(results)
    for png, caption in _plots(out, results, samples, training or (None, None)):
        parts += [f"![{caption}]({png.name})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def _resolution(suite: str, change: dict[str, float]) -> str:
    """What the paired change can and cannot tell, in words: within two standard errors of 0 it is
    not told apart from no change (no change at all, SE 0, included), and a 2-point target needs a
    standard error under 1."""
    if abs(change["change"]) <= 2 * change["se"]:
        verdict = "Within two standard errors of 0: at this size it is not told apart from no change"
    else:
        verdict = "More than two standard errors from 0: a change"
    more = (
        f"; to tell 2 points apart it needs about {math.ceil(change['examples'] * change['se'] ** 2)} examples"
        f" (`bench/classification_power.py` scores more)"
        if change["se"] > 1 and suite == "classification"
        else ""
    )
    return verdict + more + "."


def _task_tables(results: dict[str, Any]) -> list[str]:
    lines = []
    for suite, unit in (("classification", "accuracy %"), ("dialogue", "unigram F1 x100")):
        tasks = sorted({t for m in results["models"].values() for t in m.get(suite, {}) if t != "average"})
        if not tasks:
            continue
        labels = list(results["models"])
        lines += [
            f"## {suite.capitalize()} ({unit})",
            "",
            "| Task | " + " | ".join(labels) + " |",
            "|" + "---|" * (len(labels) + 1),
        ]
        for task in tasks:
            lines.append(
                f"| {task} | "
                + " | ".join(f"{results['models'][lab].get(suite, {}).get(task, math.nan):.1f}" for lab in labels)
                + " |"
            )
        lines.append("")
    return lines


def _plots(
    out: Path, results: dict[str, Any], samples: pd.DataFrame, training: tuple[Path | None, Path | None]
) -> list[tuple[Path, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    forget = samples[(samples["task"] == "forget") & samples["metric"].isin(["ma", "el"])]
    if not forget.empty:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, metric, name in zip(axes, ("ma", "el"), ("MA", "EL10")):
            for label, group in forget[forget["metric"] == metric].groupby("model", sort=False):
                ax.hist(group["value"], bins=20, range=(0, 1), alpha=0.6, label=label)
            thr = (results.get("thresholds") or {}).get(metric)
            if thr is not None:
                ax.axvline(thr, color="black", linestyle="--", label="threshold")
            ax.set(title=f"{name} of the erasure requests", xlabel=name, ylabel="requests")
            ax.legend()
        made.append(_save(fig, out / "forget_distributions.png", "MA and EL10 of each request, before and after"))
    history, epochs = training
    if history is not None and history.exists():
        frame = pd.read_parquet(history)
        per_epoch = frame.groupby("epoch")["forgotten"].sum()
        fig, ax = plt.subplots(figsize=(6, 3.8))
        ax.plot(per_epoch.index, per_epoch.values, marker="o")
        ax.axhline(frame["request_id"].nunique(), color="gray", linestyle=":", label="all requests")
        ax.set(title="Requests flagged forgotten by IUR", xlabel="epoch", ylabel="requests")
        ax.legend()
        made.append(_save(fig, out / "forgotten_per_epoch.png", "Requests forgotten per epoch"))
    if epochs is not None and epochs.exists():
        frame = pd.read_parquet(epochs)
        terms = [c for c in frame.columns if c.startswith("mean_") and c != "mean_lr"]  # lr: another scale
        if terms and not frame.empty:
            fig, ax = plt.subplots(figsize=(6, 3.8))
            for term in terms:
                ax.plot(frame["epoch"], frame[term], marker="o", label=term[5:])
            ax.set(title="Training loss terms (mean per step)", xlabel="epoch", ylabel="value")
            ax.legend()
            made.append(_save(fig, out / "loss_curves.png", "Loss terms per epoch"))
    return made


def _save(fig, path: Path, caption: str) -> tuple[Path, str]:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path, caption


def _try(get, m: dict[str, Any]):
    try:
        return get(m)
    except (KeyError, TypeError):
        return None


def cell(get, m: dict[str, Any], fmt: str) -> str:
    value = _try(get, m)
    return "-" if value is None else fmt.format(value)
