"""The ingest stage: every erasure request row ends in `accepted` or `rejected` (parquet).

Rows are streamed (bounded memory for any request count). csv and jsonl are parsed
row by row with the standard library, because Arrow-based readers abort a whole file
on one undecodable byte and we must reject that row alone; parquet files are streamed
with pyarrow and saved datasets memory-mapped, so no copy of the requests lands in a
cache outside the run directory. A leading BOM is skipped; a CSV quote that is never
closed is refused (it would merge records). Request text is never logged or put in an
error message: logs carry counts, ids and content hashes; a missing column is reported
by the header's size, never its values (a file without a header row would show a request).
A content hash is keyed with the operator's receipt key (`pipeline.keys`), and so is an id
derived from it: the receipt that ships with the hand-off confirms nobody's request to anyone
without the key.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import keys, ledger, modeling
from pipeline.atomic import atomic_path, atomic_write_json, file_digest
from pipeline.config import Config, RequestsConfig
from pipeline.errors import UserError
from pipeline.store import RunStore, fingerprint

log = logging.getLogger("icu.ingest")
OUTPUTS = ("accepted", "rejected", "chain")

ACCEPTED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("content_hash", pa.string()),
        ("source_row", pa.int64()),
        ("text", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("erased_in", pa.int32()),  # a request erased by an earlier run: its ledger entry (null: this run's)
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("source_row", pa.int64()),
        ("id", pa.string()),
        ("content_hash", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
REASONS = {
    "undecodable": "the row is not valid UTF-8",
    "malformed_row": "the row could not be parsed (wrong field count or invalid JSON)",
    "missing_text": "the row has no text field",
    "not_text": "the text field is not a string",
    "empty": "the text is empty",
    "whitespace": "the text is only whitespace",
    "missing_id": "the id field is empty",
    "bad_id": "the id is not a string or an integer, or holds control characters",
    "too_short": "fewer tokens than prefix_tokens + suffix_tokens",
    "too_long": "more tokens than allowed (requests.too_long: reject)",
    "duplicate": "same text (after normalisation) as an earlier accepted row",
    "duplicate_id": "same id as an earlier accepted row",
    "already_erased": "same text as a request an earlier run erased (ledger.path): it is checked again anyway",
}
csv.field_size_limit(sys.maxsize)
BOM = b"\xef\xbb\xbf"  # what Excel's "CSV UTF-8" and some editors put first
_UNDECODABLE = object()


@dataclass
class RawRow:
    """One input row before validation; `problem` is a reason key when parsing failed."""

    row: int
    text: object = None
    id: object = None
    problem: str | None = None
    detail: str = ""


def read_rows(cfg: RequestsConfig) -> Iterator[RawRow]:
    """Stream the request file's rows in order, numbering them from 0."""
    path, fmt = Path(cfg.path), detect_format(cfg)
    reader = {
        "csv": _read_csv,
        "jsonl": _read_jsonl,
        "json": _read_json,
        "parquet": _read_parquet,
        "dataset": _read_dataset,
    }[fmt]
    rows = reader(path, cfg)
    for row in rows:
        if cfg.limit is not None and row.row >= cfg.limit:
            return
        yield row


