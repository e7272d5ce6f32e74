"""The unlearn stage: its key, the checkpoint stamp, the launch, and consolidation.

The workers (`pipeline.worker`, one process per rank) run under Ray Train on clusters or
under plain torchrun on GPU boxes without Ray; both resume from the run's last complete,
verified checkpoint, so a failure costs at most one epoch. When they finish, the final
sharded checkpoint is consolidated into a Hugging Face folder (`unlearned_model`) that
evaluation loads and export verifies.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline import adapter, checkpoints, ledger, modeling, shards
from pipeline.ranks import launch
from pipeline.atomic import atomic_path, atomic_write_text, file_digest
from pipeline.config import AdapterConfig, Config
from pipeline.errors import UserError
from pipeline.losses import method
from pipeline.store import RunStore, fingerprint

log = logging.getLogger("icu.unlearn")

OUTPUTS = ("unlearn_result", "history", "epochs", "final_checkpoint", "unlearned_model", "probe")
# What only says when to stop, or what to keep: epoch k's weights do not depend on it.
STOP_ONLY = (("stop", "rule"), ("stop", "max_epochs"), ("stop", "mia_within"), ("keep_checkpoints",))


def key(cfg: Config, store: RunStore, resumable: bool = False) -> str:
    """What training and its stopping rule read: the model, the request rows and their
    neighbours (upstream keys), the whole `unlearning` section (the chosen method's settings and the
    loop's; the files it names by their content), and only the evaluation fields the unseen-set
    thresholds are measured with (a report setting never retrains).

    `resumable`: the key the checkpoints are stamped with, without `STOP_ONLY`: a run given more
    epochs (or another stopping rule) continues from its last checkpoint.
    """
    e, r = cfg.evaluation, cfg.requests
    thresholds = dict(
        unseen=cfg.part("evaluation")[0]["unseen_path"],
        unseen_digest=file_digest(e.unseen_path),
        el_n=e.el_n,
        el_range=e.el_range,
        cap=e.max_samples.get("unseen"),
        batch_size=e.batch_size,
        max_tokens=cfg.max_tokens,
        prefix=r.prefix_tokens,
        suffix=r.suffix_tokens,
    )
    model, unlearning = cfg.part("model", "unlearning")
    for path in STOP_ONLY if resumable else ():
        (unlearning[path[0]] if len(path) == 2 else unlearning).pop(path[-1])
    strangers = cfg.unlearning.check.strangers_path
    files = [file_digest(cfg.unlearning.ds_config), file_digest(strangers) if strangers else None]
    leak = cfg.audit.leak_tokens if cfg.unlearning.check.harden else None  # hardening checks the audit's criterion
    return fingerprint(
        "unlearn",
        model,
        unlearning,
        files,
        leak,
        thresholds,
        cfg.retrieval.pairs_per_request,
        cfg.resources.num_workers,
        store.key_of("ingest"),
        store.key_of("retrieve"),
    )


def run(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Train to a stop (resuming from checkpoints of the same key), then consolidate."""
    if adapter.enabled(cfg.unlearning.adapter):
        check_adapter(cfg)
    check_hardening(cfg)
    check_layer(cfg)
    ledger.first_original(ledger.run_chain(store))  # the workers' reference: refused if changed
    stage_key = key(cfg, store, resumable=True)
    folder = store.artefact("checkpoints")
    stamp = folder / "fingerprint"
    if stamp.exists() and stamp.read_text() != stage_key:  # checkpoints of other inputs: start over
        log.info("unlearn: inputs changed since the last checkpoint; starting from epoch 0")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, stage_key)
    sealed = checkpoints.complete_tags(folder)
    if sealed:
        log.info("unlearn: resuming from checkpoint %s", sealed[0])
    launch(cfg, store, "pipeline.worker", [str(store.root)], "unlearning")
    summary = json.loads(store.artefact("unlearn_result").read_text())
    consolidate(
        store.artefact("checkpoints"),
        summary["final_tag"],
        cfg.model_dir,
        store.artefact("unlearned_model"),
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        max_bytes=shards.parse_size(cfg.export.max_shard_size),
        lora=cfg.unlearning.adapter if adapter.enabled(cfg.unlearning.adapter) else None,
    )
    return {k: v for k, v in summary.items() if k != "thresholds"}


def check_hardening(cfg: Config) -> None:
    """`unlearning.check.harden` quantizes a whole copy of the model at every check: it needs IUR's replica."""
    u = cfg.unlearning.check
    if not u.harden:
        return
    too_big = (
        modeling.replica_bytes(cfg.model_dir, cfg.model.dtype, cfg.model.trust_remote_code) > modeling.REPLICA_MAX_BYTES
    )
    if u.replica == "never" or u.replica == "auto" and too_big:
        raise UserError(
            "unlearning.check.harden: needs an unsharded check replica (it checks a quantized copy of it), "
            f"but unlearning.check.replica is {u.replica!r}"
            + (" and the model is larger than 16 GiB" if too_big else "")
            + "; fix: set check.replica: always, or leave harden empty"
        )


