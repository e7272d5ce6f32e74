"""The export stage: the serving hand-off, verified.

`handoff` (runs/<name>/model/) is the unlearned folder after its logits were checked
against the final training engine's, with a model card, sha256 checksums and the erasure
receipt (one row per input request).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import torch
import yaml

from pipeline.atomic import atomic_path, atomic_write_json, atomic_write_text, sha256_file
from pipeline.errors import UserError
from pipeline.report import paper_table
from pipeline.store import RunStore, fingerprint

log = logging.getLogger("icu.export")
OUTPUTS = ("handoff",)

RECEIPT_COLUMNS = ["source_row", "request_id", "content_hash", "status", "epoch_forgotten", "reason", "ma_before",
                   "el_before", "ma_after", "el_after", "ma_threshold", "el_threshold", "nll_after", "nll_band_high"]


def verify(model_dir: Path, probe: dict[str, torch.Tensor], tolerance: float = 1e-5) -> float:
    """Max |logit difference| between the folder (loaded as serving would) and the final engine.

    The bound is `tolerance` times the logits' scale (at least 1): the same fp32 weights run
    through ZeRO-3's linear and torch's differ by float rounding (measured 9e-5 on
    SmolLM2-135M's logits of size ~30, 0 on the tiny test model).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
    mask = probe["attention_mask"].bool()
    diff = float((logits - probe["logits"])[mask].abs().max())
    tolerance *= max(1.0, float(probe["logits"][mask].abs().max()))
    if not diff <= tolerance:
        raise RuntimeError(f"export verification failed: {model_dir} gives logits {diff:.3g} away from the final "
                           f"engine's (tolerance {tolerance:.3g}); the consolidated checkpoint does not match training")
    return diff


def receipt_rows(store: RunStore) -> list[dict]:
    """One row per input request: forgotten (and when), not forgotten (and why: still remembered, or
    erased too deep), or rejected at ingest."""
    accepted = pd.read_parquet(store.artefact("accepted"), columns=["source_row", "id", "content_hash"])
    rejected = pd.read_parquet(store.artefact("rejected"))
    history = pd.read_parquet(store.artefact("history"))
    result = json.loads(store.artefact("unlearn_result").read_text())
    thr = result["thresholds"]
    rows = []
    for source_row, rid, digest in accepted.itertuples(index=False):
        checks = history[history["request_id"] == rid].sort_values("epoch")
        first, last = checks.iloc[0], checks.iloc[-1]
        flags = checks["forgotten"].tolist()
        since = len(flags) - next((i for i, f in enumerate(reversed(flags)) if not f), len(flags))
        forgotten, deep = bool(last["forgotten"]), bool(last.get("too_deep", False))
        stopped = f"when unlearning stopped ({result['stop_reason']} after {result['epochs']} epochs)"
        rows.append(dict(
            source_row=int(source_row), request_id=rid, content_hash=digest,
            status="forgotten" if forgotten else "too_deep" if deep else "not_forgotten",
            epoch_forgotten=int(checks["epoch"].iloc[since]) if forgotten else None,
            reason=None if forgotten else f"erased too deep {stopped}: its NLL {last['nll']:.2f} lies above the "
                   f"strangers' band ({last['band_high']:.2f}), so it stands out as erased" if deep
                   else f"still remembered {stopped}",
            ma_before=float(first["ma"]), el_before=float(first["el"]), ma_after=float(last["ma"]),
            el_after=float(last["el"]), ma_threshold=thr["ma"], el_threshold=thr["el"],
            nll_after=_number(last.get("nll")), nll_band_high=_number(last.get("band_high"))))
    for row in rejected.itertuples(index=False):
        rows.append(dict(source_row=int(row.source_row), request_id=row.id, content_hash=row.content_hash,
                         status="rejected", epoch_forgotten=None,
                         reason=f"rejected at ingest: {row.reason}" + (f" ({row.detail})" if row.detail else ""),
                         ma_before=None, el_before=None, ma_after=None, el_after=None,
                         ma_threshold=thr["ma"], el_threshold=thr["el"], nll_after=None, nll_band_high=None))
    return sorted(rows, key=lambda r: r["source_row"])


def _number(value) -> float | None:
    """A float, or None for a value the check did not measure (no band; history from an older run)."""
    return None if value is None or pd.isna(value) else float(value)


def spreadsheet_safe(value):
    """A text cell a spreadsheet would run as a formula (=, +, -, @, tab, CR first) gets a
    leading apostrophe, as OWASP's CSV-injection advice and spreadsheet-safe writers do."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def write_receipt(rows: list[dict], folder: Path) -> dict[str, int]:
    """receipt.json (values as they are) and receipt.csv (spreadsheet-safe); returns the counts."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("forgotten", "not_forgotten", "rejected")}
    atomic_write_json(folder / "receipt.json", {"counts": counts, "requests": rows})
    table = pd.DataFrame(rows, columns=RECEIPT_COLUMNS).astype({"epoch_forgotten": "Int64"})  # 6, not 6.0
    with atomic_path(folder / "receipt.csv") as tmp:
        table.map(spreadsheet_safe).to_csv(tmp, index=False)
    return counts


def key(cfg, store: RunStore) -> str:
    return fingerprint("export", cfg.part("model"), store.key_of("ingest"), store.key_of("unlearn"), store.key_of("evaluate"))


def run(cfg, store: RunStore) -> dict:
    """`handoff`: the verified Hugging Face folder, README.md model card, checksums, receipt.json/csv."""
    source, probe = store.artefact("unlearned_model"), store.artefact("probe")
    if not probe.exists():
        raise UserError(f"{probe}: missing (the run's unlearn stage predates export verification); fix: "
                        "rerun with --restart-from unlearn")
    diff = verify(source, torch.load(probe, weights_only=True))
    rows = receipt_rows(store)
    ingest = store.stage("ingest").get("summary", {})
    if "rows" in ingest and len(rows) != ingest["rows"]:
        raise RuntimeError(f"receipt has {len(rows)} rows but ingest read {ingest['rows']}")
    metrics_path = store.artefact("metrics")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    with atomic_path(store.artefact("handoff")) as tmp:
        shutil.copytree(source, tmp)
        counts = write_receipt(rows, tmp)
        atomic_write_text(tmp / "README.md", _model_card(cfg, counts, metrics, diff))
        sums = [f"{sha256_file(p)}  {p.name}" for p in sorted(tmp.iterdir()) if p.is_file()]  # as sha256sum -c reads
        atomic_write_text(tmp / "checksums.sha256", "\n".join(sums) + "\n")
    log.info("export: %s verified (max logit diff %.2g); receipt: %s", store.artefact("handoff"), diff, counts)
    return dict(counts, max_logit_diff=diff)


def _model_card(cfg, counts: dict, metrics: dict | None, diff: float) -> str:
    lines = ["# Unlearned model", "",
             f"Produced by `icu` (Iterative Contrastive Unlearning, arXiv:2407.20271) from `{cfg.model.name}` "
             f"with method `{cfg.unlearning.method}`.", "",
             f"Erasure requests: {counts['forgotten']} forgotten, {counts['not_forgotten']} not forgotten, "
             f"{counts['rejected']} rejected at ingest (per-request detail in receipt.json / receipt.csv, "
             "ids and content hashes only).", "",
             f"Verified: loading this folder with `from_pretrained` reproduces the final training engine's "
             f"logits on fixed prompts to {diff:.2g} (fp32).", ""]
    if metrics:
        lines += ["## Before / after", "", paper_table(metrics), ""]
    lines += ["## Run config", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