def detect_format(cfg: RequestsConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    path = Path(cfg.path)
    if path.is_dir():
        return "dataset"
    suffix = path.suffix.lower()
    formats = {
        ".csv": "csv",
        ".tsv": "csv",
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
        ".json": "json",
        ".parquet": "parquet",
        ".pq": "parquet",
    }
    if suffix not in formats:
        raise UserError(
            f"requests.format: cannot tell the format of {path.name} from its suffix; fix: set "
            "requests.format to jsonl, json, csv, parquet or dataset"
        )
    return formats[suffix]


def _read_csv(path: Path, cfg: RequestsConfig) -> Iterator[RawRow]:
    """Strict CSV (a BOM is skipped): an unterminated quote would silently merge records,
    so the reader's complaint about one is a one-line error naming the line."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise UserError(f"requests.path: {path} is empty; fix: provide a CSV with a header row")
            text_at = _column_index(header, cfg.text_column, "requests.text_column", path)
            id_at = _column_index(header, cfg.id_column, "requests.id_column", path) if cfg.id_column else None
            index = 0
            for fields in reader:
                if not fields:
                    continue  # a blank line is not a row in CSV
                user_id = fields[id_at] if id_at is not None and id_at < len(fields) else None
                if len(fields) != len(header):
                    yield RawRow(
                        index,
                        id=user_id,
                        problem="malformed_row",
                        detail=f"{len(fields)} fields, header has {len(header)}",
                    )
                else:
                    yield _decoded(RawRow(index, fields[text_at], user_id))
                index += 1
        except csv.Error as exc:
            raise UserError(
                f"requests.path: {path.name} line {reader.line_num}: {exc} (a quote that is never "
                "closed swallows the records after it); fix: close the quote, or write a quote "
                'inside a quoted field as ""'
            ) from None


def _read_jsonl(path: Path, cfg: RequestsConfig) -> Iterator[RawRow]:
    seen_text_key = False
    index = -1
    with open(path, "rb") as fh:
        for index, line in enumerate(raw for raw in fh if raw.strip()):
            if index == 0:
                line = line.removeprefix(BOM)
            try:  # bad bytes become surrogates, so the id of a row with undecodable text survives
                obj = json.loads(line.decode("utf-8", errors="surrogateescape"))
            except json.JSONDecodeError as exc:
                yield RawRow(index, problem="malformed_row", detail=f"invalid JSON: {exc.msg}")
                continue
            seen_text_key |= isinstance(obj, dict) and cfg.text_column in obj
            yield _from_object(index, obj, cfg)
    if index >= 0 and not seen_text_key:
        raise UserError(
            f"requests.text_column: no row of {path} has a '{cfg.text_column}' field; fix: set "
            "requests.text_column to the field that holds the text"
        )


def _read_json(path: Path, cfg: RequestsConfig) -> Iterator[RawRow]:
    """A .json file: a JSON array of objects, or JSON lines."""
    with open(path, "rb") as fh:
        head = fh.read(4096).removeprefix(BOM).lstrip()
    if not head.startswith(b"["):
        yield from _read_jsonl(path, cfg)
        return
    try:
        items = json.loads(path.read_bytes().removeprefix(BOM).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f"line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "its bytes"
        raise UserError(
            f"requests.path: {path} is not a valid JSON array ({where}); fix: repair it or use "
            "JSON lines, where one bad row is rejected on its own"
        ) from None
    if items and not any(isinstance(o, dict) and cfg.text_column in o for o in items):
        raise UserError(
            f"requests.text_column: no object in {path} has a '{cfg.text_column}' field; fix: set requests.text_column"
        )
    for index, obj in enumerate(items):
        yield _from_object(index, obj, cfg)


def _read_parquet(path: Path, cfg: RequestsConfig) -> Iterator[RawRow]:
    """Streamed with pyarrow: no copy of the requests lands in a cache outside the run."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise UserError(
            f"requests.path: cannot read {path} as parquet ({type(exc).__name__}); fix: provide a parquet file"
        ) from None
    yield from _columns(
        path, cfg, parquet.schema_arrow.names, lambda columns: parquet.iter_batches(batch_size=1024, columns=columns)
    )


