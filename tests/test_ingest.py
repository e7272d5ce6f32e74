"""Ingest: every row is accepted or rejected with a reason; nothing is lost."""

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.config import RequestsConfig
from pipeline.modeling import byte_tokenizer
from pipeline.ingest import ingest
from pipeline.keys import keyed_hash

from conftest import write_config

LONG = "The quick brown fox jumps over the lazy dog near the riverbank. "  # 63 bytes


def cfg_for(path, **kw) -> RequestsConfig:
    return RequestsConfig(path=str(path), **{"prefix_tokens": 20, "suffix_tokens": 20, **kw})


KEY = b"k" * 32


def run_ingest(cfg, tmp_path, max_len=400):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    counts = ingest(cfg, byte_tokenizer(), max_len, out / "accepted.parquet", out / "rejected.parquet", KEY)
    return counts, pd.read_parquet(out / "accepted.parquet"), pd.read_parquet(out / "rejected.parquet")


def test_bad_rows_rejected_with_distinct_reasons(tmp_path):
    rows = [
        b"id,text",
        b"a,",
        b"b,   ",
        b"c," + LONG.encode(),
        b"d," + LONG.encode(),
        b"e,too short",
        b"f," + LONG.encode()[:30] + b"\xff\xfe broken" + LONG.encode(),
        b"g," + (LONG * 2).encode(),
    ]
    path = tmp_path / "requests.csv"
    path.write_bytes(b"\n".join(rows) + b"\n")
    counts, accepted, rejected = run_ingest(cfg_for(path, id_column="id"), tmp_path)
    reasons = dict(zip(rejected["id"].fillna("?"), rejected["reason"]))
    assert counts["rows"] == 7 and counts["accepted"] + counts["rejected"] == 7
    assert list(accepted["id"]) == ["c", "g"]
    assert rejected.set_index("source_row")["reason"].to_dict() == {
        0: "empty",
        1: "whitespace",
        3: "duplicate",
        4: "too_short",
        5: "undecodable",
    }
    assert len(set(rejected["reason"])) == 5
    assert reasons["d"] == "duplicate"
    assert sorted(list(accepted["source_row"]) + list(rejected["source_row"])) == list(range(7))


def test_missing_text_column_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "requests.csv"
    path.write_text("id,body\n1,hello\n")
    cfg = write_config(
        tmp_path, f"model:\n  name: tiny-llama\nrequests:\n  path: {path}\nstorage:\n  runs_dir: {tmp_path}/runs\n"
    )
    assert main(["ingest", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "icu: error: requests.text_column: no column named 'text' in requests.csv, whose header has 2 "
        "columns (their names are not shown: without a header row they would be a request's text); fix: "
        "set requests.text_column to the name of the column in the header row, or add a header row"
    )


def test_truncate_or_reject_long_rows(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"text": LONG * 3}) + "\n")
    counts, accepted, _ = run_ingest(cfg_for(path), tmp_path, max_len=100)
    assert counts["accepted"] == 1 and accepted["n_tokens"][0] == 100 and accepted["truncated"][0]
    assert accepted["text"][0] == (LONG * 3)[:100]
    counts, _, rejected = run_ingest(cfg_for(path, too_long="reject"), tmp_path, max_len=100)
    assert counts["accepted"] == 0 and list(rejected["reason"]) == ["too_long"]


def test_jsonl_bad_lines_and_ids(tmp_path):
    lines = [
        json.dumps({"text": LONG, "id": 1}).encode(),
        b"{not json",
        b'{"text": "\xc3\x28 x"}',
        json.dumps({"other": 1}).encode(),
        json.dumps({"text": 5}).encode(),
        json.dumps([1]).encode(),
        json.dumps({"text": LONG + "!", "id": 1}).encode(),
        json.dumps({"text": None}).encode(),
    ]
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    counts, accepted, rejected = run_ingest(cfg_for(path, id_column="id"), tmp_path)
    assert list(accepted["id"]) == ["1"]
    assert list(rejected["reason"]) == [
        "malformed_row",
        "undecodable",
        "missing_text",
        "not_text",
        "malformed_row",
        "duplicate_id",
        "empty",
    ]
    assert counts["rows"] == 8


def test_content_hash_ids_and_normalised_duplicates(tmp_path):
    path = tmp_path / "r.parquet"
    pd.DataFrame({"text": [LONG, "  " + LONG.replace(" ", "   "), LONG + "x"]}).to_parquet(path)
    counts, accepted, rejected = run_ingest(cfg_for(path), tmp_path)
    assert counts == {"rows": 3, "accepted": 2, "rejected": 1, "reasons": {"duplicate": 1}}
    assert all(len(i) == 16 and i == h[:16] for i, h in zip(accepted["id"], accepted["content_hash"]))
    # keyed: the plain sha256 of the record (what anyone holding it could compute) appears nowhere
    plain = hashlib.sha256(LONG.strip().encode()).hexdigest()
    assert accepted["content_hash"][0] == keyed_hash(KEY, LONG) != plain
    assert accepted["content_hash"][0] != keyed_hash(b"other" * 8, LONG)


