"""The export stage: the serving hand-off, verified.

`handoff` (runs/<name>/model/) is the unlearned folder after its logits were checked
against the final training engine's, written in `export.dtype` a shard at a time (every
tensor checked to be the trained one rounded to that dtype), with a model card, sha256
checksums and the erasure receipt (one row per input request; content hashes keyed with the
operator's receipt key, `pipeline.keys`). It fails closed: no hand-off while an accepted
request lacks an audit verdict under a configured probe or leaks under a required one, and a
symbolic link in the folder it copies is refused rather than followed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import pandas as pd
import torch
import yaml

from pipeline.atomic import atomic_path, atomic_write_json, atomic_write_text, sha256_file
from pipeline import audit, keys, ledger, modeling, probes, shards
from pipeline.errors import UserError
from pipeline.report import paper_table
from pipeline.store import RunStore, fingerprint

log = logging.getLogger("icu.export")
OUTPUTS = ("handoff",)

RECEIPT_COLUMNS = [
    "source_row",
    "erased_in",
    "request_id",
    "content_hash",
    "status",
    "epoch_forgotten",
    "reason",
    "checked_tokens",
    "cut_points",
    "ma_before",
    "el_before",
    "span_before",
    "ma_after",
    "el_after",
    "span_after",
    "ma_threshold",
    "el_threshold",
    "span_threshold",
    "nll_after",
    "nll_band_high",
    "robust",
    "audit_leaks",
]


# Max |logit difference| per logit scale between the same weights run by ZeRO-3 and by torch:
# float rounding (fp32 measured 9e-5 on SmolLM2-135M's logits of size ~30, 0 on the tiny test
# model); the 16-bit bounds are a few units of their precision, not measured on a GPU engine.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def verify(
    model_dir: Path, probe: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, tolerance: float | None = None
) -> float:
    """Max |logit difference| between the folder (loaded in `dtype`, as serving would) and the
    final engine; refused above `tolerance` (default: `TOLERANCE[dtype]`) times the logits'
    scale (at least 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
    mask = probe["attention_mask"].bool()
    diff = float((logits - probe["logits"])[mask].abs().max())
    tolerance = (TOLERANCE[dtype] if tolerance is None else tolerance) * max(
        1.0, float(probe["logits"][mask].abs().max())
    )
    if not diff <= tolerance:
        raise RuntimeError(
            f"export verification failed: {model_dir} gives logits {diff:.3g} away from the final "
            f"engine's (tolerance {tolerance:.3g}); the consolidated checkpoint does not match training"
        )
    return diff


def receipt_rows(cfg, store: RunStore) -> list[dict]:
    """One row per input request: forgotten (and when), not forgotten (and why: still remembered, or
    erased too deep), or rejected at ingest; in a chained run also one per request earlier runs erased
    (`erased_in`: its ledger entry), with its status now. `checked_tokens`: the tokens the checks and the audit
    measured (all after the first prompt window); `cut_points`: where the sampling probe's windows
    start (pipeline/method.md, "Whole requests")."""
    accepted = pd.read_parquet(
        store.artefact("accepted"), columns=["source_row", "id", "content_hash", "n_tokens", "erased_in"]
    )
    rejected = pd.read_parquet(store.artefact("rejected"))
    history = pd.read_parquet(store.artefact("history"))
    result = json.loads(store.artefact("unlearn_result").read_text())
    thr = result["thresholds"]
    prefix, window = cfg.requests.prefix_tokens, cfg.requests.suffix_tokens
    rows = []
    for source_row, rid, digest, n_tokens, erased_in in accepted.itertuples(index=False):
        checks = history[history["request_id"] == rid].sort_values("epoch")
        first, last = checks.iloc[0], checks.iloc[-1]
        flags = checks["forgotten"].tolist()
        since = len(flags) - next((i for i, f in enumerate(reversed(flags)) if not f), len(flags))
        forgotten, deep = bool(last["forgotten"]), bool(last.get("too_deep", False))
        stopped = f"when unlearning stopped ({result['stop_reason']} after {result['epochs']} epochs)"
        rows.append(
            dict(
                source_row=None if pd.isna(source_row) else int(source_row),
                erased_in=None if pd.isna(erased_in) else int(erased_in),
                request_id=rid,
                content_hash=digest,
                status="forgotten" if forgotten else "too_deep" if deep else "not_forgotten",
                checked_tokens=f"{prefix}-{n_tokens}",
                cut_points=",".join(map(str, probes.window_cuts(int(n_tokens), prefix, window))),
                epoch_forgotten=int(checks["epoch"].iloc[since]) if forgotten else None,
                reason=None
                if forgotten
                else f"erased too deep {stopped}: its NLL {last['nll']:.2f} lies above the "
                f"strangers' band ({last['band_high']:.2f}), so it stands out as erased"
                if deep
                else f"still remembered {stopped}",
                ma_before=float(first["ma"]),
                el_before=float(first["el"]),
                span_before=_number(first.get("span")),
                ma_after=float(last["ma"]),
                el_after=float(last["el"]),
                span_after=_number(last.get("span")),
                ma_threshold=thr["ma"],
                el_threshold=thr["el"],
                span_threshold=thr.get("span"),
                nll_after=_number(last.get("nll")),
                nll_band_high=_number(last.get("band_high")),
            )
        )
    for row in rejected.itertuples(index=False):
        rows.append(
            dict(
                source_row=int(row.source_row),
                erased_in=None,
                request_id=row.id,
                content_hash=row.content_hash,
                status="rejected",
                epoch_forgotten=None,
                reason=f"rejected at ingest: {row.reason}" + (f" ({row.detail})" if row.detail else ""),
                checked_tokens=None,
                cut_points=None,
                ma_before=None,
                el_before=None,
                span_before=None,
                ma_after=None,
                el_after=None,
                span_after=None,
                ma_threshold=thr["ma"],
                el_threshold=thr["el"],
                span_threshold=thr.get("span"),
                nll_after=None,
                nll_band_high=None,
            )
        )
    # the requests earlier runs erased (no row of this run's file) first, in ledger order
    order = lambda r: (r["source_row"] is not None, r["source_row"] if r["source_row"] is not None else r["erased_in"])
    return sorted(_with_audit(rows, audit.verdicts(store)), key=order)


def _with_audit(rows: list[dict], verdicts: pd.DataFrame | None) -> list[dict]:
    """Each accepted request's audit: the span every probe reproduced (`audit_<probe>`), the probes
    it leaks under and `robust` (no probe leaks); None for rejected rows and runs without an audit."""
    probes = [] if verdicts is None else [c for c in verdicts.columns if c != "leaks"]
    out = []
    for row in rows:
        found = verdicts is not None and row["status"] != "rejected" and row["request_id"] in verdicts.index
        v = verdicts.loc[row["request_id"]] if found else None
        out.append(
            dict(
                row,
                robust=None if v is None else not v["leaks"],
                audit_leaks=None if v is None else v["leaks"],
                **{f"audit_{p}": None if v is None else int(v[p]) for p in probes},
            )
        )
    return out


def _number(value) -> float | None:
    """A float, or None for a value the check did not measure (no band; history from an older run)."""
    return None if value is None or pd.isna(value) else float(value)


def spreadsheet_safe(value):
    """A text cell a spreadsheet would run as a formula (=, +, -, @, tab, CR first) gets a
    leading apostrophe, as OWASP's CSV-injection advice and spreadsheet-safe writers do."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def write_receipt(rows: list[dict], folder: Path, key_id: str) -> dict[str, int]:
    """receipt.json (values as they are) and receipt.csv (spreadsheet-safe); returns the counts."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("forgotten", "not_forgotten", "rejected")}
    counts["earlier"] = sum(r.get("erased_in") is not None for r in rows)
    atomic_write_json(folder / "receipt.json", {"counts": counts, "content_hash": hash_note(key_id), "requests": rows})
    columns = RECEIPT_COLUMNS + [
        c for c in (rows[0] if rows else {}) if c.startswith("audit_") and c not in RECEIPT_COLUMNS
    ]
    table = pd.DataFrame(rows, columns=columns).astype({"epoch_forgotten": "Int64"})  # 6, not 6.0
    table = table.astype({c: "Int64" for c in columns if c.startswith("audit_") and c != "audit_leaks"})
    with atomic_path(folder / "receipt.csv") as tmp:
        table.map(spreadsheet_safe).to_csv(tmp, index=False)
    return counts


def hash_note(key_id: str) -> str:
    return (
        f"HMAC-SHA256 of the NFKC-normalised, whitespace-collapsed text under the operator's receipt key "
        f"(key id {key_id}); `icu hash` computes it for a text"
    )


def no_links(folder: Path) -> None:
    """A symbolic link in a folder to be handed off would ship its target (anything this user can
    read), checksummed as if trained: refused, never followed."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                link = Path(root, name)
                raise UserError(
                    f"export refused: {link} is a symbolic link; a model folder holds none (it would ship "
                    "what it points to); fix: remove it, check who else can write to the run directory, "
                    "and rerun with --restart-from unlearn"
                )


def key(cfg, store: RunStore) -> str:
    return fingerprint(
        "export",
        cfg.part("model", "export"),
        cfg.audit.require,
        store.key_of("ingest"),
        store.key_of("unlearn"),
        store.key_of("evaluate"),
        store.key_of("audit"),
    )


def reencode(source: Path, out: Path, dtype: torch.dtype, max_bytes: int) -> None:
    """`source` (a model folder) written to `out` with its floating-point weights in `dtype`, one
    shard at a time, then every tensor read back and compared with the source's, rounded."""
    for item in source.iterdir():  # config, tokenizer, the LoRA adapters (adapter/) as they are
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        elif not item.name.endswith(".safetensors") and item.name != shards.INDEX:
            shutil.copy(item, out / item.name)
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    atomic_write_json(out / "config.json", config)
    mapping = shards.weight_map(source)
    specs = {
        name: (shape, dtype if kind.is_floating_point else kind) for name, (shape, kind) in shards.specs(source).items()
    }

    def rounded(names: list[str]):
        for n, t in shards.tensors(source, names, mapping):
            yield n, t.to(specs[n][1])

    written = shards.write(out, specs, rounded, max_bytes)
    for file in dict.fromkeys(written.values()):
        names = [n for n, f in written.items() if f == file]
        want = dict(rounded(names))
        changed = [n for n, t in shards.tensors(out, names, written) if not torch.equal(t, want[n])]
        if changed:
            raise RuntimeError(f"export: {out / file} does not hold the trained weights ({', '.join(changed[:3])})")


def served_dtype(cfg) -> torch.dtype:
    return modeling.torch_dtype(cfg.model.dtype if cfg.export.dtype == "auto" else cfg.export.dtype)


def run(cfg, store: RunStore) -> dict:
    """`handoff`: the verified Hugging Face folder, README.md model card, checksums, receipt.json/csv."""
    source, probe = store.artefact("unlearned_model"), store.artefact("probe")
    if not probe.exists():
        raise UserError(
            f"{probe}: missing (the run's unlearn stage predates export verification); fix: "
            "rerun with --restart-from unlearn"
        )
    probe = torch.load(probe, weights_only=True)
    key_id = keys.key_id(keys.receipt_key(store.root))
    no_links(source)
    dtype, trained = served_dtype(cfg), modeling.torch_dtype(cfg.model.dtype)
    diff = verify(source, probe, trained)
    accepted = pd.read_parquet(store.artefact("accepted"), columns=["id"])["id"].tolist()
    refusal = audit.refused(store, cfg.audit.require, cfg.audit.probes, accepted)
    if refusal:
        raise UserError(refusal)
    rows = receipt_rows(cfg, store)
    ingest = store.stage("ingest").get("summary", {})
    expected = ingest.get("rows", 0) + ingest.get("earlier", 0)
    if "rows" in ingest and len(rows) != expected:
        raise RuntimeError(f"receipt has {len(rows)} rows but ingest read {expected} (earlier runs' included)")
    chain = ledger.run_chain(store) if cfg.ledger.path else None
    if chain is not None:
        remembered = [r["request_id"] for r in rows if r["status"] == "not_forgotten"]
        if remembered:
            raise UserError(
                f"export refused: {len(remembered)} requests are still remembered (see eval/report.md), and the "
                f"ledger {cfg.ledger.path} records a hand-off only when every request in it is erased; fix: rerun "
                "with --restart-from unlearn and a larger unlearning.stop.max_epochs"
            )
        ledger.ready(cfg, chain)
    metrics_path, audit_path = store.artefact("metrics"), store.artefact("audit")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    audited = json.loads(audit_path.read_text()) if audit_path.exists() else None
    with atomic_path(store.artefact("handoff")) as tmp:
        if dtype == trained:
            shutil.copytree(source, tmp)
            served = diff
        else:
            tmp.mkdir()
            reencode(source, tmp, dtype, shards.parse_size(cfg.export.max_shard_size))
            served = verify(tmp, probe, dtype, tolerance=math.inf)
        counts = write_receipt(rows, tmp, key_id)
        atomic_write_text(tmp / "README.md", _model_card(cfg, counts, metrics, audited, diff, dtype, served))
        sums = [
            f"{sha256_file(p)}  {p.relative_to(tmp)}" for p in sorted(tmp.rglob("*")) if p.is_file()
        ]  # sha256sum -c
        atomic_write_text(tmp / "checksums.sha256", "\n".join(sums) + "\n")
    entry = _record(cfg, store, rows, chain) if chain is not None else None
    name = str(dtype).removeprefix("torch.")
    log.info(
        "export: %s verified (max logit diff %.2g; in %s %.2g); receipt: %s",
        store.artefact("handoff"),
        diff,
        name,
        served,
        counts,
    )
    return dict(
        counts,
        max_logit_diff=diff,
        dtype=name,
        served_logit_diff=served,
        **({"ledger_entry": entry["seq"]} if entry else {}),
    )


def _record(cfg, store: RunStore, rows: list[dict], chain: dict) -> dict:
    """The run's ledger entry, once its hand-off is verified: the requests this run erased, each with
    its token ids and receipt row (`ledger.record`)."""
    accepted = pd.read_parquet(store.artefact("accepted"), columns=["id", "input_ids", "erased_in"])
    own = accepted[accepted["erased_in"].isna()]
    receipts = {r["request_id"]: r for r in rows if r["status"] != "rejected"}
    erased = [
        dict(id=rid, content_hash=receipts[rid]["content_hash"], input_ids=list(map(int, ids)), receipt=receipts[rid])
        for rid, ids in zip(own["id"], own["input_ids"])
    ]
    thresholds = json.loads(store.artefact("unlearn_result").read_text())["thresholds"]
    entry = ledger.record(cfg, chain, store.artefact("handoff"), erased, thresholds)
    log.info("export: ledger %s entry %d: %d requests erased in all", cfg.ledger.path, entry["seq"], len(receipts))
    return entry


def _model_card(
    cfg, counts: dict, metrics: dict | None, audited: dict | None, diff: float, dtype: torch.dtype, served: float
) -> str:
    lines = [
        "# Unlearned model",
        "",
        f"Produced by `icu` (Iterative Contrastive Unlearning, arXiv:2407.20271) from "
        f"{cfg.to_dict(paths=False)['model']['name'].replace('<path>', 'a local model folder')} "
        f"with method `{cfg.unlearning.loss.name}`.",
        "",
        f"Erasure requests: {counts['forgotten']} forgotten, {counts['not_forgotten']} not forgotten, "
        f"{counts['rejected']} rejected at ingest (per-request detail in receipt.json / receipt.csv, "
        "ids and content hashes only, the hashes keyed with the operator's receipt key)"
        + (
            f"; {counts['earlier']} of them were erased by earlier runs of the erasure ledger and checked again "
            "in this one (`erased_in`)."
            if counts.get("earlier")
            else "."
        ),
        "",
        f"Verified: the consolidated weights, loaded with `from_pretrained`, reproduce the final training "
        f"engine's logits on fixed prompts to {diff:.2g}. This folder holds them in "
        f"{str(dtype).removeprefix('torch.')}"
        + (
            "."
            if served == diff
            else f", each tensor checked to be the trained one rounded to it; in that precision the logits "
            f"differ from the engine's by up to {served:.2g}."
        ),
        "",
    ]
    a = cfg.unlearning.adapter
    if a.type == "lora":
        lines += [
            f"Unlearned with LoRA adapters (r {a.r}, alpha {a.alpha:g}, on {', '.join(a.target_modules)}), merged "
            "into these weights; the adapters alone are in `adapter/` (peft's format).",
            "",
        ]
    if metrics:
        lines += ["## Before / after", "", paper_table(metrics), ""]
    if audited and audited["probes"]:
        lines += [
            "## Extraction audit",
            "",
            f"Criterion: {audited['criterion']}. Rows that leak / rows:",
            "",
            audit.markdown(audited),
            "",
        ]
    lines += [
        "## Run config",
        "",
        "Paths are left out (`<path>`): they name the operator's files and machines.",
        "",
        "```yaml",
        yaml.safe_dump(cfg.to_dict(paths=False), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
