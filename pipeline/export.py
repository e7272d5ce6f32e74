"""Turn the unlearning run's sharded ZeRO-3 checkpoint into a Hugging Face model folder.

`consolidate` gathers the fp32 master weights of every rank's shard (offline, one
process), loads them into the original architecture and saves safetensors + config +
tokenizer + generation config: the folder the evaluation loads and serving reads.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from pipeline import modeling
from pipeline.errors import UserError
from pipeline.store import atomic_path

log = logging.getLogger("icu.export")


def consolidate(checkpoints: Path, tag: str, base_dir: Path, out_dir: Path, *, dtype: str = "float32",
                trust_remote_code: bool = False) -> Path:
    """Write the weights of checkpoint `tag` as a model folder like `base_dir` (atomically)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    config = AutoConfig.from_pretrained(base_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if _is_meta(model, k)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {tag} does not match {base_dir}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model = model.to(modeling.torch_dtype(dtype))
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        modeling.load_tokenizer(base_dir, trust_remote_code).save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (base_dir / extra).is_file() and not (tmp / extra).exists():
                shutil.copy(base_dir / extra, tmp / extra)
    log.info("export: consolidated checkpoint %s into %s", tag, out_dir)
    return out_dir


def _is_meta(model: torch.nn.Module, name: str) -> bool:
    return model.get_parameter(name).is_meta if name in dict(model.named_parameters()) else True


# --- the export stage: verified serving folder, model card, checksums, erasure receipt ------

RECEIPT_COLUMNS = ["request_id", "content_hash", "status", "epoch_forgotten", "reason", "ma_before", "el_before",
                   "ma_after", "el_after", "ma_threshold", "el_threshold"]


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


def receipt_rows(store) -> list[dict]:
    """One row per input request: forgotten (and when), not forgotten (and why), or rejected at ingest."""
    import json

    import pandas as pd

    accepted = pd.read_parquet(store.path("requests", "accepted.parquet"), columns=["id", "content_hash"])
    rejected = pd.read_parquet(store.path("requests", "rejected.parquet"))
    history = pd.read_parquet(store.path("unlearn", "history.parquet"))
    result = json.loads(store.path("unlearn", "result.json").read_text())
    thr = result["thresholds"]
    rows = []
    for rid, digest in accepted.itertuples(index=False):
        checks = history[history["request_id"] == rid].sort_values("epoch")
        first, last = checks.iloc[0], checks.iloc[-1]
        flags = checks["forgotten"].tolist()
        since = len(flags) - next((i for i, f in enumerate(reversed(flags)) if not f), len(flags))
        forgotten = bool(last["forgotten"])
        rows.append(dict(
            request_id=rid, content_hash=digest, status="forgotten" if forgotten else "not_forgotten",
            epoch_forgotten=int(checks["epoch"].iloc[since]) if forgotten else None,
            reason=None if forgotten else f"still remembered when unlearning stopped ({result['stop_reason']} "
                                          f"after {result['epochs']} epochs)",
            ma_before=float(first["ma"]), el_before=float(first["el"]), ma_after=float(last["ma"]),
            el_after=float(last["el"]), ma_threshold=thr["ma"], el_threshold=thr["el"]))
    for row in rejected.itertuples(index=False):
        rows.append(dict(request_id=row.id, content_hash=row.content_hash, status="rejected", epoch_forgotten=None,
                         reason=f"rejected at ingest: {row.reason}" + (f" ({row.detail})" if row.detail else ""),
                         ma_before=None, el_before=None, ma_after=None, el_after=None,
                         ma_threshold=thr["ma"], el_threshold=thr["el"]))
    return rows


def export_run(cfg, store) -> dict:
    """model/: the verified Hugging Face folder, README.md model card, checksums, receipt.json/csv."""
    import json

    import pandas as pd
    import yaml

    from pipeline.report import paper_table
    from pipeline.store import atomic_write_json, atomic_write_text

    source, probe = store.path("unlearn", "model"), store.path("unlearn", "probe.pt")
    if not probe.exists():
        raise UserError(f"{probe}: missing (the run's unlearn stage predates export verification); fix: "
                        "rerun with --restart-from unlearn")
    diff = verify(source, torch.load(probe, weights_only=True))
    rows = receipt_rows(store)
    ingest = store.stage("ingest").get("summary", {})
    if "rows" in ingest and len(rows) != ingest["rows"]:
        raise RuntimeError(f"receipt has {len(rows)} rows but ingest read {ingest['rows']}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("forgotten", "not_forgotten", "rejected")}
    metrics_path = store.path("eval", "metrics.json")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    with atomic_path(store.path("model")) as tmp:
        shutil.copytree(source, tmp)
        atomic_write_json(tmp / "receipt.json", {"counts": counts, "requests": rows})
        table = pd.DataFrame(rows, columns=RECEIPT_COLUMNS).astype({"epoch_forgotten": "Int64"})  # 6, not 6.0
        table.to_csv(tmp / "receipt.csv", index=False)
        atomic_write_text(tmp / "README.md", _model_card(cfg, counts, metrics, diff, paper_table, yaml))
        sums = [f"{_sha256(p)}  {p.name}" for p in sorted(tmp.iterdir()) if p.is_file()]
        atomic_write_text(tmp / "checksums.sha256", "\n".join(sums) + "\n")
    log.info("export: %s verified (max logit diff %.2g); receipt: %s", store.path("model"), diff, counts)
    return dict(counts, max_logit_diff=diff)


def _sha256(path: Path) -> str:
    """Plain content hash, as `sha256sum -c checksums.sha256` checks it."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_card(cfg, counts: dict, metrics: dict | None, diff: float, paper_table, yaml) -> str:
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