def _read_dataset(path: Path, cfg: RequestsConfig) -> Iterator[RawRow]:
    """A folder written by `Dataset.save_to_disk`: its Arrow files are memory-mapped, not copied."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError, pa.ArrowInvalid) as exc:
        raise UserError(
            f"requests.path: cannot read {path} ({type(exc).__name__}); fix: provide a folder "
            "written by Dataset.save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"requests.path: {path} holds {len(ds)} splits; fix: point it at one split's folder")
    yield from _columns(path, cfg, ds.column_names, lambda columns: ds.data.table.select(columns).to_batches(1024))


def _columns(path: Path, cfg: RequestsConfig, names: list[str], batches) -> Iterator[RawRow]:
    _column_index(names, cfg.text_column, "requests.text_column", path)
    if cfg.id_column:
        _column_index(names, cfg.id_column, "requests.id_column", path)
    columns = [cfg.text_column] + ([cfg.id_column] if cfg.id_column else [])
    index = 0
    for batch in batches(columns):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if cfg.id_column else [None] * len(texts)
        for text, user_id in zip(texts, ids):
            yield _decoded(RawRow(index, text, user_id))
            index += 1


def _from_object(index: int, obj: object, cfg: RequestsConfig) -> RawRow:
    if not isinstance(obj, dict):
        return RawRow(index, problem="malformed_row", detail="not a JSON object")
    user_id = obj.get(cfg.id_column) if cfg.id_column else None
    if cfg.text_column not in obj:
        return RawRow(index, id=user_id, problem="missing_text")
    return _decoded(RawRow(index, obj[cfg.text_column], user_id))


def _decoded(row: RawRow) -> RawRow:
    """Flag bytes that are not UTF-8 (surrogate escapes, raw bytes, lone surrogates); an id
    that decodes is kept even when the text does not."""
    values = []
    for value in (row.text, row.id):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                value = _UNDECODABLE
        elif isinstance(value, str) and _has_surrogates(value):
            value = _UNDECODABLE
        values.append(value)
    text, user_id = values
    if user_id is _UNDECODABLE:
        return RawRow(row.row, problem="undecodable", detail="the id is not valid UTF-8")
    if text is _UNDECODABLE:
        return RawRow(row.row, id=user_id, problem="undecodable")
    return RawRow(row.row, text, user_id, row.problem, row.detail)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _column_index(columns: list[str], name: str, key: str, path: Path) -> int:
    """Where column `name` is; else one line that never shows the header's values (a file
    without a header row would show its first request)."""
    if name not in columns:
        raise UserError(
            f"{key}: no column named '{name}' in {path.name}, whose header has {len(columns)} columns "
            "(their names are not shown: without a header row they would be a request's text); fix: "
            f"set {key} to the name of the column in the header row, or add a header row"
        )
    return list(columns).index(name)


class Ingestor:
    """Validates rows in order and routes each to accepted or rejected (see REASONS)."""

    def __init__(self, cfg: RequestsConfig, tokenizer, max_len: int, key: bytes, earlier: list[dict] = ()):
        self.cfg, self.tok, self.max_len, self.key = cfg, tokenizer, max_len, key
        self.min_len = cfg.prefix_tokens + cfg.suffix_tokens
        self.seen_hashes: dict[str, str] = {}
        self.seen_ids: set[str] = set()
        self.earlier = {r["content_hash"]: r for r in earlier}  # requests erased by earlier runs
        self.earlier_ids = {r["id"] for r in earlier}

    def check(self, row: RawRow) -> tuple[dict | None, dict | None]:
        """(accepted record, None) or (None, rejected record). A rejected record keeps the
        user's id as given and the content hash whenever the text decoded."""
        given, id_problem = user_id(row.id)
        text = row.text
        digest = keys.keyed_hash(self.key, text) if isinstance(text, str) else None
        if row.problem:
            return None, self._reject(row, given, row.problem, row.detail, digest)
        if text is None or text == "":
            return None, self._reject(row, given, "empty", digest=digest)
        if not isinstance(text, str):
            return None, self._reject(row, given, "not_text", type(text).__name__)
        if not text.strip():
            return None, self._reject(row, given, "whitespace", digest=digest)
        if id_problem:
            return None, self._reject(row, given, id_problem, digest=digest)
        if self.cfg.id_column and given is None:
            return None, self._reject(row, None, "missing_id", digest=digest)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        truncated = False
        if len(ids) > self.max_len:
            if self.cfg.too_long == "reject":
                return None, self._reject(row, given, "too_long", f"{len(ids)} > {self.max_len} tokens", digest)
            ids, truncated = ids[: self.max_len], True
            text = self.tok.decode(ids)
            digest = keys.keyed_hash(self.key, text)
        if len(ids) < self.min_len:
            return None, self._reject(row, given, "too_short", f"{len(ids)} < {self.min_len} tokens", digest)
        if digest in self.seen_hashes:
            return None, self._reject(row, given, "duplicate", f"same as {self.seen_hashes[digest]}", digest)
        if digest in self.earlier:
            then = f"as {self.earlier[digest]['id']}, ledger entry {self.earlier[digest]['erased_in']}"
            return None, self._reject(row, given, "already_erased", then, digest)
        request_id = given or digest[:16]
        if request_id in self.seen_ids:
            return None, self._reject(row, given, "duplicate_id", "", digest)
        if request_id in self.earlier_ids:
            return None, self._reject(row, given, "duplicate_id", "a request an earlier run erased has this id", digest)
        self.seen_hashes[digest] = request_id
        self.seen_ids.add(request_id)
        return dict(
            id=request_id,
            content_hash=digest,
            source_row=row.row,
            text=text,
            input_ids=ids,
            n_tokens=len(ids),
            truncated=truncated,
            erased_in=None,
        ), None

    @staticmethod
    def _reject(row: RawRow, given: str | None, reason: str, detail: str = "", digest: str | None = None) -> dict:
        return dict(source_row=row.row, id=given, content_hash=digest, reason=reason, detail=detail)


