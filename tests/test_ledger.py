"""The erasure ledger (pipeline/ledger.py) and chained runs: a verified hash chain, refused in one line
when edited or truncated, and a second run that keeps the first run's requests erased."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from implant import request_rows, run_config
from pipeline import driver, ledger, modeling
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.store import RunStore


@pytest.fixture(autouse=True)
def _ray_shut_down():
    """The runs here start Ray in this process (driver.run_pipeline); later tests start their own."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _entry(i: int) -> dict:
    return dict(
        run=f"/runs/week{i}",
        run_name=f"week{i}",
        started_from={"path": f"/m{i}", "digest": f"d{i}"},
        handoff={"path": f"/m{i + 1}", "digest": f"d{i + 1}"},
        pinned={"key_id": "k", "unseen": None, "strangers": None},
        thresholds={"ma": 0.3},
        requests=[{"id": f"r{i}", "content_hash": f"h{i}", "input_ids": [1, 2, 3], "receipt": {"status": "forgotten"}}],
    )


def _three(folder: Path) -> ledger.Ledger:
    for i in range(3):
        ledger.Ledger.open(folder).append(_entry(i), after=ledger.Ledger.open(folder).head)
    return ledger.Ledger.open(folder)


def test_a_ledger_chains_its_entries_and_verifies_them_on_load(tmp_path):
    book = _three(tmp_path / "ledger")
    assert [e["seq"] for e in book.entries] == [0, 1, 2]
    assert [e["prev"] for e in book.entries] == [None, book.entries[0]["hash"], book.entries[1]["hash"]]
    assert [(r["id"], r["erased_in"]) for r in book.erased()] == [("r0", 0), ("r1", 1), ("r2", 2)]
    assert (tmp_path / "ledger").stat().st_mode & 0o777 == 0o700
    with pytest.raises(UserError, match="entry 2 was appended by run week2 after this run started"):
        book.append(_entry(3), after=book.entries[1]["hash"])  # a run that started before entry 2
    with pytest.raises(UserError, match="it is empty, but this run started from one with entries"):
        ledger.Ledger.open(tmp_path / "moved").append(_entry(3), after=book.head)


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda lines: [lines[0], lines[1].replace('"r1"', '"rX"'), lines[2]], "entry 1 was changed"),
        (lambda lines: [lines[0], lines[2]], "entry 1 does not follow entry 0"),
        (lambda lines: lines[:2], "holds 2 entries but its head records 3"),
        (lambda lines: [lines[0], lines[1], lines[2][:40]], "entry 2 is not valid JSON"),
    ],
    ids=["edited", "entry_removed", "last_entry_removed", "cut"],
)
def test_an_edited_or_truncated_ledger_is_refused_in_one_line_naming_the_entry(tmp_path, damage, named):
    folder = tmp_path / "ledger"
    _three(folder)
    path = folder / ledger.ENTRIES
    path.write_text("".join(line + "\n" for line in damage(path.read_text().splitlines())))
    with pytest.raises(UserError, match=named) as err:
        ledger.Ledger.open(folder)
    assert "\n" not in str(err.value)
    path.write_text(path.read_text()[:-1])  # and without its last line end
    with pytest.raises(UserError, match=r"entry \d is cut short \(no line end\)"):
        ledger.Ledger.open(folder)
    (folder / ledger.HEAD).unlink()
    with pytest.raises(UserError, match="head.json is missing"):
        ledger.Ledger.open(folder)


def test_an_append_cut_between_entries_and_head_verifies_and_the_next_append_completes_it(tmp_path):
    folder = tmp_path / "ledger"
    ledger.Ledger.open(folder).append(_entry(0), after=None)
    (folder / ledger.HEAD).write_text(json.dumps({"entries": 0, "hash": None}))  # the first append, cut
    assert ledger.Ledger.open(folder).head is not None
    book = _three(tmp_path / "other")
    (tmp_path / "other" / ledger.HEAD).write_text(json.dumps({"entries": 2, "hash": book.entries[1]["hash"]}))
    assert ledger.Ledger.open(tmp_path / "other").head == book.head  # read between the entries and the head
    ledger.Ledger.open(tmp_path / "other").append(_entry(3), after=book.head)
    assert json.loads((tmp_path / "other" / ledger.HEAD).read_text())["entries"] == 4