def check_layer(cfg: Config) -> None:
    """A method that reads a layer's activations (rmu) names one the model has."""
    layer = method(cfg.unlearning.loss.name).layer(cfg.unlearning.loss.settings)
    if layer is None:
        return
    blocks = modeling.meta_model(cfg.model_dir, cfg.model.trust_remote_code).config.num_hidden_layers
    if not 0 <= layer <= blocks:
        raise UserError(
            f"unlearning.loss.layer: {layer}, but the model has {blocks} blocks; fix: choose one of 0..{blocks} "
            "(the residual stream after that many blocks)"
        )


def check_adapter(cfg: Config) -> None:
    """Before any worker starts: every LoRA target names a linear layer of the model, and the
    model folder holds safetensors (export reads the frozen weights back from it)."""
    model = modeling.meta_model(cfg.model_dir, cfg.model.trust_remote_code)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = adapter.missing_targets(linear, cfg.unlearning.adapter)
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise UserError(
            f"unlearning.adapter.target_modules: {', '.join(missing)} match no linear layer of "
            f"{cfg.model.name}; fix: choose from {', '.join(names)}"
        )
    try:
        shards.weight_map(cfg.model_dir)
    except FileNotFoundError:
        raise UserError(
            f"unlearning.adapter: {cfg.model_dir} holds no model.safetensors (LoRA export reads the "
            "frozen weights back from it); fix: save the model with safe_serialization=True"
        ) from None


def consolidate(
    folder: Path,
    tag: str,
    base_dir: Path,
    out_dir: Path,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    max_bytes: int = shards.parse_size("2GB"),
    lora: AdapterConfig | None = None,
) -> Path:
    """Write the weights of checkpoint `tag` as a model folder like `base_dir` (atomically), one
    safetensors shard at a time: no process holds the whole model (pipeline/method.md, "Scale").

    The names to write are the model's own, tied copies once (as save_pretrained writes them);
    a checkpoint that lacks one or holds another is refused. With `lora`, the checkpoint holds
    the adapters only: each weight is read from `base_dir` and merged with its adapter, and the
    adapters are also written alone to `adapter/`.
    """
    target = modeling.torch_dtype(dtype)
    model = modeling.meta_model(base_dir, trust_remote_code)
    config = model.config
    wanted = [name for name, _ in model.named_parameters()] + [
        name for name, _ in model.named_buffers() if name in model.state_dict()
    ]
    if lora is None:
        specs, fetch = _from_partitions(folder, tag, wanted, model.state_dict(), target)
    else:
        with checkpoints.fp32_partitions(folder, tag) as lazy:  # adapters are small: gathered at once
            trained = {k: v.contiguous() for k, v in lazy.items() if adapter.base_name(k)}
        specs, fetch = _merged(base_dir, trained, lora, wanted, target)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        config.dtype = target
        config.save_pretrained(tmp)
        shards.write(tmp, specs, fetch, max_bytes)
        modeling.load_tokenizer(base_dir, trust_remote_code).save_pretrained(tmp)
        if (base_dir / "generation_config.json").is_file():
            shutil.copy(base_dir / "generation_config.json", tmp / "generation_config.json")
        if lora is not None:
            adapter.save(tmp / "adapter", trained, lora, base_model=str(base_dir))
    log.info("unlearn: consolidated checkpoint %s into %s (%s)", tag, out_dir, dtype)
    return out_dir


def _from_partitions(folder: Path, tag: str, wanted: list[str], state: dict, target: torch.dtype):
    """Shard plan and fetch of a full checkpoint: each shard gathered from the ranks' partitions."""
    with checkpoints.fp32_partitions(folder, tag) as lazy:
        missing = [k for k in wanted if k not in lazy]
        unexpected = [k for k in lazy if k not in state]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {folder / tag} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        specs = {
            k: (torch.Size(lazy[k].shape), target if lazy[k].dtype.is_floating_point else lazy[k].dtype) for k in wanted
        }

    def fetch(names: list[str]):
        with checkpoints.fp32_partitions(folder, tag) as lazy:  # reopened: the last shard's pages go
            for k in names:
                yield k, lazy[k].contiguous().to(specs[k][1])

    return specs, fetch


def _merged(
    base_dir: Path, trained: dict[str, torch.Tensor], lora: AdapterConfig, wanted: list[str], target: torch.dtype
):
    """Shard plan and fetch of a LoRA checkpoint: the model folder's weights plus the adapters' deltas."""
    delta = adapter.deltas(trained, lora)
    mapping, base = shards.weight_map(base_dir), shards.specs(base_dir)
    missing = [k for k in wanted if k not in base]
    unexpected = [k for k in delta if k not in wanted]
    if missing or unexpected or not delta:
        raise RuntimeError(
            f"LoRA checkpoint does not match {base_dir}: missing {missing[:5]}, adapters of unknown "
            f"weights {unexpected[:5]}, {len(delta)} adapters"
        )
    specs = {k: (base[k][0], target if base[k][1].is_floating_point else base[k][1]) for k in wanted}

    def fetch(names: list[str]):
        for k, t in shards.tensors(base_dir, names, mapping):
            yield k, (t.float() + delta[k] if k in delta else t).to(specs[k][1])

    return specs, fetch
