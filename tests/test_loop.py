"""Pure parts of the unlearning loop: the per-rank sampler, DeepSpeed config completion, stopping."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.config import build_config
from pipeline.iur import (
    Thresholds,
    apply_band,
    band_targets,
    bigram_share,
    check_requests,
    is_forgotten,
    score_requests,
    set_auc,
)
from pipeline.stopping import StopRule
from pipeline.pairs import Pairs
from pipeline.ranks import deepspeed_config
from pipeline.worker import epoch_batches, rounds, step_rows

from conftest import REPO


@pytest.mark.parametrize("pairs,world,batch", [(13, 2, 4), (8, 2, 4), (1, 2, 8), (0, 2, 4), (30, 3, 4)])
def test_epoch_batches_deal_every_active_pair_once(pairs, world, batch):
    active = list(range(0, 2 * pairs, 2))  # not 0..n-1: indexes of the still-remembered pairs
    per_rank = [epoch_batches(active, 3, 42, r, world, batch) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of ZeRO-3 steps
    dealt = [k for rank in per_rank for b in rank for k in b if k is not None]
    assert sorted(dealt) == active
    assert all(len(b) == batch for rank in per_rank for b in rank)


def _between_looks(requests: int, every: int | None, pairs_per_request: int = 2, world: int = 2, batch: int = 4):
    """For one epoch dealt and cut into rounds as Worker.train_epoch does: the most optimizer steps
    between a step that trains a request and the next look at it, and the most updates a request
    gets between two looks."""
    pair_request = [i for i in range(requests) for _ in range(pairs_per_request)]
    dealt = [epoch_batches(list(range(len(pair_request))), 1, 42, rank, world, batch) for rank in range(world)]
    steps_since, updates = 0, 0
    for part in zip(*(rounds(b, every) for b in dealt)):
        count = {}
        for step, _ in enumerate(part[0]):
            for k in (k for rank in part for k in rank[step] if k is not None):
                count[pair_request[k]] = count.get(pair_request[k], 0) + 1
        steps_since, updates = max(steps_since, len(part[0])), max([updates, *count.values()])
    return steps_since, updates


def test_the_updates_between_two_looks_at_a_request_do_not_grow_with_n():
    """With check_every the model moves at most that many steps between two looks at a request, and a
    request gets at most its pairs' updates between them, at N = 8, 32 and 64 alike; with one
    check an epoch (the paper's cadence) the steps grow with N."""
    assert {n: _between_looks(n, 2) for n in (8, 32, 64)} == {8: (2, 2), 32: (2, 2), 64: (2, 2)}
    assert {n: _between_looks(n, None)[0] for n in (8, 32, 64)} == {8: 2, 32: 8, 64: 16}
    assert rounds(list(range(5)), 2) == [[0, 1], [2, 3], [4]] and rounds([], None) == []


def test_epoch_batches_reshuffle_each_epoch_deterministically():
    a = epoch_batches(list(range(40)), 1, 7, 0, 2, 4)
    assert a == epoch_batches(list(range(40)), 1, 7, 0, 2, 4)
    assert a != epoch_batches(list(range(40)), 2, 7, 0, 2, 4)


def test_deepspeed_config_fills_auto_from_the_run_config():
    cfg = build_config(
        {
            "requests": {"path": str(REPO / "README.md")},
            "storage": {"name": "t"},
            "unlearning": {
                "optim": {"batch_size": 3, "grad_clip": 0.5, "lr": 1e-4, "warmup_steps": 10},
                "ds_config": str(REPO / "ds_configs" / "zero3.json"),
            },
        }
    )
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
    each, paper = StopRule(max_epochs=30), StopRule(max_epochs=30, stop="set")
    assert each.reason([rec(True), rec(True)], thr, 1) == "all_forgotten"
    set_level = [rec(False, 0.1, 0.0), rec(True, 0.2, 0.01)]
    assert paper.reason(set_level, thr, 1) == "set_thresholds"
    assert each.reason(set_level, thr, 1) is None  # "each" (the default) waits for every request
    assert each.reason([rec(False), rec(True)], thr, 30) == "max_epochs"
    assert each.reason([rec(False), rec(True)], thr, 3) is None
    # erased too deep: nothing left to do for a method that cannot pull back, more to do for one that can
    band = StopRule(max_epochs=30, pull_back=True)
    too_deep = [rec(False, 0.0, 0.0, deep=True), rec(True)]
    assert each.reason(too_deep, thr, 3) == "only_too_deep_left"
    assert band.reason(too_deep, thr, 3) is None
    assert [each.needs_training(r) for r in too_deep + [rec(False)]] == [False, False, True]
    assert [band.needs_training(r) for r in too_deep + [rec(False)]] == [True, False, True]
    held = StopRule(max_epochs=30, pull_back=True, recover_within=0.03)
    assert [band.trains(r) for r in too_deep + [rec(False)]] == [True, False, True]
    assert [held.trains(r) for r in too_deep + [rec(False)]] == [True, True, True]  # the forgotten one is held


def test_recover_within_waits_for_the_neighbours_after_every_request_is_forgotten():
    thr = Thresholds(ma=0.3, el=0.05)
    done = [{"forgotten": True, "ma": 0.1, "el": 0.0, "too_deep": False}] * 2
    rule = StopRule(max_epochs=30, pull_back=True, recover_within=0.05)
    assert StopRule(max_epochs=30).recovered([0.9, 0.7, 0.86]) and rule.recovered([0.9, 0.7, 0.86])
    assert not rule.recovered([0.9, 0.7, 0.84]) and rule.recovered([])  # no neighbours: nothing to wait for
    assert rule.recovered([0.5, 0.54]) and not rule.recovered([0.5, 0.56])  # taught text it had not memorized
    repair = StopRule(max_epochs=30, pull_back=True, recover_within=0.05, repair=True)  # held to an earlier model
    assert repair.recovered([0.5, 0.56]) and not repair.recovered([0.9, 0.7, 0.84])  # climbing back is repair
    assert rule.reason(done, thr, 3, [0.9, 0.7]) is None
    assert rule.reason(done, thr, 30, [0.9, 0.7]) == "max_epochs"
    assert rule.reason(done, thr, 3, [0.9, 0.88]) == "all_forgotten"
    left = [done[0], {"forgotten": False, "ma": 0.5, "el": 0.5, "too_deep": False}]
    assert rule.reason(left, thr, 3, [0.9, 0.88]) is None


def test_mia_within_waits_until_the_set_is_as_familiar_as_strangers_on_either_side():
    off, rule = StopRule(max_epochs=30), StopRule(max_epochs=30, recover_within=0.03, mia_within=0.1)
    assert off.familiar([0.2, 0.9]) and rule.familiar([])  # off, or nothing measured yet
    assert rule.familiar([1.0, 0.41]) and rule.familiar([1.0, 0.59])
    assert not rule.familiar([1.0, 0.38])  # erased too deep as a set: singled out as erased
    assert not rule.familiar([0.5, 0.62])  # still more familiar than strangers


def test_the_rule_is_the_config_s():
    cfg = build_config(
        {
            "requests": {"path": str(REPO / "README.md")},
            "storage": {"name": "t"},
            "unlearning": {
                "loss": {"name": "icu_band"},
                "optim": {"lr_backoff": 0.5},
                "stop": {"rule": "each", "recover_within": 0.03, "mia_within": 0.1, "max_epochs": 7},
            },
        }
    )
    assert StopRule.of(cfg.unlearning, band=True) == StopRule(
        max_epochs=7, stop="each", pull_back=True, recover_within=0.03, mia_within=0.1, lr_backoff=0.5
    )


def test_neighbours_are_each_distinct_row_once():
    pairs = Pairs(["a", "b"], [[1], [2]], [0, 0, 1, 1], [[5, 6], [7], [5, 6], []])
    assert pairs.neighbours == [[5, 6], [7]]


def test_step_rows_cut_every_retain_row_to_the_longest_request_so_every_step_has_one_width():
    pairs = Pairs(["a", "b"], [[1, 1, 1], [2]], [0, 1], [[5, 6, 7, 8], []])
    general = [list(range(10)), [9, 9]]
    assert step_rows(pairs, [1, 0, None], general) == ([[2], [1, 1, 1], []], [[], [5, 6, 7], [], [0, 1, 2], [9, 9]])
    # the step without the long request is cut to the same width: ranks stay in step
    assert step_rows(pairs, [1, None], general) == ([[2], []], [[], [], [0, 1, 2], [9, 9]])
    assert step_rows(pairs, [1, None], None) == ([[2], []], [])
    assert step_rows(pairs, [None], general) == ([[]], [[], [0, 1, 2], [9, 9]])


def _quantile(values, q):
    """Linear interpolation between order statistics, written out (numpy's default method)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    below = int(math.floor(pos))
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (pos - below) * (ordered[above] - ordered[below])


UNSEEN = [2.0, 2.4, 2.1, 3.0, 2.7, 2.2, 2.9, 2.5, 2.6, 2.3]  # token-mean NLL of 10 strangers
TAILS = [9.0, 11.5, 8.0, 12.5, 10.0, 9.5, 13.0, 10.5, 11.0, 12.0]  # their tail NLL (losses.tail_nll)


def test_two_sided_rule_flags_requests_past_the_strangers_band():
    records = [{"forgotten": f} for f in (True, True, False, False)]
    out = apply_band(records, [2.5, 3.5, 1.0, 4.0], UNSEEN, 0.9)
    high = _quantile(UNSEEN, 0.9)
    assert all(r["band_high"] == pytest.approx(high) for r in out)
    # below the thresholds and inside the band: forgotten; past the band: too deep, not forgotten;
    # still remembered: neither, wherever its NLL lies
    assert [(r["forgotten"], r["too_deep"]) for r in out] == [
        (True, False),
        (False, True),
        (False, False),
        (False, False),
    ]
    assert [r["nll"] for r in out] == [2.5, 3.5, 1.0, 4.0]
    one_sided = apply_band(records, [2.5, 3.5, 1.0, 4.0], UNSEEN, None)
    assert [r["forgotten"] for r in one_sided] == [True, True, False, False]
    assert not any(r["too_deep"] for r in one_sided)


class CountingScorer:
    """BERTScore stand-in: token-set F1 of the decoded texts; records how many pairs it scored."""

    def __init__(self):
        self.scored = 0

    def f1(self, truths, guesses):
        import torch

        self.scored += len(truths)
        scores = []
        for t, g in zip(truths, guesses):
            a, b = set(t.split()), set(g.split())
            scores.append(2 * len(a & b) / (len(a) + len(b)) if a and b else 0.0)
        return torch.tensor(scores)


def test_check_generates_only_from_requests_below_the_ma_and_el_thresholds(tiny_llama_dir):
    """The screened check gives every row the verdict the unscreened rule gives it, and scores
    (generates from) only the rows at or below both thresholds."""
    import random

    from pipeline import modeling

    model, tok = modeling.load_model(tiny_llama_dir).eval(), modeling.load_tokenizer(tiny_llama_dir)
    rng = random.Random(0)
    rows = [[rng.randrange(3, 200) for _ in range(16)] for _ in range(8)]
    options = dict(prefix=8, suffix=8, num_beams=1, el_n=2, el_range="ku", batch_size=4)
    full = score_requests(model, tok, rows, scorer=CountingScorer(), **options)
    ma = sorted(r["ma"] for r in full)
    thr = Thresholds(ma=ma[len(ma) // 2], el=1.0, bertscore=1.1, bleu=1.1)  # half the rows pass the screen
    scorer = CountingScorer()
    got = check_requests(model, tok, rows, thresholds=thr, scorer=scorer, **options)
    passing = [r["ma"] <= thr.ma and r["el"] <= thr.el for r in full]
    assert 0 < sum(passing) < len(rows) and scorer.scored == sum(passing)
    assert [g["forgotten"] for g in got] == [is_forgotten(r, thr) for r in full]
    assert any(g["forgotten"] for g in got)
    for g, r, p in zip(got, full, passing):
        assert (g["ma"], g["el"]) == (r["ma"], r["el"])
        assert (g["bleu"], g["bertscore"]) == (r["bleu"], r["bertscore"]) if p else math.isnan(g["bleu"])
    # Whole requests: a row whose last part the model reproduces (its own greedy tail from token 10 on)
    # is remembered, however low its MA, while random rows pass.
    with torch.no_grad():
        tails = [
            r[:10] + model.generate(torch.tensor([r[:10]]), max_new_tokens=6, do_sample=False)[0, 10:].tolist()
            for r in rows[:3]
        ]
    lenient = Thresholds(ma=1.0, el=1.0, bertscore=1.1, bleu=1.1, span=3)
    got = check_requests(model, tok, tails + rows[3:], thresholds=lenient, scorer=CountingScorer(), **options)
    assert [g["span"] >= 6 for g in got] == [True] * 3 + [False] * 5
    assert [g["forgotten"] for g in got] == [False] * 3 + [True] * 5


def test_bigram_share_is_how_often_strangers_get_a_pair_right():
    rows = [[1, 2, 3, 9], [1, 2, 4, 9], [5, 2, 3, 9]]
    hits = [[True, False, True], [True, True, False], [False, True, True]]
    assert bigram_share(rows, hits) == {(1, 2): 1.0, (2, 3): 0.5, (3, 9): 1.0, (2, 4): 1.0, (4, 9): 0.0, (5, 2): 0.0}


def test_band_targets_push_what_is_personal_and_pull_back_the_too_deep():
    high = _quantile(UNSEEN, 0.9)
    rec = lambda forgotten=False, deep=False, edge=high: {"forgotten": forgotten, "too_deep": deep, "band_high": edge}
    rows = [[1, 2, 3, 7], [1, 2, 3], [4, 5], [1, 2]]
    hits = [[True, True, False], [True, True], [False], [True]]
    share = {(1, 2): 0.9, (2, 3): 0.2, (3, 7): 0.5}
    push, low, hi, tail_low, tail_hi = band_targets(
        [rec(), rec(deep=True), rec(forgotten=True), rec(edge=None)], rows, hits, share, UNSEEN, TAILS, ma_threshold=0.5
    )
    # (1, 2) and (3, 7) are template: not pushed while a personal token is still a hit (row 0),
    # pushed when only template hits keep MA above the threshold (row 3: MA 1 > 0.5)
    assert push == [[0.0, 1.0, 0.0], [0.0, 0.0], [0.0], [1.0]]
    assert low == [pytest.approx(_quantile(UNSEEN, 0.5))] * 4
    assert tail_low == [pytest.approx(_quantile(TAILS, 0.5))] * 4  # as unlikely as a stranger's rarest tokens
    assert tail_hi == [math.inf] * 4
    assert hi[0] == hi[3] == math.inf and hi[1] == pytest.approx(high) == hi[2]
    # held (recover_within): a forgotten or too-deep row keeps its personal positions and every
    # position it misses now (row 4: the template (1, 2) is off the top), and is kept within the
    # strangers' middle half (their 25th to 75th percentile NLL)
    rows, hits = rows + [[1, 2, 3]], hits + [[False, True]]
    recs = [rec(), rec(deep=True), rec(forgotten=True), rec(edge=None), rec(forgotten=True)]
    held, held_low, held_hi, held_tail, held_tail_hi = band_targets(
        recs, rows, hits, share, UNSEEN, TAILS, ma_threshold=0.5, hold=True
    )
    assert held == [push[0], [0.0, 1.0], [1.0], push[3], [1.0, 1.0]]
    q25, q75 = pytest.approx(_quantile(UNSEEN, 0.25)), pytest.approx(_quantile(UNSEEN, 0.75))
    assert held_low == [low[0], q25, q25, low[3], q25] and held_hi == [math.inf, q75, q75, math.inf, q75]
    t25, t75 = pytest.approx(_quantile(TAILS, 0.25)), pytest.approx(_quantile(TAILS, 0.75))
    assert held_tail == [tail_low[0], t25, t25, tail_low[3], t25]
    assert held_tail_hi == [math.inf, t75, t75, math.inf, t75]


def test_set_auc_is_the_loss_auc_of_the_requests_against_strangers():
    """Against a naive pair count: a lower NLL scores as a member."""
    import random

    rng = random.Random(3)
    strangers = [rng.gauss(4.7, 0.6) for _ in range(32)]
    for shift, want in ((-2.0, 1.0), (0.0, None), (2.0, 0.0)):
        erased = [rng.gauss(4.7 + shift, 0.3) for _ in range(8)]
        pairs = [(e < s) + 0.5 * (e == s) for e in erased for s in strangers]
        assert set_auc(erased, strangers) == pytest.approx(sum(pairs) / len(pairs))
        assert want is None or set_auc(erased, strangers) == want


def _naive_push(row, row_hits, share, ma_threshold):
    """Personal positions, then template hits least shared first, one at a time, until MA (every
    pushed hit lost) is at the threshold."""
    pairs = list(zip(row, row[1:]))
    push = [share.get(p, 0.0) < 0.5 for p in pairs]
    for t in sorted((t for t in range(len(pairs)) if row_hits[t]), key=lambda t: (share[pairs[t]], t)):
        if (sum(row_hits) - sum(h and q for h, q in zip(row_hits, push))) / len(pairs) <= ma_threshold:
            break
        push[t] = True
    return [float(q) for q in push]


@pytest.mark.parametrize("seed", range(8))
def test_band_targets_push_template_hits_the_personal_ones_cannot_make_up_for(seed):
    """A record whose template hits alone keep its MA above the threshold (every personal hit lost)
    gets the least shared of them pushed, exactly as many as a naive loop adds, whether or not a
    personal token is still a hit."""
    import random

    rng = random.Random(seed)
    rows = [[rng.randrange(6) for _ in range(rng.randrange(5, 30))] for _ in range(6)]
    share = {(a, b): rng.choice([0.1, 0.5, 0.6, 0.8, 1.0]) for a in range(6) for b in range(6)}
    # half the rows: every personal position already wrong
    hits = [
        [rng.random() < 0.9 and (k % 2 == 0 or share[pair] >= 0.5) for pair in zip(row, row[1:])]
        for k, row in enumerate(rows)
    ]
    thr = rng.choice([0.1, 0.2, 0.3])
    rec = {"forgotten": False, "too_deep": False, "band_high": 9.0}
    push, *_ = band_targets([rec] * len(rows), rows, hits, share, UNSEEN, TAILS, ma_threshold=thr)
    assert push == [_naive_push(r, h, share, thr) for r, h in zip(rows, hits)]
    personal = [[float(share.get(q, 0.0) < 0.5) for q in zip(r, r[1:])] for r in rows]
    assert any(p != q for p, q in zip(push, personal))
    assert any(p != q and any(h and m for h, m in zip(hit, q)) for p, q, hit in zip(push, personal, hits))


def test_jumped_band_is_a_trained_request_crossing_between_remembered_and_too_deep():
    s = lambda name: {"forgotten": name == "f", "too_deep": name == "d"}
    before = [s("r"), s("d"), s("r"), s("f"), s("r"), s("d")]
    after = [s("d"), s("r"), s("f"), s("d"), s("r"), s("d")]
    rule = StopRule(max_epochs=30, pull_back=True, lr_backoff=0.5)
    before, after = dict(enumerate(before)), dict(enumerate(after))
    assert rule.jumped(before, after, trained={0, 1, 2, 4, 5}) == [0, 1]
    assert rule.jumped(before, after, trained={1, 3}) == [1]  # 3 drifted there untrained: not counted
    assert rule.jumped({0: before[0]}, after, trained={0, 1}) == [0]  # 1 not looked at before: no jump to see
    assert rule.backed_off(0.5, [1]) == 0.25 and rule.backed_off(0.5, []) == 0.5


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
            checkpoints.seal(tmp_path, tag.name, checkpoints.hash_share(tmp_path, tag.name, 0, 1))
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


def test_ranks_hash_disjoint_shares_that_seal_as_one_rank_would(tmp_path):
    """Each rank hashes a share of a tag's files (largest first, dealt in turn); together the shares
    are exactly what one process records, and a seal from them verifies."""
    from pipeline import checkpoints
    from pipeline.atomic import file_records

    tag = tmp_path / "epoch-1"
    (tag / "global_step").mkdir(parents=True)
    for name, size in (("a.pt", 900), ("b.pt", 800), ("c.pt", 30), ("global_step/d.pt", 20), ("loop_state.json", 5)):
        (tag / name).write_bytes(bytes([size % 251]) * size)
    shares = [checkpoints.hash_share(tmp_path, "epoch-1", rank, 2) for rank in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert {"a.pt", "b.pt"} == {max(share, key=lambda k: share[k][0]) for share in shares}  # one large file each
    checkpoints.seal(tmp_path, "epoch-1", {k: v for share in shares for k, v in share.items()})
    assert json.loads((tag / checkpoints.RECORDS).read_text()) == {
        k: v for k, v in file_records(tag).items() if k != checkpoints.RECORDS
    }
    assert checkpoints.latest_verified(tmp_path) == "epoch-1"


def test_lr_scale_multiplies_the_scheduled_lr_without_compounding():
    """`unlearning.optim.lr_backoff`'s factor applies on top of the warmup schedule (which rewrites the
    lr after every step) and of a constant lr (which nothing rewrites), each step anew."""
    from types import SimpleNamespace

    import torch
    from deepspeed.runtime.lr_schedules import WarmupLR

    from pipeline.worker import Worker

    def optimizer_and_schedule():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
        return opt, WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=4, warmup_type="linear")

    plain_opt, plain_sched = optimizer_and_schedule()
    opt, sched = optimizer_and_schedule()
    worker = Worker.__new__(Worker)
    worker.engine, worker.lr_scale, worker.base_lr = SimpleNamespace(optimizer=opt, lr_scheduler=sched), 0.25, [1e-3]
    scheduled = []
    for _ in range(6):
        scheduled.append(plain_opt.param_groups[0]["lr"])
        assert worker._scale_lr() == pytest.approx(0.25 * scheduled[-1]) == opt.param_groups[0]["lr"]
        for o, s in ((plain_opt, plain_sched), (opt, sched)):
            o.step()
            s.step()
    assert scheduled[0] < scheduled[2] < scheduled[-1] == pytest.approx(1e-3)  # the warmup ran
    worker.engine = SimpleNamespace(optimizer=opt, lr_scheduler=None)
    assert worker._scale_lr() == pytest.approx(2.5e-4) == worker._scale_lr()


def test_back_off_halves_the_lr_per_jump_and_a_resumed_run_decides_alike():
    """The factor follows the looks: a trained request crossing the band halves it (pulled back
    across counts too; one that drifts there untrained does not), a look between checks counts like
    a check, and a run resumed from a checkpoint's loop state arrives at the same factor."""
    import dataclasses
    import json
    from types import SimpleNamespace

    from pipeline.losses import method
    from pipeline.worker import LoopState, Worker

    worker = Worker.__new__(Worker)
    worker.cfg = build_config(
        {
            "requests": {"path": str(REPO / "README.md")},
            "storage": {"name": "t"},
            "unlearning": {"loss": {"name": "icu_band"}, "optim": {"lr_backoff": 0.5}},
        }
    )
    worker.method, worker.rank = method("icu_band"), 1
    worker.rule = StopRule.of(worker.cfg.unlearning, band=True)
    worker.pairs = SimpleNamespace(request_ids=["a", "b"])
    flags = {"r": (False, False), "f": (True, False), "d": (False, True)}
    # a: remembered, too deep, remembered, forgotten, too deep, ...; b drifts too deep untrained
    looks = [("rr", {0, 1}), ("dr", {0}), ("rf", {0}), ("fd", {0}), ("ff", {0})]

    def run(state: LoopState, steps: range) -> list[float]:
        scales = []
        for k in steps:
            seen, trained = looks[k]
            state.trained_since = sorted(set(state.trained_since) | trained)
            worker._back_off(state, {i: dict(forgotten=flags[c][0], too_deep=flags[c][1]) for i, c in enumerate(seen)})
            scales.append(worker.lr_scale)
        return scales

    state = LoopState()
    assert run(state, range(5)) == [1.0, 0.5, 0.25, 0.25, 0.25]
    resumed = LoopState()
    run(resumed, range(3))
    resumed = LoopState(**json.loads(json.dumps(dataclasses.asdict(resumed))))  # through the checkpoint's JSON
    assert run(resumed, range(3, 5)) == [0.25, 0.25]
    worker.cfg.unlearning.optim.lr_backoff = 1.0
    worker.rule = StopRule.of(worker.cfg.unlearning, band=True)
    assert run(LoopState(), range(5)) == [1.0] * 5