def _cfg(tmp_path: Path, model: Path, strangers: Path | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        ledger=SimpleNamespace(path=str(tmp_path / "ledger")),
        model_dir=model,
        run_dir=tmp_path / "runs" / "next",
        evaluation=SimpleNamespace(unseen_path=None),
        unlearning=SimpleNamespace(check=SimpleNamespace(strangers_path=strangers)),
    )


def test_a_chain_from_a_model_that_is_not_the_last_hand_off_or_with_other_strangers_is_refused(tmp_path):
    first, handoff = tmp_path / "first", tmp_path / "handoff"
    for folder, content in ((first, "original"), (handoff, "unlearned")):
        folder.mkdir()
        (folder / "model.safetensors").write_text(content)
    chain, earlier = ledger.start(_cfg(tmp_path, first), "k")
    assert chain["head"] is None and earlier == []
    entry = dict(_entry(0), started_from=chain["started_from"], pinned=chain["pinned"])
    entry["handoff"] = {"path": str(handoff), "digest": ledger.file_digest(handoff)}
    ledger.Ledger.open(tmp_path / "ledger").append(entry, after=None)

    with pytest.raises(UserError, match="model.name: .*first is not the ledger's latest hand-off") as err:
        ledger.start(_cfg(tmp_path, first), "k")
    assert "\n" not in str(err.value)
    chain, earlier = ledger.start(_cfg(tmp_path, handoff), "k")
    assert chain["first_original"]["path"] == str(first) and [r["id"] for r in earlier] == ["r0"]
    assert ledger.first_original(chain) == first  # the chained run's reference and drift baseline
    assert ledger.first_original(dict(chain, started_from=chain["first_original"])) is None  # the first run
    (first / "model.safetensors").write_text("retouched")
    with pytest.raises(UserError, match="first original model .*first is gone or changed") as err:
        ledger.first_original(chain)
    assert "\n" not in str(err.value) and ledger.first_original(chain, verify=False) == first
    (first / "model.safetensors").write_text("original")
    (handoff / "model.safetensors").write_text("changed after export")
    with pytest.raises(UserError, match="not the ledger's latest hand-off"):
        ledger.start(_cfg(tmp_path, handoff), "k")
    (handoff / "model.safetensors").write_text("unlearned")
    strangers = tmp_path / "strangers.jsonl"
    strangers.write_text('{"text": "someone else"}\n')
    with pytest.raises(UserError, match="unlearning.check.strangers_path differs from the ledger's first run"):
        ledger.start(_cfg(tmp_path, handoff, strangers), "k")
    with pytest.raises(UserError, match="the receipt key"):
        ledger.start(_cfg(tmp_path, handoff), "another key")