def test_saved_dataset_folder(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"body": [LONG, LONG + "y"], "key": ["k1", "k2"]}).save_to_disk(str(folder))
    counts, accepted, _ = run_ingest(cfg_for(folder, text_column="body", id_column="key"), tmp_path)
    assert list(accepted["id"]) == ["k1", "k2"]
    assert accepted["input_ids"][0].tolist() == byte_tokenizer()(LONG, add_special_tokens=False)["input_ids"]


row_text = st.one_of(
    st.just(""),
    st.just("   "),
    st.text(max_size=80),
    st.just(LONG),
    st.builds(lambda s: LONG + s, st.text(max_size=20)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(row_text, min_size=1, max_size=25),
    fmt=st.sampled_from(["csv", "jsonl"]),
    corrupt=st.sets(st.integers(0, 24)),
)
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
    cfg = write_config(
        tmp_path,
        f"""
model:
  name: default
requests:
  path: {shared_data}/icu_benchmark/forget_sets/exp0/lm_extraction_128_0.csv
  text_column: text
  id_column: doc_id
storage:
  runs_dir: {tmp_path}/runs
""",
    )
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


PLANTED = [
    "Request 0: John Doe0 lives at 0 Main Street, born 1980-01-01, phone 555-0000",
    "Request 1: Jane Roe1 lives at 1 Elm Street, born 1981-02-02, phone 555-0101",
]


def _files_holding(root: Path, texts: list[str]) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and any(t.encode() in p.read_bytes() for t in texts)]


def test_request_text_stays_out_of_errors_manifest_logs_and_caches(tmp_path, capfd):
    """A CSV without a header row makes its first request the header: the error names columns
    by count only. Nothing else the run writes (manifest, status, logs) or caches (the
    datasets cache, for a parquet file) holds request text."""
    runs = tmp_path / "runs"
    headerless = tmp_path / "noheader.csv"
    headerless.write_text("".join(f"n{i},{t}\n" for i, t in enumerate(PLANTED)))
    cfg = write_config(
        tmp_path,
        f"model: {{name: tiny-llama}}\nrequests: {{path: {headerless}}}\n"
        f"storage: {{runs_dir: {runs}, name: noheader}}\n",
    )
    assert main(["ingest", str(cfg)]) == 2
    assert main(["status", str(runs / "noheader")]) == 0
    parquet = tmp_path / "requests.parquet"
    pd.DataFrame({"id": ["a", "b"], "text": [t * 3 for t in PLANTED]}).to_parquet(parquet)
    cache = Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache" / "huggingface" / "datasets"))
    before = set(cache.rglob("*")) if cache.exists() else set()
    for name, extra in (("parquet", ""), ("badcolumn", ", text_column: body")):
        cfg = write_config(
            tmp_path,
            f"model: {{name: tiny-llama}}\nrequests: {{path: {parquet}, id_column: id"
            f"{extra}}}\nstorage: {{runs_dir: {runs}, name: {name}}}\n",
        )
        assert main(["ingest", str(cfg)]) == (0 if name == "parquet" else 2)
    out = capfd.readouterr()
    assert not any(t[:20] in out.out + out.err for t in PLANTED), out.err
    assert "noheader.csv, whose header has 4 columns" in out.err
    for run in ("noheader", "badcolumn"):
        assert not _files_holding(runs / run, PLANTED)
    assert [p.name for p in _files_holding(runs / "parquet", PLANTED)] == ["accepted.parquet"]
    added = (set(cache.rglob("*")) if cache.exists() else set()) - before
    assert not [p for p in added if p.is_file() and any(t.encode() in p.read_bytes() for t in PLANTED)]


