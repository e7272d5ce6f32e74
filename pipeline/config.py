"""One typed config per run: YAML -> dataclasses, validated before any work starts.

Every problem is reported as a single `UserError` line that names the key and the fix
(unknown keys get the nearest valid name). Relative paths resolve against the current
directory (the project root for `make`; `--base-dir` for Ray jobs), after `${VAR}` /
`${VAR:-default}` expansion, and are stored absolute in the frozen run config. An input
path that does not exist there but does inside the project (`ds_configs/zero3.json`)
resolves to the project's file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError
from pipeline.losses import METHODS
from pipeline.quantize import PRECISIONS
from pipeline.shards import parse_size

REQUIRED = "<required>"
PATH = "<path>"  # a path's value where paths are left out (Config.to_dict)
TINY_MODELS = ("tiny-llama", "tiny-gptneo")
SUITES = ("forget", "unseen", "ppl", "classification", "dialogue", "mia")
# The audit's probes (pipeline/audit.py): greedy from the exact prefix in fp32 and at each served
# precision, sampling, shorter prompts, and greedy after relearning on retained text.
PROBES = ("greedy", *PRECISIONS, "sampling", "prompt_quarter", "prompt_half", "relearn")
PROJECT = Path(__file__).resolve().parents[1]
RENAMED = {"unlearning.set_stop": "write unlearning.stop.rule: set (was set_stop: true) or each (was false)"}
# Keys of the flat `unlearning:` section, and where each went when it was split by concern.
MOVED = {
    "method": "loss.name",
    "uw": "loss.uw",
    "lw": "loss.lw",
    "kl": "loss.kl",
    "margin": "loss.margin",
    "general_lw": "loss.general_lw",
    "npo_beta": "loss.beta (with loss.name: npo)",
    "simnpo_beta": "loss.beta (with loss.name: simnpo)",
    "simnpo_gamma": "loss.gamma",
    "retain_weight": "loss.retain_weight",
    "lr": "optim.lr",
    "batch_size": "optim.batch_size",
    "general_batch": "optim.general_batch",
    "grad_clip": "optim.grad_clip",
    "warmup_steps": "optim.warmup_steps",
    "weight_decay": "optim.weight_decay",
    "lr_backoff": "optim.lr_backoff",
    "seed": "optim.seed",
    "max_epochs": "stop.max_epochs",
    "stranger_quantile": "stop.stranger_quantile",
    "recover_within": "stop.recover_within",
    "mia_within": "stop.mia_within",
    "check_every": "check.every",
    "num_beams": "check.num_beams",
    "bertscore_threshold": "check.bertscore_threshold",
    "bleu_threshold": "check.bleu_threshold",
    "ma_threshold": "check.ma_threshold",
    "el_threshold": "check.el_threshold",
    "strangers_path": "check.strangers_path",
    "check_replica": "check.replica",
    "harden": "check.harden",
}
RECIPES = PROJECT / "ray_jobs" / "configs" / "recipes"


def path_field(default: Any = REQUIRED, *, default_factory: Any = None, **meta: Any) -> Any:
    """A field holding a filesystem path: expanded, made absolute, checked to exist."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"path": True, **meta})
    return field(default=default, metadata={"path": True, **meta})


