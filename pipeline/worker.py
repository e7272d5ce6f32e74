"""The unlearning recipe: one process per rank, DeepSpeed ZeRO-3, per-request stopping.

Runs unchanged as a Ray Train worker (`train_worker`, launched by `pipeline.unlearn`)
and under plain torchrun (`python -m torch.distributed.run ... -m pipeline.worker RUN_DIR`).
Read it top to bottom as `Worker.setup()` then `Worker.train()`:

    setup   the check replica, the engines (trained + frozen reference), resume, thresholds
    train   check -> [train an epoch, looking every `check_every` steps -> save -> check] -> finish

A check (`Worker.check`, returns a `Look`) scores every request (IUR, whole requests), measures
the strangers' band and, with the hold, the neighbours' MA. Between two checks the requests
trained in the last `unlearning.check.every` optimizer steps are looked at with one
teacher-forced pass (`Worker.look_between`): a request that crossed the line stops being pushed
(or leaves the epoch), one that jumped the band backs the lr off. So the steps between two looks
at a request, and the updates it gets between them, do not grow with the number of requests.
Every decision from what a look saw is the stopping rule's (`pipeline.stopping.StopRule`).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from pipeline import adapter, checkpoints, ledger, modeling, probes, quantize, ranks, suites
from pipeline.atomic import atomic_path, atomic_write_json, write_parquet
from pipeline.iur import (
    Thresholds,
    apply_band,
    band_targets,
    below,
    bigram_share,
    check_requests,
    memorization,
    screen,
    set_auc,
    with_leaks,
)
from pipeline.losses import method, unlearning_loss
from pipeline.metrics import pad_rows
from pipeline.pairs import Pairs, load_pairs
from pipeline.ranks import _device, _max_over_ranks, _node_id, deepspeed_config, start_rank
from pipeline.stopping import StopRule
from pipeline.store import RunStore

log = logging.getLogger("icu.unlearn")
PROBE_ROWS = 4  # request prefixes whose final logits export verifies
HISTORY_COLUMNS = [
    "epoch",
    "request_id",
    "bleu",
    "bertscore",
    "ma",
    "el",
    "span",
    "nll",
    "band_high",
    "too_deep",
    "leaks_under",
    "forgotten",
]


@dataclass
class LoopState:
    """Everything besides the engine that a resumed run needs to continue identically."""

    epoch: int = 0  # epochs of training done
    history: list[dict] = field(default_factory=list)  # one row per (check, request)
    epochs: list[dict] = field(default_factory=list)  # one row per training epoch
    thresholds: dict | None = None
    lr_scale: float = 1.0  # unlearning.optim.lr_backoff's factor so far
    neighbour_ma: list[float] = field(default_factory=list)  # with the hold: the neighbours' MA at each check
    set_auc: list[float] = field(
        default_factory=list
    )  # band methods: the requests' LOSS AUC vs strangers at each check
    resumed_from: list[str] = field(default_factory=list)  # checkpoint tags this run restarted from
    # each request's side of the line at its last look (check or look between), by request index,
    # and the requests trained since then: what the lr back-off compares at the next look
    looked: dict[str, dict] = field(default_factory=dict)
    trained_since: list[int] = field(default_factory=list)


@dataclass
class Look:
    """What one check saw: one record per request (in request order), icu_band's targets for the
    next steps (push masks, low, high, tail low, tail high per request), the set's LOSS AUC against the
    strangers, and the neighbours' MA (with the hold)."""

    records: list[dict]
    band: tuple[list, list, list, list, list] | None = None
    set_auc: float | None = None
    neighbour_ma: float | None = None


def step_rows(pairs: Pairs, batch: list[int | None], general: list[list[int]] | None) -> tuple[list, list]:
    """A step's forget rows and retain rows (none when `general` is None: the method reads no
    retain side). Pair k gives its request and its neighbour (None: an empty row of each); the
    general rows follow the neighbours. Every retain row is cut to the run's longest request, so
    every step on every rank has one width: ZeRO-3's ranks wait for each other at every layer, and
    one 128-token neighbour made its step (and its peer's wait) 1.8x as long. The retain terms
    hold the model token by token, so a cut row still holds what it keeps."""
    forget = [pairs.requests[pairs.pair_request[k]] if k is not None else [] for k in batch]
    if general is None:
        return forget, []
    width = max(map(len, pairs.requests))
    paired = [pairs.pair_neighbour[k] if k is not None else [] for k in batch]
    return forget, [row[:width] for row in paired + list(general)]