def user_id(value: object) -> tuple[str | None, str | None]:
    """(the id as given, as a string, or None; a rejection reason or None).

    Strings are kept exactly (no stripping: " x " is not "x"); integers are written in
    decimal; anything else (a float, a bool, a list) is given back as JSON and rejected,
    as are ids holding control characters (a newline would split a receipt line).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    if isinstance(value, str):
        bad = any(unicodedata.category(ch) == "Cc" for ch in value)
        return value, "bad_id" if bad else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    return json.dumps(value, default=str), "bad_id"


def key(cfg: Config, store: RunStore) -> str:
    """The request file's content, how it is read and cut, the tokenizer's model (its weights'
    signature: every later key includes this one, so all of them follow the model) and which
    receipt key hashes the requests."""
    return fingerprint(
        "ingest",
        cfg.part("requests", "model", "ledger"),
        ledger.Ledger.open(cfg.ledger.path).before(cfg.run_dir).head if cfg.ledger.path else None,
        ledger.pinned_inputs(cfg, "") if cfg.ledger.path else None,
        cfg.max_tokens,
        modeling.weights_signature(cfg.model_dir),
        file_digest(cfg.requests.path),
        keys.key_id(keys.receipt_key(store.root)),
    )


def run(cfg: Config, store: RunStore) -> dict:
    """`accepted` and `rejected`; with a ledger, every request earlier runs erased is accepted too (it is
    checked and audited again) and `chain` records where the run starts (`ledger.start`)."""
    tokenizer = modeling.load_tokenizer(cfg.model_dir, cfg.model.trust_remote_code)
    key = keys.receipt_key(store.root)
    chain, earlier = ledger.start(cfg, keys.key_id(key)) if cfg.ledger.path else ({}, [])
    counts = ingest(
        cfg.requests,
        tokenizer,
        cfg.max_tokens,
        store.artefact("accepted"),
        store.artefact("rejected"),
        key,
        earlier=[dict(r, text=tokenizer.decode(r["input_ids"])) for r in earlier],
    )
    atomic_write_json(store.artefact("chain"), chain)
    if chain and earlier:
        log.info(
            "ingest: chained to ledger entry %d; %d requests erased by earlier runs are checked again",
            chain["entries"] - 1,
            len(earlier),
        )
    elif chain:
        log.info("ingest: the first run of ledger %s", cfg.ledger.path)
    reasons = ", ".join(f"{k}={v}" for k, v in counts["reasons"].items()) or "none"
    log.info(
        "ingest: %d rows read, %d accepted, %d rejected (%s)",
        counts["rows"],
        counts["accepted"],
        counts["rejected"],
        reasons,
    )
    return counts


def ingest(
    cfg: RequestsConfig,
    tokenizer,
    max_len: int,
    accepted_path: Path,
    rejected_path: Path,
    key: bytes,
    chunk: int = 1000,
    earlier: list[dict] = (),
) -> dict:
    """Validate every row of the request file; write accepted/rejected parquet atomically. `earlier`:
    requests earlier runs erased (with their `text`), accepted after the file's rows.

    Returns counts: {"rows", "accepted", "rejected", "reasons": {reason: n}} (and "earlier": n).
    """
    from tqdm import tqdm

    ingestor = Ingestor(cfg, tokenizer, max_len, key, earlier)
    reasons: Counter = Counter()
    counts = Counter()
    with (
        atomic_path(accepted_path) as acc_path,
        atomic_path(rejected_path) as rej_path,
        pq.ParquetWriter(acc_path, ACCEPTED_SCHEMA) as acc_writer,
        pq.ParquetWriter(rej_path, REJECTED_SCHEMA) as rej_writer,
    ):
        accepted, rejected = [], []
        for row in tqdm(read_rows(cfg), desc="ingest", unit="row", mininterval=2, disable=None):
            good, bad = ingestor.check(row)
            counts["rows"] += 1
            if good:
                accepted.append(good)
            else:
                rejected.append(bad)
                reasons[bad["reason"]] += 1
            if len(accepted) >= chunk:
                _flush(acc_writer, ACCEPTED_SCHEMA, accepted)
            if len(rejected) >= chunk:
                _flush(rej_writer, REJECTED_SCHEMA, rejected)
        counts["accepted"] = ingestor_count = len(ingestor.seen_ids)
        accepted += [_carried(r) for r in earlier]
        _flush(acc_writer, ACCEPTED_SCHEMA, accepted)
        _flush(rej_writer, REJECTED_SCHEMA, rejected)
    counts["rejected"] = counts["rows"] - ingestor_count
    if counts["rows"] == 0:
        raise UserError(f"requests.path: {cfg.path} has no rows; fix: provide at least one erasure request")
    return {
        "rows": counts["rows"],
        "accepted": counts["accepted"],
        "rejected": counts["rejected"],
        "reasons": dict(sorted(reasons.items())),
        **({"earlier": len(earlier)} if earlier else {}),
    }


def _carried(request: dict) -> dict:
    """An accepted row for a request an earlier run erased (no row of this run's file)."""
    ids = list(request["input_ids"])
    return dict(
        id=request["id"],
        content_hash=request["content_hash"],
        source_row=None,
        text=request["text"],
        input_ids=ids,
        n_tokens=len(ids),
        truncated=False,
        erased_in=request["erased_in"],
    )


def _flush(writer: pq.ParquetWriter, schema: pa.Schema, records: list[dict]) -> None:
    if records:
        writer.write_table(pa.Table.from_pylist(records, schema=schema))
        records.clear()