def test_stop_settings_are_in_the_key_but_not_the_checkpoints(tmp_path):
    """A run that stops elsewhere (mia_within, max_epochs, the rule) has another result, but its epoch
    k weights are the same: it resumes from them. Anything the method or the loop reads changes both."""
    from pipeline.store import RunStore
    from pipeline.unlearn import key

    def keys(loss=None, optim=None, **stop):
        cfg = build_config(
            {
                "requests": {"path": str(REPO / "README.md")},
                "storage": {"name": "t"},
                "unlearning": {
                    "loss": {"name": "icu_band", **(loss or {})},
                    "optim": optim or {},
                    "stop": {"recover_within": 0.03, **stop},
                },
            }
        )
        cfg.resolve(tmp_path / "model", 64)
        store = RunStore(tmp_path / "run")
        return key(cfg, store), key(cfg, store, resumable=True)

    plain = keys()
    for stop in ({"mia_within": 0.1}, {"max_epochs": 3}, {"rule": "each"}):
        assert keys(**stop)[0] != plain[0] and keys(**stop)[1] == plain[1], stop
    for changed in (keys(loss={"margin": 2.0}), keys(optim={"lr": 1e-3}), keys(recover_within=0.05)):
        assert changed[0] != plain[0] and changed[1] != plain[1]
