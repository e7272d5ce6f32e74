"""Ingest: every row is accepted or rejected with a reason; nothing is lost."""

import csv
import io
import json

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.config import RequestsConfig
from pipeline.modeling import byte_tokenizer
from pipeline.requests import ingest

from conftest import write_config

LONG = "The quick brown fox jumps over the lazy dog near the riverbank. "  # 63 bytes


def cfg_for(path, **kw) -> RequestsConfig:
    return RequestsConfig(path=str(path), **{"prefix_tokens": 20, "suffix_tokens": 20, **kw})


def run_ingest(cfg, tmp_path, max_len=400):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    counts = ingest(cfg, byte_tokenizer(), max_len, out)
    return counts, pd.read_parquet(out / "accepted.parquet"), pd.read_parquet(out / "rejected.parquet")


def test_bad_rows_rejected_with_distinct_reasons(tmp_path):
    rows = [b"id,text", b"a,", b"b,   ", b"c," + LONG.encode(), b"d," + LONG.encode(), b"e,too short",
            b"f," + LONG.encode()[:30] + b"\xff\xfe broken" + LONG.encode(), b"g," + (LONG * 2).encode()]
    path = tmp_path / "requests.csv"
    path.write_bytes(b"\n".join(rows) + b"\n")
    counts, accepted, rejected = run_ingest(cfg_for(path, id_column="id"), tmp_path)
    reasons = dict(zip(rejected["id"].fillna("?"), rejected["reason"]))
    assert counts["rows"] == 7 and counts["accepted"] + counts["rejected"] == 7
    assert list(accepted["id"]) == ["c", "g"]
    assert rejected.set_index("source_row")["reason"].to_dict() == {
        0: "empty", 1: "whitespace", 3: "duplicate", 4: "too_short", 5: "undecodable"}
    assert len(set(rejected["reason"])) == 5
    assert reasons["d"] == "duplicate"
    assert sorted(list(accepted["source_row"]) + list(rejected["source_row"])) == list(range(7))


def test_missing_text_column_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "requests.csv"
    path.write_text("id,body\n1,hello\n")
    cfg = write_config(tmp_path, f"model:\n  name: tiny-llama\nrequests:\n  path: {path}\n"
                                 f"storage:\n  runs_dir: {tmp_path}/runs\n")
    assert main(["ingest", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("icu: error: requests.text_column: column 'text' not found in requests.csv "
                   "(columns: id, body); fix: set requests.text_column to one of them")


def test_truncate_or_reject_long_rows(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"text": LONG * 3}) + "\n")
    counts, accepted, _ = run_ingest(cfg_for(path), tmp_path, max_len=100)
    assert counts["accepted"] == 1 and accepted["n_tokens"][0] == 100 and accepted["truncated"][0]
    assert accepted["text"][0] == (LONG * 3)[:100]
    counts, _, rejected = run_ingest(cfg_for(path, too_long="reject"), tmp_path, max_len=100)
    assert counts["accepted"] == 0 and list(rejected["reason"]) == ["too_long"]


def test_jsonl_bad_lines_and_ids(tmp_path):
    lines = [json.dumps({"text": LONG, "id": 1}).encode(), b"{not json", b'{"text": "\xc3\x28 x"}',
             json.dumps({"other": 1}).encode(), json.dumps({"text": 5}).encode(), json.dumps([1]).encode(),
             json.dumps({"text": LONG + "!", "id": 1}).encode(), json.dumps({"text": None}).encode()]
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    counts, accepted, rejected = run_ingest(cfg_for(path, id_column="id"), tmp_path)
    assert list(accepted["id"]) == ["1"]
    assert list(rejected["reason"]) == ["malformed_row", "undecodable", "missing_text", "not_text",
                                        "malformed_row", "duplicate_id", "empty"]
    assert counts["rows"] == 8


def test_content_hash_ids_and_normalised_duplicates(tmp_path):
    path = tmp_path / "r.parquet"
    pd.DataFrame({"text": [LONG, "  " + LONG.replace(" ", "   "), LONG + "x"]}).to_parquet(path)
    counts, accepted, rejected = run_ingest(cfg_for(path), tmp_path)
    assert counts == {"rows": 3, "accepted": 2, "rejected": 1, "reasons": {"duplicate": 1}}
    assert all(len(i) == 16 and i == h[:16] for i, h in zip(accepted["id"], accepted["content_hash"]))


def test_saved_dataset_folder(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"body": [LONG, LONG + "y"], "key": ["k1", "k2"]}).save_to_disk(str(folder))
    counts, accepted, _ = run_ingest(cfg_for(folder, text_column="body", id_column="key"), tmp_path)
    assert list(accepted["id"]) == ["k1", "k2"]
    assert accepted["input_ids"][0].tolist() == byte_tokenizer()(LONG, add_special_tokens=False)["input_ids"]


row_text = st.one_of(st.just(""), st.just("   "), st.text(max_size=80), st.just(LONG),
                     st.builds(lambda s: LONG + s, st.text(max_size=20)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(row_text, min_size=1, max_size=25), fmt=st.sampled_from(["csv", "jsonl"]),
       corrupt=st.sets(st.integers(0, 24)))
def test_property_accepted_plus_rejected_is_input(tmp_path_factory, texts, fmt, corrupt):
    tmp = tmp_path_factory.mktemp("prop")
    path = tmp / f"r.{fmt}"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["text"])
        for t in texts:
            writer.writerow([t.replace("\r", "")])
        data = buf.getvalue().encode("utf-8", "surrogatepass")
        records = data.split(b"\n")
    else:
        records = [json.dumps({"text": t}).encode() for t in texts]
    for i in sorted(corrupt):  # invalid UTF-8 inside some records
        if 0 < i < len(records) and records[i]:
            records[i] = records[i][:1] + b"\xff" + records[i][1:]
    path.write_bytes(b"\n".join(records) + b"\n")
    try:
        counts, accepted, rejected = run_ingest(cfg_for(path), tmp)
    except Exception as exc:  # an unreadable file must be a clean one-line UserError
        from pipeline.errors import UserError
        assert isinstance(exc, UserError), repr(exc)
        return
    assert counts["accepted"] + counts["rejected"] == counts["rows"]
    assert len(accepted) == counts["accepted"] and len(rejected) == counts["rejected"]
    rows = sorted(list(accepted["source_row"]) + list(rejected["source_row"]))
    assert rows == list(range(counts["rows"]))
    assert rejected["reason"].notna().all()


@pytest.mark.slow
def test_icu_forget_set_exp0_accepts_128_with_default_model(shared_data, default_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, f"""
model:
  name: default
requests:
  path: {shared_data}/icu_benchmark/forget_sets/exp0/lm_extraction_128_0.csv
  text_column: text
  id_column: doc_id
storage:
  runs_dir: {tmp_path}/runs
""")
    assert main(["ingest", str(cfg)]) == 0
    accepted = pd.read_parquet(tmp_path / "runs" / "run" / "requests" / "accepted.parquet")
    rejected = pd.read_parquet(tmp_path / "runs" / "run" / "requests" / "rejected.parquet")
    assert len(accepted) == 128 and len(rejected) == 0
    assert accepted["n_tokens"].between(100, 200).all()
    source = pd.read_csv(f"{shared_data}/icu_benchmark/forget_sets/exp0/lm_extraction_128_0.csv")
    assert set(accepted["id"]) == set(source["doc_id"].astype(str))
    log = (tmp_path / "runs" / "run" / "logs" / "driver.log").read_text()
    assert "128 accepted" in log
    assert not any(text[:40] in log for text in source["text"]), "request text must never be logged"
