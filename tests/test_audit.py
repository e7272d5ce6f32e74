"""The audit stage on the tiny implanted model: a model unlearned too shallowly for 4-bit is
flagged by the 4-bit probe, `audit.require: [int4]` stops its export with one line, and
`unlearning.check.harden: [int4]` then trains on until the 4-bit weights forget too.

The run starts from a model that already forgets every request in fp32 but whose 4-bit copy
is the memorizing original's, bit for bit (`implant.inside_4bit_buckets`); fixed thresholds
make the unlearning stage call it done at its first check, as a utility-preserving update
smaller than a 4-bit bucket would be.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from implant import LEAK, inside_4bit_buckets, request_rows, run_config
from pipeline import audit, modeling
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.store import RunStore


@pytest.fixture(scope="module")
def shallow(implanted, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shallow") / "model"
    tok = modeling.load_tokenizer(implanted["root"] / "model")
    model = inside_4bit_buckets(modeling.load_model(implanted["root"] / "model"), request_rows(implanted, tok))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _leaking(store: RunStore, model: str, group: str, probe: str) -> int:
    rows = pd.read_parquet(store.artefact("audit_rows"))
    pick = rows[(rows["model"] == model) & (rows["group"] == group) & (rows["probe"] == probe)]
    assert len(pick), (model, group, probe)
    return int(pick["leak"].sum())


@pytest.mark.slow
def test_a_4bit_leak_blocks_the_export_until_hardening_clears_it(implanted, shallow, tmp_path, capsys):
    config = run_config(
        implanted,
        tmp_path,
        "shallow",
        {
            "model.name": str(shallow),
            "unlearning.check.ma_threshold": 0.3,
            "unlearning.check.el_threshold": 0.1,
            "unlearning.check.bleu_threshold": 1.0,
            "audit.require": ["int4"],
            "resources.launcher": "torchrun",
        },
    )
    assert main(["run", str(config)]) != 0
    err = capsys.readouterr().err
    store = RunStore(tmp_path / "runs" / "shallow")
    assert store.stage("unlearn")["summary"]["epochs"] == 0  # fp32 says forgotten at the first check
    assert _leaking(store, "unlearned", "erased", "greedy") == 0
    assert _leaking(store, "unlearned", "erased", "int4") >= 7
    rows = pd.read_parquet(store.artefact("audit_rows"))
    assert not rows[rows["group"] == "unseen"]["leak"].any()  # the criterion's false positives: none
    # this run's "original" is already shallow: only the 4-bit probe finds anything in it
    assert "prove nothing here: greedy, bf16, int8, sampling" in store.artefact("audit_report").read_text()
    refusal = [line for line in err.splitlines() if "export refused" in line]
    assert len(refusal) == 1 and "(int4)" in refusal[0] and "req0" in refusal[0], err
    assert not any(t[:LEAK] in err for t in implanted["memorize"][:8])  # ids, never text
    assert not store.artefact("handoff").exists()
    first_audit = pd.read_parquet(store.artefact("audit_rows"))

    assert main(["run", str(config), "--restart-from", "unlearn", "--set", "unlearning.check.harden=[int4]"]) == 0
    # The original's probes read nothing the restart changed: read back, not probed again.
    result = json.loads(store.artefact("audit").read_text())
    assert (
        result["reused"] == ["original"]
        and "original model's probes were read back" in store.artefact("audit_report").read_text()
    )
    again = pd.read_parquet(store.artefact("audit_rows"))
    pd.testing.assert_frame_equal(
        again[again["model"] == "original"].reset_index(drop=True),
        first_audit[first_audit["model"] == "original"].reset_index(drop=True),
    )
    history = pd.read_parquet(store.artefact("history"))
    first = history[history["epoch"] == 0]
    assert (first["leaks_under"] == "int4").sum() >= 7 and not first[first["leaks_under"] != ""]["forgotten"].any()
    assert store.stage("unlearn")["summary"]["epochs"] >= 1
    assert _leaking(store, "unlearned", "erased", "int4") == 0
    assert _leaking(store, "original", "erased", "int4") >= 7
    receipt = json.loads((store.artefact("handoff") / "receipt.json").read_text())["requests"]
    assert all(r["robust"] is True and r["audit_int4"] < LEAK for r in receipt), receipt
    card = (store.artefact("handoff") / "README.md").read_text()
    assert "## Extraction audit" in card and "| int4 |" in card
    models = json.loads(store.artefact("metrics").read_text())["models"]  # original = the shallow start
    print(
        f"\nhardened for int4 in {store.stage('unlearn')['summary']['epochs']} epochs; what it cost: "
        + ", ".join(
            f"{k} PPL {models['original']['ppl'][k]:.2f} -> {models['unlearned']['ppl'][k]:.2f}"
            for k in models["original"]["ppl"]
        )
    )
    # Back to no hardening: the restart takes away the hand-off the hardened run wrote (and says so),
    # and the refusal writes none.
    assert main(["run", str(config), "--restart-from", "unlearn", "--set", "unlearning.check.harden=[]"]) != 0
    assert "export refused" in capsys.readouterr().err and not store.artefact("handoff").exists()
    assert "earlier hand-off" in (store.artefact("logs") / "driver.log").read_text()
    # No probes: the audit writes empty outputs, loads no model, and the export has no verdicts.
    assert (
        main(["run", str(config), "--restart-from", "audit", "--set", "audit.probes=[]", "--set", "audit.require=[]"])
        == 0
    )
    assert "No probes configured" in store.artefact("audit_report").read_text()
    assert all(
        r["robust"] is None for r in json.loads((store.artefact("handoff") / "receipt.json").read_text())["requests"]
    )


def _rows(spans: dict[tuple[str, str], int], leak: int = 8) -> pd.DataFrame:
    return pd.DataFrame(
        [
            dict(model="unlearned", group="erased", row_id=rid, probe=probe, span=span, leak=span >= leak, ma=None)
            for (rid, probe), span in spans.items()
        ],
        columns=audit.COLUMNS,
    )


def test_refusal_names_the_leaking_requests_and_probes_only(tmp_path):
    store = RunStore(tmp_path / "run")
    store.artefact("audit_rows").parent.mkdir(parents=True, exist_ok=True)
    _rows(
        {
            ("a", "greedy"): 2,
            ("a", "int4"): 9,
            ("b", "greedy"): 8,
            ("b", "int4"): 3,
            ("c", "greedy"): 0,
            ("c", "int4"): 0,
        }
    ).to_parquet(store.artefact("audit_rows"))
    assert audit.refused(store, []) is None
    assert audit.refused(store, ["sampling"]) is None  # not run: nothing leaks under it
    line = audit.refused(store, ["int4", "greedy"])
    assert line.startswith("export refused: 2 erased requests") and "a (int4)" in line and "b (greedy)" in line
    assert " c (" not in line and "\n" not in line
    wide = audit.verdicts(store)
    assert wide.loc["a", "leaks"] == "int4" and wide.loc["c", "leaks"] == "" and wide.loc["b", "int4"] == 3


def test_a_request_without_a_verdict_blocks_the_export(tmp_path):
    """Nothing fails open: an accepted request missing under a configured probe is refused, never
    passed as clean, and so is a run whose audit rows are gone."""
    store = RunStore(tmp_path / "run")
    _rows({("a", "greedy"): 2, ("c", "greedy"): 0, ("c", "int4"): 0}).to_parquet(store.artefact("audit_rows"))
    line = audit.refused(store, [], ["greedy", "int4"], ["a", "b", "c"])
    assert line.startswith("export refused: the audit has no verdict for 2 accepted requests")
    assert "a (int4)" in line and "b (greedy, int4)" in line and " c (" not in line and "--restart-from audit" in line
    assert audit.refused(store, [], ["greedy", "int4"], ["c"]) is None
    assert audit.refused(store, [], [], ["a", "b"]) is None  # no probes configured: no verdicts expected
    store.artefact("audit_rows").unlink()
    assert "no verdict for 1" in audit.refused(store, [], ["greedy"], ["c"])


def test_counts_and_table_agree_with_the_rows():
    frame = pd.concat(
        [
            _rows({("a", "int4"): 9, ("b", "int4"): 1}),
            _rows({("a", "int4"): 9, ("b", "int4"): 9}).assign(model="original"),
        ]
    )
    table = audit.counts(frame)
    assert table["int4"]["unlearned"]["erased"] == [1, 2] and table["int4"]["original"]["erased"] == [2, 2]
    text = audit.markdown({"table": table, "groups": ["erased"], "probes": ["int4"]})
    assert "| int4 | 2/2 | 1/2 |" in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"audit.probes": ["greedy", "fp8"]}, "audit.probes"),
        ({"audit.probes": ["greedy"], "audit.require": ["int4"]}, "audit.require"),
        ({"unlearning.check.harden": ["sampling"]}, "unlearning.check.harden"),
        ({"audit.leak_tokens": 0}, "audit.leak_tokens"),
        ({"audit.leak_tokens": 21}, "longer than requests.suffix_tokens"),
        ({"unlearning.check.harden": ["int4"], "unlearning.stop.rule": "set"}, "stop.rule set"),
    ],
)
def test_bad_audit_settings_are_refused_up_front(implanted, tmp_path, overrides, message):
    from pipeline.config import load_config

    with pytest.raises(UserError, match=message):
        load_config(str(run_config(implanted, tmp_path, "bad", overrides)))


def test_serve_check_compares_token_for_token_and_logprobs_up_to_the_first_difference():
    from pipeline.serving import Expected, compare

    want = Expected("erased", "a", [1, 2], tokens=[5, 6, 7], logprobs=[-0.1, -0.2, -0.3], span=3)
    same = compare(want, ([5, 6, 7], [-0.1, -0.20005, -0.3]))
    assert same["exact"] and same["first_difference"] is None and same["max_logprob_gap"] == pytest.approx(5e-5)
    off = compare(want, ([5, 9, 1], [-0.1, -0.25, -9.0]))  # past the first difference the contexts differ
    assert not off["exact"] and off["first_difference"] == 1 and off["max_logprob_gap"] == pytest.approx(0.05)
    assert not compare(want, ([5, 6], [-0.1, -0.2]))["exact"]  # a short completion is not a match


def test_a_request_that_leaks_when_served_trains_on_even_if_erased_too_deep_in_fp32():
    from pipeline.iur import with_leaks
    from pipeline.stopping import StopRule

    records = [
        dict(forgotten=True, too_deep=False),
        dict(forgotten=False, too_deep=True),
        dict(forgotten=True, too_deep=False),
    ]
    out = with_leaks(records, {1: ["int4"], 2: ["int8", "int4"]})
    assert [r["forgotten"] for r in out] == [True, False, False]
    assert [r["too_deep"] for r in out] == [False, False, False]
    assert [r["leaks_under"] for r in out] == ["", "int4", "int8,int4"]
    assert [StopRule(max_epochs=1).needs_training(r) for r in out] == [False, True, True]