def _requests(path: Path, texts: list[str], first: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"req{first + i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def _run(config: Path):
    """Every stage of one run (`icu run`), its lock released however it ends."""
    cfg, store = driver.open_run(str(config))
    try:
        driver.run_pipeline(cfg, store)
    finally:
        store.unlock()
    return cfg, store


@pytest.mark.slow
def test_a_chained_run_catches_an_earlier_request_its_training_brings_back_and_erases_it_again(
    implanted, tmp_path, capsys
):
    """Week 1 erases req0-req3. Week 2 erases req4-req7 from week 1's hand-off while its general retain
    text holds near-copies of req0 (the leak guard switched off for them; the paper's loss teaches general
    rows with an NLL): req0 comes back, a check catches it and it is erased again before the run ends.
    An exact copy of req1 in the same pool is still kept out by the leak guard."""
    texts = [json.loads(line)["text"] for line in implanted["requests"].read_text().splitlines()]
    book = tmp_path / "ledger"
    base = {"ledger.path": str(book), "audit.probes": ["greedy", "int8"], "audit.require": ["greedy"]}
    first = {"requests.path": str(_requests(tmp_path / "w1.jsonl", texts[:4], 0))}
    week1 = run_config(implanted, tmp_path, "week1", dict(base, **first))
    _, store = _run(week1)
    entries = ledger.Ledger.open(book).entries
    assert len(entries) == 1 and [r["id"] for r in entries[0]["requests"]] == ["req0", "req1", "req2", "req3"]
    assert all(r["receipt"]["status"] == "forgotten" for r in entries[0]["requests"])

    related = tmp_path / "related.jsonl"
    near = ["Once more, " + texts[0][10:], "Then again " + texts[0][10:], "And so on: " + texts[0][10:]]
    related.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*near, texts[1]]))
    overrides = {
        "requests.path": str(_requests(tmp_path / "w2.jsonl", texts[4:], 4)),
        "model.name": str(store.artefact("handoff")),
        "retain.paths": [str(implanted["retain"]), str(related)],
        "retrieval.leak_threshold": 1.0,
        "retrieval.ngram_threshold": 1.0,
        "retrieval.k": 1,
        "retrieval.pairs_per_request": 1,
        "retrieval.general_per_source": 8,
        "unlearning.loss": {"name": "icu", "general_lw": 4.0},
        "unlearning.optim": {"lr": 3.0e-4, "batch_size": 4, "general_batch": 4},
        "unlearning.stop.max_epochs": 60,
    }
    cfg2, store2 = _run(run_config(implanted, tmp_path, "week2", dict(base, **overrides)))

    stats = json.loads(store2.artefact("retrieval_stats").read_text())
    assert stats["excluded_count"] >= 1  # the exact copy of req1, an earlier request
    tok = modeling.load_tokenizer(cfg2.model_dir)
    req1 = request_rows(implanted, tok)[1]
    general = pd.read_parquet(store2.artefact("general_items"), columns=["input_ids"])["input_ids"]
    assert all(list(row) != req1 for row in general)

    history = pd.read_parquet(store2.artefact("history"))
    req0 = history[history["request_id"] == "req0"].sort_values("epoch")["forgotten"].tolist()
    assert req0[0] and not all(req0) and req0[-1], req0  # forgotten, brought back, erased again
    receipt = json.loads((store2.artefact("handoff") / "receipt.json").read_text())["requests"]
    assert [(r["request_id"], r["erased_in"], r["status"]) for r in receipt] == [
        *((f"req{i}", 0, "forgotten") for i in range(4)),
        *((f"req{i}", None, "forgotten") for i in range(4, 8)),
    ]
    assert all(r["robust"] for r in receipt)
    book2 = ledger.Ledger.open(book)
    assert [e["run_name"] for e in book2.entries] == ["week1", "week2"]
    result2 = json.loads(store2.artefact("unlearn_result").read_text())
    assert result2["thresholds"] == entries[0]["thresholds"]
    assert result2["held_to"] == str(implanted["root"] / "model")  # the first original, not week 1's hand-off
    assert main(["ledger", str(book)]) == 0
    shown = capsys.readouterr().out
    assert "2 runs, every link verified" in shown and "8 requests erased in all" in shown
    assert book2.entries[1]["started_from"]["digest"] == entries[0]["handoff"]["digest"]
    finished = {k: v["ended"] for k, v in store.manifest()["stages"].items()}
    _run(week1)  # a finished run of the ledger, rerun after a later run chained from it: nothing to do
    assert {k: v["ended"] for k, v in store.manifest()["stages"].items()} == finished
    with pytest.raises(UserError, match="run week1 is ledger entry 0; its hand-off is evidence"):
        driver.open_run(str(week1), restart_from="evaluate")
    metrics = json.loads(store2.artefact("metrics").read_text())
    assert "first_original" in metrics["models"]  # drift against the model the ledger started from
    written = [*book.rglob("*"), *(tmp_path / "runs").rglob("*.log"), *(tmp_path / "runs").rglob("receipt.*")]
    written += [store2.artefact("handoff") / "README.md", store2.artefact("chain")]
    assert not [p for p in written if p.is_file() and any(t[:24].encode() in p.read_bytes() for t in texts)]
    assert not any(t[:24] in shown for t in texts)


@pytest.mark.slow
def test_a_run_that_leaves_a_request_remembered_hands_off_nothing_and_adds_nothing_to_the_ledger(implanted, tmp_path):
    book = tmp_path / "ledger"
    config = run_config(
        implanted,
        tmp_path,
        "short",
        {"ledger.path": str(book), "unlearning.stop.max_epochs": 1, "audit.probes": ["greedy"]},
    )
    with pytest.raises(UserError, match="export refused: .* still remembered .* the ledger"):
        _run(config)
    store = RunStore(tmp_path / "runs" / "short")
    assert not store.artefact("handoff").exists()
    assert ledger.Ledger.open(book).entries == ()