@dataclass
class ModelConfig:
    """The model to unlearn from."""

    name: str = "default"  # "default" (SmolLM2-135M), "tiny-llama", "tiny-gptneo", or a local HF folder
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    trust_remote_code: bool = False  # run the folder's own modelling code: an explicit opt-in, never a default

    def validate(self) -> None:
        _one_of("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.name != "default" and self.name not in TINY_MODELS:
            self.name = _resolve_path(
                "model.name",
                self.name,
                f"a local Hugging Face model folder, 'default', or one of {', '.join(TINY_MODELS)}",
            )


@dataclass
class RequestsConfig:
    """The erasure requests, one per row (pipeline/ingest.py: every row accepted or rejected with a reason)."""

    path: str = path_field(hint="the erasure request file (jsonl, csv, parquet) or a saved dataset folder")  # required
    format: str = "auto"  # auto (from the suffix), jsonl, json, csv, parquet, dataset
    text_column: str = "text"  # the column holding each request's text
    id_column: str | None = (
        None  # the column holding your ids (kept exactly); null: the keyed content hash's first 16 hex
    )
    prefix_tokens: int = 50  # the first prompt window: the checks prompt with it and measure every token after it
    suffix_tokens: int = 50  # a window the probes decode (the generation similarity, the audit's sampling windows)
    max_tokens: int | None = 200  # the paper's sequence length; null = the model's context
    too_long: str = "truncate"  # a request over max_tokens: truncate it, or reject it
    limit: int | None = None  # take only the first N rows (demos, smoke tests)

    def validate(self) -> None:
        _one_of("requests.format", self.format, ("auto", "jsonl", "json", "csv", "parquet", "dataset"))
        _one_of("requests.too_long", self.too_long, ("truncate", "reject"))
        _positive("requests.prefix_tokens", self.prefix_tokens)
        _positive("requests.suffix_tokens", self.suffix_tokens)
        _positive("requests.limit", self.limit)
        need = self.prefix_tokens + self.suffix_tokens
        if self.max_tokens is not None and self.max_tokens < need:
            raise UserError(
                f"requests.max_tokens: {self.max_tokens} is shorter than prefix_tokens + "
                f"suffix_tokens = {need}; fix: raise max_tokens or lower the prefix/suffix"
            )


@dataclass
class RetainConfig:
    """The retain pool: text the model must keep, where each request's neighbours are looked for."""

    # retain text files (jsonl, csv, parquet, txt) or folders
    paths: list[str] = path_field(default_factory=list, hint="retain text files (jsonl, csv, parquet, txt) or folders")
    text_column: str = "text"  # the text column of csv / jsonl / parquet files
    chunk_tokens: int | None = None  # pool items are cut to this many tokens; null = requests.max_tokens
    max_items: int | None = None  # at most this many pool items, taken from the files in turn

    def validate(self) -> None:
        _positive("retain.chunk_tokens", self.chunk_tokens)
        _positive("retain.max_items", self.max_items)


@dataclass
class RetrievalConfig:
    """Each request's nearest retain neighbours (pipeline/retrieve.py, FAISS), and the leak guard."""

    embedder: str = "minilm"  # "minilm" (the paper's all-MiniLM-L6-v2), "lm" (target model), or a folder
    k: int = 10  # neighbours retrieved per request
    pairs_per_request: int = 1  # the paper trains on the top-1 neighbour
    index: str = "auto"  # auto (exact up to exact_max pool items), flat, ivf_flat, ivf_pq, hnsw
    exact_max: int = 200_000  # the largest pool auto searches exactly
    leak_threshold: float = 0.9  # cosine at which a pool item counts as a near-copy of a request
    ngram_threshold: float = 0.3  # word 8-gram overlap at which it does
    batch_size: int = 64  # texts per embedding batch
    shard_rows: int = 1024  # pool items per embedding shard (the unit of resume)
    index_shards: int = 1  # >1: one index per slice of the pool, searched in parallel
    # pool items per retain source, beyond the neighbours, kept as general retain text
    # (unlearning.general_batch of them join every step): what holds general ability
    general_per_source: int = 0

    def validate(self) -> None:
        _positive("retrieval.k", self.k)
        _positive("retrieval.batch_size", self.batch_size)
        _positive("retrieval.exact_max", self.exact_max)
        _positive("retrieval.shard_rows", self.shard_rows)
        _positive("retrieval.index_shards", self.index_shards)
        if self.general_per_source < 0:
            raise UserError(f"retrieval.general_per_source: must be >= 0, got {self.general_per_source}")
        _in_range("retrieval.ngram_threshold", self.ngram_threshold, 0.0, 1.0)
        _one_of("retrieval.index", self.index, ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw"))
        if not 1 <= self.pairs_per_request <= self.k:
            raise UserError(
                f"retrieval.pairs_per_request: {self.pairs_per_request} must be between 1 and "
                f"retrieval.k = {self.k}; fix: lower it or raise k"
            )
        _in_range("retrieval.leak_threshold", self.leak_threshold, 0.0, 1.0)
        if self.embedder not in ("minilm", "lm"):
            self.embedder = _resolve_path(
                "retrieval.embedder", self.embedder, "'minilm', 'lm' or a sentence-transformers folder"
            )


@dataclass
class AdapterConfig:
    """What trains: every weight (none), or LoRA adapters on `target_modules` (peft) while the
    model stays frozen; the frozen model is then the same engine with its adapters disabled."""

    type: str = "none"  # none | lora
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scale: the update is alpha / r * B @ A
    dropout: float = 0.0  # LoRA dropout
    # the linear layers adapted
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def validate(self) -> None:
        _one_of("unlearning.adapter.type", self.type, ("none", "lora"))
        _positive("unlearning.adapter.r", self.r)
        _positive("unlearning.adapter.alpha", self.alpha)
        _in_range("unlearning.adapter.dropout", self.dropout, 0.0, 0.99)
        if not self.target_modules:
            raise UserError(
                "unlearning.adapter.target_modules: empty; fix: name the linear layers to adapt (e.g. [q_proj, v_proj])"
            )


@dataclass
class LossConfig:
    """The method and its own settings: `{name: icu_band, margin: 1.0, ...}` in YAML. Each method's
    settings are its record's in pipeline/losses.py (their defaults: the method's published ones)."""

    name: str = "icu"  # icu (the paper's), icu_band (the recommended recipe's), ga, gd, npo, simnpo, rmu
    settings: Any = field(default_factory=lambda: METHODS["icu"].settings())  # the method's own settings

    def validate(self) -> None:
        for problem in self.settings.problems():
            raise UserError(f"unlearning.loss.{problem}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.settings)}


@dataclass
class OptimConfig:
    """The steps: AdamW, batches, how long each step is."""

    lr: float = 5e-5  # the paper's
    batch_size: int = 8  # request/neighbour pairs per worker and step
    # general retain rows (retrieval.general_per_source) added to each step's retain side
    general_batch: int = 0
    grad_clip: float = 1.0  # the gradient's norm is clipped to this
    warmup_steps: int = 0  # linear warmup of the lr over this many steps
    weight_decay: float = 0.0  # AdamW's
    # when a request trained since its last look went from remembered to erased too deep (or back),
    # the steps are longer than the band is wide: every later step's lr is multiplied by this; 1 = never
    lr_backoff: float = 1.0
    seed: int = 42  # the batches' order, the general rows drawn, LoRA's initial A

    def validate(self) -> None:
        for key in ("lr", "batch_size", "grad_clip"):
            _positive(f"unlearning.optim.{key}", getattr(self, key))
        for key in ("general_batch", "warmup_steps", "weight_decay"):
            if not 0 <= getattr(self, key) < math.inf:
                raise UserError(f"unlearning.optim.{key}: must be a finite number >= 0, got {getattr(self, key)}")
        if not 0 < self.lr_backoff <= 1:
            raise UserError(
                f"unlearning.optim.lr_backoff: must be in (0, 1] (1 = never back off), got {self.lr_backoff}"
            )


@dataclass
class StopConfig:
    """When a request counts as forgotten, and when training ends (pipeline/stopping.py)."""

    # set: the paper's rule, stop once the set's mean MA and EL are below the thresholds (usually with
    # some requests above them); each: until every request is forgotten on its own (or max_epochs;
    # `icu run` then exits 3 naming the rest)
    rule: str = "set"
    max_epochs: int = 30  # a run must end: `icu run` exits 3 naming the requests still remembered
    # a request whose token-mean NLL lies above this quantile of the strangers' (re-measured at every
    # check) was erased too deep: it stands out as less familiar than nearly every stranger and does
    # not count as forgotten; null: one-sided (the paper's rule)
    stranger_quantile: float | None = None
    # band methods: a forgotten request stays in training, held in the band, until the neighbours' MA
    # is back within this of the original model's (either way), or max_epochs; null: stop as soon as
    # every request is forgotten
    recover_within: float | None = None
    # with recover_within: also wait until the erased set's LOSS membership AUC against the strangers
    # is within 0.5 +- this (nothing is steered toward it; the hold trains on); null: off
    mia_within: float | None = None

    def validate(self) -> None:
        _one_of("unlearning.stop.rule", self.rule, ("each", "set"))
        _positive("unlearning.stop.max_epochs", self.max_epochs)
        if self.stranger_quantile is not None:
            _in_range("unlearning.stop.stranger_quantile", self.stranger_quantile, 0.0, 1.0)
        if self.recover_within is not None:
            _in_range("unlearning.stop.recover_within", self.recover_within, 0.0, 1.0)
        if self.mia_within is not None:
            _in_range("unlearning.stop.mia_within", self.mia_within, 0.0, 0.5)
            if self.recover_within is None:
                raise UserError(
                    "unlearning.stop.mia_within: only the hold (recover_within) keeps training a set that "
                    "is forgotten but not yet as familiar as strangers; fix: set stop.recover_within (e.g. "
                    "0.03) or mia_within: null"
                )


@dataclass
class CheckConfig:
    """How each request is looked at (IUR, whole requests; pipeline/iur.py)."""

    # optimizer steps between two looks at the requests trained in them (one teacher-forced pass: a
    # request that crossed the line stops being pushed, a jump over the band backs the lr off); null:
    # only the check after each epoch (the paper's cadence)
    every: int | None = None
    num_beams: int = 2  # the generation from the prefix (the paper's beam search)
    bertscore_threshold: float = 0.3  # a generation below this BERTScore-F1 (or BLEU below its threshold) is dissimilar
    bleu_threshold: float = 0.01  # ... below this sentence BLEU-4
    ma_threshold: float | None = None  # null: the original model's mean MA on the unseen rows
    el_threshold: float | None = None  # null: the original model's mean EL10 on the unseen rows
    # the never-seen records the checks compare the requests with (the band, the template); null:
    # evaluation.unseen_path. A file of its own keeps the evaluation's membership AUC on people the
    # stopping rule never looked at
    strangers_path: str | None = path_field(None, hint="a jsonl/csv/parquet file with a text column")
    replica: str = "auto"  # IUR generates from an unsharded copy: auto (if <= 16 GiB), always, never
    # served precisions a request must be forgotten under too (its greedy continuation at that
    # precision must not leak, audit.leak_tokens) before it counts as forgotten: e.g. [int4]
    harden: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _positive("unlearning.check.every", self.every)
        _positive("unlearning.check.num_beams", self.num_beams)
        _one_of("unlearning.check.replica", self.replica, ("auto", "always", "never"))
        for precision in self.harden:
            _one_of("unlearning.check.harden", precision, PRECISIONS)
        for key in ("bertscore_threshold", "bleu_threshold", "ma_threshold", "el_threshold"):
            if getattr(self, key) is not None:
                _in_range(f"unlearning.check.{key}", getattr(self, key), 0.0, 1.0)


@dataclass
class UnlearningConfig:
    """The recipe: the method (loss), its steps (optim), when it stops (stop), how requests are looked
    at (check); with no other key, the paper's ICU. `recipe: NAME` starts from
    ray_jobs/configs/recipes/NAME.yaml (icu_paper, icu_band) and the keys given override it."""

    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    keep_checkpoints: int = 2  # epoch checkpoints kept (the newest; resume takes the newest that verifies)
    # the DeepSpeed JSON (ZeRO-3; its "auto" values filled from this config): zero3 (GPU, bf16),
    # zero3_offload, zero3_cpu
    ds_config: str = path_field("ds_configs/zero3_cpu.json", hint="a DeepSpeed JSON config")

    def validate(self) -> None:
        for part in (self.loss, self.optim, self.stop, self.check, self.adapter):
            part.validate()
        _positive("unlearning.keep_checkpoints", self.keep_checkpoints)
        if self.stop.recover_within is not None and not METHODS[self.loss.name].band:
            raise UserError(
                f"unlearning.stop.recover_within: only a band method holds a forgotten request in the band "
                f"while its neighbours recover, not {self.loss.name}; fix: use loss.name: icu_band or set "
                "stop.recover_within: null"
            )
        if self.check.harden and self.stop.rule == "set":
            raise UserError(
                "unlearning.check.harden: stop.rule set ends training on the set's mean, before each request "
                "is forgotten at the served precision; fix: use stop.rule: each with harden"
            )
        self._check_ds_config()

    def _check_ds_config(self) -> None:
        """Parse the DeepSpeed JSON now, not minutes later inside a worker, and refuse values that
        contradict the run config (the workers fill these keys from it)."""
        import json

        key = "unlearning.ds_config"
        try:
            ds = json.loads(Path(self.ds_config).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(
                f"{key}: {self.ds_config} is not valid JSON ({str(exc).splitlines()[0]}); fix the file "
                "or point it at one of ds_configs/"
            ) from None
        if not isinstance(ds, dict):
            raise UserError(f"{key}: {self.ds_config} must hold a JSON object")
        zero = ds.get("zero_optimization", {})
        if not isinstance(zero, dict) or zero.get("stage") != 3:
            raise UserError(f"{key}: zero_optimization.stage must be 3 (the workers shard with ZeRO-3); fix: set it")
        o = self.optim
        ours = {
            "train_micro_batch_size_per_gpu": ("unlearning.optim.batch_size", o.batch_size),
            "gradient_accumulation_steps": ("1", 1),
            "gradient_clipping": ("unlearning.optim.grad_clip", o.grad_clip),
        }
        lr = (
            ds.get("optimizer", {}).get("params", {}).get("lr", "auto")
            if isinstance(ds.get("optimizer"), dict)
            else "auto"
        )
        for name, value, (source, want) in [(k, ds.get(k, "auto"), v) for k, v in ours.items()] + [
            ("optimizer.params.lr", lr, ("unlearning.optim.lr", o.lr))
        ]:
            if value != "auto" and value != want:
                raise UserError(
                    f'{key}: {name} is {value!r} but {source} is {want!r}; fix: set it to "auto" '
                    f"(filled from the run config) or make the two agree"
                )


@dataclass
class EvaluationConfig:
    """What the evaluate stage scores, before and after (pipeline/evaluate.py)."""

    # forget, unseen, ppl, classification, dialogue, mia (keep runs whenever keep_path is set)
    suites: list[str] = field(default_factory=lambda: list(SUITES))
    max_samples: dict[str, int] = field(default_factory=dict)  # per-suite caps
    data_dir: str = path_field("../shared/data", hint="the shared benchmark data folder")  # the benchmark data
    # text the model never saw, like the requests (the forgetting thresholds); null = icu_benchmark/pile.csv
    unseen_path: str | None = path_field(None, hint="a jsonl/csv/parquet file with a text column")
    # text the model must keep remembering (e.g. the customers not erased): MA / EL before and after
    keep_path: str | None = path_field(None, hint="a jsonl/csv/parquet file with a text column")
    # the gold standard: the same base trained without the requests ("retrained"); scored on the
    # requests, the unseen and the kept rows, it gives MUSE's PrivLeak and the kept rows' ceiling
    reference_model: str | None = path_field(None, hint="a model folder trained without the requests")
    el_n: int = 10  # the n of EL_n
    el_range: str = "icu"  # "icu": prompts t = 0.75T..T-1; "ku": t = 1..T-1
    ppl_chunk: int = 512  # tokens per perplexity chunk
    batch_size: int = 8  # rows per forward pass (also the checks')
    # score on the ZeRO-3 workers (every rank the same units, the model sharded) instead of whole
    # replicas: auto = when one copy is larger than a worker holds (16 GiB), always, never
    sharded: str = "auto"

    def validate(self) -> None:
        _one_of("evaluation.sharded", self.sharded, ("auto", "always", "never"))
        if not self.suites:
            raise UserError(f"evaluation.suites: empty; fix: list some of {', '.join(SUITES)} (or leave the key out)")
        for suite in self.suites:
            _one_of("evaluation.suites", suite, SUITES)
        for suite, cap in self.max_samples.items():
            _one_of("evaluation.max_samples", suite, SUITES)
            _positive(f"evaluation.max_samples.{suite}", cap)
        _one_of("evaluation.el_range", self.el_range, ("icu", "ku"))
        if self.unseen_path is None:
            self.unseen_path = str(Path(self.data_dir) / "icu_benchmark" / "pile.csv")
        for key in ("el_n", "ppl_chunk", "batch_size"):
            _positive(f"evaluation.{key}", getattr(self, key))


@dataclass
class AuditConfig:
    """The extraction audit between evaluate and export (pipeline/audit.py): every probe on the
    original and the unlearned model, for the erased, kept and never-seen rows."""

    # greedy, bf16, int8, int4, sampling, prompt_quarter, prompt_half, relearn ([] skips the audit)
    probes: list[str] = field(default_factory=lambda: list(PROBES))
    leak_tokens: int = 8  # a row leaks when a probe reproduces this many consecutive true tokens
    samples: int = 8  # sampling: continuations per row (leak@N)
    temperature: float = 1.0  # sampling's temperature
    relearn_steps: int = 8  # relearn: AdamW steps on retained text (never the requests)
    # null = unlearning.lr / 10: at the unlearning lr itself, 8 AdamW steps scrambled even the
    # original's memory (demo: 0/8 requests, 3/24 kept rows left), a probe that proves nothing
    relearn_lr: float | None = None
    relearn_batch: int = 4  # rows per relearning step
    # rows (sampling: row x sample jobs) per generation batch; decoding on CPU costs 1.97 ms a token
    # at 64 and 1.35 at 256 (SmolLM2-135M, 2 cores), so batches are large
    batch_size: int = 256
    seed: int = 0  # sampling's and relearning's
    # probes under which no erased request may leak: the export refuses to write the hand-off otherwise
    require: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for probe in self.probes:
            _one_of("audit.probes", probe, PROBES)
        for probe in self.require:
            _one_of("audit.require", probe, PROBES)
            if probe not in self.probes:
                raise UserError(
                    f"audit.require: {probe!r} is not one of audit.probes; fix: add it to audit.probes "
                    "or drop it from audit.require"
                )
        for key in (
            "leak_tokens",
            "samples",
            "temperature",
            "relearn_steps",
            "relearn_batch",
            "relearn_lr",
            "batch_size",
        ):
            _positive(f"audit.{key}", getattr(self, key))


@dataclass
class ExportConfig:
    """The serving hand-off (pipeline/export.py)."""

    dtype: str = "auto"  # the hand-off's weights; auto = the dtype the model was trained in (model.dtype)
    max_shard_size: str = "2GB"  # per safetensors file, as Hugging Face writes it ("500MB", "2GB")

    def validate(self) -> None:
        _one_of("export.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if parse_size(self.max_shard_size) is None:
            raise UserError(
                f'export.max_shard_size: {self.max_shard_size!r} is not a size; fix: write e.g. "500MB" or "2GB"'
            )


@dataclass
class LedgerConfig:
    """Continual erasure (pipeline/ledger.py): `ledger: PATH` chains this run to every earlier one."""

    # a folder (on shared storage) recording every request erased by every run that named it; a run
    # with a ledger starts from its latest hand-off and keeps every earlier request erased
    path: str | None = path_field(None, must_exist=False, hint="a folder for the erasure ledger")

    def validate(self) -> None:
        if self.path is not None and Path(self.path).exists() and not Path(self.path).is_dir():
            raise UserError(f"ledger.path: {self.path} is a file; fix: point it at a folder (created on first use)")


@dataclass
class ResourcesConfig:
    """Where the work runs (pipeline/ranks.py, pipeline/cluster.py)."""

    num_workers: int = 2  # unlearning ranks (ZeRO-3 data-parallel)
    use_gpu: bool = False  # one GPU per rank (nccl); off: CPU ranks (gloo)
    cpus_per_worker: float = 1.0  # Ray CPUs (and torch threads) per rank and per actor
    embed_actors: int = 1  # retrieval's embedding replicas
    eval_actors: int = 1  # the evaluation's model replicas
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the stage fails
    launcher: str = "ray"  # "ray" (Ray Train) or "torchrun" (GPU machines without Ray)
    placement: str = "PACK"  # Ray placement of the training workers: PACK or SPREAD
    # the unlearning workers' glibc mmap threshold in bytes: a buffer above it goes back to the
    # system when freed. 64 KiB keeps a rank's heap small (135M bench step: peak RSS 3.5 GB, 4.7
    # with glibc's adaptive one), and every fresh buffer then costs page faults (demo, 2 ranks:
    # a check 13.0 -> 17.9 s, an epoch 45.7 -> 51.0 s, peak RSS 5.9 -> 4.6 GB against 4 MiB).
    # null = glibc's adaptive threshold.
    malloc_mmap_threshold: int | None = 65536

    def validate(self) -> None:
        _one_of("resources.launcher", self.launcher, ("ray", "torchrun"))
        if self.malloc_mmap_threshold is not None:
            _positive("resources.malloc_mmap_threshold", self.malloc_mmap_threshold)
        _one_of("resources.placement", self.placement, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
        for key in ("num_workers", "cpus_per_worker", "embed_actors", "eval_actors"):
            _positive(f"resources.{key}", getattr(self, key))
        if self.max_failures < 0:
            raise UserError(f"resources.max_failures: must be >= 0, got {self.max_failures}")


@dataclass
class StorageConfig:
    """Where the run directory is (pipeline/store.py)."""

    runs_dir: str = path_field("runs", must_exist=False, hint="where run directories are created")  # their parent
    name: str = ""  # default: the config file's stem

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise UserError(
                f"storage.name: {self.name!r} is not a valid run name; fix: use letters, digits, '.', '_' and '-'"
            )


@dataclass
class Config:
    requests: RequestsConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    retain: RetainConfig = field(default_factory=RetainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.storage.runs_dir) / self.storage.name

    def part(self, *sections: str) -> list[dict[str, Any]]:
        """Sections as frozen (project files relative to the project): what stage keys hold, so a
        key does not change with where a Ray job's copy of the project was unpacked."""
        frozen = self.to_dict()
        return [frozen[name] for name in sections]

    # What names resolve to on this machine: set once (`modeling.resolve` at open_run) and
    # recorded in the run's manifest, so every stage and worker uses the same values.
    def resolve(self, model_dir: str, max_tokens: int) -> None:
        self._resolved = {"model_dir": str(model_dir), "max_tokens": int(max_tokens)}

    def resolved_dict(self) -> dict[str, Any]:
        if not hasattr(self, "_resolved"):
            raise RuntimeError("config used before modeling.resolve(cfg)")
        return dict(self._resolved)

    @property
    def model_dir(self) -> Path:
        """The local model folder `model.name` names."""
        return Path(self.resolved_dict()["model_dir"])

    @property
    def max_tokens(self) -> int:
        """The request length: `requests.max_tokens`, or the model's context when null."""
        return self.resolved_dict()["max_tokens"]

    def to_dict(self, paths: bool = True) -> dict[str, Any]:
        """Plain data, as frozen in the run directory. Files shipped with the project
        (ds_configs/...) are written relative to it: a Ray job runs in a fresh copy of the
        project each time, and a resubmission must not differ by where that copy is.
        `paths=False` writes every path as "<path>" (what leaves the machine: the model card)."""
        data = _plain(self, paths)
        if not paths:  # the two names that may be folders
            if self.model.name != "default" and self.model.name not in TINY_MODELS:
                data["model"]["name"] = PATH
            if self.retrieval.embedder not in ("minilm", "lm"):
                data["retrieval"]["embedder"] = PATH
        return data


def _plain(obj: Any, paths: bool) -> dict[str, Any]:
    """A config dataclass as plain data, nested sections included (see `Config.to_dict`)."""
    if isinstance(obj, LossConfig):
        return obj.to_dict()
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _plain(value, paths)
        elif f.metadata.get("path") and value not in (None, []) and not paths:
            out[f.name] = [PATH] * len(value) if isinstance(value, list) else PATH
        elif (
            f.metadata.get("path")
            and f.metadata.get("must_exist", True)
            and isinstance(value, str)
            and Path(value).is_relative_to(PROJECT)
        ):
            out[f.name] = str(Path(value).relative_to(PROJECT))
        else:
            out[f.name] = copy.deepcopy(value)
    return out


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Config:
    """Read, build and validate a run config; `overrides` maps dotted keys to values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"config file not found: {path}; fix: pass the path of a run YAML (examples in ray_jobs/configs/)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; fix: save the config as UTF-8") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (model:, requests:, ...)")
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    if isinstance(data.get("ledger"), str):  # `ledger: PATH`, the short form of `ledger: {path: PATH}`
        data["ledger"] = {"path": data["ledger"]}
    data.setdefault("storage", {})
    if isinstance(data["storage"], dict):
        data["storage"].setdefault("name", path.stem)
    return build_config(data)


def build_config(data: dict[str, Any]) -> Config:
    """Build a `Config` from plain data (already parsed YAML) and validate every section."""
    config = _build(Config, with_recipe(data), "")
    for section in dataclasses.fields(config):
        getattr(config, section.name).validate()
    _check_audit(config)
    return config


def with_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """`unlearning.recipe: NAME` (ray_jobs/configs/recipes/NAME.yaml, or a YAML path): the recipe's
    section with the run's own `unlearning` keys over it. A run that names another method than the
    recipe's takes none of the recipe's loss settings."""
    section = data.get("unlearning")
    if not isinstance(section, dict) or "recipe" not in section:
        return data
    name = section["recipe"]
    path = Path(str(name)) if str(name).endswith((".yaml", ".yml")) else RECIPES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise UserError(
            f"unlearning.recipe: no recipe {name!r}; fix: choose one of {known} (ray_jobs/configs/recipes/) "
            "or give a YAML file's path"
        )
    base = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    own = {k: v for k, v in section.items() if k != "recipe"}
    if isinstance(own.get("loss"), dict) and own["loss"].get("name", base.get("loss", {}).get("name")) != base.get(
        "loss", {}
    ).get("name"):
        base = {k: v for k, v in base.items() if k != "loss"}
    return dict(data, unlearning=_merged(base, own))


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_audit(config: Config) -> None:
    """The audit's settings that depend on other sections."""
    a, r = config.audit, config.requests
    if a.leak_tokens > r.suffix_tokens:
        raise UserError(
            f"audit.leak_tokens: {a.leak_tokens} is longer than requests.suffix_tokens "
            f"({r.suffix_tokens}), so nothing could ever leak; fix: set it at most {r.suffix_tokens}"
        )


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, as 'key (old -> new)' lines, sorted."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return [
        f"{key} ({flat_old.get(key)!r} -> {flat_new.get(key)!r})"
        for key in sorted(set(flat_old) | set(flat_new))
        if flat_old.get(key) != flat_new.get(key)
    ]


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_kind(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if f"{prefix}{key}" in RENAMED:
            raise UserError(f"{prefix}{key}: renamed; fix: {RENAMED[f'{prefix}{key}']}")
        if cls is UnlearningConfig and (key in MOVED or key == "stop" and not isinstance(data[key], dict)):
            where = "stop.rule" if key == "stop" else MOVED[key]
            raise UserError(
                f"{prefix}{key}: moved to {prefix}{where} (the section is split by concern: loss, optim, "
                "stop, check); fix: write it there"
            )
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{prefix}{near[0]}'?" if near else f"valid keys: {', '.join(fields)}"
            raise UserError(f"{prefix}{key}: unknown key; {hint}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if hints[name] is LossConfig:
            kwargs[name] = _build_loss(data.get(name, {}), f"{key}.")
            continue
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], data.get(name, {}), f"{key}.")
            continue
        if name not in data:
            if f.default is REQUIRED or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
                raise UserError(f"{key}: missing; fix: set it to {f.metadata.get('hint', 'a value')}")
            continue
        value = _coerce(key, data[name], hints[name])
        if f.metadata.get("path"):
            value = _resolve_paths(key, value, f.metadata)
        kwargs[name] = value
    obj = cls(**kwargs)
    for name, f in fields.items():  # defaults that are paths are resolved too
        if f.metadata.get("path") and name not in data:
            setattr(obj, name, _resolve_paths(f"{prefix}{name}", getattr(obj, name), f.metadata))
    return obj


def _build_loss(data: Any, prefix: str) -> LossConfig:
    """`unlearning.loss`: the method's name and its own settings (its record in pipeline/losses.py)."""
    if not isinstance(data, dict):
        raise UserError(
            f"{prefix.rstrip('.')}: expected a mapping like {{name: icu_band, margin: 1.0}}, got {_kind(data)}"
        )
    name = data.get("name", "icu")
    _one_of(f"{prefix}name", name, tuple(METHODS))
    settings = METHODS[name].settings
    own = [f.name for f in dataclasses.fields(settings)]
    for key in data:
        if key != "name" and key not in own:
            raise UserError(f"{prefix}{key}: not a setting of {name}; its settings: {', '.join(own) or 'none'}")
    return LossConfig(name, _build(settings, {k: v for k, v in data.items() if k != "name"}, prefix))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise UserError(
                f"{key}: expected a list, got {_kind(value)}; fix: write it as [a, b] or one '- item' per line"
            )
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {_kind(value)}")
        return {_coerce(key, k, args[0]): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 5e-5 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"{key}: expected {tp.__name__}, got {_kind(value)} {value!r}")
    return value


def _resolve_paths(key: str, value: Any, meta: dict[str, Any]) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [_resolve_paths(f"{key}[{i}]", v, meta) for i, v in enumerate(value)]
    if meta.get("must_exist", True):
        return _resolve_path(key, value, meta.get("hint", "an existing path"))
    return os.path.abspath(Path(_expand(key, value)).expanduser())


def _resolve_path(key: str, value: str, hint: str) -> str:
    given = Path(_expand(key, value)).expanduser()
    path = Path(os.path.abspath(given))
    if not path.exists() and not given.is_absolute() and (PROJECT / given).exists():
        path = PROJECT / given  # a file shipped with the project (ds_configs/...), run from elsewhere
    if not path.exists():
        raise UserError(f"{key}: path not found: {path}; fix: set it to {hint}")
    return str(path)


def _expand(key: str, value: str) -> str:
    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(3)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise UserError(
                f"{key}: environment variable {name} is not set; fix: export it or write ${{{name}:-default}}"
            )
        return default

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(parents[: depth + 1])
            raise UserError(f"--set {dotted}: {where} is a value, not a section; fix: set {where}=VALUE")
    node[leaf] = value


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested sections and their values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and not prefix.endswith("max_samples."):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"{key}: {value!r} is not valid; {hint}choose one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: float | None) -> None:
    if value is not None and not (0 < value < math.inf):  # NaN fails every comparison
        raise UserError(f"{key}: must be a finite number > 0, got {value}")


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise UserError(f"{key}: must be between {low} and {high}, got {value}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def reference() -> str:
    """docs/config.md: every section and key with its default and the comment beside (or above) its
    declaration here and, for `unlearning.loss`, in pipeline/losses.py. A test regenerates it."""
    import inspect
    import io
    import tokenize

    def notes(cls: type) -> dict[str, str]:
        """Field name -> its comment, read off the source of the class and of the classes it extends."""
        out = {}
        for base in reversed(cls.__mro__[:-1]):
            out.update(own_notes(base))
        return out

    def own_notes(cls: type) -> dict[str, str]:
        out, pending = {}, []
        lines = inspect.getsource(cls).splitlines()
        for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("# ").rstrip()
                line = lines[tok.start[0] - 1]
                match = re.match(r"\s+(\w+)\s*:", line)
                if match and line.index("#") > line.index(":"):  # a comment beside its field
                    out[match.group(1)] = " ".join(pending + [text]).strip()
                    pending = []
                else:
                    pending.append(text)
            elif tok.type == tokenize.NAME and tok.start[1] == 4 and pending and tok.string not in ("def", "class"):
                out.setdefault(tok.string, " ".join(pending))
                pending = []
            elif tok.type == tokenize.NAME and tok.string == "def":
                pending = []
        return out

    def section(cls: type, prefix: str) -> list[str]:
        rows = [
            f"## `{prefix}`",
            "",
            (inspect.getdoc(cls) or "").replace("\n", " "),
            "",
            "| key | default | what it is |",
            "|---|---|---|",
        ]
        docs, nested = notes(cls), []
        for f in dataclasses.fields(cls):
            if f.name.startswith("_"):
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default) and not isinstance(default, LossConfig):
                nested.append((type(default), f"{prefix}.{f.name}"))
                rows.append(f"| `{f.name}` | (section) | see `{prefix}.{f.name}` below |")
                continue
            if isinstance(default, LossConfig):
                rows.append(
                    f"| `{f.name}` | `{{name: icu}}` | the method and its own settings: `unlearning.loss` below |"
                )
                continue
            rows.append(f"| `{f.name}` | `{default!r}` | {docs.get(f.name, '')} |")
        rows.append("")
        for cls_, name in nested:
            rows += section(cls_, name)
        return rows

    lines = [
        "# Config reference",
        "",
        "Generated by `python -m pipeline.config` from the dataclasses in "
        "`pipeline/config.py` (and the method settings in `pipeline/losses.py`); `tests/test_structure.py` "
        "fails when this file and the code disagree. One YAML file per run; every key below is its default.",
        "",
    ]
    for f in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[f.name]
        lines += section(cls, f.name)
    lines += [
        "## `unlearning.loss`: each method's settings",
        "",
        "`unlearning.loss: {name: NAME, <its settings>}`; a setting of another method is refused.",
        "",
    ]
    for name, m in METHODS.items():
        lines += [f"### `{name}`", "", (inspect.getdoc(m.settings) or "").replace("\n", " "), ""]
        fields_ = [f for f in dataclasses.fields(m.settings)]
        if fields_:
            docs = notes(m.settings)
            lines += ["| setting | default | what it is |", "|---|---|---|"]
            lines += [f"| `{f.name}` | `{f.default!r}` | {docs.get(f.name, '')} |" for f in fields_]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
