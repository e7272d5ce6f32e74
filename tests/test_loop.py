"""Pure parts of the unlearning loop: the per-rank sampler, DeepSpeed config completion, stopping."""

from __future__ import annotations

import pytest

from pipeline.config import build_config
import math

from pipeline.iur import Thresholds, apply_band, band_targets, shared_bigrams
from pipeline.worker import deepspeed_config, epoch_batches, needs_training, stop_reason

from conftest import REPO


@pytest.mark.parametrize("pairs,world,batch", [(13, 2, 4), (8, 2, 4), (1, 2, 8), (0, 2, 4), (30, 3, 4)])
def test_epoch_batches_deal_every_active_pair_once(pairs, world, batch):
    active = list(range(0, 2 * pairs, 2))  # not 0..n-1: indexes of the still-remembered pairs
    per_rank = [epoch_batches(active, 3, 42, r, world, batch) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of ZeRO-3 steps
    dealt = [k for rank in per_rank for b in rank for k in b if k is not None]
    assert sorted(dealt) == active
    assert all(len(b) == batch for rank in per_rank for b in rank)


def test_epoch_batches_reshuffle_each_epoch_deterministically():
    a = epoch_batches(list(range(40)), 1, 7, 0, 2, 4)
    assert a == epoch_batches(list(range(40)), 1, 7, 0, 2, 4)
    assert a != epoch_batches(list(range(40)), 2, 7, 0, 2, 4)


def test_deepspeed_config_fills_auto_from_the_run_config():
    cfg = build_config({"requests": {"path": str(REPO / "README.md")}, "storage": {"name": "t"},
                        "unlearning": {"batch_size": 3, "grad_clip": 0.5, "lr": 1e-4, "warmup_steps": 10,
                                       "ds_config": str(REPO / "ds_configs" / "zero3.json")}})
    ds = deepspeed_config(cfg, world=4, hidden=64)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["train_batch_size"] == 12
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 10
    assert "auto" not in str(ds["zero_optimization"]) and ds["zero_optimization"]["stage"] == 3
    ref = deepspeed_config(cfg, world=4, hidden=64, with_optimizer=False)
    assert "optimizer" not in ref and "scheduler" not in ref


def test_stop_reasons():
    thr = Thresholds(ma=0.3, el=0.05)
    rec = lambda f, ma=0.5, el=0.5, deep=False: {"forgotten": f, "ma": ma, "el": el, "too_deep": deep}
    assert stop_reason([rec(True), rec(True)], thr, 1, 30) == "all_forgotten"
    set_level = [rec(False, 0.1, 0.0), rec(True, 0.2, 0.01)]
    assert stop_reason(set_level, thr, 1, 30, "set") == "set_thresholds"
    assert stop_reason(set_level, thr, 1, 30, "each") is None  # "each" (the default) waits for every request
    assert stop_reason(set_level, thr, 1, 30) is None
    assert stop_reason([rec(False), rec(True)], thr, 30, 30) == "max_epochs"
    assert stop_reason([rec(False), rec(True)], thr, 3, 30) is None
    # erased too deep: nothing left to do for a method that cannot pull back, more to do for one that can
    too_deep = [rec(False, 0.0, 0.0, deep=True), rec(True)]
    assert stop_reason(too_deep, thr, 3, 30) == "only_too_deep_left"
    assert stop_reason(too_deep, thr, 3, 30, pull_back=True) is None
    assert [needs_training(r, False) for r in too_deep + [rec(False)]] == [False, False, True]
    assert [needs_training(r, True) for r in too_deep + [rec(False)]] == [True, False, True]


def _quantile(values, q):
    """Linear interpolation between order statistics, written out (numpy's default method)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    below = int(math.floor(pos))
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (pos - below) * (ordered[above] - ordered[below])


UNSEEN = [2.0, 2.4, 2.1, 3.0, 2.7, 2.2, 2.9, 2.5, 2.6, 2.3]  # token-mean NLL of 10 strangers


def test_two_sided_rule_flags_requests_past_the_strangers_band():
    records = [{"forgotten": f} for f in (True, True, False, False)]
    out = apply_band(records, [2.5, 3.5, 1.0, 4.0], UNSEEN, 0.9)
    high = _quantile(UNSEEN, 0.9)
    assert all(r["band_high"] == pytest.approx(high) for r in out)
    # below the thresholds and inside the band: forgotten; past the band: too deep, not forgotten;
    # still remembered: neither, wherever its NLL lies
    assert [(r["forgotten"], r["too_deep"]) for r in out] == [(True, False), (False, True), (False, False),
                                                              (False, False)]
    assert [r["nll"] for r in out] == [2.5, 3.5, 1.0, 4.0]
    one_sided = apply_band(records, [2.5, 3.5, 1.0, 4.0], UNSEEN, None)
    assert [r["forgotten"] for r in one_sided] == [True, True, False, False]
    assert not any(r["too_deep"] for r in one_sided)


def test_shared_bigrams_are_what_strangers_get_right():
    rows = [[1, 2, 3, 9], [1, 2, 4, 9], [5, 2, 3, 9]]
    hits = [[True, False, True], [True, True, False], [False, True, True]]
    # (1,2): 2/2; (2,3): 1/2 (= share, counts); (3,9): 2/2; (2,4): 1/1; (4,9): 0/1; (5,2): 0/1
    assert shared_bigrams(rows, hits) == {(1, 2), (2, 3), (3, 9), (2, 4)}
    assert shared_bigrams(rows, hits, share=0.75) == {(1, 2), (3, 9), (2, 4)}


def test_band_targets_push_what_is_personal_and_pull_back_the_too_deep():
    high = _quantile(UNSEEN, 0.9)
    rec = lambda forgotten=False, deep=False, edge=high: {"forgotten": forgotten, "too_deep": deep, "band_high": edge}
    rows = [[1, 2, 3, 7], [1, 2, 3], [4, 5], [1, 2]]
    push, low, hi = band_targets([rec(), rec(deep=True), rec(forgotten=True), rec(edge=None)], rows, {(1, 2)}, UNSEEN)
    assert push == [[0.0, 1.0, 1.0], [0.0, 0.0], [0.0], [0.0]]  # (1, 2) is template: never pushed
    assert low == [pytest.approx(_quantile(UNSEEN, 0.5))] * 4
    assert hi[0] == hi[3] == math.inf and hi[1] == pytest.approx(high) == hi[2]


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, caplog):
    """A tag counts once sealed (files.json); resuming takes the newest whose files still match
    their recorded sha256, and says in one line when it passes one over."""
    from pipeline import checkpoints

    for epoch in (1, 2, 3):
        tag = tmp_path / f"epoch-{epoch}"
        (tag / "global_step").mkdir(parents=True)
        (tag / "global_step" / "zero_pp_rank_0_model_states.pt").write_bytes(bytes([epoch]) * 64)
        (tag / "loop_state.json").write_text("{}")
        if epoch < 3:
            checkpoints.seal(tmp_path, tag.name)
    assert checkpoints.complete_tags(tmp_path) == ["epoch-2", "epoch-1"]  # epoch-3 was never sealed
    assert checkpoints.latest_verified(tmp_path) == "epoch-2"
    shard = tmp_path / "epoch-2" / "global_step" / "zero_pp_rank_0_model_states.pt"
    shard.write_bytes(b"\x00" * 64)  # same size, other bytes
    with caplog.at_level("WARNING"):
        assert checkpoints.latest_verified(tmp_path) == "epoch-1"
    assert "checkpoint epoch-2 is damaged" in caplog.text and "falling back" in caplog.text
    shard.unlink()
    assert checkpoints.latest_verified(tmp_path) == "epoch-1"
    (tmp_path / "epoch-1" / "loop_state.json").write_text("{} ")
    assert checkpoints.latest_verified(tmp_path) is None