def epoch_batches(
    active_pairs: list[int], epoch: int, seed: int, rank: int, world: int, batch_size: int
) -> list[list[int | None]]:
    """This rank's batches of pair indices for one epoch (None = an empty padding row).

    The active pairs are shuffled with a (seed, epoch) generator, padded to a multiple of
    world * batch_size, and dealt round-robin, so every rank runs the same number of
    steps (ZeRO-3 collectives must line up) and no pair is dropped or repeated.
    """
    order = list(active_pairs)
    random.Random(seed * 100_003 + epoch).shuffle(order)
    span = world * batch_size
    padded = order + [None] * (-len(order) % span)
    mine = padded[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def rounds(steps: list, every: int | None) -> list[list]:
    """An epoch's steps in rounds of `every` (null: the whole epoch): a look follows each round."""
    every = every or max(len(steps), 1)
    return [steps[i : i + every] for i in range(0, len(steps), every)]


class Worker:
    """One rank of the unlearning job: `setup()`, then `train()` to a stop (`run()` does both)."""

    def __init__(self, run_dir: str):
        self.store = RunStore(run_dir)
        self.cfg = self.store.load_config()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = _device()
        self.model_dir = self.cfg.model_dir
        self.tok = modeling.load_tokenizer(self.model_dir, self.cfg.model.trust_remote_code)
        self.hidden = modeling.hidden_size(self.model_dir)
        u = self.cfg.unlearning
        self.method, self.settings = method(u.loss.name), u.loss.settings
        self.lora = adapter.enabled(self.cfg.unlearning.adapter)
        self.pairs = load_pairs(self.store, self.cfg.retrieval.pairs_per_request)
        # the never-seen rows each check measures the band on (two-sided line, band methods)
        self.strangers = (
            suites.threshold_rows(self.cfg, self.tok, u.check.strangers_path)
            if u.stop.stranger_quantile or self.method.band
            else []
        )
        # a chained run (ledger.path): the first run's thresholds, and the frozen reference is the
        # ledger's first original (the unlearn stage verified it), so each run can repair earlier drift
        self.chain = ledger.run_chain(self.store)
        first = ledger.first_original(self.chain, verify=False)
        self.reference_dir = first if first is not None and not self.lora else self.model_dir
        self.rule = StopRule.of(u, self.method.band, repair=self.reference_dir != self.model_dir)
        self.ckpt_dir = self.store.artefact("checkpoints")
        self.replica = None  # set by setup(): the unsharded model IUR generates with, if it fits
        self.models_loaded = 0
        self.lr_scale = 1.0  # unlearning.optim.lr_backoff (LoopState.lr_scale), read by every step
        self.seconds = {"start": 0.0, "checks": 0.0, "looks": 0.0, "training": 0.0, "saves": 0.0}

    # -- setup ---------------------------------------------------------------------
    def setup(self) -> LoopState:
        """The check replica and the BERTScore encoder (both before the engines: a model made
        under a live ZeRO-3 config would be sharded), the engines, the resumed state, thresholds."""
        from pipeline.similarity import BertScorer

        started = time.time()
        self.scorer = BertScorer()
        self.replica = self._replica()
        self.build_engines()
        state = self.resume()
        self.lr_scale = state.lr_scale
        self.thr = self.thresholds(state)
        self.seconds["start"] = time.time() - started
        return state

    def build_engines(self) -> None:
        """The trained engine and what the frozen-model terms read: with LoRA, the same engine
        with its adapters disabled; otherwise a second, frozen ZeRO-3 engine of `reference_dir` (only
        if a term reads it)."""
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        ds = deepspeed_config(self.cfg, self.world, self.hidden)
        self._hf_ds = HfDeepSpeedConfig(ds)  # must stay alive: from_pretrained shards under it
        model = self._load_model()
        u = self.cfg.unlearning
        if self.lora:
            model = adapter.wrap(model, u.adapter, u.optim.seed)
        trained = [p for p in model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=trained, config=ds)
        self.base_lr = [group["lr"] for group in self.engine.optimizer.param_groups]
        self.ref = None
        if self.method.reference(self.settings) and not self.lora:
            ref_ds = deepspeed_config(self.cfg, self.world, self.hidden, with_optimizer=False)
            ref = self._load_model(self.reference_dir)
            ref.requires_grad_(False)
            self.ref, *_ = deepspeed.initialize(model=ref, config=ref_ds)
            self.ref.eval()

    def reference_forward(self, ids: torch.Tensor, attend: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """The frozen reference model's logits, or with `layer` its residual stream after that many
        blocks (no gradient)."""

        def forward(model):
            out = model(input_ids=ids, attention_mask=attend, output_hidden_states=layer is not None)
            return out.logits if layer is None else out.hidden_states[layer]

        with torch.no_grad():
            if self.ref is not None:
                return forward(self.ref)
            with self.engine.module.disable_adapter():
                return forward(self.engine.module)

    def _replica(self):
        """An unsharded model of the same architecture for IUR generation, or None (see `checker`)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        mode = self.cfg.unlearning.check.replica
        config = AutoConfig.from_pretrained(
            self.model_dir, local_files_only=True, trust_remote_code=self.cfg.model.trust_remote_code
        )
        dtype = modeling.torch_dtype(self.cfg.model.dtype)
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=self.cfg.model.trust_remote_code
        )
        size = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
        use = mode == "always" or (mode == "auto" and size <= modeling.REPLICA_MAX_BYTES)
        if self.rank == 0:
            log.info(
                "unlearn: IUR generates from %s (model %.0f MB)",
                "an unsharded replica per rank" if use else "the ZeRO-3 engine, generate() synced across ranks",
                size / 2**20,
            )
        return model.to(self.device).eval().requires_grad_(False) if use else None

    def _load_model(self, folder: Path | None = None):
        from transformers import AutoModelForCausalLM

        self.models_loaded += 1
        return AutoModelForCausalLM.from_pretrained(
            folder or self.model_dir,
            dtype=modeling.torch_dtype(self.cfg.model.dtype),
            local_files_only=True,
            trust_remote_code=self.cfg.model.trust_remote_code,
        )

    # -- checkpoints ---------------------------------------------------------------
    def resume(self) -> LoopState:
        """Continue from the newest complete checkpoint that verifies (rank 0 decides for all)."""
        chosen = [checkpoints.latest_verified(self.ckpt_dir) if self.rank == 0 else None]
        dist.broadcast_object_list(chosen, src=0)
        tag = chosen[0]
        if tag is None:
            return LoopState()
        with checkpoints.weights_only(f"checkpoint {self.ckpt_dir / tag}"):
            # with LoRA a checkpoint holds the adapters only (the frozen weights are the model folder's)
            self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag, load_module_strict=not self.lora)
        state = LoopState(**json.loads((self.ckpt_dir / tag / "loop_state.json").read_text()))
        state.resumed_from.append(tag)
        rng = self.ckpt_dir / tag / f"rng-rank{self.rank}.pt"
        if rng.exists():
            torch.set_rng_state(torch.load(rng, weights_only=True))
        if self.rank == 0:
            log.info("unlearn: resuming from checkpoint %s (after epoch %d)", tag, state.epoch)
        return state

    def save(self, state: LoopState) -> None:
        """Engine shards from every rank, then the loop state, then the seal (files + hashes)."""
        tag = f"epoch-{state.epoch}"
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False, exclude_frozen_parameters=self.lora)
        torch.save(torch.get_rng_state(), self.ckpt_dir / tag / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            atomic_write_json(self.ckpt_dir / tag / "loop_state.json", state.__dict__)
        self._seal(tag)
        if self.rank == 0:
            checkpoints.prune(self.ckpt_dir, keep=self.cfg.unlearning.keep_checkpoints, current=tag)
        dist.barrier()

    def _seal(self, tag: str) -> None:
        """`checkpoints.seal` once every rank has written its files, each rank hashing a share of them."""
        dist.barrier()
        shares: list = [None] * self.world
        dist.all_gather_object(shares, checkpoints.hash_share(self.ckpt_dir, tag, self.rank, self.world))
        if self.rank == 0:
            checkpoints.seal(self.ckpt_dir, tag, {k: v for share in shares for k, v in share.items()})

    # -- IUR -----------------------------------------------------------------------
    def thresholds(self, state: LoopState) -> Thresholds:
        """MA / EL_n: fixed values from the config, else the model's mean on unseen text; the span:
        the longest any unseen row gives (`metrics.extractable_span`). A chained run keeps the first
        run's, measured on the original model."""
        u, e = self.cfg.unlearning.check, self.cfg.evaluation
        if state.thresholds is None and self.chain.get("thresholds"):  # the band must not drift with the model
            state.thresholds = dict(self.chain["thresholds"])
        if state.thresholds is None:
            rows = suites.threshold_rows(self.cfg, self.tok)
            model, sync = self.checker()
            records = self._sharded(
                rows,
                lambda part: memorization(
                    model,
                    part,
                    el_n=e.el_n,
                    el_range=e.el_range,
                    batch_size=e.batch_size,
                    pad_id=self.tok.pad_token_id,
                    prefix=self.cfg.requests.prefix_tokens,
                    sync_calls=sync,
                ),
            )
            ma = float(np.mean([r["ma"] for r in records])) if u.ma_threshold is None else u.ma_threshold
            el = float(np.mean([r["el"] for r in records])) if u.el_threshold is None else u.el_threshold
            span = max(r["span"] for r in records)
            state.thresholds = Thresholds(ma, el, u.bertscore_threshold, u.bleu_threshold, span).to_dict()
        return Thresholds(**state.thresholds)

    def _sharded(self, rows: list, fn) -> list:
        """Apply fn to this rank's equal-sized share of rows; gather results in row order.

        Shares are padded with copies so every rank makes the same model calls.
        """
        per_rank = -(-len(rows) // self.world)
        mine = [i for i in range(self.rank, per_rank * self.world, self.world)]
        part = [rows[i % len(rows)] for i in mine] if rows else []
        results = fn(part)
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, list(zip(mine, results)))
        ordered = dict(pair for shard in gathered for pair in shard)
        return [ordered[i] for i in range(len(rows))]

    def checker(self) -> tuple[torch.nn.Module, Callable[[int], int] | None]:
        """The model IUR generates with, and the generate() call sync it needs.

        Generating from the ZeRO-3 engine gathers every layer's weights for every new
        token (minutes per check even for a 135M model on CPU). When a full copy fits
        (`unlearning.check.replica`), the current weights are gathered once into a plain
        replica on each rank, which then generates on its own with no collectives.
        """
        if self.replica is None:
            self.engine.module.eval()
            return self.engine.module, _max_over_ranks
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())), torch.no_grad():
            if self.lora:
                weights = adapter.merged({n: p.data for n, p in module.named_parameters()}, self.cfg.unlearning.adapter)
                for name, mine in self.replica.named_parameters():
                    mine.copy_(weights[name])
            else:
                for mine, full in zip(self.replica.parameters(), module.parameters()):
                    mine.copy_(full.data)
        return self.replica, None

    def check(self, epoch: int) -> Look:
        """IUR's record for every request (whole requests; two-sided against the strangers' edge
        when one is set), icu_band's targets, the set's AUC and, with the hold, the neighbours' MA."""
        c, u = self.cfg, self.cfg.unlearning.check
        model, sync = self.checker()
        records = self._sharded(
            self.pairs.requests,
            lambda part: check_requests(
                model,
                self.tok,
                part,
                prefix=c.requests.prefix_tokens,
                suffix=c.requests.suffix_tokens,
                num_beams=u.num_beams,
                el_n=c.evaluation.el_n,
                el_range=c.evaluation.el_range,
                batch_size=c.evaluation.batch_size,
                scorer=self.scorer,
                thresholds=self.thr,
                sync_calls=sync,
            ),
        )
        hits = [r.pop("hits") for r in records]
        strangers = self._screen(model, self.strangers)
        unseen = [s["nll"] for s in strangers]
        records = self._hardened(
            model, apply_band(records, [r["nll"] for r in records], unseen, c.unlearning.stop.stranger_quantile)
        )
        look = Look([dict(epoch=epoch, request_id=rid, **rec) for rid, rec in zip(self.pairs.request_ids, records)])
        if self.method.band:
            look.set_auc = set_auc([r["nll"] for r in records], unseen)
            look.band = band_targets(
                records,
                self.pairs.requests,
                hits,
                bigram_share(self.strangers, [s["hits"] for s in strangers]),
                unseen,
                [s["tail"] for s in strangers],
                self.thr.ma,
                hold=self.rule.hold,
            )
        if self.rule.hold and self.pairs.neighbours:
            look.neighbour_ma = float(np.mean([s["ma"] for s in self._screen(model, self.pairs.neighbours)]))
        self.engine.module.train()
        return look

    def look_between(self, state: LoopState, looked_at: list[int], training: set[int], band) -> set[int]:
        """A look at the requests trained in the last round, from one teacher-forced pass (their MA,
        span and NLL; the strangers' band): one that crossed the line stops being pushed (held, or
        out of the epoch), one pushed past the band is pulled back, and a jump over the band backs
        the lr off, before the rest of the epoch. `band` is updated in place; returns who trains on."""
        model, _ = self.checker()
        seen = self._screen(model, [self.pairs.requests[i] for i in looked_at])
        strangers = self._screen(model, self.strangers)
        self.engine.module.train()
        unseen = [s["nll"] for s in strangers]
        provisional = [dict(s, el=0.0, forgotten=below(dict(s, el=0.0), self.thr)) for s in seen]  # EL: at the check
        records = apply_band(provisional, [s["nll"] for s in seen], unseen, self.cfg.unlearning.stop.stranger_quantile)
        now = dict(zip(looked_at, records))
        self._back_off(state, now)
        if band is not None:
            targets = band_targets(
                records,
                [self.pairs.requests[i] for i in looked_at],
                [s["hits"] for s in seen],
                bigram_share(self.strangers, [s["hits"] for s in strangers]),
                unseen,
                [s["tail"] for s in strangers],
                self.thr.ma,
                hold=self.rule.hold,
            )
            for k, i in enumerate(looked_at):
                for whole, part in zip(band, targets):
                    whole[i] = part[k]
        return {i for i in training if i not in now or self.rule.trains(now[i])}

    def _back_off(self, state: LoopState, now: dict[int, dict]) -> None:
        """`unlearning.optim.lr_backoff`: a request trained since its last look that is now on the other side
        of the band (`StopRule.jumped`) shrinks the lr of every later step. The last looks travel in
        the loop state, so a resumed run decides exactly as the uninterrupted one did."""
        before = {int(i): r for i, r in state.looked.items()}
        jumped = self.rule.jumped(before, now, set(state.trained_since))
        state.lr_scale = self.lr_scale = self.rule.backed_off(state.lr_scale, jumped)
        if jumped and self.rank == 0 and self.cfg.unlearning.optim.lr_backoff < 1:
            log.info(
                "unlearn: %d requests jumped over the band (%s); lr now %.3g x the configured",
                len(jumped),
                ", ".join(self.pairs.request_ids[i] for i in jumped),
                state.lr_scale,
            )
        state.looked.update({str(i): dict(forgotten=r["forgotten"], too_deep=r["too_deep"]) for i, r in now.items()})
        state.trained_since = sorted(set(state.trained_since) - set(now))

    def _screen(self, model, rows: list[list[int]]) -> list[dict]:
        """`iur.screen` of rows, sharded across ranks."""
        c = self.cfg
        return self._sharded(
            rows,
            lambda part: screen(
                model,
                part,
                prefix=c.requests.prefix_tokens,
                batch_size=c.evaluation.batch_size,
                pad_id=self.tok.pad_token_id,
            ),
        )

    def _hardened(self, model, records: list[dict]) -> list[dict]:
        """`unlearning.check.harden`: a request whose greedy continuation leaks at a served precision
        (the audit's criterion, audit.leak_tokens) is not forgotten, whatever the trained precision says."""
        r, harden = self.cfg.requests, self.cfg.unlearning.check.harden
        leaks: dict[int, list[str]] = {}
        for precision in harden:
            served = quantize.served_copy(model, precision)
            found = self._sharded(
                self.pairs.requests,
                lambda part: probes.greedy_spans(
                    served,
                    part,
                    r.prefix_tokens,
                    batch_size=self.cfg.evaluation.batch_size,
                    pad_token_id=self.tok.pad_token_id,
                    settle=self.cfg.audit.leak_tokens,
                    end=r.prefix_tokens + r.suffix_tokens,
                ),
            )
            for i, span in enumerate(found):
                if span >= self.cfg.audit.leak_tokens:
                    leaks.setdefault(i, []).append(precision)
        return with_leaks(records, leaks)

    # -- training ------------------------------------------------------------------
    def train_epoch(self, state: LoopState, look: Look) -> dict:
        """One pass over the pairs of the requests that train, a look after every `check_every` steps."""
        from tqdm import tqdm

        u, p = self.cfg.unlearning.optim, self.pairs
        epoch = state.epoch + 1
        training = {i for i, r in enumerate(look.records) if self.rule.trains(r)}
        band = None if look.band is None else tuple(list(part) for part in look.band)
        active = [k for k, i in enumerate(p.pair_request) if i in training]
        dealt = [epoch_batches(active, epoch, u.seed, rank, self.world, u.batch_size) for rank in range(self.world)]
        general = random.Random(u.seed * 100_003 + epoch * 101 + self.rank)
        sums: dict[str, float] = {}
        started, looks, looking, steps = time.time(), 0, 0.0, 0
        bar = tqdm(total=len(dealt[self.rank]), desc=f"epoch {epoch}", disable=self.rank != 0 or None, mininterval=5)
        parts_of = list(zip(*(rounds(batches, self.cfg.unlearning.check.every) for batches in dealt)))
        for n, part in enumerate(parts_of):
            trained = set()
            for step, batch in enumerate(part[self.rank]):
                extra = general.sample(p.general, min(u.general_batch, len(p.general)))
                live = [k for k in batch if k is not None and p.pair_request[k] in training]
                for key, value in self.step(live or [None], extra, band).items():
                    sums[key] = sums.get(key, 0.0) + value
                trained |= {
                    p.pair_request[k]
                    for rank in part
                    for k in rank[step]
                    if k is not None and p.pair_request[k] in training
                }
                steps += 1
                bar.update()
            state.trained_since = sorted(set(state.trained_since) | trained)
            if n < len(parts_of) - 1:  # the epoch's last round is looked at by the check after it
                clock = time.time()
                training = self.look_between(state, sorted(trained), training, band)
                looking += time.time() - clock
                looks += 1
        bar.close()
        return dict(
            epoch=epoch,
            steps=steps,
            active_pairs=len(active),
            looks=looks,
            look_seconds=looking,
            seconds=time.time() - started,
            **{f"mean_{k}": v / max(steps, 1) for k, v in sums.items()},
        )

    def step(self, batch: list[int | None], general: list[list[int]] = (), band=None) -> dict[str, float]:
        """One optimizer step on paired forget/neighbour rows (plus unpaired general retain rows);
        `band`: icu_band's targets per request (`Look.band`).

        The sampler's None slots are dropped: ZeRO-3 needs the same number of forward,
        backward and step calls on every rank, not the same rows, and empty rows add
        nothing to the loss. A rank left with no pair runs one empty row.
        """
        batch = [k for k in batch if k is not None] or [None]
        p, pad, m = self.pairs, self.tok.pad_token_id, self.method
        use_retain = m.retain(self.settings)
        forget, retain = step_rows(p, batch, general if use_retain else None)
        ids, mask = pad_rows(forget + retain, pad)
        ids, mask = ids.to(self.device), mask.to(self.device)
        attend = mask.clone()
        attend[:, 0] = 1  # an empty row still attends to one token, so attention has no NaN
        n = len(forget)
        seen, layer = m.reference(self.settings), m.layer(self.settings)
        if seen:  # the frozen model sees only the rows its term reads; first, so ZeRO-3 sees whole passes
            rows = slice(n, None) if seen == "retain" else slice(0, n)
            ref = self.reference_forward(ids[rows], attend[rows], layer)
        out = self.engine(input_ids=ids, attention_mask=attend, output_hidden_states=layer is not None)
        logits = out.logits
        kwargs = dict(forget_logits=logits[:n], forget_ids=ids[:n], forget_mask=mask[:n])
        if use_retain:
            kwargs.update(
                retain_logits=logits[n:],
                retain_ids=ids[n:],
                retain_mask=mask[n:],
                retain_general=torch.arange(len(retain), device=self.device) >= len(batch),
            )
        if m.band:  # an empty row's band is never read (the row is inactive)
            rows = [p.pair_request[k] if k is not None else None for k in batch]
            push, low, high, tail_low, tail_high = band
            width = ids.shape[1] - 1
            kwargs["forget_push"] = torch.tensor(
                [(push[i] + [0.0] * width)[:width] if i is not None else [0.0] * width for i in rows],
                dtype=torch.float32,
                device=self.device,
            )
            edges = {"low": low, "high": high, "tail_low": tail_low, "tail_high": tail_high}
            for name, edge in edges.items():
                kwargs[f"forget_{name}"] = torch.tensor(
                    [edge[i] if i is not None else 0.0 for i in rows], dtype=torch.float32, device=self.device
                )
        if layer is not None:  # the loss reads the residual stream after `layer` blocks
            hidden = out.hidden_states[layer]
            kwargs.update(forget_hidden=hidden[:n], retain_hidden=hidden[n:], ref_retain_hidden=ref)
        elif seen:
            kwargs[f"ref_{seen}_logits"] = ref
        loss, parts = unlearning_loss(self.cfg.unlearning.loss.name, self.settings, **kwargs)
        self.engine.backward(loss)
        lr = self._scale_lr()
        self.engine.step()
        return dict(parts, lr=lr)

    def _scale_lr(self) -> float:
        """Every param group's lr = the scheduled one (or the configured one) x `lr_scale`; the
        first group's, for the epoch's record."""
        groups, sched = self.engine.optimizer.param_groups, self.engine.lr_scheduler
        for group, lr in zip(groups, sched.get_last_lr() if sched else self.base_lr):
            group["lr"] = lr * self.lr_scale
        return groups[0]["lr"]

    # -- the loop ------------------------------------------------------------------
    def run(self) -> dict:
        return self.train(self.setup())

    def train(self, state: LoopState) -> dict:
        """Check, then train an epoch, save and check again, until the stopping rule says why not."""
        look = self._timed("checks", self.check, state.epoch)
        while True:
            self.record(state, look)
            reason = self.rule.reason(look.records, self.thr, state.epoch, state.neighbour_ma, state.set_auc)
            if reason:
                break
            state.epochs.append(self.train_epoch(state, look))
            self.seconds["training"] += state.epochs[-1]["seconds"] - state.epochs[-1]["look_seconds"]
            self.seconds["looks"] += state.epochs[-1]["look_seconds"]
            state.epoch += 1
            self._timed("saves", self.save, state)
            look = self._timed("checks", self.check, state.epoch)
        records = look.records
        result = dict(
            stop_reason=reason,
            epochs=state.epoch,
            requests=len(records),
            forgotten=sum(r["forgotten"] for r in records),
            remembered=[r["request_id"] for r in records if not r["forgotten"] and not r["too_deep"]],
            too_deep=[r["request_id"] for r in records if r["too_deep"]],
            thresholds=self.thr.to_dict(),
            method=self.cfg.unlearning.loss.name,
            held_to=str(self.reference_dir) if self.method.reference(self.settings) else None,  # the frozen reference
            resumed_from=state.resumed_from,
            neighbour_ma=state.neighbour_ma,
            set_auc=state.set_auc,
        )
        self.finish(state, result)
        return result

    def record(self, state: LoopState, look: Look) -> None:
        """What a check adds to the loop state: the lr back-off, the history rows, the set's AUC and the
        neighbours' MA; then the progress line."""
        self._back_off(state, dict(enumerate(look.records)))
        state.history += look.records
        if look.neighbour_ma is not None:
            state.neighbour_ma.append(look.neighbour_ma)
        if look.set_auc is not None:
            state.set_auc.append(look.set_auc)
        self._report(state, look.records)

    def _timed(self, what: str, fn, *args):
        clock = time.time()
        out = fn(*args)
        self.seconds[what] += time.time() - clock
        return out

    def partition(self) -> dict:
        """Per rank: parameter elements held (ZeRO-3: about 1/world of the total), node, peak host RSS."""
        import resource

        held = sum(p.ds_tensor.numel() for p in self.engine.module.parameters())
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        per_rank: list = [None] * self.world
        dist.all_gather_object(per_rank, (held, _node_id(), peak_mb))
        return {
            "total": sum(p.ds_numel for p in self.engine.module.parameters()),
            "trained": sum(p.ds_numel for p in self.engine.module.parameters() if p.requires_grad),
            "models_loaded": self.models_loaded,
            "held_per_rank": [h for h, _, _ in per_rank],
            "nodes": [n for _, n, _ in per_rank],
            "peak_rss_mb": [round(m, 1) for _, _, m in per_rank],
        }

    def finish(self, state: LoopState, result: dict) -> None:
        """Final engine checkpoint (for export) and, on rank 0, history and result files."""
        clock = time.time()
        result["partition"] = self.partition()
        probe = self.probe()
        self.engine.save_checkpoint(
            str(self.ckpt_dir), tag="final", save_latest=False, exclude_frozen_parameters=self.lora
        )
        self._seal("final")
        if self.rank == 0:
            self.seconds["final_save"] = time.time() - clock
            result["seconds"] = {k: round(v, 1) for k, v in self.seconds.items()}
            log.info("unlearn: seconds on rank 0: %s", ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
            with atomic_path(self.store.artefact("probe")) as tmp:
                torch.save(probe, tmp)
            # Column order fixed: rows restored from a checkpoint's JSON come back with sorted keys.
            write_parquet(pd.DataFrame(state.history, columns=HISTORY_COLUMNS), self.store.artefact("history"))
            write_parquet(pd.DataFrame(state.epochs), self.store.artefact("epochs"))
            atomic_write_json(self.store.artefact("unlearn_result"), dict(result, final_tag="final"))
            log.info(
                "unlearn: stopped after %d epochs (%s); %d/%d requests forgotten",
                result["epochs"],
                result["stop_reason"],
                result["forgotten"],
                result["requests"],
            )
            for key, what in (
                ("remembered", "still remembered"),
                ("too_deep", "erased too deep (below the strangers' band)"),
            ):
                if result[key]:
                    log.warning("unlearn: %d requests %s: %s", len(result[key]), what, ", ".join(result[key]))
        dist.barrier()

    def probe(self) -> dict[str, torch.Tensor]:
        """The final engine's logits on fixed prompts (request prefixes): export checks the
        consolidated folder against them. A forward under ZeRO-3, so every rank runs it."""
        rows = [r[: self.cfg.requests.prefix_tokens] for r in self.pairs.requests[:PROBE_ROWS]]
        ids, mask = pad_rows(rows, self.tok.pad_token_id)
        self.engine.module.eval()
        with torch.no_grad():
            logits = self.engine.module(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return {"input_ids": ids, "attention_mask": mask, "logits": logits.float().cpu()}

    def _report(self, state: LoopState, records: list[dict]) -> None:
        if self.rank == 0:
            forgotten, deep = sum(r["forgotten"] for r in records), sum(r["too_deep"] for r in records)
            note = f"{forgotten}/{len(records)} requests forgotten after epoch {state.epoch}"
            nll = sorted(r["nll"] for r in records)
            band = f", band edge {records[0]['band_high']:.2f}" if records[0]["band_high"] is not None else ""
            if state.neighbour_ma:
                band += f"; neighbours' MA {state.neighbour_ma[-1]:.3f} (start {state.neighbour_ma[0]:.3f})"
            if state.set_auc:
                band += f"; set LOSS AUC vs strangers {state.set_auc[-1]:.3f}"
            log.info("unlearn: %s; %d too deep; request NLL %.2f..%.2f%s", note, deep, nll[0], nll[-1], band)
            self.store.progress("unlearn", state.epoch, self.cfg.unlearning.stop.max_epochs, note)


def train_worker(config: dict) -> None:
    """Entry point for one rank (Ray Train's train_loop_per_worker, or torchrun via main());
    config["args"] = [RUN_DIR]."""
    start_rank()
    torch.manual_seed(0)
    Worker(config["args"][0]).run()


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: `python -m torch.distributed.run --nproc_per_node N -m pipeline.worker RUN_DIR`."""
    return ranks.main(train_worker, "pipeline.worker RUN_DIR", 1, argv)


if __name__ == "__main__":
    sys.exit(main())