def test_every_input_row_keeps_its_id_and_a_receipt_row(tmp_path):
    """One receipt row per input row, in input order, with the user's id whenever the row had one
    (rejected rows too), the content hash when the text decoded, and formula-like ids escaped."""
    from pipeline import export
    from pipeline.store import RunStore

    text = LONG * 2
    lines = [
        json.dumps(o)
        for o in (
            {"id": "ok", "text": text},
            {"id": '=HYPERLINK("http://x")', "text": text + "b"},
            {"id": "e", "text": ""},
            {"id": "w", "text": "   "},
            {"id": "n", "text": 5},
            {"id": "m"},
            {"id": "", "text": text + "c"},
            {"id": ["l", 1], "text": text + "d"},
            {"id": False, "text": text + "e"},
            {"id": "nl\nid", "text": text + "f"},
            {"id": 7, "text": text + "g"},
            {"id": " x ", "text": text + "h"},
            {"id": "x", "text": text + "i"},
            {"id": "s", "text": "short"},
            {"id": "dup", "text": text},
            {"id": "ok", "text": text + "j"},
        )
    ]
    lines.insert(3, "{not json")
    lines.insert(5, "[1, 2]")
    path = tmp_path / "mixed.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n" + b'{"id": "u", "text": "\xff\xfe"}\n')
    store = RunStore(tmp_path / "run")
    counts = ingest(
        cfg_for(path, id_column="id"),
        byte_tokenizer(),
        400,
        store.artefact("accepted"),
        store.artefact("rejected"),
        KEY,
    )
    accepted, rejected = pd.read_parquet(store.artefact("accepted")), pd.read_parquet(store.artefact("rejected"))
    assert counts["rows"] == len(lines) + 1 == len(accepted) + len(rejected)
    assert set(rejected["reason"]) == {
        "empty",
        "whitespace",
        "not_text",
        "missing_text",
        "missing_id",
        "bad_id",
        "malformed_row",
        "too_short",
        "duplicate",
        "duplicate_id",
        "undecodable",
    }
    assert sorted(accepted["id"]) == sorted(["ok", '=HYPERLINK("http://x")', "7", " x ", "x"])
    given = {r.source_row: r.id for r in rejected.itertuples()}
    assert given[2] == "e" and given[4] == "w" and given[6] == "n" and given[7] == "m" and given[9] == '["l", 1]'
    assert given[10] == "false" and given[11] == "nl\nid" and given[17] == "ok" and given[18] == "u"
    assert all(pd.isna(given[k]) for k in (3, 5, 8))  # no id in the row (or no parsable row)
    assert rejected.set_index("source_row").loc[[2, 4, 16], "content_hash"].notna().all()
    history = pd.DataFrame(
        {
            "epoch": 0,
            "request_id": accepted["id"],
            "bleu": 0.0,
            "bertscore": 0.0,
            "ma": 0.1,
            "el": 0.0,
            "forgotten": True,
        }
    )
    history.to_parquet(store.artefact("history"))
    store.artefact("unlearn_result").write_text(
        json.dumps({"thresholds": {"ma": 0.5, "el": 0.1}, "stop_reason": "all_forgotten", "epochs": 0})
    )
    rows = export.receipt_rows(SimpleNamespace(requests=cfg_for(path)), store)
    assert [r["source_row"] for r in rows] == list(range(counts["rows"]))
    export.write_receipt(rows, tmp_path / "out", "key-id")
    receipt = pd.read_csv(tmp_path / "out" / "receipt.csv", keep_default_na=False)
    assert len(receipt) == counts["rows"]
    assert receipt.loc[1, "request_id"] == '\'=HYPERLINK("http://x")' and receipt.loc[1, "status"] == "forgotten"
    assert json.loads((tmp_path / "out" / "receipt.json").read_text())["requests"][1]["request_id"].startswith("=")


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_a_byte_order_mark_changes_nothing(tmp_path, fmt):
    """Excel's "CSV UTF-8" and some editors start files with a BOM; they ingest like their twins."""
    rows = [{"id": f"r{i}", "text": LONG + str(i)} for i in range(3)]
    if fmt == "csv":
        body = "id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in rows)
    elif fmt == "jsonl":
        body = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        body = json.dumps(rows)
    results = []
    for name, data in (("plain", body.encode()), ("bom", b"\xef\xbb\xbf" + body.encode())):
        path = tmp_path / f"{name}.{fmt}"
        path.write_bytes(data)
        (tmp_path / name).mkdir()
        counts, accepted, rejected = run_ingest(cfg_for(path, id_column="id"), tmp_path / name)
        results.append((counts, accepted, len(rejected)))
    (plain, plain_rows, _), (bom, bom_rows, _) = results
    assert plain == bom and plain["accepted"] == 3
    pd.testing.assert_frame_equal(plain_rows, bom_rows)


def test_an_unterminated_quote_is_refused_in_one_line(tmp_path, capsys):
    """An open quote would swallow the records after it (5 records read as 4): refused, naming the line."""
    records = [f"r{i},Request {i}: {LONG}" for i in range(5)]
    records[1] = 'r1,"Request 1: ' + LONG
    path = tmp_path / "quote.csv"
    path.write_text("id,text\n" + "\n".join(records) + "\n")
    cfg = write_config(
        tmp_path,
        f"model: {{name: tiny-llama}}\nrequests: {{path: {path}, id_column: id, "
        f"prefix_tokens: 8, suffix_tokens: 8}}\nstorage: {{runs_dir: {tmp_path}/runs}}\n",
    )
    assert main(["ingest", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("icu: error: requests.path: quote.csv line") and "quote" in err[0]
    assert "Request" not in err[0]
